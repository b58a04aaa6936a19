"""Where a model that is loaded nowhere should go, and what must leave to make room: pure functions.

Placement looks at the whole fleet, not one node: replays of homelab traces showed that *which node* gives
up memory matters more than the order of eviction on a node. So :func:`place` prefers a node with room,
then the node whose cheapest valid victim set the policy values least. Victim sets never contain a pinned
model, a model with requests in flight or queued, or one loaded less than ``min_resident_s`` ago: when no
valid set exists the answer is None and the caller waits, it never bends the rules.

The ``cost`` strategy ranks a resident model by what evicting it is expected to cost: its reload time times
the probability that it is asked for again soon, per MiB its eviction frees. "Soon" comes from the model's
*bursts* (runs of requests close together, kept by a :class:`UseLog`): a model with reuse history is
expected back one typical inter-burst gap after its last burst. A model seen in a single burst that is over
has no evidence of reuse: it is "far" and costs nothing to miss, as does a model not expected back within
:data:`FAR_S`. That is scan resistance: an evaluation harness walking many models once per pass leaves a
trail of one-burst models, and recency or frequency would evict exactly the one the next pass needs first.
Far models leave first, the one expected back last first (Belady's rule on predicted uses): a one-burst
model is assumed back one cycle (the longest reuse gap seen) after its burst, so among them the most
recently used goes first (on a repeated scan the earliest-used come back first; on a single pass the order
costs nothing), and a model the current pass already served again goes before one it has yet to reach.
Models in use (in a burst) and everyday models with short reuse gaps are never evicted while a far model
could go instead. The figures come in as :class:`ModelStats` from the caller, so these functions stay pure
and a replay can feed them the same way the live engine does.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from cortex.engine.state import ModelSlot, NodeSnapshot, NodeStatus, SlotState

__all__ = [
    "BURST_GAP_S",
    "COST_HORIZON_S",
    "ModelStats",
    "Placement",
    "Strategy",
    "UseLog",
    "burst_gap_s",
    "cycle_s",
    "evictable",
    "in_burst",
    "miss_cost",
    "model_miss_cost",
    "next_use_s",
    "place",
    "select_victims",
    "victim_order",
]

Strategy = Literal["lru", "priority", "cost"]

COST_HORIZON_S = 1800.0
""""Soon", for the ``cost`` strategy: a model is valued by the chance it is asked for within this many seconds."""

FAR_S = 900.0
"""A model not expected back within this many seconds is "far": Belady's rule on predicted uses orders those."""

DEFAULT_LOAD_S = 30.0
"""The reload time assumed for a model cortex has never timed, when the caller knows none at all."""

BURST_GAP_S = 120.0
"""A request more than this many seconds after its model's previous one always starts a new *burst* of it."""

BURST_PACES = 16.0
"""A burst is over once its model has been quiet for this many of its usual gaps between requests in a burst
(at least :data:`BURST_MIN_S`, at most :data:`BURST_GAP_S`): a harness sending two prompts a second is done
after seconds of silence, a chat session with a request every 15 s only after two minutes."""

BURST_MIN_S = 10.0
"""The shortest silence that ends a burst, however fast its requests came."""

PACE_WEIGHT = 0.1
"""Weight of the newest gap between two requests of a burst in the model's usual one."""

GAP_WEIGHT = 0.5
"""Weight of the newest inter-burst gap in a model's typical gap (an exponentially weighted mean)."""


@dataclass(frozen=True, slots=True)
class ModelStats:
    """What the ``cost`` strategy knows about a model's demand and reload."""

    load_s: float = DEFAULT_LOAD_S
    """Seconds a load of it takes (measured, else an estimate)."""
    since_s: float | None = None
    """Seconds since its last request (None: never asked for, so no evidence that it will be)."""
    bursts: int = 0
    """Bursts of requests seen (:data:`BURST_GAP_S` apart or more), the one under way included."""
    gap_s: float = 0.0
    """Its typical idle time between two bursts (an exponentially weighted mean; 0 before a second burst)."""
    pace_s: float = math.inf
    """Its usual gap between two requests of one burst (an exponentially weighted mean; inf: none seen yet)."""


def burst_gap_s(pace_s: float) -> float:
    """The silence that ends a burst whose requests came ``pace_s`` apart (see :data:`BURST_PACES`)."""
    return min(BURST_GAP_S, max(BURST_MIN_S, BURST_PACES * pace_s))


def in_burst(s: ModelStats) -> bool:
    """Whether the model's current burst is still going (False without burst history)."""
    return s.since_s is not None and s.since_s <= burst_gap_s(s.pace_s)


class UseLog:
    """Each model's bursts of requests, as the :class:`ModelStats` of the ``cost`` strategy need them.

    The caller notes every request (:meth:`note`) and asks for the figures at a given time (:meth:`figures`);
    the log keeps four numbers per model and decides nothing itself.
    """

    __slots__ = ("_models",)

    def __init__(self) -> None:
        self._models: dict[str, tuple[float, int, float, float]] = {}
        """model → (time of its last request, bursts seen, typical gap between bursts, usual pace in one)."""

    def note(self, model_id: str, now: float) -> None:
        """Count a request for ``model_id`` arriving at ``now`` (seconds, the caller's clock)."""
        last, bursts, gap, pace = self._models.get(model_id, (now, 0, 0.0, math.inf))
        idle = max(0.0, now - last)
        if bursts == 0:
            bursts = 1
        elif idle > burst_gap_s(pace):
            gap = idle if bursts == 1 else (1 - GAP_WEIGHT) * gap + GAP_WEIGHT * idle
            bursts += 1
        else:
            pace = idle if math.isinf(pace) else (1 - PACE_WEIGHT) * pace + PACE_WEIGHT * idle
        self._models[model_id] = (max(last, now), bursts, gap, pace)

    def figures(self, model_id: str, now: float) -> tuple[float, int, float, float] | None:
        """(seconds since its last request, bursts, typical gap, usual pace) for ``model_id``; None if never noted."""
        entry = self._models.get(model_id)
        if entry is None:
            return None
        last, bursts, gap, pace = entry
        return max(0.0, now - last), bursts, gap, pace

    def models(self) -> list[str]:
        """Every model noted so far."""
        return list(self._models)


def cycle_s(stats: Mapping[str, ModelStats]) -> float:
    """How long a model seen in a single burst is assumed to stay away.

    The longest typical gap between bursts of any model with reuse history (a repeated scan comes back after
    a whole pass), at least :data:`FAR_S`.
    """
    return max([FAR_S, *(s.gap_s for s in stats.values() if s.bursts >= 2 and s.since_s is not None)])


def next_use_s(s: ModelStats, cycle: float = math.inf) -> float:
    """Expected seconds until the model is asked for again (``inf``: no evidence that it ever will be).

    In a burst (:func:`in_burst`): about as long as since its last request. After a single burst: one
    ``cycle`` (:func:`cycle_s`) after its last request, however overdue (so that among such models the most
    recently used is expected back last); ``inf`` without a cycle. With reuse history: the typical gap minus
    the time already idle, and once the model is later than that, as long again as it is late (a model quiet
    for long is likely to stay quiet); never less than :data:`BURST_GAP_S` outside a burst. Never asked for:
    ``inf``.
    """
    if s.since_s is None:
        return math.inf
    if in_burst(s):
        return max(s.since_s, 1.0)
    if s.bursts < 2:
        return cycle - s.since_s
    return max(s.gap_s - s.since_s, s.since_s - s.gap_s, BURST_GAP_S)


def _far(s: ModelStats, ahead: float) -> bool:
    """Whether a model is not expected back within the horizon (a single burst that is over counts as such)."""
    return s.since_s is not None and not in_burst(s) and (s.bursts < 2 or ahead > FAR_S)


def miss_cost(slot: ModelSlot, stats: Mapping[str, ModelStats]) -> float:
    """Expected reload seconds lost by evicting ``slot``, per MiB it frees: load_s x P(reuse soon) / MiB.

    P(reuse soon) is that of at least one request within :data:`COST_HORIZON_S` when the next one is
    expected :func:`next_use_s` from now (exponentially distributed); a model seen in a single burst, or not
    expected back within the horizon, costs nothing. A model of unknown size counts as 1 GiB, so it is
    neither free nor priceless.
    """
    return model_miss_cost(slot.model_id, slot.vram_mb or slot.frees_mb, stats)


def model_miss_cost(model_id: str, mb: int, stats: Mapping[str, ModelStats]) -> float:
    """:func:`miss_cost` of a model by id and footprint (0 = unknown: counted as 1 GiB)."""
    return _miss(stats.get(model_id, _NO_STATS), mb, math.inf)


def _miss(s: ModelStats, mb: int, cycle: float) -> float:
    ahead = next_use_s(s, cycle)
    if _far(s, ahead) or ahead <= 0:
        return 0.0
    return s.load_s * (1.0 - math.exp(-COST_HORIZON_S / ahead)) / max(mb or 1024, 1)


def _cost_key(slot: ModelSlot, stats: Mapping[str, ModelStats], cycle: float) -> tuple[float, float]:
    """The ``cost`` order of one slot: the lowest key leaves first.

    The models not expected back within :data:`FAR_S` first, the one expected back last first among them
    (Belady's rule on predicted uses); then the cheapest miss, least recently used first.
    """
    s = stats.get(slot.model_id, _NO_STATS)
    ahead = next_use_s(s, cycle)
    if _far(s, ahead):
        return (0.0, -ahead)
    return (_miss(s, slot.vram_mb or slot.frees_mb, cycle), _recency(slot))


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
        cycle = cycle_s(known)
        return sorted(slots, key=lambda s: (*_cost_key(s, known, cycle), s.model_id))
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
        # the expected reload seconds the whole set costs (not per MiB: every set frees what is needed), then
        # the set whose worst member comes last in the victim order (one-burst models: the most recent)
        known = stats or {}
        cycle = cycle_s(known)
        keys = [_cost_key(s, known, cycle) for s in victims]
        lost = sum(k[0] * max(s.vram_mb or s.frees_mb or 1024, 1) for k, s in zip(keys, victims, strict=True))
        return (lost, max(k[1] for k in keys), float(len(victims)))
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
