"""Everything cortex knows about one node or one model, redrawn live.

A plain Screen (not modal) so the app's action keys still work on the subject shown; the text comes from
the pure functions in :mod:`cortex.tui.describe` and is repainted only when it changed. The status badge
carries ``-up``/``-down``/``-draining``/``-restarting`` classes that ``cortex.tcss`` colours.

It also shows the what-if (``w``): the app asks the engine for it in a worker and hands the screen the
outcome (:meth:`DetailScreen.whatif_started`, :meth:`DetailScreen.whatif_done`); the screen only draws it,
at the top while there is something to show and as a one-line hint at the bottom before.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Footer, Static

from cortex.engine import FleetSnapshot, NodeStatus
from cortex.engine.facade import WhatIf
from cortex.tui.describe import model_lines, node_lines, whatif_lines
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
        self.whatif: WhatIf | None = None
        """The last what-if shown here."""
        self.replaying = False
        """Whether a what-if is under way."""

    def compose(self) -> ComposeResult:
        yield Static("", id="status")
        with VerticalScroll(id="detail"):
            yield Static("", id="body")
        yield Footer()

    def on_mount(self) -> None:
        self._paint()

    def show(self, snap: FleetSnapshot, now: float, loads: Mapping[str, int] | None = None) -> None:
        """Redraw the subject from a snapshot (``loads``: the engine's loads per model in the last hour)."""
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
                lines, status = model_lines(model, snap, now, (loads or {}).get(model.id, 0)), model.state
        if lines != self._lines or status != self._status:
            self._lines, self._status = lines, status
            if self.is_mounted:
                self._paint()

    def _paint(self) -> None:
        badge = self.query_one("#status", Static)
        badge.update(Content(f" {self.selection.kind} {self.selection.key} · {self._status or 'gone'}"))
        for name in BADGE_CLASSES:
            badge.set_class(name == f"-{self._status}", name)
        whatif = whatif_lines(self.whatif, running=self.replaying, tz=self._tz)
        body = [*whatif, (), *self._lines] if self.replaying or self.whatif is not None else [*self._lines, (), *whatif]
        self.query_one("#body", Static).update(tone_content(body))

    def whatif_started(self) -> None:
        """Say that the what-if runs (the console stays live meanwhile)."""
        self.replaying = True
        if self.is_mounted:
            self._paint()
            self.query_one("#detail", VerticalScroll).scroll_home(animate=False)

    def whatif_done(self, result: WhatIf) -> None:
        """Show the what-if's comparison (or why there is none)."""
        self.replaying, self.whatif = False, result
        if self.is_mounted:
            self._paint()

    def action_close(self) -> None:
        _ = self.dismiss(None)
