"""Table tests of the pure placement functions: ``evictable``, ``victim_order``, ``select_victims``, ``place``.

Times are wall-clock seconds around ``NOW``; ``min_resident_s`` is 30 unless a case says otherwise. A node's
used VRAM is the sum of the known footprints of what it holds (as the estimate would be) unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from cortex.engine.placement import Placement, Strategy, evictable, place, select_victims, victim_order
from cortex.engine.state import ModelSlot, NodeSnapshot, NodeStatus, SlotState

NOW = 100_000.0
OLD = 1.0
"""Loaded long ago (before any use in the tables): past any ``min_resident_s`` used here."""
MIN_RESIDENT = 30.0
TARGET = "new/model"


def slot(
    model: str,
    vram: int | None,
    *,
    used: float = 0.0,
    loaded_at: float | None = OLD,
    state: SlotState = SlotState.LOADED,
    in_flight: int = 0,
    pinned: bool = False,
    frees: int = 0,
) -> ModelSlot:
    """A slot; ``used`` is its last use (0 = never); ``frees``: its estimate when ``vram`` is unknown."""
    return ModelSlot(
        model_id=model,
        state=state,
        state_since=OLD,
        vram_mb=vram,
        in_flight=in_flight,
        last_used=used,
        loaded_at=loaded_at if state is SlotState.LOADED else None,
        pinned=pinned,
        frees_mb=vram or frees,
    )


def target(state: SlotState = SlotState.UNLOADED, vram: int | None = 4000) -> ModelSlot:
    return slot(TARGET, vram, state=state, loaded_at=None)


def node(
    name: str,
    *slots: ModelSlot,
    total: int = 10_000,
    used: int | None = None,
    headroom: int = 0,
    status: NodeStatus = NodeStatus.UP,
) -> NodeSnapshot:
    if used is None:
        used = sum(
            s.vram_mb or 0 for s in slots if s.state in (SlotState.LOADED, SlotState.LOADING, SlotState.UNLOADING)
        )
    return NodeSnapshot(
        name=name,
        endpoint=f"http://{name}:8080",
        status=status,
        vram_total_mb=total,
        vram_used_mb=used,
        vram_source="estimate",
        headroom_mb=headroom,
        slots=slots,
    )


# -- evictable -----------------------------------------------------------------------------------------

EVICTABLE: list[Any] = [
    pytest.param(slot("a", 1000), {}, True, id="idle-old-loaded"),
    pytest.param(slot("a", 1000, pinned=True), {}, False, id="pinned"),
    pytest.param(slot("a", 1000, in_flight=1), {}, False, id="in-flight"),
    pytest.param(slot("a", 1000), {"a": 1}, False, id="queued"),
    pytest.param(slot("a", 1000), {"b": 3}, True, id="other-model-queued"),
    pytest.param(slot("a", 1000), {"a": 0}, True, id="queue-zero"),
    pytest.param(slot("a", 1000, loaded_at=NOW - 5), {}, False, id="too-young"),
    pytest.param(slot("a", 1000, loaded_at=NOW - MIN_RESIDENT), {}, True, id="exactly-min-resident"),
    pytest.param(slot("a", 1000, loaded_at=NOW - MIN_RESIDENT + 0.01), {}, False, id="just-under-min-resident"),
    pytest.param(slot("a", 1000, state=SlotState.LOADING), {}, False, id="loading"),
    pytest.param(slot("a", 1000, state=SlotState.UNLOADING), {}, False, id="unloading"),
    pytest.param(slot("a", 1000, state=SlotState.UNLOADED), {}, False, id="unloaded"),
    pytest.param(slot("a", 1000, state=SlotState.STUCK), {}, False, id="stuck-reloading"),
    pytest.param(slot("a", None), {}, True, id="unknown-footprint-is-evictable-but-never-counted"),
]


@pytest.mark.parametrize(("s", "queued", "expected"), EVICTABLE)
def test_evictable(s: ModelSlot, queued: Mapping[str, int], expected: bool) -> None:
    assert evictable(s, now=NOW, min_resident_s=MIN_RESIDENT, queued=queued) is expected


# -- victim_order --------------------------------------------------------------------------------------

ORDER: list[Any] = [
    pytest.param(
        [slot("a", 1, used=300), slot("b", 1, used=100), slot("c", 1, used=200)],
        "lru",
        {},
        ["b", "c", "a"],
        id="lru-oldest-use-first",
    ),
    pytest.param(
        [slot("a", 1, used=0, loaded_at=500), slot("b", 1, used=400)],
        "lru",
        {},
        ["b", "a"],
        id="lru-never-used-counts-from-load",
    ),
    pytest.param(
        [slot("b", 1, used=100), slot("a", 1, used=100)],
        "lru",
        {},
        ["a", "b"],
        id="lru-tie-by-id",
    ),
    pytest.param(
        [slot("a", 1, used=100), slot("b", 1, used=500), slot("c", 1, used=50)],
        "priority",
        {"a": 5, "b": 0, "c": 9},
        ["b", "a", "c"],
        id="priority-lowest-first",
    ),
    pytest.param(
        [slot("a", 1, used=300), slot("b", 1, used=100), slot("c", 1, used=200)],
        "priority",
        {"a": 1, "b": 1, "c": 1},
        ["b", "c", "a"],
        id="priority-tie-then-lru",
    ),
    pytest.param(
        [slot("a", 1, used=300), slot("b", 1, used=100)],
        "priority",
        {"a": -1},
        ["a", "b"],
        id="priority-missing-is-zero",
    ),
]


@pytest.mark.parametrize(("slots", "strategy", "priorities", "expected"), ORDER)
def test_victim_order(
    slots: list[ModelSlot], strategy: Strategy, priorities: Mapping[str, int], expected: list[str]
) -> None:
    assert [s.model_id for s in victim_order(slots, strategy=strategy, priorities=priorities)] == expected


# -- select_victims ------------------------------------------------------------------------------------

LRU_ABC = (slot("a", 3000, used=300), slot("b", 3000, used=100), slot("c", 3000, used=200))
"""9,000 of 10,000 MiB used; b is the least recently used, then c, then a."""

SELECT: list[Any] = [
    pytest.param(node("n", *LRU_ABC), 1000, "lru", {}, {}, (), id="fits-in-free"),
    pytest.param(node("n", *LRU_ABC, total=9000), 0, "lru", {}, {}, (), id="zero-need-fits-exactly"),
    pytest.param(node("n", *LRU_ABC), 1001, "lru", {}, {}, ("b",), id="one-victim-lru"),
    pytest.param(node("n", *LRU_ABC), 4001, "lru", {}, {}, ("b", "c"), id="two-victims-lru-order"),
    pytest.param(node("n", *LRU_ABC), 10_000, "lru", {}, {}, ("b", "c", "a"), id="everything-must-go"),
    pytest.param(node("n", *LRU_ABC), 10_001, "lru", {}, {}, None, id="not-enough-even-with-all"),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, used=100, pinned=True), slot("c", 3000, used=200)),
        1001,
        "lru",
        {},
        {},
        ("c",),
        id="pinned-skipped",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, used=100, in_flight=2), slot("c", 3000, used=200)),
        1001,
        "lru",
        {},
        {},
        ("c",),
        id="in-flight-skipped",
    ),
    pytest.param(node("n", *LRU_ABC), 1001, "lru", {}, {"b": 1}, ("c",), id="queued-skipped"),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, loaded_at=NOW - 10), slot("c", 3000, used=200)),
        1001,
        "lru",
        {},
        {},
        ("c",),
        id="too-young-skipped",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", None, used=100), slot("c", 3000, used=200), used=9000),
        1001,
        "lru",
        {},
        {},
        ("b", "c"),
        id="unknown-footprint-evicted-in-order-counts-nothing",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", None, used=100, frees=2000), used=9000),
        1001,
        "lru",
        {},
        {},
        ("b",),
        id="unknown-footprint-counts-its-estimate",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", None, used=100, frees=500), used=9800),
        1001,
        "lru",
        {},
        {},
        ("b", "a"),
        id="estimate-too-small-takes-the-next",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300, pinned=True), slot("b", 2000, used=100), used=9800),
        5000,
        "lru",
        {},
        {},
        None,
        id="known-victims-cannot-free-enough",
    ),
    pytest.param(
        node("n", slot("a", None, used=300), slot("b", None, used=100), used=9000),
        1001,
        "lru",
        {},
        {},
        ("b", "a"),
        id="only-unknown-footprints-all-in-order",
    ),
    pytest.param(
        node(
            "n",
            slot("a", 3000, pinned=True),
            slot("b", 3000, in_flight=1),
            slot("c", 3000, loaded_at=NOW - 1),
        ),
        1001,
        "lru",
        {},
        {},
        None,
        id="no-valid-set",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, used=100), headroom=500, used=6000),
        3501,
        "lru",
        {},
        {},
        ("b",),
        id="headroom-forces-a-victim",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, used=100), headroom=500, used=6000),
        3500,
        "lru",
        {},
        {},
        (),
        id="headroom-exactly-fits",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, used=100), used=9000),
        1001,
        "lru",
        {},
        {},
        ("b",),
        id="reported-used-above-estimate",
    ),
    pytest.param(
        node(
            "n",
            slot("a", 3000, used=300),
            slot("b", 3000, state=SlotState.UNLOADING),
            slot("c", 3000, state=SlotState.LOADING),
        ),
        1001,
        "lru",
        {},
        {},
        ("a",),
        id="loading-and-unloading-not-victims",
    ),
    pytest.param(node("n", *LRU_ABC), 1001, "priority", {"a": 0, "b": 9, "c": 5}, {}, ("a",), id="priority-lowest"),
    pytest.param(
        node("n", *LRU_ABC), 4001, "priority", {"a": 0, "b": 9, "c": 5}, {}, ("a", "c"), id="priority-two-lowest"
    ),
    pytest.param(
        node("n", *LRU_ABC), 1001, "priority", {"a": 1, "b": 1, "c": 1}, {}, ("b",), id="priority-tie-then-lru"
    ),
    pytest.param(
        node("n", slot("a", 3000, pinned=True), slot("b", 3000, used=100), slot("c", 3000, used=200)),
        1001,
        "priority",
        {"a": -10, "b": 9, "c": 5},
        {},
        ("c",),
        id="priority-never-pinned",
    ),
    pytest.param(
        node("n", slot("a", 3000, used=300), slot("b", 3000, used=100), used=11_000),
        0,
        "lru",
        {},
        {},
        ("b",),
        id="over-budget-node-frees-down-to-budget",
    ),
]


@pytest.mark.parametrize(("n", "need", "strategy", "priorities", "queued", "expected"), SELECT)
def test_select_victims(
    n: NodeSnapshot,
    need: int,
    strategy: Strategy,
    priorities: Mapping[str, int],
    queued: Mapping[str, int],
    expected: tuple[str, ...] | None,
) -> None:
    got = select_victims(
        n, need, strategy=strategy, priorities=priorities, now=NOW, min_resident_s=MIN_RESIDENT, queued=queued
    )
    assert (None if got is None else tuple(s.model_id for s in got)) == expected


def test_select_victims_zero_min_resident_allows_fresh_models() -> None:
    n = node("n", slot("a", 3000, loaded_at=NOW), slot("b", 7000, pinned=True))
    got = select_victims(n, 1, strategy="lru", priorities={}, now=NOW, min_resident_s=0, queued={})
    assert got is not None
    assert [s.model_id for s in got] == ["a"]


# -- place ---------------------------------------------------------------------------------------------

PLACE: list[Any] = [
    pytest.param(
        [node("a", target(), slot("x", 8000)), node("b", target(), slot("y", 2000))],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", (), 4000),
        id="fits-on-one-node-only",
    ),
    pytest.param(
        [node("a", target(), slot("x", 3000)), node("b", target(), slot("y", 1000)), node("c", target())],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("c", (), 6000),
        id="fits-several-most-free-left",
    ),
    pytest.param(
        [node("a", target(), slot("x", 1000)), node("b", target(), slot("y", 1000))],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("a", (), 5000),
        id="fit-tie-config-order",
    ),
    pytest.param(
        [
            node("a", target(), slot("x", 9000, used=1)),
            node("b", target(), slot("y", 5000, used=99_000), total=9000),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", (), 0),
        id="fit-beats-eviction-exact-fit",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 4000, used=500), slot("a2", 4000, used=900)),
            node("b", target(), slot("b1", 8000, used=700)),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("a", ("a1",), 2000),
        id="lru-oldest-victim-set-wins",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 1000, used=200), slot("a2", 8000, used=900)),
            node("b", target(), slot("b1", 5000, used=700), slot("pin", 4000, used=999, pinned=True)),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", ("b1",), 2000),
        id="lru-not-the-node-freeing-most-but-oldest-set",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 1000, used=200), slot("a2", 7000, used=900)),
            node("b", target(), slot("b1", 9000, used=950)),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("a", ("a1", "a2"), 6000),
        id="lru-set-newest-use-decides",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 8000, used=100)),
            node("b", target(), slot("b1", 8000, used=900)),
        ],
        4000,
        "priority",
        {"a1": 5, "b1": 1},
        {},
        (),
        Placement("b", ("b1",), 6000),
        id="priority-lowest-priority-set-wins",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 8000, used=900)),
            node("b", target(), slot("b1", 8000, used=100)),
        ],
        4000,
        "priority",
        {"a1": 3, "b1": 3},
        {},
        (),
        Placement("b", ("b1",), 6000),
        id="priority-tie-then-lru",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 2000, used=100), slot("a2", 2000, used=100), used=10_000),
            node("b", target(), slot("b1", 4000, used=100), used=10_000),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", ("b1",), 0),
        id="equal-cost-fewer-victims",
    ),
    pytest.param(
        [node("a", target(), slot("a1", 8000, used=100)), node("b", target(), slot("b1", 8000, used=900))],
        4000,
        "lru",
        {},
        {},
        ("a",),
        Placement("b", ("b1",), 6000),
        id="exclude",
    ),
    pytest.param(
        [node("a", slot("x", 1000)), node("b", target(), slot("y", 5000))],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", (), 1000),
        id="node-not-listing-model-skipped",
    ),
    pytest.param(
        [node("a", target(SlotState.STUCK)), node("b", target(), slot("y", 5000))],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", (), 1000),
        id="stuck-reloading-node-skipped",
    ),
    pytest.param(
        [node("a", target(SlotState.LOADING)), node("b", target(SlotState.LOADED))],
        4000,
        "lru",
        {},
        {},
        (),
        None,
        id="loading-or-loaded-not-candidates",
    ),
    pytest.param(
        [
            node("a", target(), status=NodeStatus.DOWN),
            node("b", target(), status=NodeStatus.DRAINING),
            node("c", target(), status=NodeStatus.RESTARTING),
            node("d", target(), slot("y", 5000)),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("d", (), 1000),
        id="down-draining-restarting-skipped",
    ),
    pytest.param(
        [node("a", target(), total=12_000, headroom=8001)],
        4000,
        "lru",
        {},
        {},
        (),
        None,
        id="larger-than-budget-never-placed",
    ),
    pytest.param(
        [node("a", target(), slot("y", 6000), headroom=1000)],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("a", ("y",), 5000),
        id="headroom-respected",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 8000, pinned=True)),
            node("b", target(), slot("b1", 8000, in_flight=1)),
            node("c", target(), slot("c1", 8000, loaded_at=NOW - 1)),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        None,
        id="no-valid-set-anywhere",
    ),
    pytest.param(
        [
            node("a", target(), slot("a1", 8000, used=100, pinned=True)),
            node("b", target(), slot("b1", 8000, used=900)),
        ],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", ("b1",), 6000),
        id="only-valid-set-even-if-newer",
    ),
    pytest.param(
        [node("a", target(), slot("a1", 8000, used=100)), node("b", target(), slot("b1", 8000, used=900))],
        4000,
        "lru",
        {},
        {"a1": 2},
        (),
        Placement("b", ("b1",), 6000),
        id="queued-victim-protected",
    ),
    pytest.param(
        [node("a", target(vram=None), slot("x", 3000)), node("b", target(vram=None), slot("y", 1000))],
        0,
        "lru",
        {},
        {},
        (),
        Placement("b", (), 9000),
        id="unknown-need-most-free",
    ),
    pytest.param(
        [node("a", target(), slot("a1", None, used=100), used=9000), node("b", target(), slot("b1", 8000, used=900))],
        4000,
        "lru",
        {},
        {},
        (),
        Placement("b", ("b1",), 6000),
        id="a-sure-set-beats-one-of-unknown-size",
    ),
]


@pytest.mark.parametrize(("nodes", "need", "strategy", "priorities", "queued", "exclude", "expected"), PLACE)
def test_place(
    nodes: list[NodeSnapshot],
    need: int,
    strategy: Strategy,
    priorities: Mapping[str, int],
    queued: Mapping[str, int],
    exclude: tuple[str, ...],
    expected: Placement | None,
) -> None:
    got = place(
        TARGET,
        need,
        nodes,
        strategy=strategy,
        priorities=priorities,
        now=NOW,
        min_resident_s=MIN_RESIDENT,
        queued=queued,
        exclude=exclude,
    )
    assert got == expected


def test_place_never_exceeds_budget_on_the_chosen_node() -> None:
    nodes = [node("a", target(), slot("a1", 3000, used=1), slot("a2", 3000, used=2), headroom=700, total=9000)]
    got = place(TARGET, 4000, nodes, strategy="lru", priorities={}, now=NOW, min_resident_s=0, queued={}, exclude=())
    assert got == Placement("a", ("a1",), 9000 - 700 - 3000 - 4000)
    assert got is not None
    assert got.free_after_mb >= 0
