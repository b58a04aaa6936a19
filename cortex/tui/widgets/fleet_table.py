"""A DataTable of thousands of rows that formats only the rows on screen and redraws only what changed.

The console redraws several times a second in the loop that also streams tokens, and a catalogue of 64
nodes x 32 models is 2,048 rows of which a terminal shows about forty. :meth:`FleetTable.sync` takes each
row as its identity (node name, model id) and an *item*, the unformatted value the row is made from, plus
the function that formats an item into cells. The table keeps the full ordered list of keys and items;
its cells are placeholders that format their row when the DataTable paints it, so only the rows on
screen are ever formatted, and each again only when its item changed (a per-row render cached by the
item's value). Rows are added, removed and re-sorted only when the set or the order of keys changed; the
cursor follows the selected row's identity. (The request log, whose rows are mostly new at every redraw,
is not a DataTable: :mod:`cortex.tui.widgets.request_log`.)

Cells arrive as toned runs (:mod:`cortex.tui.render`). They are styled lazily, at paint time, through the
``tone--*`` component classes, so a theme change restyles every cell without a resync, and
``cortex.tcss`` decides what ``success`` or ``muted`` looks like using theme variables only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.cache import LRUCache
from textual.geometry import Size
from textual.widget import Widget
from textual.widgets import DataTable
from textual.widgets.data_table import DuplicateKey, RowKey
from textual.widgets.data_table import Row as DataRow

from cortex.tui.render import Cell, ColumnSpec

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


def _label(spec: ColumnSpec, cols: int) -> Text:
    """A column's header for ``cols`` cells (its gap included): its short label when the full one does not fit."""
    text = spec.short if spec.short and cell_len(spec.label) > cols - 1 else spec.label
    return Text(" " + text, justify="right" if spec.right else "left", no_wrap=True)


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
    """One cell: a placeholder that takes its toned runs from its row's render when the table paints it."""

    __slots__ = ("_table", "column", "right", "row_key", "trim")

    def __init__(
        self, table: FleetTable, row_key: str, column: int, *, right: bool = False, trim: bool = False
    ) -> None:
        self._table = table
        self.row_key = row_key
        self.column = column
        self.right = right
        self.trim = trim

    @property
    def spans(self) -> Cell:
        """The cell's toned runs (its row is formatted now if its item changed since the last time)."""
        return self._table.row_cells(self.row_key)[self.column]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> list[Segment]:
        return self._table.segments(self.spans, options.max_width, right=self.right, trim=self.trim)

    def __str__(self) -> str:
        return "".join(text for text, _ in self.spans)


def _as_cells(item: Any) -> tuple[Cell, ...]:
    """The render of rows given already formatted."""
    cells: tuple[Cell, ...] = item
    return cells


REBUILD_AT = 32
"""Removing more rows than this (or than half of them) clears the table and adds the rest back:
``DataTable.remove_row`` costs a pass over every row, an add does not."""


class FleetTable(DataTable[ToneText]):
    """A row-cursor table whose columns share the width by content (see :func:`column_widths`).

    Column widths follow the widest content formatted since the last resize (rows given formatted: every
    row; rows given as items: the rows formatted, those on screen and near it) and only grow in between,
    so a figure that flickers between three and four digits never re-lays the table out at every redraw.
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
        self._keys: list[str] = []
        """The identity of each row, in display order."""
        self._items: dict[str, object] = {}
        """Each row's item (what its cells are formatted from)."""
        self._format: Callable[[Any], tuple[Cell, ...]] = _as_cells
        self._eager = True
        """Rows were given formatted: widths are measured on every row that changed."""
        self._rendered: dict[str, tuple[object, tuple[Cell, ...]]] = {}
        """Each formatted row's cells and the item they were formatted from."""
        self.renders = 0
        """Rows formatted so far (rows given formatted are not counted): what a redraw costs, for tests."""
        self._relayout_due = False
        self._flex_width = -1
        self._natural = [cell_len(spec.label) for spec in self._specs]
        """Each column's widest content since the last resize (labels included)."""
        self._widths: tuple[int, ...] = ()
        """The column widths in use."""
        self._tones = ToneStyles(self)
        self._painted: LRUCache[tuple[object, ...], list[list[Segment]]] = LRUCache(4096)
        """Painted data cells by value and place (see :meth:`_render_cell`)."""

    @property
    def keys(self) -> list[str]:
        """The identity of each row, in display order."""
        return list(self._keys)

    @property
    def selected_key(self) -> str | None:
        """The identity of the row under the cursor."""
        if not self._keys:
            return None
        return self._keys[min(self.cursor_row, len(self._keys) - 1)]

    def cell_text(self, row: int, column: str) -> str:
        """The plain text shown in a cell (for tests and the detail screen)."""
        index = [spec.key for spec in self._specs].index(column)
        return "".join(text for text, _ in self.row_cells(self._keys[row])[index])

    def row_cells(self, key: str) -> tuple[Cell, ...]:
        """A row's cells, formatted from its item unless the last render was of an equal item."""
        item = self._items[key]
        hit = self._rendered.get(key)
        if hit is not None and (hit[0] is item or hit[0] == item):
            return hit[1]
        cells = self._format(item)
        self._rendered[key] = (item, cells)
        if not self._eager:
            self.renders += 1
            if self._grow((cells,)) and not self._relayout_due:
                # Painting a row scrolled into view found wider content: widen the columns after this frame.
                self._relayout_due = True
                self.call_later(self._apply_widths)
        return cells

    def segments(self, spans: Cell, width: int, *, right: bool = False, trim: bool = False) -> list[Segment]:
        """A cell's toned runs painted ``width`` cells wide (see :func:`paint`)."""
        return paint(spans, width, self._tones, right=right, trim=trim)

    @property
    def widths(self) -> tuple[int, ...]:
        """The columns' widths in cells, gaps included (for tests)."""
        return self._widths

    def sync(self, rows: Sequence[tuple[str, Any]], render: Callable[[Any], tuple[Cell, ...]] | None = None) -> None:
        """Show these rows (unique keys, in this order), touching only what changed.

        Args:
            rows: each row's key and either its cells (``render`` None) or its item.
            render: formats an item into the row's cells; called only for rows painted (or measured
                near the screen), and again only when the row's item no longer compares equal.
        """
        wanted = [key for key, _ in rows]
        items = dict(rows)
        old_keys, old_items = self._keys, self._items
        eager = render is None
        if eager != self._eager or (render is not None and render is not self._format):
            self._rendered = {}
        self._format = _as_cells if render is None else render
        self._eager = eager
        selected = self.selected_key
        self._keys, self._items = wanted, items
        if len(self._rendered) > len(items):
            self._rendered = {key: hit for key, hit in self._rendered.items() if key in items}
        if not self.columns:
            return
        changed = items != old_items
        if changed:
            if eager:
                grown = self._grow([cells for key, cells in rows if old_items.get(key) != cells])
            else:
                grown = self._grow([self.row_cells(key) for key in self._near(wanted, selected)])
            if grown:
                self._apply_widths()
        new = items.keys() - old_items.keys()
        gone = old_items.keys() - items.keys()
        if len(gone) > REBUILD_AT or len(gone) * 2 > max(len(old_keys), 1):
            # Mostly other rows (a filter typed or cleared): one rebuild costs less than a removal each.
            self.clear()
            self._append_rows(wanted)
        else:
            for key in gone:
                self.remove_row(key)
            self._append_rows([key for key in wanted if key in new])
            if [row.key.value for row in self.ordered_rows] != wanted:
                order = {key: index for index, key in enumerate(wanted)}
                self.sort(self._specs[0].key, key=lambda cell: order[cell.row_key])
        if changed:
            self._invalidate()
        self._restore(selected, old_items, wanted)

    def _append_rows(self, keys: Sequence[str]) -> None:
        """Add rows at the bottom, all at once.

        What ``DataTable.add_row`` does for each row, less the per-row cursor revalidation and idle check
        (a cleared filter brings back 2,048 rows): the cells are placeholders, one line high, in columns
        of set widths, so there is nothing to measure either (see :meth:`_update_dimensions`).
        """
        if not keys:
            return
        columns = [column.key for column in self.ordered_columns]
        start = len(self.rows)
        for offset, key in enumerate(keys):
            row_key = RowKey(key)
            if row_key in self._row_locations:
                raise DuplicateKey(f"The row key {row_key!r} already exists.")
            self._row_locations[row_key] = start + offset
            self._data[row_key] = dict(zip(columns, self._cells(key), strict=True))
            self.rows[row_key] = DataRow(row_key, 1)
        self._require_update_dimensions = True
        self.cursor_coordinate = self.cursor_coordinate
        if start == 0 and self.columns and self.show_cursor and self.cursor_type != "none":
            self._highlight_cursor()  # a cursor where there was no row to put it: announce it, as add_row does
        self._update_count += 1
        self.check_idle()

    def _update_dimensions(self, new_rows: Iterable[RowKey]) -> None:
        """The scrollable size, without measuring the new rows' cells.

        ``DataTable`` measures every cell of every new row to widen auto-width columns and size auto-height
        rows; a fleet table has neither (its widths come from :func:`column_widths`), and measuring 2,048
        rows would format them all.
        """
        width = sum(column.get_render_width(self) for column in self.columns.values())
        header = self.header_height if self.show_header else 0
        self.virtual_size = Size(width + self._row_label_column_width, self._total_row_height + header)

    def _near(self, keys: list[str], selected: str | None) -> list[str]:
        """The keys of the rows on screen and a screen either side (where the cursor will be, too)."""
        height = max(self.size.height, 1)
        top = int(self.scroll_offset.y)
        spans = [(top - height, top + 2 * height)]
        if selected in self._items:
            at = keys.index(selected)
            spans.append((at - height, at + height))
        near: dict[str, None] = {}
        for start, stop in spans:
            near.update(dict.fromkeys(keys[max(0, start) : max(0, stop)]))
        return list(near)

    def _invalidate(self) -> None:
        """Items changed: forget the DataTable's rendered lines and repaint (only the rows on screen)."""
        self._update_count += 1
        self._clear_caches()
        self.refresh()

    def _restore(self, selected: str | None, old: dict[str, object], wanted: list[str]) -> None:
        """Keep the cursor on the row it was on, wherever that row went."""
        if selected is not None and selected in old and selected in self._items and self.show_cursor:
            index = wanted.index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False)

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> list[list[Segment]]:
        """A data cell's painted lines, kept by the cell's value: a changed row repaints only its changed cells.

        The DataTable keys its own cache by a counter that every change bumps, so once any row changed
        it would repaint every cell on screen through Rich; here a cell whose runs, width, place and
        highlight are what they were gets its lines back as they were painted.
        """
        if row_index < 0 or column_index < 0:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        key = self._row_locations.get_key(row_index)
        if key is None:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        spans = self.row_cells(key.value or "")[column_index]
        cache_key = (
            spans,
            row_index,
            column_index,
            base_style,
            width,
            cursor,
            hover,
            self.show_cursor,
            self._show_hover_cursor,
            self._pseudo_class_state,
        )
        lines = self._painted.get(cache_key)
        if lines is None:
            lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
            self._painted.set(cache_key, lines)
        return lines

    def notify_style_update(self) -> None:
        self._tones.clear()
        self._painted.clear()
        super().notify_style_update()

    def _cells(self, key: str) -> list[ToneText]:
        return [ToneText(self, key, i, right=spec.right, trim=spec.trim) for i, spec in enumerate(self._specs)]

    def _grow(self, rows: Sequence[tuple[Cell, ...]]) -> bool:
        """Widen the content widths for these rows' cells; True when the column widths change with them."""
        natural = list(self._natural)
        for cells in rows:
            for i, spans in enumerate(cells):
                natural[i] = max(natural[i], sum(cell_len(run) for run, _ in spans))
        if natural == self._natural:
            return False
        self._natural = natural
        return column_widths(self._specs, self._flex_width, natural) != self._widths

    def _apply_widths(self) -> None:
        """Lay the columns out again for the content widths, in place (the rows stay)."""
        self._relayout_due = False
        widths = column_widths(self._specs, self._flex_width, self._natural)
        if widths == self._widths or len(self.columns) != len(widths):
            return
        self._widths = widths
        for spec, column, cols in zip(self._specs, self.ordered_columns, widths, strict=True):
            column.width = cols
            column.label = _label(spec, cols)
        self._invalidate()
        self._update_dimensions(())
        self.refresh(layout=True)

    def _build(self, width: int) -> None:
        self._flex_width = width
        self.clear(columns=True)
        self._widths = column_widths(self._specs, width, self._natural)
        for spec, cols in zip(self._specs, self._widths, strict=True):
            self.add_column(_label(spec, cols), width=cols, key=spec.key)
        self._append_rows(self._keys)

    def _measure_all(self) -> None:
        """Content widths from scratch: every row given formatted, else the rows near the screen."""
        self._natural = [cell_len(spec.label) for spec in self._specs]
        keys = self._keys if self._eager else self._near(self._keys, self.selected_key)
        self._grow([self.row_cells(key) for key in keys])

    def on_mount(self) -> None:
        self._measure_all()
        self._build(max(0, self.size.width - 2))

    def on_resize(self, event: events.Resize) -> None:
        width = max(0, event.size.width - 2)
        if width != self._flex_width:
            cursor = self.cursor_row
            self._measure_all()
            self._build(width)
            if self.row_count:
                self.move_cursor(row=min(cursor, self.row_count - 1), animate=False)
