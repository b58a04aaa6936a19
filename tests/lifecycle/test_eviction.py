"""Eviction by VRAM (lru, priority), what is never evicted (pins, in-flight work), idle TTL, reconcile."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from cortex.config import ModelSettings
from cortex.engine.state import SlotState
from cortex.sim import SimModel
from tests.lifecycle.conftest import SimFactory
from tests.lifecycle.support import (
    CHAT,
    RELOAD,
    UNLOAD,
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

FULL = [SimModel("p", 3000), SimModel("q", 3000), SimModel("r", 3000), SimModel("s", 3000, loaded=False)]
"""10 GiB node: p, q, r loaded (9,000 MiB plus the node's 300 MiB base); s needs one of them gone."""


def _models(priorities: dict[str, int] | None = None) -> list[ModelSettings]:
    priorities = priorities or {}
    return [ModelSettings(id=m, vram_mb=3000, priority=priorities.get(m, 0)) for m in "pqrs"]


async def test_lru_evicts_the_least_recently_used(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", FULL, vram_mb=10_000)
    async with running(make_settings([node_cfg(a)], _models()), tmp_path / "state.json") as (eng, srv):
        for model in ("q", "p", "r"):  # q is now the least recently used
            assert (await chat(http, srv, model))[0] == 200
            await asyncio.sleep(0.02)
        status, headers, _ = await chat(http, srv, "s")
        assert status == 200
        assert headers["x-cortex-node"] == "a"
        assert [r.json["model_id"] for r in recorded(a, UNLOAD)] == ["q"]
        assert {m: a.model_status(m) for m in "pqrs"} == {"p": "loaded", "q": "unloaded", "r": "loaded", "s": "loaded"}
        assert slot_state(eng, "a", "q") is SlotState.UNLOADED
        assert snap_node(eng, "a").cycles == 1
        # the unload was answered before the reload was sent
        assert recorded(a, UNLOAD)[0].at <= recorded(a, RELOAD, "s")[0].at


async def test_priority_evicts_the_lowest_priority(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", FULL, vram_mb=10_000)
    settings = make_settings([node_cfg(a)], _models({"p": 5, "q": 1, "r": 3}), strategy="priority")
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        for model in ("p", "r", "q"):  # q has the lowest priority but is the most recently used
            assert (await chat(http, srv, model))[0] == 200
            await asyncio.sleep(0.02)
        assert (await chat(http, srv, "s"))[0] == 200
        assert [r.json["model_id"] for r in recorded(a, UNLOAD)] == ["q"]
        assert a.model_status("p") == a.model_status("r") == "loaded"


async def test_pinned_model_survives_pressure(sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """A model that fits only by evicting the pin waits, then gets 503; the pin stays loaded."""
    a = await sims("a", [SimModel("big", 5000), SimModel("x", 4000, loaded=False)])
    b = await sims("b", [SimModel("y", 1000)])
    settings = make_settings(
        [node_cfg(a, pinned=["big"]), node_cfg(b)],
        [ModelSettings(id="big", vram_mb=5000), ModelSettings(id="x", vram_mb=4000)],
        queue_timeout_s=1.0,
    )
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        started = time.monotonic()
        status, headers, body = await chat(http, srv, "x")
        assert status == 503, body
        assert "Retry-After" in headers
        assert time.monotonic() - started >= 0.9  # it waited for room first
        assert recorded(a, UNLOAD) == []
        assert recorded(a, RELOAD) == []
        assert a.model_status("big") == "loaded"
        slot = snap_node(eng, "a").slot("big")
        assert slot is not None
        assert slot.pinned
        assert slot.state is SlotState.LOADED


async def test_model_with_a_request_in_flight_is_not_evicted(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """x needs m's memory; m is evicted only after its streaming request has finished."""
    a = await sims("a", [SimModel("m", 4000), SimModel("x", 4000, loaded=False)], tok_s=25)
    settings = make_settings(
        [node_cfg(a)], [ModelSettings(id="m", vram_mb=4000), ModelSettings(id="x", vram_mb=4000)], queue_timeout_s=5
    )
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        ended: list[float] = []
        chunks: list[bytes] = []

        async def long_stream() -> int:
            async with http.post(srv.url + CHAT, json=chat_body("m", stream=True, max_tokens=25)) as resp:
                async for chunk in resp.content.iter_any():
                    chunks.append(chunk)
                ended.append(time.monotonic())
                return resp.status

        streaming = asyncio.ensure_future(long_stream())
        await wait_until(lambda: snap_node(eng, "a").in_flight == 1, "the stream on m is in flight")
        status, headers, _ = await asyncio.wait_for(chat(http, srv, "x"), 6)
        assert status == 200
        assert headers["x-cortex-node"] == "a"
        assert await streaming == 200
        body = b"".join(chunks)
        assert body.rstrip().endswith(b"[DONE]")
        assert b'"finish_reason":"length"' in body.replace(b" ", b"")
        (unload,) = recorded(a, UNLOAD)
        assert unload.json["model_id"] == "m"
        assert unload.at >= ended[0] - 0.05, "m was unloaded while its request was in flight"


async def test_idle_ttl_unloads_idle_models_but_keeps_pins(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("p", 1000), SimModel("u", 1000), SimModel("v", 1000)])
    settings = make_settings([node_cfg(a, pinned=["p"])], idle_ttl_s=0.6)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        # keep v busy-ish: used every 0.2 s, so it never idles for 0.6 s
        async def keep_using() -> None:
            for _ in range(10):
                assert (await chat(http, srv, "v"))[0] == 200
                await asyncio.sleep(0.15)

        user = asyncio.ensure_future(keep_using())
        await wait_until(lambda: a.model_status("u") == "unloaded", "u unloaded by the idle TTL", within=3)
        await user
        assert a.model_status("p") == "loaded"
        assert a.model_status("v") == "loaded"
        await wait_until(lambda: a.model_status("v") == "unloaded", "v unloaded once idle", within=3)
        await asyncio.sleep(0.8)  # well past the TTL again
        assert a.model_status("p") == "loaded"
        assert slot_state(eng, "a", "p") is SlotState.LOADED
        assert [r.json["model_id"] for r in recorded(a, UNLOAD)] == ["u", "v"]


async def test_reconcile_at_start_trims_extras_and_loads_pins(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Over budget at start: an unpinned extra is unloaded (LRU); a pinned model that is unloaded is loaded."""
    a = await sims(
        "a",
        [SimModel("e1", 3000), SimModel("e2", 3000), SimModel("e3", 3000), SimModel("pin", 1000, loaded=False)],
    )
    b = await sims("b", [SimModel("e1", 3000), SimModel("w", 1000)])
    c = await sims("c", [SimModel("pin", 1000, loaded=False), SimModel("w", 1000)])
    settings = make_settings(
        [node_cfg(a, pinned=["pin"]), node_cfg(b), node_cfg(c)],
        [ModelSettings(id=m, vram_mb=3000) for m in ("e1", "e2", "e3")] + [ModelSettings(id="pin", vram_mb=1000)],
    )
    async with running(settings, tmp_path / "state.json") as (eng, _srv):
        await wait_until(lambda: a.model_status("pin") == "loaded", "the pin loaded on a")
        unloaded = [r.json["model_id"] for r in recorded(a, UNLOAD)]
        assert len(unloaded) == 1, unloaded  # 9,300 MiB on 8,192: one 3,000 MiB extra is enough
        assert a.used_vram_mb() <= 8192
        snap = snap_node(eng, "a")
        assert snap.vram_used_mb <= snap.vram_total_mb - snap.headroom_mb
        # the pin is loaded where it is pinned, nowhere else; other nodes are left alone
        assert c.model_status("pin") == "unloaded"
        assert recorded(b, UNLOAD) == recorded(c, UNLOAD) == []
        assert recorded(c, RELOAD) == []
