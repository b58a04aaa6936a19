"""The fleet dashboard: header, nodes, models, sparklines, request log, filter and footer.

The screen owns the widgets and the view state the operator changes (filter, sort orders, which table has
the focus); the app owns the engine, the timer and the commands. :meth:`DashboardScreen.show` turns a
snapshot into rows through :mod:`cortex.tui.render` and skips all work when neither the snapshot nor the
displayed second nor the view state changed, so most ticks cost a comparison.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.events import DescendantFocus
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input

from cortex.engine import FleetSnapshot, RequestRecord
from cortex.tui.render import (
    MODEL_COLUMNS,
    MODEL_SORTS,
    NODE_COLUMNS,
    NODE_SORTS,
    REQUEST_COLUMNS,
    Selection,
    header_line,
    model_item_cells,
    model_items,
    node_item_cells,
    node_items,
    request_rows,
    selection_stats,
    spark_captions,
)
from cortex.tui.screens.detail import DetailScreen
from cortex.tui.widgets.fleet_table import FleetTable
from cortex.tui.widgets.header import FleetHeader
from cortex.tui.widgets.request_log import RequestLog
from cortex.tui.widgets.spark import SparkPanel

__all__ = ["DashboardScreen"]


REQUEST_LOG_PERIOD_S = 1.0
"""The request log is redrawn at most this often (the tables and the header follow ``tui.refresh_hz``)."""


class DashboardScreen(Screen[None]):
    """The console's main screen."""

    BINDINGS = [Binding("escape", "clear_filter", "clear filter", show=False)]

    def __init__(self, *, address: str, read_only: bool, tz: dt.tzinfo | None = None, metrics: str = "") -> None:
        super().__init__()
        self.address = address
        self.read_only = read_only
        self.tz = tz
        self.metrics = metrics
        self.link = ""
        """What is wrong with the link to a remote gateway (set by the app), shown in the header."""
        self.needle = ""
        """The filter: a case-insensitive substring of node names, model ids and related names."""
        self.sorts = {"nodes": "name", "models": "id"}
        """The sort order of each table, cycled by `s`."""
        self.table_id = "nodes"
        """The table that last had the focus: its row is the selection."""
        self._snap: FleetSnapshot | None = None
        self._now = 0.0
        self._loads: Mapping[str, int] = {}
        self._drawn_loads: Mapping[str, int] | None = None
        self._drawn_snap: FleetSnapshot | None = None
        self._drawn_view: tuple[object, ...] = ()
        self._drawn_requests: tuple[tuple[RequestRecord, ...], str] | None = None
        self._requests_drawn_at = float("-inf")
        # The widgets exist from the start, so a redraw never has to look them up (or find them gone).
        self.header = FleetHeader(id="header")
        self.tables = {
            "nodes": FleetTable(NODE_COLUMNS, id="nodes"),
            "models": FleetTable(MODEL_COLUMNS, id="models"),
        }
        self.requests = RequestLog(REQUEST_COLUMNS, id="requests")
        self.sparks = (SparkPanel(id="spark-tok"), SparkPanel(id="spark-ttft"))
        self.filter_input = Input(
            placeholder="filter nodes, models and requests (Enter keeps it, Esc clears it)", id="filter"
        )

    def compose(self) -> ComposeResult:
        yield self.header
        yield from self.tables.values()
        with Horizontal(id="sparks"):
            yield from self.sparks
        yield self.requests
        yield self.filter_input
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.requests.border_title = "requests · newest first"
        self._titles()

    @property
    def selection(self) -> Selection | None:
        """The node or model under the cursor of the table that has (or last had) the focus."""
        key = self.tables[self.table_id].selected_key
        if key is None:
            return None
        return Selection("node" if self.table_id == "nodes" else "model", key)

    def show(self, snap: FleetSnapshot, now: float, loads: Mapping[str, int] | None = None) -> None:
        """Redraw from a snapshot and the loads per model in the last hour; cheap when nothing visible changed."""
        self._snap, self._now = snap, now
        if loads is not None:
            self._loads = loads
        self._redraw()

    def _redraw(self) -> None:
        snap, now, needle = self._snap, self._now, self.needle
        if snap is None:
            return
        view = (int(now), needle, self.sorts["nodes"], self.sorts["models"], self.link)
        loads = self._loads
        if snap is not self._drawn_snap or view != self._drawn_view or loads is not self._drawn_loads:
            self._drawn_snap, self._drawn_view, self._drawn_loads = snap, view, loads
            self.header.show(
                header_line(
                    snap, now, address=self.address, read_only=self.read_only, link=self.link, metrics=self.metrics
                )
            )
            # Items, not cells: each table formats only the rows it paints (2,048 models, ~40 on screen).
            self.tables["nodes"].sync(node_items(snap, now, needle=needle, sort=self.sorts["nodes"]), node_item_cells)
            self.tables["models"].sync(
                model_items(snap, now, needle=needle, sort=self.sorts["models"], loads=loads), model_item_cells
            )
        drawn = self._drawn_requests
        # Under load every redraw would bring a page of new log rows, and rendering table rows is the
        # console's main cost: the log moves at most once a second (a filter change shows at once).
        log_due = drawn is None or drawn[1] != needle or now - self._requests_drawn_at >= REQUEST_LOG_PERIOD_S
        if log_due and (drawn is None or drawn[0] is not snap.requests or drawn[1] != needle):
            self._drawn_requests = (snap.requests, needle)
            self._requests_drawn_at = now
            self.requests.sync(request_rows(snap.requests, self.tz, needle=needle))
        self._show_sparks()

    def _show_sparks(self) -> None:
        if self._snap is None:
            return
        selected = selection_stats(self._snap, self.selection)
        tok_caption, ttft_caption = spark_captions(selected)
        stats = None if selected is None else selected[1]
        self.sparks[0].show(tok_caption, () if stats is None else stats.tok_s_series)
        self.sparks[1].show(ttft_caption, () if stats is None else stats.ttft_series)

    def _titles(self) -> None:
        suffix = f" · filter: {self.needle}" if self.needle else ""
        for table_id, table in self.tables.items():
            table.border_title = f"{table_id} · by {self.sorts[table_id]}{suffix}"

    def cycle_sort(self) -> str:
        """Switch the focused table to its next sort order; returns what it is now sorted by."""
        keys = list(NODE_SORTS if self.table_id == "nodes" else MODEL_SORTS)
        current = self.sorts[self.table_id]
        self.sorts[self.table_id] = keys[(keys.index(current) + 1) % len(keys)] if current in keys else keys[0]
        self._titles()
        self._redraw()
        return f"{self.table_id} sorted by {self.sorts[self.table_id]}"

    def open_filter(self) -> None:
        """Show the filter input with the current filter and give it the focus."""
        self.filter_input.value = self.needle
        self.filter_input.display = True
        self.filter_input.focus()

    def _close_filter(self) -> None:
        self.filter_input.display = False
        self.tables[self.table_id].focus()

    def action_clear_filter(self) -> None:
        self.filter_input.value = ""
        self._set_needle("")
        self._close_filter()

    def _set_needle(self, needle: str) -> None:
        if needle != self.needle:
            self.needle = needle
            self._titles()
            self._redraw()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self._set_needle(event.value.strip())

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        self._close_filter()

    def on_descendant_focus(self, event: DescendantFocus) -> None:
        if event.widget.id in ("nodes", "models"):
            self.table_id = event.widget.id
            self._show_sparks()

    @on(DataTable.RowHighlighted)
    def _row_highlighted(self) -> None:
        self._show_sparks()

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id in ("nodes", "models"):
            self.open_detail()

    def open_detail(self) -> None:
        """Push the detail screen of the selection, if there is one."""
        selection = self.selection
        if selection is None:
            return
        detail = DetailScreen(selection, tz=self.tz)
        if self._snap is not None:
            detail.show(self._snap, self._now, self._loads)
        _ = self.app.push_screen(detail)
