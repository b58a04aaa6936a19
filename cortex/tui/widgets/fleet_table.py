"""A DataTable that is fed whole row lists and changes only the rows and cells that differ.

The console redraws several times a second in the loop that also streams tokens, and every DataTable
change makes it re-render its visible cells, so a redraw must change as little as possible:
:meth:`FleetTable.sync` matches rows by identity (node name, model id), removes the gone, adds the new,
calls ``update_cell`` only where a cell differs and re-sorts only when the order changed. The cursor
follows the selected row's identity. (The request log, whose rows are mostly new at every redraw, is not a
DataTable: :mod:`cortex.tui.widgets.request_log`.)

Cells arrive as toned runs (:mod:`cortex.tui.render`). They are styled lazily, at paint time, through the
``tone--*`` component classes, so a theme change restyles every cell without a resync, and
``cortex.tcss`` decides what ``success`` or ``muted`` looks like using theme variables only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.widget import Widget
from textual.widgets import DataTable

from cortex.tui.render import Cell, ColumnSpec, Row

__all__ = ["TONES", "FleetTable", "ToneStyles", "ToneText", "column_widths", "paint"]

TONES = ("success", "warning", "error", "muted", "accent")
"""Tones a cell may use; each is a component class ``tone--<name>``."""


def paint(
    spans: Cell, width: int, style_of: Callable[[str], Style], *, right: bool = False, trim: bool = False
) -> list[Segment]:
    """Toned runs as one line of exactly `width` cells, led by a one-cell gap, cut with an ellipsis.

    Cells are painted straight to segments rather than through ``rich.text.Text``: a table cell is one
    line, and skipping Text's wrapping machinery makes a repaint about five times cheaper. ``style_of``
    gives a tone's style (the ``tone--*`` component classes of the widget that paints). ``trim``: a cell
    that does not fit loses its leading ``org/`` first, so that ``google/gemma-3-12b-it`` and
    ``google/gemma-3-4b-it`` stay told apart in a narrow column instead of both becoming ``google/gemma-3…``.
    """
    if trim and spans and "/" in spans[0][0] and 1 + sum(cell_len(run) for run, _ in spans) > width:
        first, tone = spans[0]
        spans = ((first.rsplit("/", 1)[1], tone), *spans[1:])
    out = [Segment(" ")]
    used = 1
    for run, tone in spans:
        style = style_of(tone) if tone else None
        length = cell_len(run)
        if used + length > width:
            room = width - used
            if room > 0:
                out.append(Segment(set_cell_size(run, room - 1) + "…", style))
            used = max(used, width)
            break
        out.append(Segment(run, style))
        used += length
    if used < width:
        pad = Segment(" " * (width - used))
        if right:
            out.insert(0, pad)
        else:
            out.append(pad)
    return out


def column_widths(specs: Sequence[ColumnSpec], width: int, natural: Sequence[int] | None = None) -> tuple[int, ...]:
    """Each column's width in cells (its one-cell gap included) when the table is ``width`` wide.

    Every column gets at least its own ``width``. Without ``natural`` the flex column takes what the others
    leave. With ``natural`` (each column's widest content), columns share the room by content: the first
    column, the row's identity (a node name, a model id), is widened to its content first, as far as the
    room goes; then the rest is shared max-min fair: first to the columns that need least to show
    everything, and what the wide ones (a list of models) cannot all have is split evenly between them.
    Room left once every column shows its content stays at the right: a wide terminal gets whole columns
    packed together, not a flex column stretched across a hundred empty cells.
    """
    if natural is None:
        fixed = sum(spec.width + 1 for spec in specs if not spec.flex)
        return tuple((max(spec.width, width - fixed - 1) if spec.flex else spec.width) + 1 for spec in specs)
    widths = [spec.width for spec in specs]
    room = width - len(specs) - sum(widths)
    wants = [max(0, want - spec.width) for spec, want in zip(specs, natural, strict=True)]
    if specs and room > 0:
        widths[0] += min(wants[0], room)
        room -= widths[0] - specs[0].width
    needs = sorted((need, i) for i, need in enumerate(wants) if need > 0 and i > 0)
    for left, (need, i) in zip(range(len(needs), 0, -1), needs, strict=True):
        share = min(need, max(0, room) // left)
        widths[i] += share
        room -= share
    return tuple(w + 1 for w in widths)


class ToneStyles:
    """A widget's ``tone--*`` component styles for painting cells, cached until its styles change."""

    __slots__ = ("_styles", "_widget")

    def __init__(self, widget: Widget) -> None:
        self._widget = widget
        self._styles: dict[str, Style] = {}

    def __call__(self, tone: str) -> Style:
        style = self._styles.get(tone)
        if style is None:
            # The full component style has translucent colours ($text-muted) blended already; keep
            # only its foreground and text style so the row's own background (cursor, stripes) shows.
            full = self._widget.get_component_rich_style(f"tone--{tone}")
            style = Style(color=full.color, bold=full.bold, italic=full.italic, underline=full.underline)
            self._styles[tone] = style
        return style

    def clear(self) -> None:
        """Forget the styles (the theme or the CSS changed)."""
        self._styles = {}


class ToneText:
    """One cell: toned runs rendered by its table with the current theme."""

    __slots__ = ("_table", "right", "row_key", "spans", "trim")

    def __init__(
        self, table: FleetTable, row_key: str, spans: Cell, *, right: bool = False, trim: bool = False
    ) -> None:
        self._table = table
        self.row_key = row_key
        self.spans = spans
        self.right = right
        self.trim = trim

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> list[Segment]:
        return self._table.segments(self.spans, options.max_width, right=self.right, trim=self.trim)

    def __str__(self) -> str:
        return "".join(text for text, _ in self.spans)


class FleetTable(DataTable[ToneText]):
    """A row-cursor table whose columns share the width by content (see :func:`column_widths`).

    Column widths follow the widest content seen since the last resize and only grow in between, so a
    figure that flickers between three and four digits never re-lays the table out at every redraw.
    """

    COMPONENT_CLASSES = {f"tone--{tone}" for tone in TONES}
    DEFAULT_CSS = """
    FleetTable { height: auto; }
    """

    def __init__(self, columns: Sequence[ColumnSpec], *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(
            id=id,
            cursor_type="row",
            cell_padding=0,
            cursor_foreground_priority="renderable",  # a red "down" stays red under the cursor
        )
        self._specs = tuple(columns)
        self._rows: list[Row] = []
        self._flex_width = -1
        self._natural = [cell_len(spec.label) for spec in self._specs]
        """Each column's widest content since the last resize (labels included)."""
        self._widths: tuple[int, ...] = ()
        """The column widths in use."""
        self._tones = ToneStyles(self)

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

    def segments(self, spans: Cell, width: int, *, right: bool = False, trim: bool = False) -> list[Segment]:
        """A cell's toned runs painted ``width`` cells wide (see :func:`paint`)."""
        return paint(spans, width, self._tones, right=right, trim=trim)

    @property
    def widths(self) -> tuple[int, ...]:
        """The columns' widths in cells, gaps included (for tests)."""
        return self._widths

    def sync(self, rows: Sequence[Row]) -> None:
        """Show these rows (unique keys, in this order), touching only what changed."""
        if not self.columns:
            self._rows = list(rows)
            return
        shown = dict(self._rows)
        if self._grow([row for row in rows if shown.get(row[0]) != row[1]]):  # only new or changed rows
            selected = self.selected_key
            self._rows = list(rows)
            self._build(self._flex_width)  # the content outgrew the layout: lay the columns out again
            keys = self.keys
            if selected in keys and self.show_cursor:
                self.move_cursor(row=keys.index(selected), animate=False)
            return
        selected = self.selected_key
        old = dict(self._rows)
        wanted = [key for key, _ in rows]
        if len(old.keys() - set(wanted)) * 2 > max(len(old), 1):
            # Mostly new rows (a filter typed or cleared): one rebuild costs less than a remove and an add each.
            self.clear()
            for key, cells in rows:
                self.add_row(*self._cells(key, cells), key=key)
            self._rows = list(rows)
            self._restore(selected, old, wanted)
            return
        for key in old.keys() - set(wanted):
            self.remove_row(key)
        for key, cells in rows:
            before = old.get(key)
            if before is None:
                self.add_row(*self._cells(key, cells), key=key)
                continue
            for spec, was, now in zip(self._specs, before, cells, strict=True):
                if was != now:
                    self.update_cell(key, spec.key, ToneText(self, key, now, right=spec.right))
        self._rows = list(rows)
        if [row.key.value for row in self.ordered_rows] != wanted:
            order = {key: index for index, key in enumerate(wanted)}
            self.sort(self._specs[0].key, key=lambda cell: order[cell.row_key])
        self._restore(selected, old, wanted)

    def _restore(self, selected: str | None, old: dict[str, tuple[Cell, ...]], wanted: list[str]) -> None:
        """Keep the cursor on the row it was on, wherever that row went."""
        if selected is not None and selected in old and selected in wanted and self.show_cursor:
            index = wanted.index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False)

    def notify_style_update(self) -> None:
        self._tones.clear()
        super().notify_style_update()

    def _cells(self, key: str, cells: tuple[Cell, ...]) -> list[ToneText]:
        return [
            ToneText(self, key, c, right=spec.right, trim=spec.trim) for spec, c in zip(self._specs, cells, strict=True)
        ]

    def _grow(self, rows: Sequence[Row]) -> bool:
        """Widen the content widths for these rows; True when the column widths change with them."""
        natural = list(self._natural)
        for _, cells in rows:
            for i, spans in enumerate(cells):
                natural[i] = max(natural[i], sum(cell_len(run) for run, _ in spans))
        if natural == self._natural:
            return False
        self._natural = natural
        return column_widths(self._specs, self._flex_width, natural) != self._widths

    def _build(self, width: int) -> None:
        self._flex_width = width
        self.clear(columns=True)
        self._widths = column_widths(self._specs, width, self._natural)
        for spec, cols in zip(self._specs, self._widths, strict=True):
            label = Text(" " + spec.label, justify="right" if spec.right else "left", no_wrap=True)
            self.add_column(label, width=cols, key=spec.key)
        rows, self._rows = self._rows, []
        self.sync(rows)

    def on_mount(self) -> None:
        self._build(max(0, self.size.width - 2))

    def on_resize(self, event: events.Resize) -> None:
        width = max(0, event.size.width - 2)
        if width != self._flex_width:
            cursor = self.cursor_row
            self._natural = [cell_len(spec.label) for spec in self._specs]
            self._grow(self._rows)
            self._build(width)
            if self.row_count:
                self.move_cursor(row=min(cursor, self.row_count - 1), animate=False)
