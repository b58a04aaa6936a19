"""The console's loads/h column and its what-if (issue 14 §5).

The first tests drive the console on the fake engine (the key, "replaying…", the table, a failure); the
last runs it on a real engine and gateway over a simulated node with real requests, and checks that the
figures on screen are the ones ``replay_all`` gives for the recorded trace on the same fleet.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from cortex.config import TuiSettings
from cortex.replay import STRATEGIES, read_trace, replay_all
from cortex.replay.run import quantile
from cortex.tui import fmt
from cortex.tui.app import CortexApp
from cortex.tui.messages import WhatIfFinished
from cortex.tui.screens.detail import DetailScreen
from cortex.tui.widgets.fleet_table import FleetTable
from tests.tui.fakes import LOADS, PHI, FakeEngine, build_app
from tests.tui.pilots import Messages, body_text, finish_whatif, select, whatif_rows
from tests.tui.traffic import SEQUENCE, drive, hand_fleet, live_gateway


def loads_column(app: CortexApp) -> dict[str, str]:
    table = app.dashboard.query_one("#models", FleetTable)
    return {key: table.cell_text(i, "loads") for i, key in enumerate(table.keys)}


async def test_the_models_table_shows_the_engines_loads_of_the_last_hour(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        shown = loads_column(app)
        assert shown[PHI] == str(LOADS[PHI])
        assert {k: v for k, v in shown.items() if v != "0"} == {k: str(v) for k, v in LOADS.items()}
        engine.loads = {**LOADS, PHI: 13}  # a new object: the engine counted another load
        for _ in range(100):  # the next refresh shows it (bounded: 5 s on a loaded machine)
            await pilot.pause(0.05)
            if loads_column(app)[PHI] == "13":
                break
        assert loads_column(app)[PHI] == "13"


async def test_w_on_a_detail_screen_replays_and_shows_the_table(engine: FakeEngine, messages: Messages) -> None:
    engine.whatif_gate = asyncio.Event()
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.press("w")  # the dashboard has no what-if: nothing happens
        await pilot.pause()
        assert engine.whatifs == 0
        await select(pilot, "model", PHI)
        await pilot.press("enter")
        assert isinstance(app.screen, DetailScreen)
        assert "w: what if?" in body_text(app)
        assert f"loads         {LOADS[PHI]} in the last hour" in body_text(app)
        await pilot.press("w")
        await pilot.pause()
        assert "replaying the last hour" in body_text(app)
        await pilot.press("w")  # a second press while it runs starts no second replay
        await pilot.pause()
        engine.whatif_gate.set()
        await finish_whatif(pilot)
        assert engine.whatifs == 1
        [finished] = messages.of(WhatIfFinished)
        assert isinstance(finished, WhatIfFinished)
        assert finished.result is engine.whatif_result
        text = body_text(app)
        assert "replaying" not in text
        rows = whatif_rows(text)
        assert rows["live"] == ["240", "16", "12.5s", "31.0s", fmt.DASH]
        assert rows["lru"] == ["240", "18", "13.2s", "33.5s", "0"]
        assert rows["priority"] == ["240", "17", "12.9s", "30.1s", "0"]
        assert rows["cost"] == ["240", "9", "4.25s", "31.2s", "1"]


async def test_a_failed_whatif_is_said_on_screen_and_in_a_notice(engine: FakeEngine, messages: Messages) -> None:
    engine.fail_with = RuntimeError("replay blew up")
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await select(pilot, "model", PHI)
        await pilot.press("enter", "w")
        await finish_whatif(pilot)
        await pilot.pause()
        assert "replay blew up" in body_text(app)
        assert any("replay blew up" in n.message for n in messages.notifications())


async def test_the_whatif_shows_what_replay_all_gives_for_the_recorded_hour(tmp_path: Path) -> None:
    async with live_gateway(tmp_path) as live:
        await drive(live)
        settings = live.settings.model_copy(update={"tui": TuiSettings(refresh_hz=10)})
        app = CortexApp(live.engine, settings, gateway_url=live.url)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.2)
            assert loads_column(app) == {"m1": "2", "m2": "2", "m3": "1"}
            await select(pilot, "model", "m3")
            await pilot.press("enter", "w")
            await finish_whatif(pilot)
            text = body_text(app)
        # What the same trace gives on the same fleet, computed here from the record file.
        trace = read_trace(live.record)
        assert [r.model for r in trace] == list(SEQUENCE)
        fleet = hand_fleet(live)
        expected = await asyncio.to_thread(replay_all, trace, fleet, STRATEGIES, base=live.settings)
    rows = whatif_rows(text)
    for name, result in expected.items():
        assert rows[name] == [
            str(len(SEQUENCE)),
            str(result.loads),
            fmt.seconds(result.p95_wait_s),
            fmt.seconds(result.max_wait_s),
            str(result.failed),
        ], (name, text)
    assert expected["lru"].loads == 5  # the replay of lru makes the five loads the live engine made
    waits = [w for w in (r.get("waited_s") for r in _lines(live.record)) if isinstance(w, float)]
    assert rows["live"][:2] == [str(len(SEQUENCE)), "5"]
    assert rows["live"][2:4] == [fmt.seconds(quantile(waits, 0.95)), fmt.seconds(max(waits))]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
