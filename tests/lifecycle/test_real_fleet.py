"""The lifecycle against nodes that behave like a real fleet (issue 12), each case end to end on loopback.

The simulated nodes here are honest: every model listed in a ``from-config`` node is loaded at start and no
size is configured, a load that does not fit answers ``internal_error`` "CUDA out of memory" (the sim
allocates the weights in steps), two loads that overcommit the device fail, and a node can hang like a
stopped process. Each test reproduces one situation a real fleet meets first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest

from cortex.config import ModelSettings, Settings
from cortex.engine import commands as cmd
from cortex.engine.state import NodeStatus, SlotState
from cortex.sim import SimModel, SimNode
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


def _reload_replies(sim: SimNode) -> int:
    return len(recorded(sim, RELOAD))


async def _stream(http: aiohttp.ClientSession, url: str, model: str) -> tuple[int, dict[str, str], str]:
    async with http.post(url + CHAT, json=chat_body(model, stream=True, max_tokens=8)) as resp:
        text = (await resp.read()).decode()
        return resp.status, dict(resp.headers), text


# -- 1. unknown footprints ------------------------------------------------------------------------------


async def test_preloaded_models_of_unknown_size_are_evicted_for_a_cold_one(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """from-config node: org/a and org/b loaded at start, no size known; org/c needs one of them gone."""
    n = await sims(
        "n",
        [SimModel("org/a", 5000), SimModel("org/b", 5000), SimModel("org/c", 5000, loaded=False)],
        vram_mb=12000,
    )
    # min_resident_s is high: models found loaded at start count as used long ago, not freshly loaded
    settings = make_settings([node_cfg(n)], min_resident_s=3600, queue_timeout_s=10)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        status, headers, body = await chat(http, srv, "org/c")
        assert status == 200, body
        assert headers["x-cortex-node"] == "n"
        assert n.model_status("org/c") == "loaded"
        assert sorted(n.model_status(m) for m in ("org/a", "org/b")) == ["loaded", "unloaded"]
        # cortex evicted before loading: the node never had to answer out of memory
        assert all(not r.json or r.json.get("model_id") == "org/c" for r in recorded(n, RELOAD))
        assert n.used_vram_mb() <= n.vram_mb
        # the load ran alone on its node: its exact size is learned
        assert eng.fleet.footprint("org/c") == 5000


async def test_a_known_size_evicts_preloaded_models_of_unknown_size(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The wanted model's size is configured, the preloaded victims' are not: they still make room."""
    n = await sims(
        "n",
        [SimModel("org/a", 5000), SimModel("org/b", 5000), SimModel("org/c", 6000, loaded=False)],
        vram_mb=12000,
    )
    settings = make_settings([node_cfg(n)], [ModelSettings(id="org/c", vram_mb=6000)], queue_timeout_s=10)
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        status, _, body = await asyncio.wait_for(chat(http, srv, "org/c"), 8)
        assert status == 200, body
        assert n.model_status("org/c") == "loaded"
        assert [n.model_status(m) for m in ("org/a", "org/b")].count("unloaded") == 1
        assert n.used_vram_mb() <= n.vram_mb


async def test_an_oom_answer_evicts_the_next_victim_and_retries(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The estimate (the preloaded models' share) is too small for big: OOM, evict one more, retry."""
    caplog.set_level(logging.INFO, logger="cortex.engine.lifecycle")
    n = await sims(
        "n",
        [SimModel("org/a", 2000), SimModel("org/b", 2000), SimModel("org/big", 9000, loaded=False)],
        vram_mb=12000,
    )
    settings = make_settings([node_cfg(n)], queue_timeout_s=10)
    state = tmp_path / "state.json"
    async with running(settings, state) as (eng, srv):
        status, _, body = await chat(http, srv, "org/big")
        assert status == 200, body
        assert n.model_status("org/big") == "loaded"
        assert "did not fit; evicting" in caplog.text
        assert _reload_replies(n) >= 2  # the first answered out of memory
        assert n.used_vram_mb() <= n.vram_mb
        assert eng.fleet.footprint("org/big") == 9000  # the successful load ran alone: exact
    saved = json.loads(state.read_text())
    assert saved["footprints"]["org/big"] == 9000


async def test_an_oom_floor_is_kept_when_nothing_more_can_be_evicted(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = await sims("n", [SimModel("p", 3000), SimModel("big", 7000, loaded=False)], vram_mb=8000)
    settings = make_settings([node_cfg(n, pinned=["p"])], queue_timeout_s=3)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        status, _, body = await chat(http, srv, "big")
        assert status == 503, body
        assert "out of memory" in body["error"]["message"].lower()
        assert n.model_status("p") == "loaded"  # the pin was never a victim
        floor = eng.fleet.floor("big")
        assert 0 < floor < 7000  # it needs more than was free then


# -- 2. concurrent cold loads ---------------------------------------------------------------------------


async def test_concurrent_cold_loads_of_unknown_size_spread_and_never_overcommit(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    models = ["m/x", "m/y", "m/z"]
    nodes = [
        await sims(name, [SimModel(m, 5000, loaded=False) for m in models], vram_mb=16000, load_s=0.3)
        for name in ("n1", "n2", "n3")
    ]
    settings = make_settings([node_cfg(s) for s in nodes], queue_timeout_s=20)
    state = tmp_path / "state.json"
    async with running(settings, state) as (eng, srv):
        peak: dict[str, int] = {}

        async def watch() -> None:
            while True:
                for node in eng.fleet.nodes.values():
                    loading = sum(1 for s in node.slots.values() if s.state is SlotState.LOADING)
                    peak[node.name] = max(peak.get(node.name, 0), loading)
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(chat(http, srv, models[i % 3]) for i in range(30)))
        watcher.cancel()
        assert [r[0] for r in results] == [200] * 30
        # a load of unknown size runs alone on its node: no node ever loaded two at once
        assert max(peak.values()) == 1
        assert {r[1]["x-cortex-node"] for r in results} == {"n1", "n2", "n3"}
        for sim in nodes:
            assert sim.used_vram_mb() <= sim.vram_mb
            assert all("internal_error" not in json.dumps(r.json) for r in recorded(sim, RELOAD))
        assert {m: eng.fleet.footprint(m) for m in models} == {m: 5000 for m in models}
    # a restart with what was learned serves the same traffic
    for sim in nodes:
        await sim.restart(unloaded=True)
    async with running(settings, state) as (eng, srv):
        results = await asyncio.gather(*(chat(http, srv, models[i % 3]) for i in range(30)))
        assert [r[0] for r in results] == [200] * 30


# -- 3. a node that hangs mid-load ----------------------------------------------------------------------


def _fast_down(settings: Settings) -> Settings:
    settings.poll.timeout_s = 0.3
    settings.poll.down_after = 2
    return settings


async def test_a_node_that_hangs_mid_load_gives_it_up_and_the_next_node_loads(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n1 = await sims("n1", [SimModel("m/a", 3000, loaded=False)], vram_mb=8000, load_s=0.2)
    n2 = await sims("n2", [SimModel("m/a", 3000, loaded=False)], vram_mb=16000, load_s=2.0)
    settings = _fast_down(make_settings([node_cfg(n1), node_cfg(n2)], queue_timeout_s=20))
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        streamed = asyncio.ensure_future(_stream(http, srv.url, "m/a"))
        unary = asyncio.ensure_future(chat(http, srv, "m/a"))
        await wait_until(lambda: eng.fleet.loading.get("m/a", ("",))[0] == "n2", "the load on n2 (most free)")
        n2.hang()
        try:
            status, headers, text = await asyncio.wait_for(streamed, 15)
            assert status == 200
            assert text.endswith("data:[DONE]\n\n")
            # the headers went out while it loaded on n2; where it really ran is said before the first chunk
            assert headers["x-cortex-node"] == "n2"
            before_data = text.split("data:")[0]
            assert before_data.rstrip().endswith(": x-cortex-node: n1")
            ustatus, uheaders, _ = await asyncio.wait_for(unary, 15)
            assert (ustatus, uheaders["x-cortex-node"]) == (200, "n1")
            assert snap_node(eng, "n2").status is NodeStatus.DOWN
            assert n1.model_status("m/a") == "loaded"
        finally:
            n2.resume()


async def test_a_load_that_outlives_load_timeout_s_moves_on(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n1 = await sims("n1", [SimModel("m/a", 3000, loaded=False)], vram_mb=8000, load_s=0.1)
    n2 = await sims("n2", [SimModel("m/a", 3000, loaded=False)], vram_mb=16000, load_s=30)
    settings = make_settings([node_cfg(n1), node_cfg(n2)], queue_timeout_s=20)
    settings.gateway.load_timeout_s = 0.8
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        status, headers, _ = await asyncio.wait_for(chat(http, srv, "m/a"), 10)
        assert (status, headers["x-cortex-node"]) == (200, "n1")
        assert snap_node(eng, "n2").status is NodeStatus.UP  # slow is not down
        assert len(recorded(n2, RELOAD)) == 1


# -- 4. failure accounting ------------------------------------------------------------------------------


async def test_streams_cortex_cuts_itself_do_not_mark_the_node_down(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = await sims("n", [SimModel("k/e", 1000), SimModel("m/s", 1000)], tok_s=20)
    settings = make_settings([node_cfg(n)])
    async with running(settings, tmp_path / "state.json") as (eng, srv):

        async def long_request(stream: bool) -> int:
            body = chat_body("m/s", stream=stream, max_tokens=400)
            async with http.post(srv.url + CHAT, json=body) as resp:
                await resp.read()
                return resp.status

        # unary ones get the node's 500 "No response received from the model" when the engine goes
        streams = [asyncio.ensure_future(long_request(i % 2 == 0)) for i in range(6)]
        await wait_until(lambda: eng.fleet.nodes["n"].slots["m/s"].in_flight == 6, "six requests in flight")
        eng.settings.gateway.drain_s = 0.1
        result = await eng.submit(cmd.UnloadModel("m/s", force=True))
        assert result.ok, result.message
        statuses = await asyncio.wait_for(asyncio.gather(*streams), 10)
        assert statuses.count(200) == 3  # the streams had begun; the unary requests failed
        assert snap_node(eng, "n").status is NodeStatus.UP
        assert eng.fleet.nodes["n"].request_failures == 0
        status, headers, _ = await chat(http, srv, "k/e")
        assert (status, headers["x-cortex-node"]) == (200, "n")


# -- 5. node-side lazy loads ----------------------------------------------------------------------------


async def test_a_restart_cortex_did_not_see_is_requeued_not_passed_on(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = await sims("n", [SimModel("m/a", 2000)], load_s=0.3)
    settings = make_settings([node_cfg(n)], poll_s=60)  # cortex will not poll again during the test
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        assert slot_state(eng, "n", "m/a") is SlotState.LOADED
        await n.restart(unloaded=True)  # fast, and with nothing loaded: the next request lazy-loads
        results = await asyncio.gather(*(chat(http, srv, "m/a") for _ in range(8)))
        assert [r[0] for r in results] == [200] * 8, [r[2] for r in results if r[0] != 200]
        assert snap_node(eng, "n").status is NodeStatus.UP
        assert eng.fleet.nodes["n"].request_failures == 0


# -- 6. pins --------------------------------------------------------------------------------------------


async def test_a_pin_lost_in_a_fast_restart_is_loaded_again(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = await sims("n", [SimModel("p", 2000), SimModel("q", 1000)], load_s=0.05)
    settings = make_settings([node_cfg(n, pinned=["p"])], poll_s=0.1)
    async with running(settings, tmp_path / "state.json") as (eng, _srv):
        await n.restart(unloaded=True)  # back before a poll could fail: never seen down
        await wait_until(lambda: n.model_status("p") == "loaded", "the pin reloaded after the restart")
        assert n.model_status("q") == "unloaded"  # only pins come back
        n.models.unload("p", 0)  # an outside unload: enforced on the next poll too
        await wait_until(lambda: n.model_status("p") == "loaded", "the pin reloaded after an outside unload")
        assert snap_node(eng, "n").status is NodeStatus.UP


async def test_a_pin_sent_while_the_model_loads_pins_where_it_lands(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n1 = await sims("n1", [SimModel("m/a", 1000, loaded=False)], vram_mb=4000)
    n2 = await sims("n2", [SimModel("m/a", 1000, loaded=False)], vram_mb=16000, load_s=0.5)
    settings = make_settings([node_cfg(n1), node_cfg(n2)])
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        request = asyncio.ensure_future(chat(http, srv, "m/a"))
        await wait_until(lambda: "m/a" in eng.fleet.loading, "the load")
        where = eng.fleet.loading["m/a"][0]
        result = await eng.submit(cmd.PinModel("m/a"))
        assert result.ok, result.message
        assert result.detail["node"] == where
        assert (await request)[1]["x-cortex-node"] == where
        assert eng.fleet.is_pinned(where, "m/a")
        other = "n1" if where == "n2" else "n2"
        assert not eng.fleet.is_pinned(other, "m/a")


# -- 8/9. impossible requests, waiting streams ----------------------------------------------------------


async def test_headroom_counts_for_too_large(sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    n = await sims("n", [SimModel("m/a", 1000), SimModel("m/big", 7800, loaded=False)], vram_mb=8192)
    settings = make_settings([node_cfg(n)], [ModelSettings(id="m/big", vram_mb=7800)], headroom_mb=512)
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        status, headers, body = await asyncio.wait_for(chat(http, srv, "m/big"), 3)
        assert status == 503
        assert "7800 MiB" in body["error"]["message"]
        assert "n with 7680 MiB usable" in body["error"]["message"]
        assert headers["x-should-retry"] == "false"


async def test_a_stream_that_waited_for_a_load_names_its_node(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = await sims("n", [SimModel("m/a", 1000, loaded=False)], load_s=1.6)
    settings = make_settings([node_cfg(n)], queue_timeout_s=10)
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        status, headers, text = await _stream(http, srv.url, "m/a")
        assert status == 200
        assert ": loading m/a" in text  # it waited long enough for notices: headers went out early
        assert headers["x-cortex-node"] == "n"
