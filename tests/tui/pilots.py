"""Helpers for pilot tests: collected messages, selecting a row, letting commands and the what-if finish."""

from __future__ import annotations

from textual.message import Message
from textual.notifications import Notification, Notify
from textual.pilot import Pilot
from textual.widgets import Static

from cortex.tui.app import CortexApp
from cortex.tui.render import Selection
from cortex.tui.widgets.fleet_table import FleetTable


class Messages(list[Message]):
    """The messages an app processed (``run_test(message_hook=messages.append)``)."""

    def notifications(self) -> list[Notification]:
        return [m.notification for m in self if isinstance(m, Notify)]

    def of(self, kind: type[Message]) -> list[Message]:
        return [m for m in self if isinstance(m, kind)]


async def select(pilot: Pilot[int], kind: str, key: str) -> None:
    """Focus the nodes or models table and put its cursor on a row, as Tab and the arrows would."""
    app = pilot.app
    assert isinstance(app, CortexApp)
    table = app.dashboard.query_one("#nodes" if kind == "node" else "#models", FleetTable)
    table.focus()
    await pilot.pause()
    table.move_cursor(row=table.keys.index(key), animate=False)
    await pilot.pause()
    assert app.dashboard.selection == Selection("node" if kind == "node" else "model", key)


async def settle(pilot: Pilot[int]) -> None:
    """Let submitted commands finish and their results be handled."""
    await pilot.pause()
    pending = [w for w in pilot.app.workers if w.group == "commands"]
    if pending:  # an empty list would mean "every worker", the event stream included
        await pilot.app.workers.wait_for_complete(pending)
    await pilot.pause()


def body_text(app: CortexApp) -> str:
    return str(app.screen.query_one("#body", Static).render())


def whatif_rows(text: str) -> dict[str, list[str]]:
    """The what-if block's rows by their first word, figures after the label."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["requests", "loads"])
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.strip().startswith("replays start"):
            break
        words = line.split()
        skip = 2 if len(words) > 1 and words[1].startswith("(") else 1  # "live (lru)", "lru (now)"
        rows[words[0]] = words[skip:]
    return rows


async def finish_whatif(pilot: Pilot[int]) -> None:
    running = [w for w in pilot.app.workers if w.group == "whatif"]
    if running:  # an empty list would mean every worker, the endless event stream included
        await pilot.app.workers.wait_for_complete(running)
    await pilot.pause()
