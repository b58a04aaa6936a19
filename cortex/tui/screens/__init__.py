"""The console's screens. Those that show live fleet data implement :class:`FleetView`.

The app owns the refresh timer and hands every fleet view on the screen stack the same snapshot and the
same "now", so the dashboard under a dialog and a detail screen on top never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from cortex.engine import FleetSnapshot

__all__ = ["FleetView"]


@runtime_checkable
class FleetView(Protocol):
    """A screen that redraws from a fleet snapshot."""

    def show(self, snap: FleetSnapshot, now: float, loads: Mapping[str, int] | None = None) -> None:
        """Redraw from this snapshot as of `now` (cheap when nothing changed); ``loads``: per model, last hour."""
        ...
