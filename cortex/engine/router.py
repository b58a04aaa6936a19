"""Where a request for a loaded model goes: a pure function, called once per request.

It takes anything shaped like a node (a :class:`~cortex.engine.state.NodeSnapshot` in tests and in
placement, the fleet's live records on the hot path, where building a snapshot per request would cost more
than the routing itself) and never awaits.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol

from cortex.engine.state import NodeStatus, SlotState

__all__ = ["NodeLike", "SlotLike", "pick_node"]


class SlotLike(Protocol):
    """The part of a model slot routing reads."""

    @property
    def state(self) -> SlotState: ...


class NodeLike(Protocol):
    """The part of a node routing reads."""

    @property
    def name(self) -> str: ...

    @property
    def status(self) -> NodeStatus: ...

    @property
    def in_flight(self) -> int: ...

    def slot(self, model_id: str) -> SlotLike | None: ...


def pick_node(model_id: str, nodes: Iterable[NodeLike], exclude: Collection[str] = ()) -> str | None:
    """The up, undrained node where ``model_id`` is loaded with the fewest requests in flight.

    Ties go to the node listed first in the config, so routing is deterministic.

    Args:
        model_id: the canonical model id.
        nodes: the fleet, in config order.
        exclude: nodes already tried for this request (failover).

    Returns:
        The node's name, or None when the model is loaded on no eligible node.
    """
    best: str | None = None
    best_load = 0
    for node in nodes:
        if node.status is not NodeStatus.UP or node.name in exclude:
            continue
        slot = node.slot(model_id)
        if slot is None or slot.state is not SlotState.LOADED:
            continue
        if best is None or node.in_flight < best_load:
            best, best_load = node.name, node.in_flight
    return best
