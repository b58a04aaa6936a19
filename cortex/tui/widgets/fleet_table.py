"""A DataTable that is fed whole row lists and changes only the cells that differ.

The console redraws several times a second in the loop that also streams tokens, so a redraw must cost
little when nothing changed: :meth:`FleetTable.sync` compares the new rows with what is shown, position by
position, and calls ``update_cell`` only where a cell differs (rows are added or removed at the end).
Rows are positional, so the cursor is moved to follow the selected *row identity* when the order changes.

Cells arrive as toned runs (:mod:`cortex.tui.render`). They are styled lazily, at paint time, through the
``tone--*`` component classes, so a theme change restyles every cell without a resync, and
``cortex.tcss`` decides what ``success`` or ``muted`` looks like using theme variables only.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.style import Style
from rich.text import Text
from textual import events
from textual.widgets import DataTable

from cortex.tui.render import Cell, ColumnSpec, Row

__all__ = ["TONES", "FleetTable", "ToneText"]

TONES = ("success", "warning", "error", "muted", "accent")
"""Tones a cell may use; each is a component class ``tone--<name>``."""


class ToneText:
    """One cell: toned runs rendered by its table with the current theme."""

    __slots__ = ("_table", "right", "spans")

    def __init__(self, table: FleetTable, spans: Cell, *, right: bool = False) -> None:
        self._table = table
        self.spans = spans
        self.right = right

    def __rich__(self) -> Text:
        return self._table.styled(self.spans, right=self.right)

    def __str__(self) -> str:
        return "".join(text for text, _ in self.spans)


class FleetTable(DataTable[ToneText]):
    """A row-cursor table of fixed-width columns, one of which takes the width left over."""

    COMPONENT_CLASSES = {f"tone--{tone}" for tone in TONES}
    DEFAULT_CSS = """
    FleetTable { height: auto; }
    """

    def __init__(
        self,
        columns: Sequence[ColumnSpec],
        *,
        cursor: bool = True,
        id: str | None = None,  # noqa: A002 - textual's name for it
    ) -> None:
        super().__init__(id=id, cursor_type="row", show_cursor=cursor, cell_padding=0)
        self.can_focus = cursor
        self._specs = tuple(columns)
        self._rows: list[Row] = []
        self._flex_width = -1

    @property
    def keys(self) -> list[str]:
        """The identity of each row, in display order."""
        return [key for key, _ in self._rows]

    @property
    def selected_key(self) -> str | None:
        """The identity of the row under the cursor."""
        if not self._rows:
            return None
        return self._rows[min(self.cursor_row, len(self._rows) - 1)][0]

    def cell_text(self, row: int, column: str) -> str:
        """The plain text shown in a cell (for tests and the detail screen)."""
        index = [spec.key for spec in self._specs].index(column)
        return "".join(text for text, _ in self._rows[row][1][index])

    def styled(self, spans: Cell, *, right: bool = False) -> Text:
        """Toned runs as a rich Text in the current theme (a one-cell gap leads every cell)."""
        text = Text(" ", no_wrap=True, overflow="ellipsis", justify="right" if right else "left", end="")
        for run, tone in spans:
            text.append(run, self._tone_style(tone))
        return text

    def _tone_style(self, tone: str) -> Style:
        if not tone:
            return Style.null()
        return self.get_component_rich_style(f"tone--{tone}", partial=True)

    def sync(self, rows: Sequence[Row]) -> None:
        """Show these rows, touching only the cells that changed."""
        if not self.columns:
            self._rows = list(rows)
            return
        selected = self.selected_key
        old = self._rows
        for index, (_key, cells) in enumerate(rows):
            if index >= len(old):
                self.add_row(*self._cells(cells), key=str(index))
                continue
            for spec, before, after in zip(self._specs, old[index][1], cells, strict=True):
                if before != after:
                    self.update_cell(str(index), spec.key, ToneText(self, after, right=spec.right))
        for index in range(len(old) - 1, len(rows) - 1, -1):
            self.remove_row(str(index))
        self._rows = list(rows)
        if selected is not None and self.show_cursor:
            keys = self.keys
            if selected in keys and keys.index(selected) != self.cursor_row:
                self.move_cursor(row=keys.index(selected), animate=False)

    def _cells(self, cells: tuple[Cell, ...]) -> list[ToneText]:
        return [ToneText(self, c, right=spec.right) for spec, c in zip(self._specs, cells, strict=True)]

    def _build(self, width: int) -> None:
        fixed = sum(spec.width + 1 for spec in self._specs if not spec.flex)
        self._flex_width = width
        self.clear(columns=True)
        for spec in self._specs:
            cols = max(spec.width, width - fixed - 1) if spec.flex else spec.width
            label = Text(" " + spec.label, justify="right" if spec.right else "left", no_wrap=True)
            self.add_column(label, width=cols + 1, key=spec.key)
        rows, self._rows = self._rows, []
        self.sync(rows)

    def on_mount(self) -> None:
        self._build(max(0, self.size.width - 2))

    def on_resize(self, event: events.Resize) -> None:
        width = max(0, event.size.width - 2)
        if width != self._flex_width:
            cursor = self.cursor_row
            self._build(width)
            if self.row_count:
                self.move_cursor(row=min(cursor, self.row_count - 1), animate=False)
