"""The non-command keys and the views: help, detail, filter, sort, layout sizes, NO_COLOR, cheap redraws."""

from __future__ import annotations

from dataclasses import replace

import pytest
from textual.strip import Strip

from cortex.tui.render import Cell
from cortex.tui.screens.detail import DetailScreen
from cortex.tui.screens.help import HelpScreen
from cortex.tui.widgets.fleet_table import FleetTable
from cortex.tui.widgets.request_log import RequestLog
from tests.tui.fakes import GEMMA, LLAMA, NOW, PHI, QWEN7, FakeEngine, build_app
from tests.tui.pilots import Messages, select


def rows(app_table: FleetTable) -> list[str]:
    return app_table.keys


async def test_dashboard_shows_the_fleet(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        dash = app.dashboard
        assert rows(dash.tables["nodes"]) == ["gpu-large", "gpu-medium", "gpu-small"]
        assert len(rows(dash.tables["models"])) == 6
        assert dash.requests.row_count == 6
        assert dash.requests.cell_text(0, "time") == "23:59:59"
        assert dash.tables["nodes"].cell_text(2, "status") == "down"
        header = str(dash.header.render())
        assert "http://127.0.0.1:8000" in header
        assert "up 1h02m" in header
        assert "3 errors" in header
        assert engine.subscribed == 1
        assert engine.wants_requests is False  # the request log comes from snapshots, not one event each


async def test_help_lists_every_key_and_closes(messages: Messages) -> None:
    app = build_app()
    async with app.run_test(size=(80, 24), message_hook=messages.append) as pilot:
        await pilot.press("question_mark")
        help_screen = app.screen
        assert isinstance(help_screen, HelpScreen)
        text = str(help_screen.query_one("#keys").render())
        for key, words in [("q", "quit"), ("?", "key map"), ("/", "filter"), ("s", "sort"), ("t", "theme"),
                           ("p", "pin"), ("u", "unload"), ("r", "load"), ("d", "drain"), ("R", "restart"),
                           ("tab", "switch"), ("enter", "details")]:  # fmt: skip
            assert f" {key}  " in text, key
            assert words in text, key
        await pilot.press("escape")
        assert app.screen is app.dashboard
        await pilot.press("question_mark", "question_mark")
        assert app.screen is app.dashboard


@pytest.mark.parametrize(
    ("kind", "key", "needles"),
    [
        ("node", "gpu-large", ["NVIDIA RTX 6000 Ada", "kind=restart", "http://gpu-large.internal:8080"]),
        ("model", PHI, ["on gpu-medium for 12s", "listed on"]),
    ],
    ids=["node", "model"],
)
async def test_enter_opens_the_detail_of_the_selection(kind: str, key: str, needles: list[str]) -> None:
    app = build_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, kind, key)
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, DetailScreen)
        assert screen.selection.key == key
        body = str(screen.query_one("#body").render())
        for needle in needles:
            assert needle in body
        await pilot.press("escape")
        assert app.screen is app.dashboard


async def test_detail_follows_the_fleet_and_marks_the_status(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(80, 24)) as pilot:
        await select(pilot, "node", "gpu-large")
        await pilot.press("enter")
        badge = app.screen.query_one("#status")
        assert badge.has_class("-up")
        engine.fleet = replace(engine.fleet, nodes=engine.fleet.nodes[1:])
        app.refresh_views()
        await pilot.pause()
        assert "no longer in the fleet" in str(app.screen.query_one("#body").render())
        assert not badge.has_class("-up")


async def test_filter_narrows_both_tables_and_escape_clears_it() -> None:
    app = build_app()
    async with app.run_test(size=(120, 40)) as pilot:
        dash = app.dashboard
        await pilot.press("slash")
        assert dash.filter_input.has_focus
        await pilot.press(*"gpu-small")
        assert rows(dash.tables["nodes"]) == ["gpu-small"]
        assert rows(dash.tables["models"]) == [QWEN7]
        assert dash.requests.row_count == 0
        await pilot.press("enter")
        assert dash.tables["nodes"].has_focus
        assert not dash.filter_input.display
        assert dash.tables["nodes"].border_title == "nodes · by name · filter: gpu-small"
        await pilot.press("escape")
        assert dash.needle == ""
        assert len(rows(dash.tables["nodes"])) == 3


async def test_s_cycles_the_sort_of_the_focused_table() -> None:
    app = build_app()
    async with app.run_test(size=(120, 40)) as pilot:
        dash = app.dashboard
        await pilot.press("s")
        assert dash.sorts["nodes"] == "status"
        assert rows(dash.tables["nodes"]) == ["gpu-small", "gpu-medium", "gpu-large"]
        assert dash.selection is not None
        assert dash.selection.key == "gpu-large"  # the selection follows its row
        await pilot.press("tab", "s", "s")
        assert dash.sorts["models"] == "vram"
        assert rows(dash.tables["models"])[0] == LLAMA or rows(dash.tables["models"])[0].startswith("Qwen")
        for _ in range(4):
            await pilot.press("s")
        assert dash.sorts["models"] == "id"
        assert rows(dash.tables["models"])[0] == GEMMA


async def test_sparklines_follow_the_selection() -> None:
    app = build_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "model", LLAMA)
        tok, _ttft = app.dashboard.sparks
        assert "Llama-3.1-8B-Instruct" in str(tok.query_one("Static").render())
        await select(pilot, "node", "gpu-small")
        assert "gpu-small" in str(tok.query_one("Static").render())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
async def test_every_column_fits_from_80_columns(size: tuple[int, int]) -> None:
    app = build_app()
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        for table in (*app.dashboard.tables.values(), app.dashboard.requests):
            assert table.virtual_size.width <= table.size.width, table.id
            assert not table.show_horizontal_scrollbar


async def test_no_color_still_renders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("t", "question_mark", "escape")
        svg = app.export_screenshot()
        assert "gpu-medium" in svg
        assert app.dashboard.tables["nodes"].cell_text(1, "status") == "draining"


async def test_a_quiet_tick_touches_no_cell(monkeypatch: pytest.MonkeyPatch, engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        updates: list[tuple[str | None, object]] = []
        adds: list[str | None] = []
        original_update, original_add = FleetTable.update_cell, FleetTable.add_row

        def counting_update(self: FleetTable, row_key: object, column_key: object, *a: object, **k: object) -> None:
            updates.append((self.id, column_key))
            original_update(self, row_key, column_key, *a, **k)  # type: ignore[arg-type]

        def counting_add(self: FleetTable, *cells: object, **k: object) -> object:
            adds.append(self.id)
            return original_add(self, *cells, **k)  # type: ignore[arg-type]

        paints: list[tuple[Cell, ...]] = []
        original_paint = RequestLog._paint_row

        def counting_paint(self: RequestLog, cells: tuple[Cell, ...], width: int) -> Strip:
            paints.append(cells)
            return original_paint(self, cells, width)

        monkeypatch.setattr(FleetTable, "update_cell", counting_update)
        monkeypatch.setattr(FleetTable, "add_row", counting_add)
        monkeypatch.setattr(RequestLog, "_paint_row", counting_paint)
        tables = app.dashboard.tables
        renders = {name: table.renders for name, table in tables.items()}
        for _ in range(3):
            app.refresh_views()
        await pilot.pause()
        assert updates == []
        assert adds == []
        assert paints == []
        assert {name: table.renders for name, table in tables.items()} == renders  # no row formatted again
        models = list(engine.fleet.models)
        models[0] = replace(models[0], in_flight=5)
        requests = (replace(engine.fleet.requests[0], ts=NOW + 0.5), *engine.fleet.requests)
        engine.fleet = replace(engine.fleet, models=tuple(models), requests=requests)
        app.refresh_views()
        await pilot.pause()
        assert updates == []  # cells are placeholders: the changed row is formatted again, and only it
        assert adds == []
        assert {name: table.renders - renders[name] for name, table in tables.items()} == {"nodes": 0, "models": 1}
        assert tables["models"].cell_text(tables["models"].keys.index(models[0].id), "in_flight") == "5"
        assert paints == []  # the request log moves at most once a second
        rows_before = app.dashboard.requests.row_count
        app.clock = lambda: NOW + 1.0
        app.refresh_views()
        await pilot.pause()
        assert app.dashboard.requests.cell_text(0, "time") == "00:00:00"
        assert app.dashboard.requests.row_count == rows_before + 1
        # only the new row is painted: the rows that moved down keep their painted lines
        assert paints == [app.dashboard.requests._rows[0][1]]
