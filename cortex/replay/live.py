"""The console's what-if: the live gateway's last hour, replayed under each strategy beside what happened.

It is split in two because the halves run in different places. :func:`capture` runs on the gateway's
loop and copies what the replay needs out of the live engine (the last hour's requests, the fleet as the
snapshot shows it: node memory, listed models, live pins, known and learned sizes, measured load times,
and a deep copy of the settings); nothing it returns refers to a live object. :func:`run_whatif` then runs
in a worker thread on that copy alone: :func:`~cortex.replay.run.replay_all` builds its own engine parts
on its own virtual-time loop, so the live engine is never touched from the thread. The fleet is built by
:func:`~cortex.replay.spec.fleet_from_settings`, the code behind ``cortex replay --fleet-from``, with the
live facts in place of the config's guesses.

A replay starts with only the pins loaded (like ``cortex replay``), while the live hour began with whatever
was resident then: a strategy's first loads of the hour may be loads the live engine did not need.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cortex.config import Settings
from cortex.engine.facade import WhatIf, WhatIfRow
from cortex.engine.history import Finished
from cortex.engine.state import FleetSnapshot
from cortex.replay.run import STRATEGIES, quantile, replay_all
from cortex.replay.spec import FleetSpec, Request, SpecError, fleet_from_settings

__all__ = ["DEFAULT_LOAD_S", "LiveCapture", "capture", "live_fleet", "run_whatif"]

DEFAULT_LOAD_S = 30.0
"""Load time of a model cortex never loaded in this process, when it has measured no load at all."""


@dataclass(frozen=True, slots=True)
class LiveCapture:
    """Everything a what-if needs, copied off the live engine (see the module docstring)."""

    requests: tuple[Finished, ...]
    """The last hour's finished requests, in arrival order."""
    settings: Settings
    """A deep copy of the live settings (the replayed engine takes its tunables)."""
    footprints: Mapping[str, int]
    """Known sizes (MiB): the snapshot's, then learned ones, then estimates from reported memory."""
    listed: Mapping[str, tuple[str, ...]]
    pinned: Mapping[str, tuple[str, ...]]
    vram: Mapping[str, int]
    load_times: Mapping[str, float]
    live_loads: int
    """Loads the live engine carried out in the window."""
    since: float
    until: float


def capture(
    snap: FleetSnapshot,
    settings: Settings,
    learned: Mapping[str, int],
    requests: Sequence[Finished],
    load_times: Mapping[str, float],
    live_loads: Mapping[str, int],
    now: float,
    window_s: float,
) -> LiveCapture:
    """Copy what a what-if needs from the live engine's state (runs on the loop; cheap).

    Args:
        snap: the current fleet.
        settings: the live settings (deep-copied here).
        learned: the footprints the engine learned.
        requests: the finished requests of the window.
        load_times: measured load seconds by model.
        live_loads: loads per model in the window.
        now: the wall-clock time.
        window_s: how far back the window reaches.
    """
    sizes: dict[str, int] = {}
    estimates: dict[str, int] = {}
    for node in snap.nodes:
        for slot in node.slots:
            if slot.vram_mb:
                sizes[slot.model_id] = slot.vram_mb
            elif slot.frees_mb:
                estimates[slot.model_id] = max(estimates.get(slot.model_id, 0), slot.frees_mb)
    for model in snap.models:
        if model.vram_mb:
            sizes.setdefault(model.id, model.vram_mb)
    footprints = {**estimates, **learned, **sizes}
    ordered = tuple(sorted(requests, key=lambda r: r.t))
    return LiveCapture(
        requests=ordered,
        settings=settings.model_copy(deep=True),
        footprints=footprints,
        listed={n.name: tuple(s.model_id for s in n.slots) for n in snap.nodes if n.slots},
        pinned={n.name: tuple(s.model_id for s in n.slots if s.pinned) for n in snap.nodes},
        vram={n.name: n.vram_total_mb for n in snap.nodes if n.vram_total_mb > 0},
        load_times=dict(load_times),
        live_loads=sum(live_loads.values()),
        since=ordered[0].t if ordered else now - window_s,
        until=now,
    )


def trace_of(requests: Sequence[Finished]) -> list[Request]:
    """The replay's trace: arrival, model and busy time of each request."""
    return [Request(r.t, r.model, r.dur) for r in requests]


def live_fleet(live: LiveCapture, trace: Sequence[Request]) -> FleetSpec:
    """The fleet to replay on, from the live facts (``cortex replay --fleet-from``'s builder).

    A model with no measured load time takes the mean of those measured, or :data:`DEFAULT_LOAD_S`.

    Raises:
        SpecError: a model of the trace has no known size.
    """
    measured = list(live.load_times.values())
    default = sum(measured) / len(measured) if measured else DEFAULT_LOAD_S
    return fleet_from_settings(
        live.settings,
        live.footprints,
        trace,
        load_s=default,
        load_times=live.load_times,
        listed=live.listed,
        pinned=live.pinned,
        vram=live.vram,
    )


def run_whatif(live: LiveCapture) -> WhatIf:
    """Replay the captured hour under each strategy (runs in a worker thread; touches only ``live``)."""
    strategy = live.settings.eviction.strategy
    head = WhatIf(since=live.since, until=live.until, strategy=strategy)
    if not live.requests:
        return dataclasses.replace(head, error="no finished requests in the last hour: nothing to replay")
    trace = trace_of(live.requests)
    try:
        fleet = live_fleet(live, trace)
    except SpecError as exc:
        return dataclasses.replace(head, error=str(exc))
    waits = [r.waited for r in live.requests]
    actual = WhatIfRow("live", len(trace), live.live_loads, quantile(waits, 0.95), max(waits, default=0.0))
    started = time.perf_counter()
    results = replay_all(trace, fleet, STRATEGIES, base=live.settings)
    rows = tuple(
        WhatIfRow(name, r.requests, r.loads, r.p95_wait_s, r.max_wait_s, r.failed) for name, r in results.items()
    )
    return WhatIf(
        since=live.since,
        until=live.until,
        strategy=strategy,
        live=actual,
        replayed=rows,
        seconds=time.perf_counter() - started,
    )
