"""A caption and a textual Sparkline: one figure of the selected node or model over the window.

The caption says whose figure it is and its current value; the sparkline gets new data only when the
series changed, because assigning ``data`` always repaints.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from cortex.tui.render import Cell
from cortex.tui.widgets.tone import tone_content

__all__ = ["SparkPanel"]


class SparkPanel(Horizontal):
    """``tok/s llama-3-8b 812`` followed by its sparkline."""

    DEFAULT_CSS = """
    SparkPanel { height: 2; width: 1fr; }
    SparkPanel > Static { width: 20; height: 2; text-wrap: nowrap; text-overflow: ellipsis; }
    SparkPanel > Sparkline { width: 1fr; height: 2; margin-right: 1; }
    """

    _caption: tuple[Cell, ...] = ()
    _series: tuple[float, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static("")
        yield Sparkline([], summary_function=max)

    def on_mount(self) -> None:
        self._paint()

    def show(self, caption: Sequence[Cell], series: Sequence[float]) -> None:
        """Display a two-line caption and a series, touching only what changed."""
        caption, values = tuple(caption), tuple(series)
        if caption == self._caption and values == self._series:
            return
        self._caption, self._series = caption, values
        if self.is_mounted:
            self._paint()

    def _paint(self) -> None:
        self.query_one(Static).update(tone_content(self._caption), layout=False)  # fixed size
        spark = self.query_one(Sparkline)
        if spark.data != list(self._series):
            spark.data = list(self._series)
