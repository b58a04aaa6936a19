"""The request log: a read-only table drawn line by line, each row painted once.

Under load every redraw brings a page of new rows. In a ``DataTable`` any change re-renders every visible
cell (each through Rich's console), and that was most of what the console cost the proxy: with it the
gateway kept about 0.84 of its ``--no-tui`` throughput, and with the log not redrawn at all 1.0
(``bench/console_overhead.py``). Here the log is a ``ScrollView`` on Textual's line API: a row's line is
painted once, kept while the row is on screen (keyed by its cells, so rows that only move down are not
repainted), and a redraw is a lookup per visible line. The header stays on the first line while the rows
scroll under it.

Cells are toned runs like the fleet tables' (:func:`cortex.tui.widgets.fleet_table.paint`) with the same
``tone--*`` component classes, so a theme change restyles the log as well.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.cells import cell_len
from textual import events
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from cortex.tui.render import Cell, ColumnSpec, Row
from cortex.tui.widgets.fleet_table import TONES, ToneStyles, column_widths, paint

__all__ = ["RequestLog"]


class RequestLog(ScrollView, can_focus=False):
    """Rows of fixed-width columns (one takes the width left over) under a header line."""

    COMPONENT_CLASSES = {"request-log--header", *(f"tone--{tone}" for tone in TONES)}
    DEFAULT_CSS = """
    RequestLog { height: auto; }
    """

    def __init__(self, columns: Sequence[ColumnSpec], *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self._specs = tuple(columns)
        self._rows: list[Row] = []
        self._widths: tuple[int, ...] = ()
        self._laid_out_for = -1
        self._lines: dict[tuple[Cell, ...], Strip] = {}
        self._natural = [cell_len(spec.label) for spec in self._specs]
        """Each column's widest content so far (it only grows, so the layout settles)."""
        self._header: Strip | None = None
        self._tones = ToneStyles(self)

    # -- the surface the dashboard and the tests use ---------------------------------------------------

    @property
    def row_count(self) -> int:
        return len(self._rows)

    def cell_text(self, row: int, column: str) -> str:
        """The plain text of a cell."""
        index = [spec.key for spec in self._specs].index(column)
        return "".join(text for text, _ in self._rows[row][1][index])

    def sync(self, rows: Sequence[Row]) -> None:
        """Show these rows; nothing is repainted when they did not change."""
        rows = list(rows)
        if rows == self._rows:
            return
        self._rows = rows
        if self._grow([row for row in rows if row[1] not in self._lines]):  # rows painted before were measured
            self._laid_out_for = -1  # the content outgrew the columns: lay them out again at the next line
        kept = {cells: line for _, cells in rows if (line := self._lines.get(cells)) is not None}
        self._lines = kept
        self.virtual_size = Size(self.size.width, len(rows) + 1)
        self.refresh()

    # -- drawing ---------------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        if width != self._laid_out_for:
            self._layout(width)
        if y == 0:
            if self._header is None:
                self._header = self._paint_header(width)
            return self._header
        index = self.scroll_offset.y + y - 1
        if index >= len(self._rows):
            return Strip.blank(width, self.rich_style)
        cells = self._rows[index][1]
        line = self._lines.get(cells)
        if line is None:
            line = self._lines[cells] = self._paint_row(cells, width)
        return line

    def _grow(self, rows: Sequence[Row]) -> bool:
        """Widen the content widths for these rows; True when they grew (the layout is then stale)."""
        natural = list(self._natural)
        for _, cells in rows:
            for i, spans in enumerate(cells):
                natural[i] = max(natural[i], sum(cell_len(run) for run, _ in spans))
        grew = natural != self._natural
        self._natural = natural
        return grew

    def _layout(self, width: int) -> None:
        """Column widths for ``width`` by content, as the fleet tables (two cells kept for a scroll bar)."""
        self._widths = column_widths(self._specs, max(0, width - 2), self._natural)
        self._laid_out_for = width
        self._lines = {}
        self._header = None

    def _paint_row(self, cells: tuple[Cell, ...], width: int) -> Strip:
        base = self.rich_style
        segments = []
        for spec, cell, cols in zip(self._specs, cells, self._widths, strict=True):
            segments.extend(paint(cell, cols, self._tones, right=spec.right))
        return Strip(segments).adjust_cell_length(width).apply_style(base)

    def _paint_header(self, width: int) -> Strip:
        style = self.get_component_rich_style("request-log--header")
        segments = []
        for spec, cols in zip(self._specs, self._widths, strict=True):
            segments.extend(paint(((spec.label, ""),), cols, self._tones, right=spec.right))
        return Strip(segments).adjust_cell_length(width).apply_style(style)

    def notify_style_update(self) -> None:
        self._tones.clear()
        self._lines = {}
        self._header = None
        super().notify_style_update()

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(event.size.width, len(self._rows) + 1)
        self.refresh()  # the next line drawn lays the columns out for the new width
