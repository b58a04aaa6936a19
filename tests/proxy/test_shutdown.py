"""Leaving ``serve()`` drains: live streams finish, endless feeds end at once, nothing waits out drain_s."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from cortex.config import GatewaySettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import Servers, serve
from cortex.sim import SimModel, SimNode

DRAIN_S = 4.0


@pytest.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Engine, SimNode]]:
    """A node and an engine; the test enters and leaves ``serve()`` itself (``drain_s`` by indirect param)."""
    drain_s = float(getattr(request, "param", DRAIN_S))
    sim = SimNode([SimModel("m1", 1000)], name="a", tok_s=10, load_s=0.05)
    await sim.start()
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="", drain_s=drain_s),
        poll=PollSettings(interval_s=0.2),
        nodes=[NodeSettings(name="a", endpoint=sim.url, vram_mb=8192)],
    )
    try:
        async with Engine(settings, state_path=tmp_path / "state.json") as engine:
            await asyncio.wait_for(engine.ready.wait(), 5)
            yield engine, sim
    finally:
        await sim.stop()


async def _enter(engine: Engine) -> tuple[contextlib.AbstractAsyncContextManager[Servers], Servers]:
    cm = serve(engine)
    return cm, await cm.__aenter__()


async def test_open_event_feed_does_not_hold_the_drain(stack: tuple[Engine, SimNode]) -> None:
    engine, _ = stack
    cm, servers = await _enter(engine)
    exiting: asyncio.Future[bool | None] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            feed = await http.get(servers.url + "/admin/events")
            try:
                assert feed.status == 200
                assert (await asyncio.wait_for(feed.content.readline(), 5)).startswith(b": cortex events")
                started = time.monotonic()
                exiting = asyncio.ensure_future(cm.__aexit__(None, None, None))
                await asyncio.wait_for(asyncio.shield(exiting), 3 * DRAIN_S)
                took = time.monotonic() - started
                assert took < 1.5, f"an idle event feed held the shutdown for {took:.1f} s"
                await asyncio.wait_for(feed.read(), 2)  # and the feed was ended cleanly
            finally:
                feed.close()
    finally:
        await (exiting if exiting is not None else cm.__aexit__(None, None, None))


async def test_live_stream_finishes_during_the_drain(stack: tuple[Engine, SimNode]) -> None:
    engine, _ = stack
    cm, servers = await _enter(engine)
    exiting: asyncio.Future[bool | None] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 15, "stream": True}
            async with http.post(servers.url + "/v1/chat/completions", json=body) as resp:
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                exiting = asyncio.ensure_future(cm.__aexit__(None, None, None))
                rest = await asyncio.wait_for(resp.read(), DRAIN_S + 2)
            await asyncio.wait_for(asyncio.shield(exiting), DRAIN_S + 2)
    finally:
        await (exiting if exiting is not None else cm.__aexit__(None, None, None))
    raw = first + rest
    assert raw.rstrip().endswith(b"data:[DONE]"), raw[-200:]
    assert raw.count(b'"finish_reason":"length"') == 1
    # New connections are refused once the gateway has stopped.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(servers.url + "/health")


@pytest.mark.parametrize("stack", [0.6], indirect=True, ids=["drain-0.6s"])
async def test_a_stream_longer_than_drain_s_is_cut_at_drain_s(stack: tuple[Engine, SimNode]) -> None:
    engine, sim = stack
    cm, servers = await _enter(engine)
    exiting: asyncio.Future[bool | None] | None = None
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "stream": True}
            async with http.post(servers.url + "/v1/chat/completions", json=body) as resp:  # 10 s at 10 tok/s
                await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                started = time.monotonic()
                exiting = asyncio.ensure_future(cm.__aexit__(None, None, None))
                await asyncio.wait_for(asyncio.shield(exiting), 5)
                took = time.monotonic() - started
                with contextlib.suppress(aiohttp.ClientError):
                    await asyncio.wait_for(resp.read(), 2)
    finally:
        await (exiting if exiting is not None else cm.__aexit__(None, None, None))
    assert 0.5 <= took < 1.8, f"drain_s is 0.6 s; leaving serve() took {took:.2f} s"
    node = engine.snapshot().node("a")
    assert node is not None
    assert node.in_flight == 0  # the cut stream's lease was released
    await asyncio.sleep(0.2)
    assert sim.running == 0  # and the node stopped generating for it
