"""Where a model that is loaded nowhere should go, and what must leave to make room: pure functions.

Placement looks at the whole fleet, not one node: replays of homelab traces showed that *which node* gives
up memory matters more than the order of eviction on a node. So :func:`place` prefers a node with room,
then the node whose cheapest valid victim set the policy values least. Victim sets never contain a pinned
model, a model with requests in flight or queued, or one loaded less than ``min_resident_s`` ago: when no
valid set exists the answer is None and the caller waits, it never bends the rules.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cortex.engine.state import ModelSlot, NodeSnapshot, NodeStatus, SlotState

__all__ = ["Placement", "evictable", "place", "select_victims", "victim_order"]

Strategy = Literal["lru", "priority"]


@dataclass(frozen=True, slots=True)
class Placement:
    """Load the model on ``node`` after unloading ``victims`` (in this order)."""

    node: str
    victims: tuple[str, ...] = ()
    free_after_mb: int = 0


def evictable(slot: ModelSlot, *, now: float, min_resident_s: float, queued: Mapping[str, int]) -> bool:
    """Whether a slot may be unloaded to make room."""
    return (
        slot.state is SlotState.LOADED
        and not slot.pinned
        and slot.in_flight == 0
        and queued.get(slot.model_id, 0) == 0
        and (slot.loaded_at is None or now - slot.loaded_at >= min_resident_s)
    )


def _recency(slot: ModelSlot) -> float:
    return max(slot.last_used, slot.loaded_at or 0.0)


def victim_order(slots: Sequence[ModelSlot], *, strategy: Strategy, priorities: Mapping[str, int]) -> list[ModelSlot]:
    """Slots in the order they should leave: LRU first, or lowest priority then LRU."""
    if strategy == "priority":
        return sorted(slots, key=lambda s: (priorities.get(s.model_id, 0), _recency(s), s.model_id))
    return sorted(slots, key=lambda s: (_recency(s), s.model_id))


def select_victims(
    node: NodeSnapshot,
    need_mb: int,
    *,
    strategy: Strategy,
    priorities: Mapping[str, int],
    now: float,
    min_resident_s: float,
    queued: Mapping[str, int],
    protected: Collection[str] = (),
) -> tuple[ModelSlot, ...] | None:
    """The shortest prefix of the victim order that frees ``need_mb`` on ``node``.

    A victim counts for what it is expected to free (:attr:`ModelSlot.frees_mb`: its footprint, else an
    estimate from the node's report). A victim about which nothing at all is known still frees *something*:
    when the counted ones do not reach ``need_mb``, such victims are kept in the set rather than declaring
    the node full, and the caller re-measures after each unload and stops as soon as the node reports room.

    Returns:
        () when the model already fits, the victims when some must go, None when no valid set can free
        enough.
    """
    free = node.vram_free_mb
    if free >= need_mb:
        return ()
    candidates = [
        s
        for s in node.slots
        if s.model_id not in protected and evictable(s, now=now, min_resident_s=min_resident_s, queued=queued)
    ]
    chosen: list[ModelSlot] = []
    uncounted = False
    for slot in victim_order(candidates, strategy=strategy, priorities=priorities):
        chosen.append(slot)
        frees = slot.vram_mb or slot.frees_mb
        uncounted = uncounted or not frees
        free += frees
        if free >= need_mb:
            return tuple(chosen)
    return tuple(chosen) if uncounted else None


def _cost(victims: Sequence[ModelSlot], strategy: Strategy, priorities: Mapping[str, int]) -> tuple[float, ...]:
    newest = max(_recency(s) for s in victims)
    if strategy == "priority":
        top = max(priorities.get(s.model_id, 0) for s in victims)
        return (float(top), newest, float(len(victims)))
    return (newest, float(len(victims)))


def place(
    model_id: str,
    need_mb: int,
    nodes: Sequence[NodeSnapshot],
    *,
    strategy: Strategy,
    priorities: Mapping[str, int],
    now: float,
    min_resident_s: float,
    queued: Mapping[str, int],
    exclude: Collection[str] = (),
    exact: bool = True,
    protected: Mapping[str, Collection[str]] | None = None,
) -> Placement | None:
    """Choose the node for a model loaded nowhere.

    Only up, undrained nodes that list the model as ``unloaded`` are candidates. Among those where it fits,
    the one left with the most free memory wins; otherwise the node whose victim set is cheapest under the
    strategy (``lru``: the set whose most recent use is oldest; ``priority``: the lowest highest-priority,
    then the oldest), fewer victims breaking ties.

    Args:
        model_id: the model to place.
        need_mb: its footprint in MiB, or the best estimate of it (0 when nothing is known: it is then placed
            where memory is free now, and an out-of-memory answer teaches a bound).
        nodes: the fleet, in config order.
        strategy: ``lru`` or ``priority``.
        priorities: model id → priority (missing = 0).
        now: wall-clock time, for ``min_resident_s``.
        min_resident_s: loaded models younger than this are not victims.
        protected: node → models that may not be evicted from it now, whatever else the rules say (models
            still serving the batch they were loaded for: the fairness quantum).
        queued: model id → requests waiting for it.
        exclude: nodes not to use (a load already failed there).
        exact: whether ``need_mb`` is the model's known footprint. A load whose size is only estimated runs
            alone on its node (no other load in progress there, before or after it starts), so that the
            device cannot be overcommitted by two guesses and the size it takes can be measured.

    Returns:
        The placement, or None when no node can take the model without breaking a rule.
    """
    fits: list[tuple[int, int, NodeSnapshot]] = []
    evictions: list[tuple[tuple[float, ...], int, NodeSnapshot, tuple[ModelSlot, ...]]] = []
    for order, node in enumerate(nodes):
        if node.status is not NodeStatus.UP or node.name in exclude:
            continue
        slot = node.slot(model_id)
        if slot is None or slot.state is not SlotState.UNLOADED:
            continue
        if need_mb > node.vram_total_mb - node.headroom_mb:
            continue
        loading = [s for s in node.slots if s.state is SlotState.LOADING]
        if loading and (not exact or any(s.vram_mb is None for s in loading)):
            continue
        victims = select_victims(
            node,
            need_mb,
            strategy=strategy,
            priorities=priorities,
            now=now,
            min_resident_s=min_resident_s,
            queued=queued,
            protected=protected.get(node.name, ()) if protected else (),
        )
        if victims is None:
            continue
        if not victims:
            fits.append((-(node.vram_free_mb - need_mb), order, node))
        else:
            # a set that is only hoped to free enough (victims of unknown size) ranks after every sure one
            sure = node.vram_free_mb + sum(v.vram_mb or v.frees_mb for v in victims) >= need_mb
            evictions.append(((0.0 if sure else 1.0, *_cost(victims, strategy, priorities)), order, node, victims))
    if fits:
        neg_left, _, node = min(fits, key=lambda t: (t[0], t[1]))
        return Placement(node.name, (), -neg_left)
    if evictions:
        _, _, node, victims = min(evictions, key=lambda t: (t[0], t[1]))
        freed = sum(v.vram_mb or v.frees_mb for v in victims)
        return Placement(node.name, tuple(v.model_id for v in victims), node.vram_free_mb + freed - need_mb)
    return None
