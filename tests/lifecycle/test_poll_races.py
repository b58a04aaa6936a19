"""A poll read before cortex's own load or unload must not undo it (regression: a stale `reloading` made a
just-loaded model unroutable and sent the placer back to a node whose load had just failed; a stale `loaded`
after an unload would route requests into the node's lazy load)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from cortex.config import NodeSettings, Settings
from cortex.engine.events import EventBus
from cortex.engine.fleet import Fleet, StateStore
from cortex.engine.mistralrs import MistralRsClient
from cortex.engine.router import pick_node
from cortex.engine.state import SlotState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(fleet: Fleet, model: str) -> SlotState:
    return fleet.nodes["a"].slots[model].state


def _fleet(tmp_path: Path) -> tuple[Fleet, Clock]:
    clock = Clock()
    settings = Settings(nodes=[NodeSettings(name="a", endpoint="http://a.invalid:1", vram_mb=8192)])
    fleet = Fleet(
        settings,
        {"a": cast(MistralRsClient, None)},
        EventBus(),
        StateStore(tmp_path / "state.json"),
        gateway="test",
        clock=clock,
    )
    assert fleet.poll_ok(fleet.nodes["a"], {"x": "unloaded"}, None)  # came up
    return fleet, clock


def test_stale_reloading_after_a_load_is_ignored_once(tmp_path: Path) -> None:
    fleet, clock = _fleet(tmp_path)
    node = fleet.nodes["a"]
    clock.now += 1
    fleet.begin_load(node, "x", ())
    clock.now += 1
    fleet.set_slot(node, "x", SlotState.LOADED)  # the reload answered `loaded`
    clock.now += 0.1
    fleet.poll_ok(node, {"x": "reloading"}, None)  # read while the load ran
    assert state(fleet, "x") is SlotState.LOADED
    assert pick_node("x", fleet.nodes.values()) == "a"
    clock.now += 1
    fleet.poll_ok(node, {"x": "loaded"}, None)
    assert state(fleet, "x") is SlotState.LOADED
    clock.now += 1
    fleet.poll_ok(node, {"x": "unloaded"}, None)  # a real external unload, read after cortex's act
    assert state(fleet, "x") is SlotState.UNLOADED


def test_stale_loaded_after_an_unload_is_ignored(tmp_path: Path) -> None:
    fleet, clock = _fleet(tmp_path)
    node = fleet.nodes["a"]
    clock.now += 1
    fleet.poll_ok(node, {"x": "loaded"}, None)
    assert state(fleet, "x") is SlotState.LOADED
    clock.now += 1
    fleet.set_slot(node, "x", SlotState.UNLOADED)  # cortex unloaded it
    clock.now += 0.1
    fleet.poll_ok(node, {"x": "loaded"}, None)  # read before the unload
    assert state(fleet, "x") is SlotState.UNLOADED
    assert pick_node("x", fleet.nodes.values()) is None


def test_fresh_reads_and_recoveries_apply_at_once(tmp_path: Path) -> None:
    fleet, clock = _fleet(tmp_path)
    node = fleet.nodes["a"]
    clock.now += 1
    fleet.set_slot(node, "x", SlotState.UNLOADED)
    clock.now += 0.1
    fleet.poll_ok(node, {"x": "loaded"}, None, fresh=True)  # e.g. read after a restart by the defrag
    assert state(fleet, "x") is SlotState.LOADED
    fleet.set_slot(node, "x", SlotState.UNLOADED)
    fleet.mark_down(node, "test")
    clock.now += 1
    assert fleet.poll_ok(node, {"x": "loaded"}, None)  # came back up: what it says now is the truth
    assert state(fleet, "x") is SlotState.LOADED
