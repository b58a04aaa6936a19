"""The three things a front end may ask of the engine.

The console (and anything else that is not the gateway) is written against this protocol, never against
:class:`cortex.engine.engine.Engine` itself, so tests drive it with a fake and the engine's internals stay
free to change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from cortex.engine.commands import Command, CommandResult
from cortex.engine.events import Event
from cortex.engine.state import FleetSnapshot

__all__ = ["EngineFacade"]


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
