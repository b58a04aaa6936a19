"""CortexApp: the operator's console, running in the gateway's own event loop.

The app is the only part of the console that talks to the engine, and only through
:class:`~cortex.engine.EngineFacade`: it reads ``snapshot()`` on a timer at ``tui.refresh_hz`` and hands it
to the screens, consumes ``subscribe()`` in one declared worker that only posts messages, and sends
``submit()`` commands in workers whose outcome (success, refusal or exception) is handled in one place,
:meth:`CortexApp._worker_changed`, and always shown as a notification. The what-if (``w`` on a detail
screen) is one more worker awaiting the facade's ``whatif()``, which replays off the loop, so the console
keeps drawing meanwhile. Screens own their widgets and view state; the app owns keys, commands,
confirmation flows and themes.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from textual import on, work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.filter import ANSIToTruecolor, LineFilter
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState

from cortex.config import Settings
from cortex.engine import Command, CommandResult, EngineFacade, NodeStatus, commands
from cortex.engine.facade import WhatIf
from cortex.tui.describe import command_label, event_notice
from cortex.tui.messages import CommandFinished, CommandSubmitted, EngineEventReceived, WhatIfFinished
from cortex.tui.render import Selection
from cortex.tui.screens import FleetView
from cortex.tui.screens.confirm import ConfirmScreen
from cortex.tui.screens.dashboard import DashboardScreen
from cortex.tui.screens.detail import DetailScreen
from cortex.tui.screens.help import HelpScreen
from cortex.tui.themes import FALLBACK_THEME, find_theme_dir, load_themes

__all__ = ["CortexApp", "RemoteLink"]

FLEET_ACTIONS = frozenset({"pin", "unload", "load", "drain", "restart"})
"""Actions that change the fleet: refused in read-only mode."""
DASHBOARD_ACTIONS = frozenset({"filter", "sort"})
"""Actions that act on the dashboard's own view."""
BLOCKED_BY_DIALOGS = FLEET_ACTIONS | DASHBOARD_ACTIONS | {"quit", "help"}
"""Actions that do nothing while a dialog is open (no dialog stacks on a dialog)."""


BUSY_REQ_S = 20.0
"""Above this many requests per second (since the last tick) the gateway counts as busy."""
BUSY_IN_FLIGHT = 32
"""...or with this many requests in flight."""
BUSY_REFRESH_HZ = 1.0
"""The console's redraw rate while the gateway is busy (``tui.refresh_hz`` otherwise)."""
TOASTS_MAX = 3
"""Notifications shown at once (2 on a short terminal): older ones give way, so a burst never covers the
header and the tables."""


@runtime_checkable
class RemoteLink(Protocol):
    """A facade that reaches its engine over the network (``cortex attach``) and can lose it."""

    def link_status(self) -> str:
        """What is wrong with the link ("" while it is up), e.g. ``reconnecting in 4 s: connection refused``."""
        ...


class CortexApp(App[int]):
    """The live fleet console. ``await CortexApp(...).run_async()`` returns the exit code (0)."""

    CSS_PATH = "cortex.tcss"
    TITLE = "cortex"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit", tooltip="quit cortex (asks first while requests are in flight)"),
        Binding("question_mark", "help", "help", key_display="?", tooltip="this key map"),
        Binding("slash", "filter", "filter", key_display="/", tooltip="filter nodes, models and requests"),
        Binding("s", "sort", "sort", tooltip="next sort order of the focused table"),
        Binding("t", "next_theme", "theme", tooltip="next theme (the files in themes/)"),
        Binding("p", "pin", "pin", tooltip="pin or unpin the selected model"),
        Binding("u", "unload", "unload", tooltip="unload the selected model (asks; a pinned one asks twice)"),
        Binding("r", "load", "load", tooltip="load (or reload) the selected model"),
        Binding("d", "drain", "drain", tooltip="drain or undrain the selected node"),
        Binding("R", "restart", "restart", key_display="R", tooltip="restart the selected node (asks)"),
        Binding(
            "w",
            "whatif",
            "what-if",
            tooltip="what-if on a detail screen: the last hour under each strategy",
        ),
    ]

    def __init__(
        self,
        engine: EngineFacade,
        settings: Settings,
        *,
        gateway_url: str,
        read_only: bool = False,
        theme_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        tz: dt.tzinfo | None = None,
        metrics_url: str = "",
        attached: bool = False,
    ) -> None:
        """Build the console.

        Args:
            engine: the engine facade (snapshot, subscribe, submit).
            settings: the settings; the console reads ``tui``.
            gateway_url: the address shown in the header (where clients reach the gateway).
            read_only: refuse every key that would change the fleet (they leave the footer too).
            theme_dir: where theme files live (else ``tui.theme_dir``, else the shipped ``themes/``).
            clock: wall-clock time source for uptime and ages (tests fix it).
            tz: zone of the request log's times (None = local).
            metrics_url: where Prometheus scrapes, shown in the header and the help.
            attached: the console watches a gateway running elsewhere (``cortex attach``): quitting it
                stops nothing.
        """
        super().__init__()
        self.engine = engine
        self.settings = settings
        self.gateway_url = gateway_url
        self.metrics_url = metrics_url
        self.attached = attached
        self.read_only = read_only
        self.clock = clock
        self._link = ""
        self._last_tick = float("-inf")
        self._last_seen = time.monotonic()
        self._last_requests = 0
        self._busy = False
        self.dashboard = DashboardScreen(address=gateway_url, read_only=read_only, tz=tz, metrics=metrics_url)
        self._commands: dict[Worker[Any], Command] = {}
        self._theme_problems: list[str] = []
        self.theme_cycle = self._load_themes(theme_dir)

    def get_line_filters(self) -> Sequence[LineFilter]:
        """Textual's line filters less ``ANSIToTruecolor``, which rebuilt every segment of every redrawn line.

        cortex's themes and styles are all truecolor, so that filter changed nothing on screen (the snapshot
        tests are the proof), yet under load it was most of the console's drawing cost: with it the proxy
        kept 0.84 of its ``--no-tui`` throughput, without it about 1.0 (``bench/console_overhead.py``).
        A terminal's own palette still shows any ANSI colour (Rich markup in a notice, say) as it would anyway.
        """
        return [f for f in super().get_line_filters() if not isinstance(f, ANSIToTruecolor)]

    # -- themes -------------------------------------------------------------------------------------

    def _load_themes(self, theme_dir: Path | None) -> list[str]:
        directory, explicit = find_theme_dir(theme_dir, self.settings.tui.theme_dir)
        found = load_themes(directory, explicit=explicit)
        self._theme_problems = found.problems
        self.register_theme(FALLBACK_THEME)
        for theme in found.themes:
            self.register_theme(theme)
        cycle = [theme.name for theme in found.themes]
        wanted = self.settings.tui.theme
        if wanted in self.available_themes:
            self.theme = wanted
        else:
            self._theme_problems.append(f"theme {wanted!r} not found; using the built-in theme")
            self.theme = FALLBACK_THEME.name
        if self.theme not in cycle:
            cycle.insert(0, self.theme)
        return cycle

    def action_next_theme(self) -> None:
        """Switch to the next loaded theme, and say which it is."""
        index = self.theme_cycle.index(self.theme) if self.theme in self.theme_cycle else -1
        index = (index + 1) % len(self.theme_cycle)
        self.theme = self.theme_cycle[index]
        self.notify(f"{self.theme} ({index + 1} of {len(self.theme_cycle)})", title="theme", markup=False)

    # -- notifications ------------------------------------------------------------------------------

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        """Textual's notify, less repeats and less stacking.

        A notice already on screen is not shown twice, and only the newest few stay up (``TOASTS_MAX``,
        two below 30 lines): a burst of events (a node going down takes its models with it) would
        otherwise stack toasts up the whole screen and over the header.
        """
        shown = list(self._notifications)  # Textual keeps no public list of what is on screen
        if any(n.message == message and n.title == title for n in shown):
            return
        keep = (TOASTS_MAX if self.size.height >= 30 else 2) - 1
        if len(shown) > keep:
            for old in shown[: len(shown) - keep]:
                self._unnotify(old, refresh=False)
            self._refresh_notifications()
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    # -- lifecycle ----------------------------------------------------------------------------------

    def get_default_screen(self) -> Screen[Any]:
        return self.dashboard

    def on_mount(self) -> None:
        if self._theme_problems:
            self.notify("\n".join(self._theme_problems), title="themes", severity="error", markup=False)
        self.refresh_views()
        self.set_interval(1 / self.settings.tui.refresh_hz, self._tick)
        self._watch_engine()

    def _tick(self) -> None:
        # The console shares the loop (and the core) with the proxy. When the gateway is busy, drawing at
        # refresh_hz would take CPU from the requests it shows, so it draws at most BUSY_REFRESH_HZ then.
        now = time.monotonic()
        busy_period = 1 / min(BUSY_REFRESH_HZ, self.settings.tui.refresh_hz) - 0.01
        if self._busy and now - self._last_tick < busy_period:
            return  # not even a snapshot: under load, building one costs as much as drawing it
        snap = self.engine.snapshot()
        # The rate since the last look reacts at once; the snapshot's own req/s is a 60 s average.
        rate = (snap.totals.requests - self._last_requests) / max(now - self._last_seen, 1e-3)
        self._last_requests, self._last_seen = snap.totals.requests, now
        self._busy = rate >= BUSY_REQ_S or snap.totals.in_flight >= BUSY_IN_FLIGHT
        if self._busy and now - self._last_tick < busy_period:
            return
        self._last_tick = now
        self._check_link()
        self.refresh_views()

    def _check_link(self) -> None:
        """Show the state of the link to a remote gateway in the header, and say when it changes."""
        if not isinstance(self.engine, RemoteLink):
            return
        link = self.engine.link_status()
        if link != self._link:
            if link and not self._link:
                self.notify(f"lost the gateway at {self.gateway_url}: {link}", severity="error", markup=False)
            elif self._link and not link:
                self.notify(f"connected to {self.gateway_url}", markup=False)
            self._link = link
            self.dashboard.link = link

    def refresh_views(self) -> None:
        """Hand the current snapshot (and the loads of the last hour) to every screen that shows the fleet."""
        snap, now, loads = self.engine.snapshot(), self.clock(), self.engine.loads_last_hour()
        for screen in self.screen_stack:
            if isinstance(screen, FleetView):
                screen.show(snap, now, loads)

    @work(exclusive=True, group="engine-events", exit_on_error=False, description="Watching engine events")
    async def _watch_engine(self) -> None:
        stream = self.engine.subscribe(requests=False)
        try:
            async for event in stream:
                # Request events come at the proxy's rate; the request log reads them from the snapshot
                # at refresh_hz instead, so posting one message per request would be pure cost.
                if not event.coalesce:
                    self.post_message(EngineEventReceived(event))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    @on(EngineEventReceived)
    def _engine_event(self, message: EngineEventReceived) -> None:
        notice = event_notice(message.event)
        if notice is not None:
            self.notify(notice.message, severity=notice.severity, markup=False)
        if not message.event.coalesce:
            self.refresh_views()

    # -- keys ---------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in FLEET_ACTIONS and self.read_only:
            return False  # not offered at all: the footer leaves them out
        if action in DASHBOARD_ACTIONS and self.screen is not self.dashboard:
            return False
        if action == "whatif":
            return isinstance(self.screen, DetailScreen)
        return not (isinstance(self.screen, ModalScreen) and action in BLOCKED_BY_DIALOGS)

    def _selected(self, kind: str, verb: str) -> Selection | None:
        """The selection if it is a `kind`; otherwise say why nothing happens."""
        if self.read_only:
            self.notify(f"read-only console: {verb} is disabled", severity="warning")
            return None
        selection = self.dashboard.selection
        if selection is None or selection.kind != kind:
            other = "models" if kind == "model" else "nodes"
            self.notify(f"{verb}: select a {kind} first (Tab to the {other} table)", severity="warning")
            return None
        return selection

    async def action_quit(self) -> None:
        in_flight = self.engine.snapshot().totals.in_flight
        if in_flight <= 0 or self.attached:
            self.exit(0)
            return
        question = (
            f"{in_flight} request(s) in flight. Quit cortex? The gateway stops after they finish "
            f"(at most {self.settings.gateway.drain_s:g} s)."
        )
        self._confirm(question, lambda: self.exit(0), yes="Quit")

    def action_help(self) -> None:
        bindings = [b for b in self.BINDINGS if isinstance(b, Binding)]
        where = [f"gateway {self.gateway_url}" + (" (attached)" if self.attached else "")]
        if self.metrics_url:
            where.append(f"metrics {self.metrics_url}")
        where.append(f"theme {self.theme} (t: next of {len(self.theme_cycle)})")
        _ = self.push_screen(HelpScreen(bindings, read_only=self.read_only, about=where))

    def action_whatif(self) -> None:
        """Replay the last hour under each strategy, shown on the detail screens (one run at a time)."""
        if any(w.group == "whatif" and not w.is_finished for w in self.workers):
            self.notify("what-if: already replaying", severity="warning")
            return
        for screen in self.screen_stack:
            if isinstance(screen, DetailScreen):
                screen.whatif_started()
        self._run_whatif()

    @work(exclusive=True, group="whatif", exit_on_error=False, description="Replaying the last hour")
    async def _run_whatif(self) -> None:
        self.post_message(WhatIfFinished(await self.engine.whatif()))

    @on(WhatIfFinished)
    def _whatif_finished(self, message: WhatIfFinished) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, DetailScreen):
                screen.whatif_done(message.result)

    def action_filter(self) -> None:
        self.dashboard.open_filter()

    def action_sort(self) -> None:
        self.dashboard.cycle_sort()

    def action_pin(self) -> None:
        sel = self._selected("model", "pin")
        if sel is not None:
            model = self.engine.snapshot().model(sel.key)
            pinned = model is not None and model.pinned
            self.submit(commands.UnpinModel(sel.key) if pinned else commands.PinModel(sel.key))

    def action_load(self) -> None:
        sel = self._selected("model", "load")
        if sel is not None:
            self.submit(commands.LoadModel(sel.key))

    def action_unload(self) -> None:
        sel = self._selected("model", "unload")
        if sel is None:
            return
        model = self.engine.snapshot().model(sel.key)
        where = ", ".join(model.nodes) if model is not None and model.nodes else "every node"
        if model is None or not model.pinned:
            self._confirm(f"Unload {sel.key} from {where}?", lambda: self.submit(commands.UnloadModel(sel.key)))
            return

        def ask_again() -> None:
            self._confirm(
                f"{sel.key} is PINNED. Unload it anyway (force)? It stays unpinned until pinned again.",
                lambda: self.submit(commands.UnloadModel(sel.key, force=True)),
                yes="Force unload",
            )

        self._confirm(f"Unload {sel.key} from {where}?", ask_again)

    def action_drain(self) -> None:
        sel = self._selected("node", "drain")
        if sel is not None:
            node = self.engine.snapshot().node(sel.key)
            draining = node is not None and node.status is NodeStatus.DRAINING
            self.submit(commands.UndrainNode(sel.key) if draining else commands.DrainNode(sel.key))

    def action_restart(self) -> None:
        sel = self._selected("node", "restart")
        if sel is None:
            return
        node = self.engine.snapshot().node(sel.key)
        if node is not None and node.agent is None:
            self.notify(
                f"restart: {sel.key} has no agent; a restart needs `cortex agent` running beside its mistralrs",
                severity="warning",
                markup=False,
            )
            return
        stale = "" if node is None or node.agent is None or node.agent.fresh else " Its agent has not reported lately."
        question = (
            f"Restart mistralrs on {sel.key}? It is drained first (in-flight requests finish), "
            f"then restarted through its agent, and its pinned models are loaded again.{stale}"
        )
        self._confirm(question, lambda: self.submit(commands.RestartNode(sel.key)), yes="Restart")

    def _confirm(self, question: str, then: Callable[[], object], *, yes: str = "Yes") -> None:
        def answered(answer: bool | None) -> None:
            if answer:
                then()

        _ = self.push_screen(ConfirmScreen(question, yes=yes), answered)

    # -- commands -----------------------------------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Send a command to the engine in a worker; its outcome becomes a notification."""
        worker = self.run_worker(
            self.engine.submit(command),
            group="commands",
            exit_on_error=False,
            description=command_label(command),
        )
        self._commands[worker] = command
        self.post_message(CommandSubmitted(command))

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group == "engine-events" and event.state is WorkerState.ERROR:
            self.notify(f"engine events stopped: {worker.error!r}", severity="error", markup=False)
        if worker.group == "whatif" and event.state is WorkerState.ERROR:
            now = self.clock()
            failed = WhatIf(since=now - 3600, until=now, strategy="", error=f"what-if failed: {worker.error!r}")
            self.notify(failed.error, severity="error", markup=False)
            self.post_message(WhatIfFinished(failed))
        if worker.group != "commands" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        command = self._commands.pop(worker, None)
        if command is None:
            return
        if event.state is WorkerState.SUCCESS and isinstance(worker.result, CommandResult):
            result = worker.result
            text = result.message or ("done" if result.ok else "failed")
            severity: SeverityLevel = "information" if result.ok else "error"
            self.notify(text, title=command_label(command), severity=severity, markup=False)
            self.post_message(CommandFinished(command, result))
        else:
            error = f"failed: {worker.error!r}"
            self.notify(error, title=command_label(command), severity="error", markup=False)
            self.post_message(CommandFinished(command, None, error))
