"""FleetTable.sync: whatever the sequence of row lists, the table shows exactly the last one, in order."""

from __future__ import annotations

import random

from textual.app import App, ComposeResult

from cortex.tui.render import ColumnSpec, cell
from cortex.tui.widgets.fleet_table import FleetTable

COLUMNS = (ColumnSpec("name", "name", 5), ColumnSpec("value", "value", 5, flex=True, right=True))


class TableApp(App[None]):
    CSS = "FleetTable > .tone--success { color: $success; }"

    def compose(self) -> ComposeResult:
        yield FleetTable(COLUMNS, id="table")


async def test_sync_converges_on_any_sequence_and_the_cursor_follows_its_row() -> None:
    app = TableApp()
    async with app.run_test(size=(40, 20)) as pilot:
        table = app.query_one(FleetTable)
        rnd = random.Random(20260101)
        for _ in range(120):
            keys = rnd.sample([f"k{i}" for i in range(12)], rnd.randint(0, 10))
            rows = [(key, (cell(key), cell(str(rnd.randint(0, 3)), "success"))) for key in keys]
            table.sync(rows)
            assert [row.key.value for row in table.ordered_rows] == keys
            assert [[str(c) for c in table.get_row_at(i)] for i in range(len(rows))] == [
                [key, cells[1][0][0]] for key, cells in rows
            ]
        table.sync([(k, (cell(k), cell("0"))) for k in ("a", "b", "c")])
        table.move_cursor(row=1)
        table.sync([(k, (cell(k), cell("0"))) for k in ("c", "a", "b")])
        assert table.selected_key == "b"
        assert table.cursor_row == 2
        await pilot.pause()


async def test_tones_follow_the_theme() -> None:
    app = TableApp()
    async with app.run_test(size=(40, 20)) as pilot:
        table = app.query_one(FleetTable)
        table.sync([("a", (cell("a"), cell("up", "success")))])
        before = table.segments(cell("up", "success"), 6)[1].style
        app.theme = "dracula"
        await pilot.pause()
        after = table.segments(cell("up", "success"), 6)[1].style
        assert before is not None
        assert after is not None
        assert before.color != after.color
        assert "".join(s.text for s in table.segments(cell("abcdefgh"), 6)) == " abcd…"
        assert "".join(s.text for s in table.segments(cell("ab"), 6, right=True)) == "    ab"
