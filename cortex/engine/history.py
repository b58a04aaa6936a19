"""The engine's memory of its last hour: finished requests and the loads they cost.

The traffic record (``[gateway] record``) is a file for ``cortex replay`` and is off by default, yet the
console's ``loads/h`` column and its what-if must work without it. So the engine keeps its own bounded copy
of the last hour: one tuple per finished request, fed from the same place as the recorder
(:meth:`~cortex.engine.engine.Engine.record`) with the same fields a record line has, and one per load
cortex carried out, taken from its own ``ModelLoaded`` events. Both are bounded by age (:data:`WINDOW_S`)
and by count (:data:`MAX_REQUESTS`, :data:`MAX_LOADS`), so a busy gateway holds a few MB at most. Pruning
happens when the history is read or written, never on a timer.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import NamedTuple

from cortex.engine.metrics import RequestOutcome
from cortex.engine.state import RequestRecord

__all__ = ["MAX_LOADS", "MAX_REQUESTS", "WINDOW_S", "Finished", "TrafficHistory", "finished"]

WINDOW_S = 3600.0
"""How far back the history reaches (the console's "last hour")."""
MAX_REQUESTS = 100_000
"""Finished requests kept at most; beyond, the oldest go first (about 15 MB at the cap)."""
MAX_LOADS = 10_000
"""Loads kept at most."""
LOAD_SAMPLES = 5
"""Measured load times kept per model (their mean is the model's load time in a what-if)."""


class Finished(NamedTuple):
    """One finished request, as a ``[gateway] record`` line has it."""

    t: float
    """Arrival (Unix seconds)."""
    model: str
    dur: float
    """Seconds the node was busy with it (its whole time less the wait for a load)."""
    waited: float
    """Seconds it waited for its model to load."""


def finished(outcome: RequestOutcome, record: RequestRecord) -> Finished | None:
    """A finished request's record-line facts; None for one refused before routing (nothing the fleet did).

    The one derivation behind both the history and the ``[gateway] record`` file.
    """
    if outcome.model == "unknown":
        return None
    took = outcome.ended - outcome.started
    busy = max(0.0, took - outcome.queue_s)
    return Finished(round(record.ts - took, 3), outcome.model, round(busy, 3), round(outcome.queue_s, 3))


class TrafficHistory:
    """The last hour of finished requests and loads (see the module docstring).

    Args:
        clock: wall-clock time (the engine's clock).
        window_s: how far back to keep.
        max_requests: finished requests kept at most.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        window_s: float = WINDOW_S,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self.clock = clock
        self.window_s = window_s
        self._requests: deque[Finished] = deque(maxlen=max_requests)
        self._loads: deque[tuple[float, str]] = deque()
        self._counts: Counter[str] = Counter()
        self._counts_view: Mapping[str, int] | None = None
        self._load_s: dict[str, deque[float]] = {}

    def add_request(self, outcome: RequestOutcome, record: RequestRecord) -> None:
        """Note a finished request (the request path calls this: it only appends a tuple)."""
        item = finished(outcome, record)
        if item is not None:
            self._requests.append(item)

    def add_load(self, at: float, model: str, seconds: float | None) -> None:
        """Note a load cortex carried out (``seconds``: how long it took, when measured)."""
        self._prune_loads(self.clock())
        if len(self._loads) >= MAX_LOADS:
            _, oldest = self._loads.popleft()
            self._forget(oldest)
        self._loads.append((at, model))
        self._counts[model] += 1
        self._counts_view = None
        if seconds is not None:
            self._load_s.setdefault(model, deque(maxlen=LOAD_SAMPLES)).append(seconds)

    def _forget(self, model: str) -> None:
        self._counts[model] -= 1
        if self._counts[model] <= 0:
            del self._counts[model]
        self._counts_view = None

    def _prune_loads(self, now: float) -> None:
        horizon = now - self.window_s
        while self._loads and self._loads[0][0] < horizon:
            _, model = self._loads.popleft()
            self._forget(model)

    def loads_last_hour(self) -> Mapping[str, int]:
        """Loads per model within the window; the same object until a count changes."""
        self._prune_loads(self.clock())
        if self._counts_view is None:
            self._counts_view = dict(self._counts)
        return self._counts_view

    def requests_last_hour(self) -> list[Finished]:
        """The finished requests within the window, oldest first (a copy)."""
        horizon = self.clock() - self.window_s
        requests = self._requests
        while requests and requests[0].t < horizon:
            requests.popleft()
        return list(requests)

    def load_seconds(self) -> dict[str, float]:
        """Each model's mean measured load time (seconds), over its last few loads."""
        return {model: sum(s) / len(s) for model, s in self._load_s.items() if s}
