"""Every action key on the dashboard: the command it submits, the dialogs in front of destructive ones."""

from __future__ import annotations

from dataclasses import replace

from textual.widgets import Static
from textual.widgets._footer import FooterKey

from cortex.engine import CommandResult, NodeStatus, commands, events
from cortex.tui.app import CortexApp
from cortex.tui.messages import CommandFinished, CommandSubmitted, EngineEventReceived
from cortex.tui.screens.confirm import ConfirmScreen
from tests.tui.fakes import GEMMA, LLAMA, PHI, FakeEngine, build_app, build_fleet
from tests.tui.pilots import Messages, select, settle

DIRECT_KEYS: list[tuple[str, str, str, commands.Command]] = [
    ("model", GEMMA, "p", commands.PinModel(GEMMA)),
    ("model", LLAMA, "p", commands.UnpinModel(LLAMA)),
    ("model", PHI, "r", commands.LoadModel(PHI)),
    ("node", "gpu-large", "d", commands.DrainNode("gpu-large")),
    ("node", "gpu-medium", "d", commands.UndrainNode("gpu-medium")),
]


async def test_direct_keys_submit_their_command(engine: FakeEngine, messages: Messages) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        for kind, key, press, expected in DIRECT_KEYS:
            del messages[:]
            await select(pilot, kind, key)
            await pilot.press(press)
            await settle(pilot)
            assert engine.submitted[-1] == expected
            submitted = [m.command for m in messages.of(CommandSubmitted) if isinstance(m, CommandSubmitted)]
            assert submitted == [expected]
            finished = [m for m in messages.of(CommandFinished) if isinstance(m, CommandFinished)]
            assert len(finished) == 1
            assert finished[0].result is not None
            assert finished[0].result.ok
            notes = [(n.severity, n.message) for n in messages.notifications()]
            assert notes == [("information", f"{type(expected).__name__} accepted")]
        assert len(engine.submitted) == len(DIRECT_KEYS)


async def test_unload_asks_first(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "model", GEMMA)
        for answer in ("n", "escape", "y"):
            await pilot.press("u")
            dialog = app.screen
            assert isinstance(dialog, ConfirmScreen)
            assert "Unload google/gemma-2-9b-it from gpu-medium?" in dialog.question
            await pilot.press(answer)
            await settle(pilot)
            assert app.screen is app.dashboard
            assert engine.submitted == ([commands.UnloadModel(GEMMA)] if answer == "y" else [])


async def test_unloading_a_pinned_model_asks_twice_and_forces(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "model", LLAMA)
        await pilot.press("u")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        dialog = app.screen
        assert isinstance(dialog, ConfirmScreen)
        assert "PINNED" in dialog.question
        assert engine.submitted == []
        await pilot.press("y")
        await settle(pilot)
        assert engine.submitted == [commands.UnloadModel(LLAMA, force=True)]


async def test_declining_the_second_question_unloads_nothing(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "model", LLAMA)
        await pilot.press("u", "y", "n")
        await settle(pilot)
        assert engine.submitted == []
        assert app.screen is app.dashboard


async def test_restart_asks_first(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "node", "gpu-small")
        for answer in ("n", "y"):
            await pilot.press("R")
            dialog = app.screen
            assert isinstance(dialog, ConfirmScreen)
            assert "gpu-small" in dialog.question
            await pilot.press(answer)
            await settle(pilot)
        assert engine.submitted == [commands.RestartNode("gpu-small")]


async def test_confirm_buttons_answer_too(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "node", "gpu-large")
        await pilot.press("R")
        await pilot.click("#yes")
        await settle(pilot)
        assert engine.submitted == [commands.RestartNode("gpu-large")]
        await pilot.press("R")
        await pilot.press("enter")  # "No" has the focus
        await settle(pilot)
        assert engine.submitted == [commands.RestartNode("gpu-large")]


async def test_tab_moves_the_selection_between_nodes_and_models(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert app.dashboard.selection is not None
        assert app.dashboard.selection.key == "gpu-large"
        await pilot.press("d")
        await pilot.press("tab", "down")
        assert app.dashboard.selection is not None
        assert app.dashboard.selection.key == LLAMA
        await pilot.press("p")
        await settle(pilot)
        assert engine.submitted == [commands.DrainNode("gpu-large"), commands.UnpinModel(LLAMA)]


async def test_model_keys_need_a_model_and_node_keys_a_node(engine: FakeEngine, messages: Messages) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await select(pilot, "node", "gpu-large")
        await pilot.press("p", "u", "r")
        await select(pilot, "model", GEMMA)
        await pilot.press("d", "R")
        await settle(pilot)
        assert engine.submitted == []
        assert app.screen is app.dashboard
        notes = messages.notifications()
        assert [n.severity for n in notes] == ["warning"] * 5
        assert [n.message.split(":")[0] for n in notes] == ["pin", "unload", "load", "drain", "restart"]
        assert "select a model first" in notes[0].message
        assert "select a node first" in notes[3].message


ACTIONS = {"pin", "unload", "load", "drain", "restart"}


def footer_actions(app: CortexApp) -> set[str]:
    """The actions the dashboard's footer offers right now."""
    return {key.action for key in app.dashboard.query(FooterKey)}


async def test_read_only_offers_no_action_in_the_footer_and_submits_nothing(
    engine: FakeEngine, messages: Messages
) -> None:
    app = build_app(engine, read_only=True)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        for kind, key, keys in (("model", LLAMA, "pur"), ("node", "gpu-large", "dR")):
            await select(pilot, kind, key)
            for press in keys:
                await pilot.press(press)
                assert app.screen is app.dashboard
        await settle(pilot)
        assert engine.submitted == []
        offered = footer_actions(app)
        assert not offered & ACTIONS
        assert {"quit", "help", "filter"} <= offered
    writable = build_app(FakeEngine())
    async with writable.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert footer_actions(writable) >= ACTIONS  # the same footer, read-write, offers them all


async def test_restart_on_a_node_without_an_agent_says_so_and_asks_nothing(messages: Messages) -> None:
    fleet = build_fleet()
    large = fleet.nodes[0]
    engine = FakeEngine(replace(fleet, nodes=(replace(large, agent=None), *fleet.nodes[1:])))
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await select(pilot, "node", "gpu-large")
        await pilot.press("R")
        await settle(pilot)
        assert app.screen is app.dashboard  # no confirmation dialog
        assert engine.submitted == []
        [note] = messages.notifications()
        assert note.severity == "warning"
        assert "gpu-large has no agent" in note.message
        await select(pilot, "node", "gpu-medium")  # it has one: the dialog comes
        await pilot.press("R")
        assert isinstance(app.screen, ConfirmScreen)


async def test_t_names_the_theme_it_switched_to(engine: FakeEngine, messages: Messages) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        first = app.theme
        await pilot.press("t")
        await pilot.pause()
        assert app.theme != first
        [note] = messages.notifications()
        assert note.title == "theme"
        assert note.message.startswith(f"{app.theme} (2 of ")
        await pilot.press("question_mark")
        await pilot.pause()
        assert f"theme {app.theme}" in str(app.screen.query_one("#keys", Static).render())


async def test_a_refused_command_is_an_error_notification(engine: FakeEngine, messages: Messages) -> None:
    engine.results[commands.PinModel] = CommandResult(False, "gpu-medium has no room for it")
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await select(pilot, "model", GEMMA)
        await pilot.press("p")
        await settle(pilot)
        [note] = messages.notifications()
        assert (note.severity, note.message, note.title) == ("error", "gpu-medium has no room for it", f"pin {GEMMA}")


async def test_a_raising_submit_is_an_error_notification(engine: FakeEngine, messages: Messages) -> None:
    engine.fail_with = RuntimeError("engine stopped")
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await select(pilot, "model", PHI)
        await pilot.press("r")
        await settle(pilot)
        [note] = messages.notifications()
        assert note.severity == "error"
        assert "engine stopped" in note.message
        [finished] = [m for m in messages.of(CommandFinished) if isinstance(m, CommandFinished)]
        assert finished.result is None
        assert "engine stopped" in finished.error


async def test_keys_do_nothing_behind_a_dialog(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await select(pilot, "node", "gpu-large")
        await pilot.press("R")
        dialog = app.screen
        await pilot.press("d", "R", "p", "question_mark", "slash", "s", "q")
        assert app.screen is dialog
        assert len(app.screen_stack) == 2
        await pilot.press("n")
        await settle(pilot)
        assert engine.submitted == []


async def test_engine_events_become_notifications(engine: FakeEngine, messages: Messages) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.pause()
        engine.events.put_nowait(events.NodeWentDown(node="gpu-small", reason="3 polls failed"))
        engine.events.put_nowait(events.ModelLoadFailed(node="gpu-medium", model=PHI, message="out of memory"))
        engine.events.put_nowait(events.DefragFinished(node="gpu-large", ok=True))
        while len(messages.of(EngineEventReceived)) < 3:
            await pilot.pause()
        await pilot.pause()
        notes = [(n.severity, n.message) for n in messages.notifications()]
        assert notes == [
            ("error", "Node gpu-small is down: 3 polls failed"),
            ("error", f"Loading {PHI} on gpu-medium failed: out of memory"),
            ("information", "Defrag of gpu-large finished"),
        ]
        assert engine.subscribed == 1


async def test_lifecycle_events_redraw_at_once(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        fleet = engine.fleet
        down = replace(fleet.nodes[0], status=NodeStatus.DOWN)
        engine.fleet = replace(fleet, nodes=(down, *fleet.nodes[1:]))
        engine.events.put_nowait(events.NodeWentDown(node="gpu-large", reason="gone"))
        table = app.dashboard.tables["nodes"]
        while table.cell_text(0, "status") != "down":
            await pilot.pause()


async def test_quit_without_traffic_exits_with_zero() -> None:
    app = build_app(FakeEngine(build_fleet(in_flight=0)))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value == 0


async def test_quit_with_requests_in_flight_asks(engine: FakeEngine) -> None:
    app = build_app(engine)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("q")
        dialog = app.screen
        assert isinstance(dialog, ConfirmScreen)
        assert "3 request(s) in flight" in dialog.question
        await pilot.press("n")
        assert app.is_running
        assert app.screen is app.dashboard
        await pilot.press("q", "y")
        await pilot.pause()
    assert app.return_value == 0
