"""Everything cortex knows about one node or one model, redrawn live.

A plain Screen (not modal) so the app's action keys still work on the subject shown; the text comes from
the pure functions in :mod:`cortex.tui.describe` and is repainted only when it changed. The status badge
carries ``-up``/``-down``/``-draining``/``-restarting`` classes that ``cortex.tcss`` colours.
"""

from __future__ import annotations

import datetime as dt

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Static

from cortex.engine import FleetSnapshot, NodeStatus
from cortex.tui.describe import model_lines, node_lines
from cortex.tui.render import Cell, Selection, cell
from cortex.tui.widgets.tone import tone_content

__all__ = ["DetailScreen"]

BADGE_CLASSES = (*(f"-{status.value}" for status in NodeStatus), "-loaded", "-loading", "-unloaded")


class DetailScreen(Screen[None]):
    """The detail of the selection; Escape, q or Enter goes back."""

    BINDINGS = [Binding("escape,q,enter", "close", "back")]

    def __init__(self, selection: Selection, *, tz: dt.tzinfo | None = None) -> None:
        super().__init__()
        self.selection = selection
        self._tz = tz
        self._lines: list[Cell] = []
        self._status = ""

    def compose(self) -> ComposeResult:
        yield Static("", id="status")
        with VerticalScroll(id="detail"):
            yield Static("", id="body")
        yield Footer()

    def on_mount(self) -> None:
        self._paint()

    def show(self, snap: FleetSnapshot, now: float) -> None:
        """Redraw the subject from a snapshot."""
        sel = self.selection
        status = ""
        if sel.kind == "node":
            node = snap.node(sel.key)
            lines = [cell(f"node {sel.key} is no longer in the fleet", "warning")]
            if node is not None:
                lines, status = node_lines(node, now, self._tz), node.status.value
        else:
            model = snap.model(sel.key)
            lines = [cell(f"model {sel.key} is no longer in the catalogue", "warning")]
            if model is not None:
                lines, status = model_lines(model, snap, now), model.state
        if lines != self._lines or status != self._status:
            self._lines, self._status = lines, status
            if self.is_mounted:
                self._paint()

    def _paint(self) -> None:
        badge = self.query_one("#status", Static)
        badge.update(Content(f" {self.selection.kind} {self.selection.key} · {self._status or 'gone'}"))
        for name in BADGE_CLASSES:
            badge.set_class(name == f"-{self._status}", name)
        self.query_one("#body", Static).update(tone_content(self._lines))

    def action_close(self) -> None:
        _ = self.dismiss(None)
