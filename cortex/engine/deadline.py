"""A deadline that moves on every request and almost never fires: one loop timer, moved on lazily.

Arming a loop timer for each request and cancelling it when the request is done costs a ``call_at`` and a
``cancel`` per request, for a timer that nearly never fires. :class:`Deadline` keeps one timer: :meth:`set`
only notes the new time (arming the timer when none is armed or the new time is sooner), and a timer that
fires before the current time re-arms itself for it. ``IdleWatch`` (``cortex/proxy/forward.py``) does the
same for a stream's silence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["Deadline"]


class Deadline:
    """Call ``on_due`` once the time last :meth:`set` (loop time) passes, unless :meth:`clear` came first."""

    __slots__ = ("_armed_at", "_at", "_handle", "_loop", "_on_due")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_due: Callable[[], object]) -> None:
        self._loop = loop
        self._on_due = on_due
        self._at: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    @property
    def pending(self) -> bool:
        """Whether it will fire (set and not cleared since)."""
        return self._at is not None

    def set(self, at: float) -> None:
        """Fire at ``at`` (sooner or later than the time set before)."""
        self._at = at
        if self._handle is None or self._armed_at > at:
            self._arm(at)

    def clear(self) -> None:
        """Do not fire (the timer stays armed until it comes due, then does nothing unless set again)."""
        self._at = None

    def cancel(self) -> None:
        """Do not fire, and drop the timer (the owner is done with it)."""
        self._at = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = at
        self._handle = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at:
            self._arm(at)
            return
        self._at = None
        self._on_due()
