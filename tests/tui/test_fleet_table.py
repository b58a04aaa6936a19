"""FleetTable.sync: whatever the sequence of row lists, the table shows exactly the last one, in order."""

from __future__ import annotations

import random

from textual.app import App, ComposeResult

from cortex.tui.render import Cell, ColumnSpec, cell
from cortex.tui.widgets.fleet_table import FleetTable, column_widths

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


def test_columns_share_the_width_by_content() -> None:
    specs = (
        ColumnSpec("node", "node", 5),
        ColumnSpec("models", "models", 6, flex=True),
        ColumnSpec("agent", "agent", 5),
    )
    # Room for everything: each column as wide as its content (+1 gap), the rest stays at the right.
    assert column_widths(specs, 60, (12, 30, 5)) == (13, 31, 6)
    # Tight: the identity column (node names) is served first, then the others share what is left.
    assert column_widths(specs, 40, (12, 30, 5)) == (13, 21, 6)
    # Tighter than the identity wants: it takes what there is; nobody goes below its minimum.
    assert column_widths(specs, 20, (12, 30, 5)) == (7, 7, 6)
    assert column_widths(specs, 10, (12, 30, 5)) == (6, 7, 6)
    # Max-min fair among the rest: the small need is met in full before the big one takes the remainder.
    three = (ColumnSpec("id", "id", 2), ColumnSpec("a", "a", 2), ColumnSpec("b", "b", 2))
    assert column_widths(three, 20, (2, 4, 40)) == (3, 5, 12)
    # Without content widths: the old rule, the flex column takes what the others leave.
    assert column_widths(specs, 40, None) == (6, 28, 6)


async def test_a_narrow_model_column_drops_the_org_before_cutting_the_name() -> None:
    app = TableApp()
    async with app.run_test(size=(40, 20)):
        table = app.query_one(FleetTable)

        def shown(text: str, width: int, *, trim: bool) -> str:
            return "".join(s.text for s in table.segments(cell(text), width, trim=trim))

        assert shown("google/gemma-3-12b-it", 16, trim=True) == " gemma-3-12b-it "
        assert shown("google/gemma-3-4b-it", 16, trim=True) == " gemma-3-4b-it  "
        assert shown("google/gemma-3-12b-it", 16, trim=False) == " google/gemma-3…"
        assert shown("meta-llama/Llama-3.3-70B", 12, trim=True) == " Llama-3.3-…"
        assert shown("Qwen/Qwen3-4B", 16, trim=True) == " Qwen/Qwen3-4B  "  # it fits: nothing trimmed


async def test_the_columns_widen_to_new_content_and_keep_the_cursor() -> None:
    app = TableApp()
    async with app.run_test(size=(40, 20)) as pilot:
        table = app.query_one(FleetTable)
        table.sync([(k, (cell(k), cell("1"))) for k in ("a", "b", "c")])
        await pilot.pause()
        table.move_cursor(row=2)
        before = table.widths
        assert before == (6, 6)  # "name" 4 < min 5, "value" 5
        table.sync([(k, (cell(k * 12), cell("1"))) for k in ("a", "b", "c")])
        await pilot.pause()
        assert table.widths == (13, 6)
        assert table.selected_key == "c"
        assert table.cell_text(2, "name") == "c" * 12


async def test_of_2048_rows_only_those_near_the_screen_are_formatted_and_scrolling_formats_the_rest() -> None:
    app = TableApp()
    formatted: list[str] = []

    def render(item: tuple[str, int]) -> tuple[Cell, ...]:
        formatted.append(item[0])
        return (cell(item[0]), cell(str(item[1])))

    keys = [f"m{i:04d}" for i in range(2048)]
    async with app.run_test(size=(40, 20)) as pilot:
        table = app.query_one(FleetTable)
        table.sync([(key, (key, 0)) for key in keys], render)
        await pilot.pause()
        assert table.row_count == 2048
        first = set(formatted)
        assert 0 < len(first) <= 3 * table.size.height  # the screen and its neighbourhood, not 2,048 rows
        assert keys[0] in first
        assert keys[-1] not in first
        # Every figure moves: only the rows near the screen are formatted again.
        formatted.clear()
        table.sync([(key, (key, 1)) for key in keys], render)
        await pilot.pause()
        assert 0 < len(formatted) <= 3 * table.size.height
        assert table.cell_text(0, "value") == "1"
        # Nothing moved: nothing formatted, nothing repainted from scratch.
        formatted.clear()
        table.sync([(key, (key, 1)) for key in keys], render)
        await pilot.pause()
        assert formatted == []
        # The cursor goes to the far end: those rows are formatted when painted, and they show.
        table.move_cursor(row=2000, animate=False)
        await pilot.pause()
        assert table.selected_key == keys[2000]
        assert keys[2000] in formatted
        assert keys[0] not in formatted
        assert keys[2000] in app.export_screenshot()
        await pilot.press("down", "down")
        assert table.selected_key == keys[2002]


async def test_of_2048_rows_the_cursor_follows_its_row_through_a_resort_and_a_filter_narrows_the_rows() -> None:
    app = TableApp()
    keys = [f"m{i:04d}" for i in range(2048)]

    def render(item: tuple[str, int]) -> tuple[Cell, ...]:
        return (cell(item[0]), cell(str(item[1]), "success"))

    async with app.run_test(size=(40, 20)) as pilot:
        table = app.query_one(FleetTable)
        table.sync([(key, (key, 0)) for key in keys], render)
        await pilot.pause()
        table.move_cursor(row=10, animate=False)
        table.sync([(key, (key, 0)) for key in reversed(keys)], render)
        assert table.keys == keys[::-1]
        assert [row.key.value for row in table.ordered_rows] == keys[::-1]
        assert table.selected_key == keys[10]
        assert table.cursor_row == 2037
        narrowed = [key for key in keys if key.endswith("7")]
        table.sync([(key, (key, 2)) for key in narrowed], render)
        await pilot.pause()
        assert table.row_count == len(narrowed) == 205
        assert [row.key.value for row in table.ordered_rows] == narrowed
        assert table.cell_text(len(narrowed) - 1, "value") == "2"
        table.sync([(key, (key, 3)) for key in keys], render)  # the filter cleared: every row is back
        await pilot.pause()
        assert table.row_count == 2048
        assert table.keys == keys
        assert table.cell_text(2047, "name") == keys[-1]
