"""Defrag end to end: drain, restart (skipped without an agent, or a stand-in), trim, reload pins, undrain."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import pytest

from cortex.config import ModelSettings, Settings
from cortex.engine.commands import RestartNode
from cortex.engine.events import DefragFinished, DefragStarted, Event, ModelUnloaded
from cortex.engine.lifecycle import RestartResult
from cortex.engine.state import NodeStatus, SlotState
from cortex.sim import SimModel, SimNode
from tests.lifecycle.conftest import SimFactory
from tests.lifecycle.support import chat, make_settings, node_cfg, running, slot_state, snap_node

MODELS = [
    SimModel("p", 2000),
    SimModel("m", 3000),
    SimModel("x", 3000, loaded=False),
    SimModel("y", 1000, loaded=False),
]
"""8 GiB node: pinned p and m loaded (5,300 MiB with the base); x needs m's memory: one eviction cycle."""


def _settings(sim: SimNode) -> Settings:
    return make_settings(
        [node_cfg(sim, pinned=["p"])],
        [
            ModelSettings(id="p", vram_mb=2000),
            ModelSettings(id="m", vram_mb=3000),
            ModelSettings(id="x", vram_mb=3000),
            ModelSettings(id="y", vram_mb=1000),
        ],
        defrag_after_cycles=1,
        queue_timeout_s=10,
    )


async def test_defrag_without_agent_is_skipped_at_once_without_draining(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = await sims("a", MODELS)
    caplog.set_level(logging.WARNING, logger="cortex.engine.lifecycle")
    settings = _settings(a)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        events: list[Event] = []
        statuses: list[NodeStatus] = []

        async def listen() -> None:
            async for event in eng.subscribe():
                events.append(event)
                statuses.append(eng.fleet.nodes["a"].status)

        listener = asyncio.ensure_future(listen())
        status, headers, _ = await asyncio.wait_for(chat(http, srv, "x"), 10)
        assert status == 200
        assert headers["x-cortex-node"] == "a"
        assert a.model_status("m") == "unloaded"  # x needed m's memory: one eviction cycle, a defrag is due
        assert eng.lifecycle.defrag_task is None  # ...but with no agent nothing was started
        assert "call for a defrag restart, but it has no live agent; skipped" in caplog.text
        node = snap_node(eng, "a")
        assert node.status is NodeStatus.UP
        assert node.cycles == 0
        # an operator's restart says so at once, and never drains the node
        result = await asyncio.wait_for(eng.submit(RestartNode("a")), 1)
        assert not result.ok
        assert "no agent for a: restart skipped" in result.message
        await asyncio.sleep(0.05)
        listener.cancel()
    assert NodeStatus.DRAINING not in statuses
    assert NodeStatus.RESTARTING not in statuses
    kinds = [type(e) for e in events]
    assert DefragStarted not in kinds


async def test_defrag_with_an_agent_drains_trims_and_restores(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", MODELS)
    settings = _settings(a)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        events: list[Event] = []

        async def listen() -> None:
            async for event in eng.subscribe():
                events.append(event)

        listener = asyncio.ensure_future(listen())
        seen: dict[str, object] = {}
        eng.lifecycle.agent_alive = lambda _node: True

        async def spy(node: str, timeout_s: float) -> RestartResult:
            rec = eng.fleet.nodes[node]
            seen.update(status=rec.status, drained=rec.drained, in_flight=rec.in_flight)
            # while cortex is not looking, the node loses its pin and lazily loads y
            a.models.unload("p", 0)
            await a.models.reload("y", 0, bug=False)
            return RestartResult(True, "restarted (stand-in)")

        eng.lifecycle.restart = spy
        status, headers, _ = await asyncio.wait_for(chat(http, srv, "x"), 10)
        assert status == 200
        assert headers["x-cortex-node"] == "a"
        task = eng.lifecycle.defrag_task
        assert task is not None
        result = await asyncio.wait_for(task, 10)
        assert result.ok
        assert seen == {"status": NodeStatus.RESTARTING, "drained": True, "in_flight": 0}
        node = snap_node(eng, "a")
        assert node.status is NodeStatus.UP
        assert node.cycles == 0
        assert a.model_status("y") == "unloaded"  # trimmed: it was not resident before the defrag
        assert a.model_status("p") == "loaded"  # the pin came back
        assert a.model_status("x") == "loaded"
        assert slot_state(eng, "a", "p") is SlotState.LOADED
        await asyncio.sleep(0.05)
        listener.cancel()
    kinds = [type(e) for e in events]
    assert DefragStarted in kinds
    assert DefragFinished in kinds
    assert any(isinstance(e, ModelUnloaded) and e.model == "y" and e.reason == "defrag" for e in events)


async def test_defrag_with_a_stand_in_restart(sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """The restarted node loads every configured model; cortex unloads the extras and reloads its pins."""
    a = await sims("a", MODELS)
    settings = _settings(a)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        calls: list[tuple[str, NodeStatus, bool]] = []

        async def restart(node: str, timeout_s: float) -> RestartResult:
            rec = eng.fleet.nodes[node]
            calls.append((node, rec.status, rec.drained))
            await a.restart()
            a.models.unload("p", 0)  # and, say, the pin is not in its startup config
            return RestartResult(True, "ok")

        eng.lifecycle.agent_alive = lambda _node: True
        eng.lifecycle.restart = restart
        status, _, _ = await asyncio.wait_for(chat(http, srv, "x"), 10)
        assert status == 200
        task = eng.lifecycle.defrag_task
        assert task is not None
        result = await asyncio.wait_for(task, 10)
        assert result == RestartResult(True, "ok")
        assert calls == [("a", NodeStatus.RESTARTING, True)]
        # resident before: p (pinned) and x (just loaded); the restart loaded m and y too
        assert {m: a.model_status(m) for m in ("p", "m", "x", "y")} == {
            "p": "loaded",
            "m": "unloaded",
            "x": "loaded",
            "y": "unloaded",
        }
        node = snap_node(eng, "a")
        assert node.status is NodeStatus.UP
        assert node.cycles == 0
        assert {s.model_id for s in node.slots if s.state is SlotState.LOADED} == {"p", "x"}
        # and it serves again
        assert (await chat(http, srv, "x"))[0] == 200
