"""An asyncio event loop on virtual time: a day of timers runs in the seconds its callbacks take.

``cortex replay`` runs the engine's real lifecycle code, whose waits are all loop timers (``asyncio.sleep``,
``wait_for``, ``call_later``) and whose clock is ``loop.time()``. This loop never blocks: whenever nothing
is ready, its clock jumps to the next scheduled timer instead of sleeping until it. It does no I/O (its
selector reports nothing, ever), so it only suits code that talks to in-memory peers; a wait with no timer
behind it would block forever on a real loop, and here it raises :class:`Stalled` instead of hanging.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any

__all__ = ["Stalled", "VirtualLoop"]


class Stalled(RuntimeError):
    """Every task waits on something no timer will ever set: on a real loop this would hang."""


class _TimeSkippingSelector(selectors.BaseSelector):
    """A selector with no I/O: ``select(timeout)`` advances the loop's clock by ``timeout`` and returns."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, fileobj if isinstance(fileobj, int) else fileobj.fileno(), events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Stalled("no task is ready and no timer is scheduled")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def close(self) -> None:
        self._keys.clear()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and jumps over idle stretches (see the module docstring).

    Args:
        start: the clock's first reading (seconds). Keep it small enough that float steps stay far below a
            nanosecond (the loop's timer resolution): about 1e6 is right, a Unix time is not.
    """

    def __init__(self, start: float = 1_000_000.0) -> None:
        self._vtime = start
        super().__init__(_TimeSkippingSelector(self))
        # Timers due within this of now run now: the jump lands on a timer up to a float rounding.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        """The virtual clock."""
        return self._vtime

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the selector does it when the loop would otherwise wait)."""
        self._vtime += seconds
