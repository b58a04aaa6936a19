"""The response-id map: bounded LRU, written atomically and not on every change, kept across restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cortex.engine.affinity import AffinityStore, responses_path
from cortex.engine.engine import Engine
from cortex.sim import SimModel
from tests.conftest import FleetFactory, NodeSpec


def test_lru_keeps_the_most_recently_used(tmp_path: Path) -> None:
    store = AffinityStore(tmp_path / "responses.json", capacity=3)
    for i in range(3):
        store.remember(f"resp_{i}", "a", "m", None)
    assert store.lookup("resp_0") is not None  # a use: resp_1 is now the oldest
    store.remember("resp_3", "b", "m", 7)
    assert len(store) == 3
    assert store.lookup("resp_1") is None
    assert [store.lookup(f"resp_{i}") is not None for i in (0, 2, 3)] == [True, True, True]
    holder = store.lookup("resp_3")
    assert holder is not None
    assert (holder.node, holder.model, holder.epoch) == ("b", "m", 7)
    assert store.forget("resp_3")
    assert not store.forget("resp_3")


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "responses.json"
    store = AffinityStore(path)
    store.remember("resp_x", "gpu-a", "m", 1700000000)
    store.remember("resp_y", "gpu-b", "m", None)
    assert store.saves == 0  # nothing written until flushed or the delay passed
    store.flush()
    assert store.saves == 1
    store.flush()
    assert store.saves == 1  # nothing changed since
    assert not list(path.parent.glob("*.tmp"))
    assert path.stat().st_mode & 0o777 == 0o600
    again = AffinityStore(path, capacity=1)
    assert len(again) == 1
    assert again.lookup("resp_x") is None  # over capacity: the older one is dropped
    assert again.lookup("resp_y") is not None


def test_unreadable_file_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "responses.json"
    path.write_text("{not json")
    assert len(AffinityStore(path)) == 0
    rows = {"resp_ok": {"node": "a", "model": "m", "epoch": None}, "bad": {"node": 3}, "worse": "x"}
    path.write_text(json.dumps({"format": 2, "responses": rows}))
    store = AffinityStore(path)
    assert len(store) == 1
    assert store.lookup("resp_ok") is not None


def test_file_lives_beside_the_state_file(tmp_path: Path) -> None:
    assert responses_path(tmp_path / "state.json") == tmp_path / "responses.json"
    assert responses_path(None).name == "responses.json"
    assert responses_path(None).parent.name == "cortex"


async def test_a_burst_of_changes_is_one_write(tmp_path: Path) -> None:
    store = AffinityStore(tmp_path / "responses.json", save_delay_s=0.05)
    writer = asyncio.ensure_future(store.run())
    try:
        for i in range(500):
            store.remember(f"resp_{i}", "a", "m", None)
        for _ in range(250):
            if store.saves:
                break
            await asyncio.sleep(0.02)
        assert store.saves == 1
        rows = json.loads((tmp_path / "responses.json").read_text())["responses"]
        assert len(rows) == 500
        assert list(rows)[-1] == "resp_499"  # least recently used first
        assert rows["resp_7"] == {"node": "a", "model": "m", "epoch": None}
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_the_map_survives_a_gateway_restart(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m", 1000)]))
    async with f.openai() as client:
        made = await client.responses.create(model="m", input="remember this", max_output_tokens=2)
    await f.engine.stop()  # flushes the map, as a gateway shutting down does
    path = tmp_path / "responses.json"
    assert path.exists()
    again = Engine(f.settings, state_path=tmp_path / "state-2.json")
    holder = again.affinity.lookup(made.id)
    assert holder is not None
    assert (holder.node, holder.model) == ("a", "m")
