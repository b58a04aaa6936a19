"""``GET /v1/models`` is serialised once per fleet change, and still tells every change (issue 18 point 4).

No timing here: the tests count how often the gateway built the list (``Servers.catalogue.builds``) while
polls that change nothing go on, and check that each kind of change the list shows (a load, a pin, a node
reporting a kind, a reload changing aliases, a node dropping a model) reaches the very next answer.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cortex.config import ModelSettings
from cortex.engine import commands as cmd
from cortex.engine.reload import Reloader
from cortex.proxy.catalogue import Catalogue
from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec

ANTHROPIC = {"anthropic-version": "2023-06-01"}


def catalogue(f: Fleet) -> Catalogue:
    assert f.servers.catalogue is not None
    return f.servers.catalogue


async def models(f: Fleet, headers: dict[str, str] | None = None, query: str = "") -> tuple[int, Any, Any]:
    async with f.http.get(f.url + "/v1/models" + query, headers=headers or {}) as resp:
        raw = await resp.read()
        return resp.status, raw, resp.headers


async def entry(f: Fleet, model: str) -> dict[str, Any]:
    status, raw, _ = await models(f)
    assert status == 200
    return next(e for e in json.loads(raw)["data"] if e["id"] == model)


async def polls(f: Fleet, n: int = 2) -> None:
    """Wait until every node was polled ``n`` more times."""
    for _ in range(n):
        since = time.time()
        await f.wait_for(lambda s=since: all(rec.last_poll > s for rec in f.engine.fleet.nodes.values()), what="a poll")


async def two_nodes(fleet: FleetFactory) -> Fleet:
    """Two nodes; returns once the kinds node ``b`` reports are known (learning them is a change)."""
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("cold", 1000, loaded=False)]),
        NodeSpec("b", [SimModel("m1", 1000), SimModel("m2", 1000)], sim={"kinds": {"m2": "text"}}),
        models=[ModelSettings(id="m1", aliases=["first"])],
    )
    await f.wait_for(lambda: f.engine.kinds.of("m2") == "text", what="the kinds")
    return f


async def test_polls_that_change_nothing_do_not_rebuild_the_list(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    status, first, _ = await models(f)
    assert status == 200
    builds = catalogue(f).builds
    await polls(f, 3)
    for _ in range(5):
        status, again, _ = await models(f)
        assert status == 200
        assert again == first
    assert catalogue(f).builds == builds
    # The Anthropic shape comes from the same build.
    status, _, _ = await models(f, ANTHROPIC)
    assert status == 200
    assert catalogue(f).builds == builds


async def test_a_load_shows_in_the_next_answer_and_rebuilds_once(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    assert (await entry(f, "cold"))["cortex"]["state"] == "unloaded"
    builds = catalogue(f).builds
    result = await f.engine.submit(cmd.LoadModel("cold", "a"))
    assert result.ok, result.message
    cold = await entry(f, "cold")
    assert cold["cortex"]["state"] == "loaded"
    assert cold["cortex"]["nodes"] == ["a"]
    after = catalogue(f).builds
    assert after > builds
    await polls(f, 2)
    await entry(f, "cold")
    assert catalogue(f).builds == after  # the polls after the load found nothing new


async def test_pin_kind_reload_and_dropped_model_all_show(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    assert (await entry(f, "m2"))["kind"] == "text"
    assert (await entry(f, "m2"))["cortex"]["pinned"] is False
    f.engine.fleet.set_pin("b", "m2", True)
    assert (await entry(f, "m2"))["cortex"]["pinned"] is True

    assert (await entry(f, "m1"))["cortex"]["aliases"] == ["first"]
    reloader = Reloader(f.engine, lambda: f.settings)
    report = reloader.apply(f.settings.model_copy(update={"models": [ModelSettings(id="m1", aliases=["renamed"])]}))
    assert report.ok, report.message
    assert (await entry(f, "m1"))["cortex"]["aliases"] == ["renamed"]

    # The node stops listing m2 (as if its config changed and it restarted): the next poll drops it.
    f.sim("b").models.slots.pop("m2")
    await polls(f, 2)
    status, raw, _ = await models(f)
    assert status == 200
    assert b'"m2"' not in raw
    assert "m2" not in catalogue(f).served()


async def test_etag_answers_304_until_the_list_changes(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    status, body, headers = await models(f)
    tag = headers["ETag"]
    assert status == 200
    assert tag.startswith('"')
    status, body304, headers304 = await models(f, {"If-None-Match": tag})
    assert status == 304
    assert body304 == b""
    assert headers304["ETag"] == tag
    status, _, _ = await models(f, {"If-None-Match": '"something-else"'})
    assert status == 200
    # The Anthropic page has its own tag.
    status, page, aheaders = await models(f, ANTHROPIC)
    assert status == 200
    assert aheaders["ETag"] != tag
    assert b'"type":"model"' in page
    f.engine.fleet.set_pin("a", "m1", True)
    status, changed, headers = await models(f, {"If-None-Match": tag})
    assert status == 200
    assert headers["ETag"] != tag
    assert changed != body


async def test_2048_entries_page_in_both_dialects_from_one_build(fleet: FleetFactory) -> None:
    nodes = [
        NodeSpec(f"n{i}", [SimModel(f"org{i}/model-{j:03d}", 100, loaded=j < 2) for j in range(256)], vram_mb=65536)
        for i in range(8)
    ]
    f = await fleet(*nodes, poll={"interval_s": 0.3})
    status, raw, _ = await models(f)
    assert status == 200
    data = json.loads(raw)["data"]
    assert len(data) == 2048
    assert len({e["id"] for e in data}) == 2048
    builds = catalogue(f).builds
    seen: list[str] = []
    after = ""
    while True:
        status, raw, _ = await models(f, ANTHROPIC, f"?limit=1000{after}")
        assert status == 200
        page = json.loads(raw)
        seen += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        after = f"&after_id={page['last_id']}"
    assert seen == sorted(e["id"] for e in data)
    status, raw, _ = await models(f, ANTHROPIC, "?limit=5000")
    assert status == 400
    assert b"limit" in raw
    await polls(f, 1)
    await models(f)
    assert catalogue(f).builds == builds
