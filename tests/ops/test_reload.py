"""Config reload on a live gateway: nodes come and go, keys change, a bad file changes nothing (issue 16 §1).

Each test runs the real engine and gateway over simulated nodes, writes ``cortex.toml`` files to
``tmp_path`` and reloads through ``POST /admin/reload`` (what ``cortex reload`` calls), while a stream is
in flight: the stream must finish whole whatever the reload did.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from cortex.config import load_settings
from cortex.engine.events import ConfigReloaded, Event
from cortex.engine.reload import Reloader, watch_file
from cortex.sim import SimModel, SimNode
from tests.conftest import Fleet, FleetFactory, NodeSpec

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def toml(nodes: list[tuple[str, str, list[str]]], extra: str = "", *, keys: list[str] | None = None) -> str:
    """A config like the fleet fixture's (so only what a test changes differs), with these nodes."""
    out = [
        "[gateway]",
        'listen = "127.0.0.1:0"',
        'metrics_listen = ""',
        "drain_s = 2.0",
        f"api_keys = {keys or []!r}".replace("'", '"'),
        "[poll]",
        "interval_s = 0.1",
        "timeout_s = 1.0",
        extra,
    ]
    for name, url, pinned in nodes:
        out += ["[[nodes]]", f'name = "{name}"', f'endpoint = "{url}"', "vram_mb = 8192", f"pinned = {pinned!r}"]
    return "\n".join(out).replace("'", '"') + "\n"


def reloader(f: Fleet, path: Path) -> Reloader:
    f.engine.reloader = Reloader(f.engine, lambda: load_settings(path), source=str(path))
    return f.engine.reloader


async def reload(f: Fleet) -> tuple[int, dict[str, Any]]:
    async with f.http.post(f.url + "/admin/reload", json={}) as resp:
        return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def sim(*models: SimModel, name: str) -> AsyncIterator[SimNode]:
    node = SimNode(list(models), name=name, vram_mb=8192, load_s=0.05)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


class Stream:
    """An OpenAI SDK stream read in the background, to check it arrives whole after a reload."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, max_tokens: int) -> None:
        self.started = asyncio.Event()
        self.max_tokens = max_tokens
        self.task = asyncio.ensure_future(self._read(client, model))

    async def _read(self, client: openai.AsyncOpenAI, model: str) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=model,
            messages=MSG,
            max_tokens=self.max_tokens,
            stream=True,
        )
        text, finish, chunks = "", None, 0
        async for chunk in stream:
            self.started.set()
            chunks += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish, chunks

    async def whole(self) -> None:
        text, finish, chunks = await asyncio.wait_for(self.task, 15)
        assert finish == "length", "the stream ended early"
        assert chunks >= self.max_tokens
        assert text


async def events_of(f: Fleet) -> tuple[list[Event], asyncio.Task[None]]:
    seen: list[Event] = []

    async def collect() -> None:
        async for event in f.engine.subscribe(requests=False):
            seen.append(event)

    task = asyncio.ensure_future(collect())
    await asyncio.sleep(0)
    return seen, task


async def test_nodes_added_and_removed_while_a_stream_runs_on_the_removed_one(
    fleet: FleetFactory, tmp_path: Path
) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), NodeSpec("b", [SimModel("m2", 1000)], tok_s=40))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    async with sim(SimModel("m2", 1000), SimModel("m3", 1000), name="c") as c:
        client = f.openai(timeout=15.0)
        stream = Stream(client, "m2", 30)  # ~0.75 s on b
        await asyncio.wait_for(stream.started.wait(), 5)
        path.write_text(toml([("a", f.sim("a").url, []), ("c", c.url, [])]))

        status, report = await reload(f)

        assert status == 200, report
        assert report["ok"] is True
        assert "nodes: added c (" + c.url + ")" in report["changes"]
        assert "nodes: removing b once drained (1 in flight)" in report["changes"]
        snap = f.engine.snapshot()
        assert snap.node("b").status.value == "draining"  # type: ignore[union-attr]
        # New requests for m2 go to the new node while b finishes its stream.
        await f.wait_for(lambda: f.engine.fleet.nodes["c"].status.value == "up", what="c polled")
        async with f.http.post(f.url + "/v1/chat/completions", json={"model": "m2", "messages": MSG}) as resp:
            assert resp.status == 200
            assert resp.headers["x-cortex-node"] == "c"
        await stream.whole()
        await f.wait_for(lambda: f.engine.snapshot().node("b") is None, what="b leaves the fleet")
        assert [n.name for n in f.engine.snapshot().nodes] == ["a", "c"]
        # Its poll loop ended with it: once a poll that was under way has landed, the node hears nothing more.
        await asyncio.sleep(0.15)
        polls = len(f.sim("b").requests)
        await asyncio.sleep(0.35)
        assert len(f.sim("b").requests) == polls
        await client.close()


async def test_api_keys_change_live_and_the_running_stream_finishes(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=40))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    seen, collector = await events_of(f)
    open_client = f.openai(timeout=15.0)
    stream = Stream(open_client, "m1", 30)
    await asyncio.wait_for(stream.started.wait(), 5)
    path.write_text(toml([("a", f.sim("a").url, [])], keys=["k-one"]))

    status, report = await reload(f)

    assert status == 200
    assert report["changes"] == ["gateway.api_keys"]  # named, never shown
    await stream.whole()  # authenticated when it began: it is not cut
    with pytest.raises(openai.AuthenticationError):
        await open_client.chat.completions.create(model="m1", messages=MSG)
    keyed = f.openai(api_key="k-one")
    done = await keyed.chat.completions.create(model="m1", messages=MSG, max_tokens=2)
    assert done.choices[0].message.content
    await f.wait_for(lambda: any(isinstance(e, ConfigReloaded) for e in seen), what="the reload event")
    [event] = [e for e in seen if isinstance(e, ConfigReloaded)]
    assert event.ok
    assert event.changes == ("gateway.api_keys",)
    collector.cancel()
    await open_client.close()
    await keyed.close()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ('[[nodes]]\nname = "x"\nendpoint = "nowhere"\nvram_mb = 1\n', "nodes[1].endpoint: not a URL"),
        ("[eviction\n", "not valid TOML"),
        ("[gateway]\nlisten = 8000\n", "gateway"),
    ],
    ids=["bad-value", "bad-toml", "duplicate-table"],
)
async def test_a_bad_file_is_refused_whole_and_the_old_config_keeps_serving(
    fleet: FleetFactory, tmp_path: Path, bad: str, error: str
) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=40))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    seen, collector = await events_of(f)
    client = f.openai(timeout=15.0)
    stream = Stream(client, "m1", 30)
    await asyncio.wait_for(stream.started.wait(), 5)
    # A good change and a bad one in the same file: neither applies.
    path.write_text(toml([("a", f.sim("a").url, [])], '[eviction]\nstrategy = "priority"\n', keys=["k"]) + bad)

    status, report = await reload(f)

    assert status == 422
    assert report["ok"] is False
    assert any(error in line for line in report["errors"]), report
    assert "the running config stays" in report["message"]
    assert f.engine.settings.eviction.strategy == "cost"
    assert f.engine.api_keys == []
    await stream.whole()
    done = await client.chat.completions.create(model="m1", messages=MSG, max_tokens=2)
    assert done.choices[0].message.content  # still no key needed: the old config serves
    await f.wait_for(lambda: any(isinstance(e, ConfigReloaded) for e in seen), what="the refusal event")
    assert [e.ok for e in seen if isinstance(e, ConfigReloaded)] == [False]
    collector.cancel()
    await client.close()


async def test_settings_apply_live_and_listen_addresses_wait_for_a_restart(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000), SimModel("m2", 1000, loaded=False)]))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    extra = '[eviction]\nstrategy = "priority"\nidle_ttl_s = 600\n[[models]]\nid = "m1"\naliases = ["fast-*"]\n'
    text = toml([("a", f.sim("a").url, ["m2"])], extra).replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"')
    path.write_text(text)

    status, report = await reload(f)

    assert status == 200, report
    assert report["restart_needed"] == ["gateway.listen"]
    assert f.engine.settings.gateway.listen == "127.0.0.1:0"  # keeps what it really listens on
    assert "needs a restart: gateway.listen" in report["message"]
    assert "eviction.strategy: 'cost' → 'priority'" in report["changes"]
    assert f.engine.settings.eviction.idle_ttl_s == 600
    assert f.engine.lifecycle.settings is f.engine.settings
    # A new alias resolves at once; a new pin is loaded.
    async with f.http.post(f.url + "/v1/chat/completions", json={"model": "fast-one", "messages": MSG}) as resp:
        assert resp.status == 200
        assert resp.headers["x-cortex-model"] == "m1"
    assert f.engine.fleet.is_pinned("a", "m2")
    await f.wait_for(lambda: f.sim("a").model_status("m2") == "loaded", what="the new pin loaded")
    # The same file again: nothing to do.
    status, report = await reload(f)
    assert (status, report["changes"], report["message"]) == (
        200,
        [],
        "config unchanged; needs a restart: gateway.listen",
    )


async def test_cluster_and_record_changes_wait_for_a_restart(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    record = tmp_path / "trace.jsonl"
    extra = '[cluster]\nredis_url = "redis://127.0.0.1:1/0"\n'
    text = toml([("a", f.sim("a").url, [])], extra).replace("[gateway]\n", f'[gateway]\nrecord = "{record}"\n', 1)
    path.write_text(text)

    status, report = await reload(f)

    assert status == 200, report
    assert sorted(report["restart_needed"]) == ["cluster", "gateway.record"]
    assert f.engine.settings.cluster.redis_url.get_secret_value() == ""  # still one gateway, no Redis
    assert f.engine.settings.gateway.record == ""
    assert f.engine.recorder is None


async def test_a_request_queued_for_a_load_survives_a_reload(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000), SimModel("m3", 1000, loaded=False)], load_s=0.6))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    queued = asyncio.ensure_future(f.post("/v1/chat/completions", {"model": "m3", "messages": MSG, "max_tokens": 2}))
    await f.wait_for(lambda: f.engine.snapshot().totals.queued == 1, what="the request to queue")
    path.write_text(toml([("a", f.sim("a").url, [])], '[eviction]\nstrategy = "priority"\n'))

    status, _ = await reload(f)

    assert status == 200
    code, body, headers = await asyncio.wait_for(queued, 10)
    assert code == 200, body
    assert headers["x-cortex-node"] == "a"
    assert float(headers["x-cortex-queue-ms"]) > 0


async def test_a_node_whose_endpoint_changed_comes_back_at_its_new_address(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), NodeSpec("b", [SimModel("m2", 1000)]))
    path = tmp_path / "cortex.toml"
    reloader(f, path)
    async with sim(SimModel("m2", 1000), SimModel("m4", 1000), name="b-new") as moved:
        path.write_text(toml([("a", f.sim("a").url, []), ("b", moved.url, [])]))

        status, report = await reload(f)

        assert status == 200
        assert f"nodes: b moves to {moved.url} after it has drained (0 in flight)" in report["changes"]
        await f.wait_for(
            lambda: (
                (n := f.engine.snapshot().node("b")) is not None
                and n.endpoint == moved.url
                and n.status.value == "up"
                and n.slot("m4") is not None
            ),
            what="b back at its new address",
        )
        assert [n.name for n in f.engine.snapshot().nodes] == ["a", "b"]  # config order kept


async def test_a_watched_file_reloads_when_it_changes(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    path = tmp_path / "cortex.toml"
    path.write_text(
        toml([("a", f.sim("a").url, [])], "").replace("drain_s = 2.0", "drain_s = 2.0\nwatch_config = true")
    )
    watcher = asyncio.ensure_future(watch_file(path, reloader(f, path), every_s=0.05))
    try:
        await f.http.post(f.url + "/admin/reload", json={})  # watch_config is on from now
        path.write_text(path.read_text().replace("interval_s = 0.1", "interval_s = 0.2"))
        await f.wait_for(lambda: f.engine.settings.poll.interval_s == 0.2, what="the watched change applied")
        # Off again (by the file itself): later edits are left alone.
        path.write_text(path.read_text().replace("watch_config = true", "watch_config = false"))
        await f.wait_for(lambda: not f.engine.settings.gateway.watch_config, what="watching turned off")
        path.write_text(path.read_text().replace("interval_s = 0.2", "interval_s = 0.3"))
        await asyncio.sleep(0.3)
        assert f.engine.settings.poll.interval_s == 0.2
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
