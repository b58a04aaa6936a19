"""RequestLog: header, columns, scrolling under a fixed header, one paint per row, theme and resize."""

from __future__ import annotations

from textual.app import App, ComposeResult

from cortex.tui.render import ColumnSpec, Row, cell
from cortex.tui.widgets.request_log import RequestLog

COLUMNS = (
    ColumnSpec("time", "time", 4),
    ColumnSpec("model", "model", 5, flex=True),
    ColumnSpec("status", "st", 3, right=True),
)


class LogApp(App[None]):
    CSS = """
    RequestLog { height: 6; }
    RequestLog > .tone--error { color: $error; }
    """

    def compose(self) -> ComposeResult:
        yield RequestLog(COLUMNS, id="log")


def rows(n: int, status: str = "200") -> list[Row]:
    return [(f"r{i}", (cell(f"t{i:02d}"), cell(f"model-{i}"), cell(status, "error"))) for i in range(n)]


def line(log: RequestLog, y: int) -> str:
    return log.render_line(y).text


async def test_header_then_rows_in_their_columns() -> None:
    app = LogApp()
    async with app.run_test(size=(30, 10)) as pilot:
        log = app.query_one(RequestLog)
        log.sync(rows(3))
        await pilot.pause()
        # Columns as wide as their content (issue 16): time 4+1, model 7+1 ("model-2"), st 3+1, packed left.
        assert line(log, 0) == " time model    st".ljust(30)
        assert line(log, 1) == " t00  model-0 200".ljust(30)
        assert line(log, 3).startswith(" t02  model-2")
        assert line(log, 4).strip() == ""
        assert log.row_count == 3
        assert log.cell_text(2, "model") == "model-2"
        assert log.virtual_size.height == 4


async def test_rows_scroll_under_the_header() -> None:
    app = LogApp()
    async with app.run_test(size=(30, 10)) as pilot:
        log = app.query_one(RequestLog)
        log.sync(rows(20))
        await pilot.pause()
        log.scroll_to(y=5, animate=False)
        await pilot.pause()
        assert log.scroll_offset.y == 5
        assert line(log, 0).startswith(" time model")
        assert line(log, 1).startswith(" t05  model-5")


async def test_a_row_is_painted_once_while_it_stays() -> None:
    app = LogApp()
    async with app.run_test(size=(30, 10)) as pilot:
        log = app.query_one(RequestLog)
        log.sync(rows(3))
        await pilot.pause()
        painted = [line(log, y) for y in range(1, 4)]
        first = log.render_line(1)
        assert log.render_line(1) is first, "a kept row is not painted again"
        # a new row on top: the old rows move down and keep their painted lines
        newest: Row = ("r9", (cell("t99"), cell("new"), cell("503", "error")))
        log.sync([newest, *rows(3)])
        await pilot.pause()
        assert log.render_line(2) is first
        assert [line(log, y) for y in range(2, 5)] == painted
        assert line(log, 1).startswith(" t99  new")
        log.sync([newest, *rows(3)])  # the same rows: nothing to do
        assert log.render_line(2) is first


async def test_tones_follow_the_theme() -> None:
    app = LogApp()
    async with app.run_test(size=(30, 10)) as pilot:
        log = app.query_one(RequestLog)
        log.sync(rows(1))
        await pilot.pause()

        def status_colour() -> object:
            segment = next(s for s in log.render_line(1) if s.text == "200")
            assert segment.style is not None
            return segment.style.color

        before = status_colour()
        current = app.get_theme(app.theme)
        assert current is not None
        other = next(
            name
            for name in app.available_themes
            if (theme := app.get_theme(name)) is not None and theme.error not in (None, current.error)
        )
        app.theme = other
        await pilot.pause()
        assert status_colour() != before


async def test_columns_follow_their_content_within_the_width() -> None:
    app = LogApp()
    async with app.run_test(size=(30, 10)) as pilot:
        log = app.query_one(RequestLog)
        log.sync(rows(1))
        await pilot.pause()
        assert len(line(log, 1)) == 30
        assert line(log, 1).index("200") == 14
        long: Row = ("r9", (cell("t99"), cell("a-much-longer-model-id"), cell("503", "error")))
        log.sync([long, *rows(1)])
        await pilot.pause()
        # The column grew as far as the width goes (two cells stay for a scroll bar)...
        assert line(log, 1) == " t99  a-much-longer-mod… 503  "
        await pilot.resize_terminal(24, 10)
        await pilot.pause()
        assert line(log, 1) == " t99  a-much-long… 503  "  # ...narrower: the model column gives way
        await pilot.resize_terminal(50, 10)
        await pilot.pause()
        assert line(log, 1) == " t99  a-much-longer-model-id 503".ljust(50)  # wider: all of it, packed left
