"""Loading on demand: one reload per burst, failed loads, the queue's bounds, keep-alives, the reload bug."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from cortex.config import ModelSettings
from cortex.engine.state import SlotState
from cortex.sim import SimModel
from tests.lifecycle.conftest import SimFactory
from tests.lifecycle.support import (
    CHAT,
    RELOAD,
    chat,
    chat_body,
    make_settings,
    node_cfg,
    recorded,
    running,
    slot_state,
    snap_node,
    wait_until,
)


async def test_burst_for_a_cold_model_reloads_once_on_one_node(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    load_s = 0.4
    a = await sims("a", [SimModel("m", 4000), SimModel("x", 2000, loaded=False)], load_s=load_s)
    b = await sims("b", [SimModel("x", 2000, loaded=False), SimModel("y", 3000)], load_s=load_s)
    c = await sims("c", [SimModel("x", 2000, loaded=False), SimModel("z", 1000, loaded=False)], load_s=load_s)
    settings = make_settings([node_cfg(a), node_cfg(b), node_cfg(c)], [ModelSettings(id="x", vram_mb=2000)])
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=10)
        try:
            replies = await asyncio.gather(
                *(
                    client.chat.completions.with_raw_response.create(
                        model="x", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=3
                    )
                    for i in range(20)
                )
            )
        finally:
            await client.close()
        assert all(r.http_response.status_code == 200 for r in replies)
        assert all(r.parse().choices[0].message.content for r in replies)
        reloads = {sim.name: recorded(sim, RELOAD, "x") for sim in (a, b, c)}
        assert sum(len(v) for v in reloads.values()) == 1, reloads
        (target,) = [name for name, v in reloads.items() if v]
        sim = {"a": a, "b": b, "c": c}[target]
        assert {r.headers["x-cortex-node"] for r in replies} == {target}
        reload_at = reloads[target][0].at
        chats = recorded(sim, CHAT, "x")
        assert len(chats) == 20
        # the reload blocks for load_s: no chat request reached the node before it answered
        assert min(r.at for r in chats) >= reload_at + load_s * 0.95
        for other in {"a": a, "b": b, "c": c}.values():
            if other is not sim:
                assert recorded(other, CHAT, "x") == []
        assert slot_state(eng, target, "x") is SlotState.LOADED


async def test_failed_load_tries_another_node_that_lists_the_model(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # a has the most free memory, so it is tried first; its load fails, b's succeeds
    a = await sims("a", [SimModel("x", 2000, loaded=False)], vram_mb=16384)
    b = await sims("b", [SimModel("x", 2000, loaded=False)])
    c = await sims("c", [SimModel("y", 1000)])
    a.set_load_failure("x", "weights are corrupt")
    settings = make_settings([node_cfg(a), node_cfg(b), node_cfg(c)], [ModelSettings(id="x", vram_mb=2000)])
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        status, headers, body = await chat(http, srv, "x")
        assert status == 200, body
        assert headers["x-cortex-node"] == "b"
        assert len(recorded(a, RELOAD, "x")) == 1
        assert len(recorded(b, RELOAD, "x")) == 1
        assert recorded(a, CHAT) == []
        assert slot_state(eng, "a", "x") is SlotState.UNLOADED


async def test_failed_load_everywhere_is_503_with_the_node_message(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("x", 2000, loaded=False)], vram_mb=16384)
    b = await sims("b", [SimModel("x", 2000, loaded=False)])
    a.set_load_failure("x", "weights are corrupt")
    b.set_load_failure("x", "disk on fire")
    settings = make_settings([node_cfg(a), node_cfg(b)], [ModelSettings(id="x", vram_mb=2000)])
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        status, headers, body = await chat(http, srv, "x")
        assert status == 503
        assert "Retry-After" in headers
        message = body["error"]["message"]
        assert "Failed to load model: disk on fire" in message, message
        assert len(recorded(a, RELOAD, "x")) == 1
        assert len(recorded(b, RELOAD, "x")) == 1
        assert recorded(a, CHAT) == recorded(b, CHAT) == []


async def test_queue_overflow_is_503_with_retry_after(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("x", 2000, loaded=False)], load_s=1.0)
    settings = make_settings([node_cfg(a)], [ModelSettings(id="x", vram_mb=2000)], max_queue=2)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        waiting = [asyncio.ensure_future(chat(http, srv, "x")) for _ in range(2)]
        await wait_until(lambda: eng.fleet.queued.get("x") == 2, "two requests queued for x")
        status, headers, body = await chat(http, srv, "x")
        assert status == 503
        assert int(headers["Retry-After"]) > 0
        assert body["error"]["type"] == "server_error"
        assert "wait for x" in body["error"]["message"]
        results = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert [r[0] for r in results] == [200, 200]
        assert len(recorded(a, RELOAD, "x")) == 1


async def test_queue_timeout_is_503_with_retry_after(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("x", 2000, loaded=False)], load_s=3.0)
    settings = make_settings([node_cfg(a)], [ModelSettings(id="x", vram_mb=2000)], queue_timeout_s=0.5)
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        started = time.monotonic()
        status, headers, body = await chat(http, srv, "x")
        waited = time.monotonic() - started
        assert status == 503
        assert int(headers["Retry-After"]) > 0
        assert "not ready within" in body["error"]["message"]
        assert 0.4 <= waited < 2.5
        assert recorded(a, CHAT) == []


async def test_keepalive_comments_during_a_long_load_and_others_not_held_up(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A waiting stream hears `: loading ...` before its first data; loaded models answer meanwhile."""
    a = await sims("a", [SimModel("n", 2000), SimModel("x", 2000, loaded=False)], load_s=6.0)
    b = await sims("b", [SimModel("m", 2000)])
    settings = make_settings([node_cfg(a), node_cfg(b)], [ModelSettings(id="x", vram_mb=2000)], queue_timeout_s=20)
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        lines: list[tuple[float, str]] = []

        async def stream() -> int:
            async with http.post(srv.url + CHAT, json=chat_body("x", stream=True)) as resp:
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line:
                        lines.append((time.monotonic(), line))
                return resp.status

        streaming = asyncio.ensure_future(stream())
        await wait_until(lambda: len(recorded(a, RELOAD, "x")) == 1, "the reload of x started", within=3)
        # while x loads for 6 s: a model loaded on another node, and one on the loading node itself
        for model, node in (("m", "b"), ("n", "a")):
            t0 = time.monotonic()
            status, headers, _ = await asyncio.wait_for(chat(http, srv, model), 3)
            assert status == 200
            assert headers["x-cortex-node"] == node
            assert time.monotonic() - t0 < 1.0, f"{model} was held up by the load of x"
        assert await asyncio.wait_for(streaming, 15) == 200
    notices = [(t, line) for t, line in lines if line.startswith(":")]
    data = [(t, line) for t, line in lines if line.startswith("data:")]
    assert data, lines
    assert notices, lines
    assert notices[0][0] < data[0][0]
    assert re.fullmatch(r": loading x on a \(\d+ s\)", notices[0][1]), notices
    # at least every 5 s while the model loads: a 6 s load gets two
    before = [t for t, _ in notices if t < data[0][0]]
    assert len(before) >= 2, notices
    assert all(t2 - t1 <= 5.0 for t1, t2 in itertools.pairwise(before))
    assert data[-1][1].replace(" ", "") == "data:[DONE]"
    assert any('"content"' in line for _, line in data)


async def test_stuck_reloading_model_is_never_reloaded(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """With the mistral.rs reload bug, cortex never calls reload on a loaded or reloading model."""
    a = await sims("a", [SimModel("m", 2000), SimModel("y", 1000), SimModel("z", 1000, loaded=False)], reload_bug=True)
    # someone outside cortex calls reload on the loaded model: it is now stuck in the reloading set
    async with http.post(a.url + RELOAD, json={"model_id": "m"}) as resp:
        assert (await resp.json())["status"] == "not_found"
    assert a.model_status("m") == "reloading"
    settings = make_settings([node_cfg(a)], [ModelSettings(id=i, vram_mb=1000) for i in ("y", "z")], queue_timeout_s=1)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        # listed twice (reloading and loaded): loaded wins and it keeps serving
        assert slot_state(eng, "a", "m") is SlotState.LOADED
        for model in ("m", "y"):
            status, _, body = await chat(http, srv, model)
            assert status == 200, body
        async with http.post(srv.url + "/admin/models/m/load", json={}) as resp:
            assert resp.status == 200
            assert "already loaded" in (await resp.json())["message"]
        # an unloaded model still gets its one reload
        status, _, _ = await chat(http, srv, "z")
        assert status == 200
        assert len(recorded(a, RELOAD, "z")) == 1
        # unload m through cortex: the node now reports it as reloading, forever
        async with http.post(srv.url + "/admin/models/m/unload", json={}) as resp:
            assert resp.status == 200
        assert a.model_status("m") == "reloading"
        status, headers, body = await chat(http, srv, "m")
        assert status == 503
        assert "Retry-After" in headers
    assert len(recorded(a, RELOAD, "m")) == 1  # only the one this test sent
    assert len(recorded(a, RELOAD, "y")) == 0
    assert len(recorded(a, CHAT, "m")) == 1


async def test_unloaded_stuck_model_is_seen_as_reloading(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("m", 2000), SimModel("y", 1000)], reload_bug=True)
    async with http.post(a.url + RELOAD, json={"model_id": "m"}) as resp:
        assert (await resp.json())["status"] == "not_found"
    async with running(make_settings([node_cfg(a)]), tmp_path / "state.json") as (eng, srv):
        async with http.post(srv.url + "/admin/models/m/unload", json={}) as resp:
            assert resp.status == 200
        await wait_until(lambda: slot_state(eng, "a", "m") is SlotState.STUCK, "m seen as stuck", within=1.0)


async def test_footprint_learned_from_the_vram_change_and_remembered(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("m", 1000), SimModel("x", 2500, loaded=False)])
    state = tmp_path / "state.json"
    settings = make_settings([node_cfg(a)])  # no [[models]]: no footprint in the config
    async with running(settings, state) as (eng, srv):
        assert eng.fleet.footprint("x") is None
        status, _, _ = await chat(http, srv, "x")
        assert status == 200
        assert eng.fleet.footprint("x") == 2500
        slot = snap_node(eng, "a").slot("x")
        assert slot is not None
        assert slot.vram_mb == 2500
    assert json.loads(state.read_text())["footprints"] == {"x": 2500}
    async with running(settings, state) as (eng, _srv):
        assert eng.fleet.footprint("x") == 2500
        assert eng.fleet.footprint("m") is None


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_unknown_model_is_404_and_never_reaches_a_node(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path, stream: bool
) -> None:
    a = await sims("a", [SimModel("m", 1000)])
    async with (
        running(make_settings([node_cfg(a)]), tmp_path / "state.json") as (_eng, srv),
        http.post(srv.url + CHAT, json=chat_body("nope", stream=stream)) as resp,
    ):
        assert resp.status == 404
    assert recorded(a, CHAT) == []
    assert recorded(a, RELOAD) == []
