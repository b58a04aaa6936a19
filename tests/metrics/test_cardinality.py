"""Bounded cardinality: a thousand requests for made-up model names add no series."""

from __future__ import annotations

import asyncio

import orjson

from cortex.config import ModelSettings
from cortex.sim import SimModel
from tests.conftest import FleetFactory, NodeSpec
from tests.metrics.helpers import labels, scrape, wait_until

N = 1000


def made_up(i: int) -> tuple[str, str]:
    """(path, body) of request ``i``: OpenAI and Anthropic, plain, alias-like and hostile names."""
    names = (
        f"gpt-made-up-{i}",
        f"claude-opus-{i}",  # looks like the configured `claude-sonnet-*` alias, does not match it
        f"m1-{i}",  # a served id with a suffix
        f'evil"name\n{{model="x"}}-{i}',  # would break the exposition if it ever became a label
        f"{'x' * 300}-{i}",
    )
    path = "/v1/messages" if i % 2 else "/v1/chat/completions"
    body = {"model": names[i % len(names)], "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    return path, orjson.dumps(body).decode()


async def test_made_up_model_names_add_no_series(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000)]),
        models=[ModelSettings(id="m1", aliases=["claude-sonnet-*"])],
        gateway={"metrics_listen": "127.0.0.1:0"},
    )

    async def send(i: int) -> None:
        path, body = made_up(i)
        async with f.http.post(f.url + path, data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 404, (i, resp.status)
            await resp.read()

    # One real request and one unknown one per dialect first: the series an unknown model may ever use.
    for path in ("/v1/chat/completions", "/v1/messages"):
        body = {"model": "claude-sonnet-x", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        async with f.http.post(f.url + path, json=body) as resp:
            assert resp.status == 200
    await send(0)
    await send(1)
    await wait_until(lambda: f.engine.metrics.requests_total == 4, what="warm-up recorded")
    before = await scrape(f.http, f.servers.metrics)

    for start in range(2, N + 2, 50):
        await asyncio.gather(*(send(i) for i in range(start, start + 50)))
    await wait_until(lambda: f.engine.metrics.requests_total == N + 4, what="every request recorded")
    after = await scrape(f.http, f.servers.metrics)

    assert set(after.samples) == set(before.samples), "made-up model names created series"
    moved = {key for key, value in after.samples.items() if before.samples[key] != value}
    for name, lab in moved:
        d = dict(lab)
        # Everything labelled with a model says `unknown`; the overhead histogram has only `api`.
        assert d.get("model") == "unknown" or name.startswith("cortex_proxy_overhead_seconds"), (name, d)
    assert after.value("cortex_requests_total", model="unknown", node="", api="openai", status="404") == 1 + N / 2
    assert after.value("cortex_requests_total", model="unknown", node="", api="anthropic", status="404") == 1 + N / 2
    assert after.samples[("cortex_requests_total", labels(model="m1", node="a", api="openai", status="200"))] == 1
    assert all(dict(lab).get("model") in (None, "m1", "unknown") for _, lab in after.samples)
