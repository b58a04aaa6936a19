"""What a front end may ask of the engine: the three essentials, and two views of the last hour.

The console (and anything else that is not the gateway) is written against this protocol, never against
:class:`cortex.engine.engine.Engine` itself, so tests drive it with a fake and the engine's internals stay
free to change. Besides snapshot, subscribe and submit, the engine answers two questions about its last
hour that the snapshot does not carry: how many loads each model cost (the console's ``loads/h``), and
what each eviction strategy would have done with the same traffic (the what-if, a replay run off the
loop). Their answers are plain values (:class:`WhatIf`), so ``cortex attach`` gets them over HTTP alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cortex.engine.commands import Command, CommandResult
from cortex.engine.events import Event
from cortex.engine.state import FleetSnapshot

__all__ = ["EngineFacade", "WhatIf", "WhatIfRow"]


@dataclass(frozen=True, slots=True)
class WhatIfRow:
    """What one strategy did (or, for ``live``, what really happened) with the last hour's requests."""

    name: str
    """``live``, or a strategy (``lru``, ``priority``, ``cost``)."""
    requests: int
    loads: int
    p95_wait_s: float
    """Seconds waited for a load by the 95th-percentile request (nearest rank)."""
    max_wait_s: float
    failed: int = 0
    """Requests that got an error instead of a node (replays only)."""


@dataclass(frozen=True, slots=True)
class WhatIf:
    """The last hour's traffic replayed under each strategy, beside what the live engine did.

    ``error`` says why there is nothing to compare (no traffic, a model of unknown size, the gateway
    unreachable); the rows are empty then.
    """

    since: float
    """Wall-clock start of the replayed window (the first request's arrival, or an hour ago)."""
    until: float
    strategy: str
    """The strategy the live engine runs."""
    live: WhatIfRow | None = None
    replayed: tuple[WhatIfRow, ...] = ()
    seconds: float = 0.0
    """How long the replays took."""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data (``GET /admin/whatif``)."""
        data = dataclasses.asdict(self)
        data["replayed"] = list(data["replayed"])  # as JSON reads back
        return data


class EngineFacade(Protocol):
    """Snapshot, subscribe, submit."""

    def snapshot(self) -> FleetSnapshot:
        """The current fleet (immutable; cheap to call at any rate)."""
        ...

    def subscribe(self, *, requests: bool = True) -> AsyncIterator[Event]:
        """Events as they happen; a slow reader loses request events, never lifecycle ones.

        ``requests=False`` leaves out the per-request events (the console reads the request log from the
        snapshot, and must not cost the proxy a wake-up per request).
        """
        ...

    async def submit(self, command: Command) -> CommandResult:
        """Carry out a command and say what became of it."""
        ...

    def loads_last_hour(self) -> Mapping[str, int]:
        """Loads cortex carried out in the last hour, by model (models with none are absent).

        The same object comes back until a count changes, so a caller may compare by identity.
        """
        ...

    async def whatif(self) -> WhatIf:
        """Replay the last hour's requests under each strategy beside what really happened.

        The replays run off the event loop; problems come back in :attr:`WhatIf.error`, never raised.
        """
        ...
