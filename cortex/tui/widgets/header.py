"""The one-line header: gateway address, uptime and fleet-wide rates.

A Static that re-renders only when its text changes, so the 4 Hz redraw costs nothing between seconds.
"""

from __future__ import annotations

from textual.widgets import Static

from cortex.tui.render import Cell
from cortex.tui.widgets.tone import tone_content

__all__ = ["FleetHeader"]


class FleetHeader(Static):
    """Address, uptime, req/s, tok/s, errors, in flight."""

    DEFAULT_CSS = """
    FleetHeader { height: 1; width: 1fr; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    _line: Cell = ()

    def show(self, line: Cell) -> None:
        """Display a header line if it differs from the one shown."""
        if line != self._line:
            self._line = line
            self.update(tone_content([line]), layout=False)  # fixed size: a repaint is enough
