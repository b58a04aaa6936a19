"""Table tests of :func:`cortex.engine.router.pick_node`: where a request for a loaded model goes."""

from __future__ import annotations

from typing import Any, cast

import pytest

from cortex.config import NodeSettings
from cortex.engine.fleet import NodeRec, SlotRec
from cortex.engine.mistralrs import MistralRsClient
from cortex.engine.router import pick_node
from cortex.engine.state import ModelSlot, NodeSnapshot, NodeStatus, SlotState

M = "org/model"


def node(
    name: str,
    *,
    state: SlotState | None = SlotState.LOADED,
    in_flight: int = 0,
    status: NodeStatus = NodeStatus.UP,
    model: str = M,
) -> NodeSnapshot:
    """A node listing ``model`` in ``state`` (None: not listed) with ``in_flight`` requests."""
    slots = () if state is None else (ModelSlot(model, state, 0.0, vram_mb=1000),)
    return NodeSnapshot(
        name=name,
        endpoint=f"http://{name}:8080",
        status=status,
        vram_total_mb=8192,
        vram_used_mb=1000,
        vram_source="estimate",
        headroom_mb=0,
        slots=slots,
        in_flight=in_flight,
    )


CASES: list[Any] = [
    pytest.param([node("a")], (), "a", id="single-loaded-node"),
    pytest.param(
        [node("a", in_flight=3), node("b", in_flight=1), node("c", in_flight=2)], (), "b", id="least-in-flight"
    ),
    pytest.param([node("a", in_flight=2), node("b", in_flight=2)], (), "a", id="tie-goes-to-config-order"),
    pytest.param(
        [node("a", in_flight=5), node("b", in_flight=2), node("c", in_flight=2)], (), "b", id="tie-after-better-node"
    ),
    pytest.param([node("a", in_flight=0, status=NodeStatus.DOWN), node("b", in_flight=9)], (), "b", id="down-skipped"),
    pytest.param(
        [node("a", in_flight=0, status=NodeStatus.DRAINING), node("b", in_flight=9)], (), "b", id="draining-skipped"
    ),
    pytest.param(
        [node("a", in_flight=0, status=NodeStatus.RESTARTING), node("b", in_flight=9)], (), "b", id="restarting-skipped"
    ),
    pytest.param(
        [node("a", in_flight=0, status=NodeStatus.UNKNOWN), node("b", in_flight=9)], (), "b", id="unknown-skipped"
    ),
    pytest.param([node("a", in_flight=0), node("b", in_flight=4)], ("a",), "b", id="exclude"),
    pytest.param([node("a"), node("b")], ("a", "b"), None, id="all-excluded"),
    pytest.param([node("a", state=SlotState.UNLOADED), node("b", in_flight=7)], (), "b", id="unloaded-slot-skipped"),
    pytest.param([node("a", state=SlotState.LOADING), node("b", in_flight=7)], (), "b", id="loading-slot-skipped"),
    pytest.param([node("a", state=SlotState.UNLOADING), node("b", in_flight=7)], (), "b", id="unloading-slot-skipped"),
    pytest.param([node("a", state=SlotState.STUCK), node("b", in_flight=7)], (), "b", id="stuck-reloading-skipped"),
    pytest.param([node("a", state=None), node("b", in_flight=7)], (), "b", id="not-listed-skipped"),
    pytest.param([node("a", state=SlotState.UNLOADED)], (), None, id="loaded-nowhere"),
    pytest.param([node("a", model="org/other")], (), None, id="other-model-only"),
    pytest.param([], (), None, id="empty-fleet"),
    pytest.param(
        [node("a", status=NodeStatus.DOWN), node("b", status=NodeStatus.DRAINING)], (), None, id="no-routable-node"
    ),
    pytest.param(
        [node("a", in_flight=1, status=NodeStatus.DOWN), node("b", in_flight=3), node("c", in_flight=3)],
        ("x",),
        "b",
        id="unknown-exclude-name-ignored",
    ),
]


@pytest.mark.parametrize(("nodes", "exclude", "expected"), CASES)
def test_pick_node(nodes: list[NodeSnapshot], exclude: tuple[str, ...], expected: str | None) -> None:
    assert pick_node(M, nodes, exclude) == expected


def test_pick_node_accepts_a_generator_once() -> None:
    """The hot path hands it ``dict.values()``-like iterables; a one-shot iterator must work too."""
    nodes = [node("a", in_flight=2), node("b", in_flight=1)]
    assert pick_node(M, iter(nodes)) == "b"


def test_pick_node_on_live_records() -> None:
    """The fleet's mutable records satisfy the protocol (drained and restarting hide a node)."""
    recs = []
    for name in ("a", "b"):
        rec = NodeRec(NodeSettings(name=name, endpoint=f"http://{name}:1", vram_mb=8192), cast(MistralRsClient, None))
        rec.health = NodeStatus.UP
        rec.slots[M] = SlotRec(M, SlotState.LOADED, 0.0)
        recs.append(rec)
    recs[1].in_flight = 1
    assert pick_node(M, recs) == "a"
    recs[0].drained = True
    assert pick_node(M, recs) == "b"
    recs[1].restarting = True
    assert pick_node(M, recs) is None
