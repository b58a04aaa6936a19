"""The offline yardstick for a replay: how few loads would a clairvoyant cortex need for this trace?

Belady's rule (evict what is needed furthest in the future) is optimal for one cache of equal-sized items;
here it runs through cortex's own :func:`~cortex.engine.placement.place` with the ``lru`` order fed the
*future* instead of the past (a model's "last use" is set so that the one needed furthest ahead looks least
recently used), so the node rule, pins, headroom and "only nodes that list it" are the engine's. Requests are
taken as points (no duration, instant loads): nothing is ever busy, so the figure is a relaxation, not a
schedule cortex could follow.

The replay applies it to the requests in the order the engine *served* them (lease times), not the order
they arrived: cortex batches, holding requests back until their model's turn, and a bound over the arrival
order would charge a load for every interleaving the batching removed. Over the service order the bound
isolates what eviction decides: how many loads the same schedule needs when every victim is chosen with
perfect knowledge of the future.
"""

from __future__ import annotations

from collections.abc import Sequence

from cortex.engine.placement import place
from cortex.engine.state import ModelSlot, NodeSnapshot, NodeStatus, SlotState
from cortex.replay.spec import FleetSpec, Request

__all__ = ["lower_bound_loads"]

_FAR = 1e12
"""``last_used`` = _FAR - next use: the model needed furthest ahead has the oldest "use"."""


def lower_bound_loads(requests: Sequence[Request], fleet: FleetSpec, *, headroom_mb: int) -> int:
    """Loads the clairvoyant schedule needs for ``requests`` (in arrival order) on ``fleet``.

    A request for a model that no node can take (not listed, too large) is skipped, as the replay fails it.
    """
    mb = {m.id: m.mb for m in fleet.models}
    nxt: list[float] = [0.0] * len(requests)
    upcoming: dict[str, float] = {}
    for i in range(len(requests) - 1, -1, -1):
        nxt[i] = upcoming.get(requests[i].model, float("inf"))
        upcoming[requests[i].model] = requests[i].t
    next_use = dict(upcoming)
    resident: dict[str, set[str]] = {n.name: set(n.pinned) for n in fleet.nodes}
    pinned = {n.name: set(n.pinned) for n in fleet.nodes}
    loads = 0
    for i, req in enumerate(requests):
        next_use[req.model] = nxt[i]
        if any(req.model in held for held in resident.values()) or req.model not in mb:
            continue
        snaps = []
        for node in fleet.nodes:
            held = resident[node.name]
            slots = tuple(
                ModelSlot(
                    model_id=m,
                    state=SlotState.LOADED if m in held else SlotState.UNLOADED,
                    state_since=0.0,
                    vram_mb=mb[m],
                    frees_mb=mb[m],
                    last_used=max(0.0, _FAR - next_use.get(m, float("inf"))) if m in held else 0.0,
                    pinned=m in pinned[node.name],
                )
                for m in node.models
            )
            snaps.append(
                NodeSnapshot(
                    name=node.name,
                    endpoint="",
                    status=NodeStatus.UP,
                    vram_total_mb=node.vram_mb,
                    vram_used_mb=sum(mb[m] for m in held),
                    vram_source="estimate",
                    headroom_mb=headroom_mb,
                    slots=slots,
                )
            )
        placement = place(
            req.model, mb[req.model], snaps, strategy="lru", priorities={}, now=0.0, min_resident_s=0.0, queued={}
        )
        if placement is None:
            continue
        resident[placement.node].difference_update(placement.victims)
        resident[placement.node].add(req.model)
        loads += 1
    return loads
