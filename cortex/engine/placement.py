"""Where a model that is loaded nowhere should go, and what must leave to make room: pure functions.

Placement looks at the whole fleet, not one node: replays of homelab traces showed that *which node* gives
up memory matters more than the order of eviction on a node. So :func:`place` prefers a node with room,
then the node whose cheapest valid victim set the policy values least. Victim sets never contain a pinned
model, a model with requests in flight or queued, or one loaded less than ``min_resident_s`` ago: when no
valid set exists the answer is None and the caller waits, it never bends the rules.

The ``cost`` strategy ranks a resident model by what evicting it is expected to cost: its reload time times
the probability that it is asked for again soon (from its decayed request rate, which mixes recency and
frequency), per MiB its eviction frees. The figures come in as :class:`ModelStats` from the caller, so these
functions stay pure and a replay can feed them the same way the live engine does.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cortex.engine.state import ModelSlot, NodeSnapshot, NodeStatus, SlotState

__all__ = [
    "COST_HORIZON_S",
    "ModelStats",
    "Placement",
    "Strategy",
    "evictable",
    "miss_cost",
    "model_miss_cost",
    "place",
    "select_victims",
    "victim_order",
]

Strategy = Literal["lru", "priority", "cost"]

COST_HORIZON_S = 600.0
""""Soon", for the ``cost`` strategy: a model is valued by the chance it is asked for within this many seconds."""

DEFAULT_LOAD_S = 30.0
"""The reload time assumed for a model cortex has never timed, when the caller knows none at all."""


@dataclass(frozen=True, slots=True)
class ModelStats:
    """What the ``cost`` strategy knows about a model's demand and reload."""

    rate: float = 0.0
    """Requests per second, exponentially decayed (recent requests weigh more; a model left alone fades)."""
    load_s: float = DEFAULT_LOAD_S
    """Seconds a load of it takes (measured, else an estimate)."""


def miss_cost(slot: ModelSlot, stats: Mapping[str, ModelStats]) -> float:
    """Expected reload seconds lost by evicting ``slot``, per MiB it frees: load_s x P(reuse soon) / MiB.

    P(reuse soon) is that of at least one request within :data:`COST_HORIZON_S` for a Poisson stream at the
    model's decayed rate. A model of unknown size counts as 1 GiB, so it is neither free nor priceless.
    """
    return model_miss_cost(slot.model_id, slot.vram_mb or slot.frees_mb, stats)


def model_miss_cost(model_id: str, mb: int, stats: Mapping[str, ModelStats]) -> float:
    """:func:`miss_cost` of a model by id and footprint (0 = unknown: counted as 1 GiB)."""
    s = stats.get(model_id, _NO_STATS)
    reuse = 1.0 - math.exp(-s.rate * COST_HORIZON_S)
    return s.load_s * reuse / max(mb or 1024, 1)


_NO_STATS = ModelStats()


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


def victim_order(
    slots: Sequence[ModelSlot],
    *,
    strategy: Strategy,
    priorities: Mapping[str, int],
    stats: Mapping[str, ModelStats] | None = None,
) -> list[ModelSlot]:
    """Slots in the order they should leave: LRU first, lowest priority then LRU, or cheapest miss then LRU.

    ``stats`` feeds the ``cost`` strategy (:func:`miss_cost`); without it every model costs the same and
    ``cost`` orders as ``lru``.
    """
    if strategy == "cost":
        known = stats or {}
        return sorted(slots, key=lambda s: (miss_cost(s, known), _recency(s), s.model_id))
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
    stats: Mapping[str, ModelStats] | None = None,
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
    for slot in victim_order(candidates, strategy=strategy, priorities=priorities, stats=stats):
        chosen.append(slot)
        frees = slot.vram_mb or slot.frees_mb
        uncounted = uncounted or not frees
        free += frees
        if free >= need_mb:
            return tuple(chosen)
    return tuple(chosen) if uncounted else None


def _cost(
    victims: Sequence[ModelSlot],
    strategy: Strategy,
    priorities: Mapping[str, int],
    stats: Mapping[str, ModelStats] | None,
) -> tuple[float, ...]:
    newest = max(_recency(s) for s in victims)
    if strategy == "cost":
        # the expected reload seconds the whole set costs (not per MiB: every set frees what is needed)
        known = stats or {}
        lost = sum(miss_cost(s, known) * max(s.vram_mb or s.frees_mb or 1024, 1) for s in victims)
        return (lost, newest, float(len(victims)))
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
    stats: Mapping[str, ModelStats] | None = None,
) -> Placement | None:
    """Choose the node for a model loaded nowhere.

    Only up, undrained nodes that list the model as ``unloaded`` are candidates. Among those where it fits,
    the one left with the most free memory wins; otherwise the node whose victim set is cheapest under the
    strategy (``lru``: the set whose most recent use is oldest; ``priority``: the lowest highest-priority,
    then the oldest; ``cost``: the fewest expected reload seconds lost, :func:`miss_cost`), fewer victims
    breaking ties.

    Args:
        model_id: the model to place.
        need_mb: its footprint in MiB, or the best estimate of it (0 when nothing is known: it is then placed
            where memory is free now, and an out-of-memory answer teaches a bound).
        nodes: the fleet, in config order.
        strategy: ``lru``, ``priority`` or ``cost``.
        priorities: model id → priority (missing = 0).
        now: wall-clock time, for ``min_resident_s``.
        min_resident_s: loaded models younger than this are not victims.
        protected: node → models that may not be evicted from it now, whatever else the rules say (models
            still serving the batch they were loaded for: the fairness quantum).
        stats: model id → demand and reload time, for the ``cost`` strategy (ignored by the others).
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
            stats=stats,
        )
        if victims is None:
            continue
        if not victims:
            fits.append((-(node.vram_free_mb - need_mb), order, node))
        else:
            # a set that is only hoped to free enough (victims of unknown size) ranks after every sure one
            sure = node.vram_free_mb + sum(v.vram_mb or v.frees_mb for v in victims) >= need_mb
            rank = (0.0 if sure else 1.0, *_cost(victims, strategy, priorities, stats))
            evictions.append((rank, order, node, victims))
    if fits:
        neg_left, _, node = min(fits, key=lambda t: (t[0], t[1]))
        return Placement(node.name, (), -neg_left)
    if evictions:
        _, _, node, victims = min(evictions, key=lambda t: (t[0], t[1]))
        freed = sum(v.vram_mb or v.frees_mb for v in victims)
        return Placement(node.name, tuple(v.model_id for v in victims), node.vram_free_mb + freed - need_mb)
    return None
