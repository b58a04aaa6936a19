"""The `?` screen: the key map, read from the app's own bindings so it cannot drift from them.

Each binding's ``tooltip`` carries the long explanation shown here; the footer shows the short
``description``. Keys that belong to widgets (Tab, Enter, Escape) are listed after them.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from cortex.tui.render import Cell
from cortex.tui.widgets.tone import tone_content

__all__ = ["HelpScreen"]

WIDGET_KEYS = (
    ("tab", "switch between the nodes and models tables (the selection follows)"),
    ("↑ ↓", "move the selection"),
    ("enter", "details of the selected node or model: fields, slots, agent GPUs"),
    ("esc", "close a screen or dialog; clear the filter"),
)


def key_name(binding: Binding) -> str:
    """How a binding's key is written in the help."""
    names = {"question_mark": "?", "slash": "/"}
    return binding.key_display or names.get(binding.key, binding.key)


class HelpScreen(ModalScreen[None]):
    """The key map."""

    BINDINGS = [
        Binding("escape,q,question_mark", "close", "close"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 84; max-width: 100%; height: auto; max-height: 100%; padding: 0 1; }
    """

    def __init__(self, bindings: list[Binding], *, read_only: bool, about: list[str] | None = None) -> None:
        super().__init__()
        self._keymap = bindings
        self._read_only = read_only
        self._about = about or []
        """Lines on where things are (gateway, metrics, theme), shown above the keys."""

    def compose(self) -> ComposeResult:
        lines: list[Cell] = [((f" {text}", "muted"),) for text in self._about]
        if lines:
            lines.append(())
        for binding in self._keymap:
            text = binding.tooltip or binding.description
            lines.append(((f" {key_name(binding):>6}  ", "accent"), (text, "")))
        for key, text in WIDGET_KEYS:
            lines.append(((f" {key:>6}  ", "accent"), (text, "")))
        if self._read_only:
            lines.append((("read-only console: p u r d R are disabled", "warning"),))
        with VerticalScroll() as scroll:
            scroll.border_title = "help · esc closes"
            yield Static(tone_content(lines), id="keys")

    def action_close(self) -> None:
        _ = self.dismiss(None)
