"""The console's side of issue 16: reload toasts, toasts that never bury the header, columns by content."""

from __future__ import annotations

from dataclasses import replace

from textual.widgets._toast import Toast

from cortex.engine import ModelSlot, ModelView, SlotState, events
from cortex.tui.widgets.fleet_table import FleetTable
from tests.tui.fakes import NOW, FakeEngine, build_app, build_fleet
from tests.tui.pilots import Messages


async def test_a_refused_reload_is_an_error_toast_naming_the_key(engine: FakeEngine, messages: Messages) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.pause()
        engine.events.put_nowait(
            events.ConfigReloaded(
                False,
                "config /etc/cortex.toml refused, the running config stays: nodes[1].endpoint: not a URL",
                errors=("nodes[1].endpoint: not a URL", "poll.interval_s: Input should be greater than 0"),
            )
        )
        engine.events.put_nowait(
            events.ConfigReloaded(
                True, "config applied: 2 change(s); needs a restart: gateway.listen", restart_needed=("gateway.listen",)
            )
        )
        engine.events.put_nowait(events.ConfigReloaded(True, "config applied: 1 change(s)", ("a",)))
        for _ in range(20):
            await pilot.pause()
            if len(messages.notifications()) == 3:
                break
        refused, restart, applied = messages.notifications()
        assert refused.severity == "error"
        assert "nodes[1].endpoint: not a URL" in refused.message
        assert "poll.interval_s" in refused.message  # the other problems too
        assert (restart.severity, applied.severity) == ("warning", "information")


async def test_a_burst_of_notices_never_stacks_over_the_header(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        for i in range(8):
            app.notify(f"node gpu-{i} is down: connection refused", severity="error")
            await pilot.pause()
        app.notify("node gpu-7 is down: connection refused", severity="error")  # a repeat: not shown twice
        await pilot.pause()
        await pilot.pause()
        toasts = list(app.screen.query(Toast))
        assert len(toasts) == 2  # the newest two on a 24-line terminal
        assert all(t.region.y > app.dashboard.header.region.bottom for t in toasts)
        assert [str(t.render()).count("gpu-7") for t in toasts].count(1) == 1


def demo_like_fleet() -> FakeEngine:
    """Two gemma ids that share their first 15 characters, and a long node name."""
    fleet = build_fleet()
    gemmas = ("google/gemma-3-12b-it", "google/gemma-3-4b-it")
    models = tuple(
        ModelView(mid, "loaded", ("gpu-large",), ("gpu-large",), False, vram_mb=9000, last_used=NOW - 5)
        for mid in gemmas
    )
    large = fleet.nodes[0]
    slots = (*large.slots, *(ModelSlot(mid, SlotState.LOADED, NOW - 60, 9000) for mid in gemmas))
    renamed = replace(large, name="gpu-large-rack2-a6000", slots=slots)
    return FakeEngine(replace(fleet, nodes=(renamed, *fleet.nodes[1:]), models=(*fleet.models, *models)))


async def test_at_80_columns_model_ids_stay_told_apart() -> None:
    app = build_app(demo_like_fleet())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        table = app.dashboard.query_one("#models", FleetTable)
        shown = {
            key: "".join(s.text for s in table.segments(((key, ""),), table.widths[0], trim=True)).strip()
            for key in ("google/gemma-3-12b-it", "google/gemma-3-4b-it")
        }
        # The org goes first, so the two stay told apart even in the 13 cells left beside loads/h.
        assert shown == {"google/gemma-3-12b-it": "gemma-3-12b-…", "google/gemma-3-4b-it": "gemma-3-4b-it"}
        assert table.widths[0] >= 14  # the id column took the room the others did not need (13 + its gap)


async def test_at_170_columns_nothing_is_cut_and_the_model_column_does_not_sprawl() -> None:
    app = build_app(demo_like_fleet())
    async with app.run_test(size=(170, 48)) as pilot:
        await pilot.pause()
        nodes = app.dashboard.query_one("#nodes", FleetTable)
        models = app.dashboard.query_one("#models", FleetTable)
        assert nodes.widths[0] == len("gpu-large-rack2-a6000") + 1  # the node name whole
        longest = max(len(m.id) for m in app.engine.snapshot().models)
        assert models.widths[0] == longest + 1  # as wide as the longest id, not the rest of the screen
        assert sum(models.widths) < 150
