"""The engine: owns the fleet, its pollers, the lifecycle actor, the metrics and the agent hub.

It is an async context manager because it owns resources (one ``ClientSession``, background tasks) and
whoever starts a resource stops it. Front ends see the facade (:meth:`snapshot`, :meth:`subscribe`,
:meth:`submit`, and the last hour's :meth:`loads_last_hour` and :meth:`whatif`); the gateway also uses the
request-path methods (:meth:`resolve`, :meth:`acquire`, :meth:`record`) and :attr:`session` to stream to nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp

from cortex.config import Settings
from cortex.engine import commands as cmd
from cortex.engine.affinity import AffinityStore, responses_path
from cortex.engine.agents import AgentHub
from cortex.engine.events import Event, EventBus, ModelLoaded, ModelPinChanged, NodeStatusChanged, RequestCompleted
from cortex.engine.facade import WhatIf
from cortex.engine.fleet import Fleet, NodeRec, StateStore
from cortex.engine.history import TrafficHistory
from cortex.engine.kinds import ModelKinds
from cortex.engine.lifecycle import Lease, Lifecycle, RestartResult
from cortex.engine.metrics import CortexMetrics, RequestOutcome
from cortex.engine.mistralrs import MistralRsClient, NodeError
from cortex.engine.recorder import TraceRecorder
from cortex.engine.state import FleetSnapshot
from cortex.engine.upstream import UpstreamPool

if TYPE_CHECKING:
    from cortex.cluster import Cluster
    from cortex.engine.reload import Reloader

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    """The headless core (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        gateway: str | None = None,
        state_path: Path | None = None,
        responses_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.gateway = gateway if gateway is not None else settings.gateway.listen
        self.bus = EventBus()
        self.metrics = CortexMetrics(clock=clock)
        self._state_path = state_path
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._upstream: UpstreamPool | None = None
        self._fleet: Fleet | None = None
        self._lifecycle: Lifecycle | None = None
        self.agents = AgentHub(settings, on_change=self._agents_changed, clock=clock)
        self.ready = asyncio.Event()
        """Set once every node has been polled once (and pins/budgets reconciled where up)."""
        self._aliases: dict[str, str | None] = {}
        record = settings.gateway.record
        self.recorder: TraceRecorder | None = (
            TraceRecorder(Path(record).expanduser(), settings.gateway.record_max_mb) if record else None
        )
        """Writes the traffic record for ``cortex replay`` (``gateway.record``), or None."""
        self.history = TrafficHistory(clock)
        """The last hour of finished requests and loads (the console's loads/h and what-if), record or not."""
        self._unrecorded: list[RequestOutcome] = []
        """Finished requests waiting for :meth:`_record_unrecorded` (one callback per turn of the loop)."""
        self._whatif: asyncio.Task[WhatIf] | None = None
        self.affinity = AffinityStore(responses_file or responses_path(state_path))
        """Which node holds each stored OpenAI response (``previous_response_id`` routing), persisted."""
        self.kinds = ModelKinds()
        """The model kinds nodes report (``/v1/models`` shows them)."""
        self.api_keys: list[bytes] = [k.get_secret_value().encode() for k in settings.gateway.api_keys]
        """The client API keys, one list the gateway's handlers share: a config reload changes it in place."""
        self.reloader: Reloader | None = None
        """Re-reads the config and applies it (set by the runtime when there is a config to re-read)."""
        self.cluster: Cluster | None = None
        """The other gateways sharing the fleet through Redis (``[cluster] redis_url``); None alone."""

    # -- resources ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        # No cookie jar: nodes set no cookies cortex should keep, and filtering a jar costs every request.
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        timeout = self.settings.poll.timeout_s
        clients = {n.name: MistralRsClient(self._session, n.endpoint, timeout_s=timeout) for n in self.settings.nodes}
        self._fleet = Fleet(
            self.settings, clients, self.bus, StateStore(self._state_path), gateway=self.gateway, clock=self.clock
        )
        fleet = self._fleet
        fleet.agent_info = self.agents.info
        fleet.agent_vram = self.agents.vram
        fleet.stats_for_model = self.metrics.model_stats
        fleet.stats_for_node = self.metrics.node_stats
        fleet.totals = self.metrics.totals
        fleet.recent = self.metrics.recent
        self.metrics.bind_fleet(fleet.snapshot)
        self._upstream = UpstreamPool(connect_timeout_s=self.settings.gateway.first_byte_timeout_s)
        self._lifecycle = Lifecycle(
            self.settings, fleet, self.metrics, self.bus, self.spawn, self._restart, upstream=self._upstream
        )
        self._lifecycle.agent_alive = self._agent_alive
        if self.settings.cluster.redis_url.get_secret_value():
            from cortex.cluster import Cluster  # imported only when configured: a lone gateway pays nothing

            self.cluster = Cluster(self)
            await self.cluster.start()

        for node in fleet.nodes.values():
            self.background(self._poll_loop(node))
        self.background(self._mark_ready())
        self.background(self._ttl_loop())
        self.background(self._agents_loop())
        self.background(self._count_loads())
        if self.recorder is not None:
            self.recorder.start()
        self.background(self.affinity.run())
        self.background(self.kinds.run(self))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Cancel every engine task and close the session."""
        if self.recorder is not None:
            await self.recorder.stop()  # what is buffered reaches the file
        if self.cluster is not None:
            await self.cluster.stop()  # leases given back, this gateway leaves the registry
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self.affinity.flush()
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a coroutine as an engine task (cancelled by :meth:`stop`)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Like :meth:`spawn`, for tasks nobody awaits (the engine's task set keeps them)."""
        _ = self.spawn(coro)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine task failed", exc_info=task.exception())

    @property
    def session(self) -> aiohttp.ClientSession:
        """The one persistent client session (polls, lifecycle calls and the odd proxy call to nodes)."""
        assert self._session is not None, "Engine used outside `async with`"
        return self._session

    @property
    def upstream(self) -> UpstreamPool:
        """The keep-alive connections that carry client requests to nodes."""
        assert self._upstream is not None, "Engine used outside `async with`"
        return self._upstream

    @property
    def fleet(self) -> Fleet:
        assert self._fleet is not None, "Engine used outside `async with`"
        return self._fleet

    @property
    def lifecycle(self) -> Lifecycle:
        assert self._lifecycle is not None, "Engine used outside `async with`"
        return self._lifecycle

    # -- polling --------------------------------------------------------------------------------------

    async def _mark_ready(self) -> None:
        while any(n.last_poll == 0.0 for n in self.fleet.nodes.values()):
            await asyncio.sleep(0.02)
        self.ready.set()

    async def poll_once(self, node: NodeRec) -> None:
        """Poll one node now (health, models, system info) and apply what it says.

        A node whose server start time (``created`` in its model list) changed restarted between two polls,
        too fast to be seen down: it is treated as come back (its whole state applied, budget and pins
        reconciled). Pins are checked on every poll.
        """
        fleet = self.fleet
        lifecycle = self.lifecycle
        try:
            await node.client.health()
            models, info = await asyncio.gather(node.client.models(), node.client.system_info())
        except NodeError as exc:
            fleet.poll_failed(node, str(exc))
            return
        finally:
            lifecycle.changed()
        created = node.client.created
        restarted = node.server_created is not None and created is not None and created != node.server_created
        node.server_created = created
        if restarted:
            log.info("node %s restarted (its server start time changed)", node.name)
        if fleet.poll_ok(node, models, info, fresh=restarted) or restarted:
            if not restarted:
                log.info("node %s is up (%d models listed)", node.name, len(models))
            self.background(lifecycle.reconcile(node))
        elif lifecycle.pins_missing(node):
            self.background(lifecycle.reconcile(node, budget=False))

    def poll_node(self, node: NodeRec) -> None:
        """Poll a node that joined after the start (a config reload) until it leaves the fleet."""
        self.background(self._poll_loop(node))

    async def _poll_loop(self, node: NodeRec) -> None:
        # Ends once a config reload removed (or replaced) the node; the interval is read live for the same reason.
        while self.fleet.nodes.get(node.name) is node:
            if not node.restarting:
                await self.poll_once(node)
            await asyncio.sleep(self.settings.poll.interval_s)

    async def _ttl_loop(self) -> None:
        while True:  # idle_ttl_s is read live: a config reload may turn the TTL on or off
            ttl = self.settings.eviction.idle_ttl_s
            await asyncio.sleep(max(0.2, min(ttl / 4, 10.0)) if ttl > 0 else 1.0)
            if self.settings.eviction.idle_ttl_s > 0:
                await self.lifecycle.ttl_sweep()

    async def _agents_loop(self) -> None:
        """Let the hub notice agents going stale (it signals changes; staleness needs a clock tick)."""
        while True:
            await asyncio.sleep(self.settings.poll.interval_s)
            self.agents.refresh()

    async def _count_loads(self) -> None:
        """Feed the history with the loads cortex carries out (a poll's sighting has no ``seconds``)."""
        async for event in self.bus.subscribe(requests=False):
            if isinstance(event, ModelLoaded) and event.seconds is not None:
                self.history.add_load(self.clock(), event.model, event.seconds)

    def _agents_changed(self) -> None:
        if self._fleet is not None:
            self._fleet.touch()

    def _agent_alive(self, node: str) -> bool:
        info = self.agents.info(node)
        return info is not None and info.fresh

    async def _restart(self, node: str, timeout_s: float) -> RestartResult:
        outcome = await self.agents.restart(node, timeout_s)
        return RestartResult(ok=outcome.ok, message=outcome.message, ran=bool(outcome.command_id))

    # -- facade ---------------------------------------------------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        """The current fleet (immutable)."""
        return self.fleet.snapshot()

    def subscribe(self, *, requests: bool = True) -> AsyncIterator[Event]:
        """Engine events as they happen (``requests=False``: without the per-request ones)."""
        return self.bus.subscribe(requests=requests)

    async def submit(self, command: cmd.Command) -> cmd.CommandResult:
        """Carry out a command; never raises for a command that cannot be done."""
        from cortex.engine.commands_impl import execute

        try:
            return await execute(self, command)
        except NodeError as exc:
            return cmd.CommandResult(False, str(exc))

    def loads_last_hour(self) -> Mapping[str, int]:
        """Loads cortex carried out in the last hour, by model (the same object until a count changes)."""
        return self.history.loads_last_hour()

    async def whatif(self) -> WhatIf:
        """Replay the last hour under each strategy in a worker thread (callers meanwhile share one run)."""
        if self._whatif is None or self._whatif.done():
            from cortex.replay.live import capture, run_whatif

            history = self.history
            live = capture(
                self.snapshot(),
                self.settings,
                dict(self.fleet.store.footprints),
                history.requests_last_hour(),
                history.load_seconds(),
                history.loads_last_hour(),
                self.clock(),
                history.window_s,
            )
            self._whatif = self.spawn(asyncio.to_thread(run_whatif, live))
        run = self._whatif
        try:
            return await asyncio.shield(run)  # a caller that leaves does not cancel the others' run
        except Exception as exc:  # logged by _task_done; the caller gets it in words
            now = self.clock()
            return WhatIf(since=now - self.history.window_s, until=now, strategy="", error=f"what-if failed: {exc}")

    # -- request path ---------------------------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        """The canonical model id for a client's name: an id nodes list, else a `[[models]].aliases` match."""
        if name in self.fleet.nodes_by_model():
            return name
        cached = self._aliases.get(name, "")
        if cached != "":
            return cached
        found: str | None = None
        for facts in self.settings.models:
            if name in facts.aliases:
                found = facts.id
                break
        if found is None:
            for facts in self.settings.models:
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in facts.aliases):
                    found = facts.id
                    break
        if len(self._aliases) > 4096:
            self._aliases.clear()
        self._aliases[name] = found
        return found

    def default_model(self) -> str | None:
        """The model for requests that name none: the config's first pinned model."""
        pinned = self.settings.pinned_models()
        return pinned[0] if pinned else None

    def served_models(self) -> list[str]:
        """Every model id some node lists, sorted."""
        return sorted(self.fleet.nodes_by_model())

    async def acquire(
        self, model: str, exclude: tuple[str, ...] = (), on_wait: Callable[[float], Awaitable[None]] | None = None
    ) -> Lease:
        """A lease on a node serving ``model`` (see :meth:`Lifecycle.acquire`)."""
        return await self.lifecycle.acquire(model, exclude, on_wait)

    def record(self, outcome: RequestOutcome) -> None:
        """Count a finished request (metrics, windows, request log, event)."""
        self._record(outcome)
        self.fleet.touch()
        self.lifecycle.changed()

    def _record(self, outcome: RequestOutcome) -> None:
        record = self.metrics.request_done(outcome)
        self.history.add_request(outcome, record)
        if self.recorder is not None:
            self.recorder.add(outcome, record)
        if self.bus.subscribers:
            self.bus.publish(RequestCompleted(record))

    def record_soon(self, outcome: RequestOutcome) -> None:
        """Like :meth:`record`, once the response has been handed to the socket (off the latency path).

        Requests that end in the same turn of the loop are recorded together, by one callback.
        """
        unrecorded = self._unrecorded
        unrecorded.append(outcome)
        if len(unrecorded) == 1:
            asyncio.get_running_loop().call_soon(self._record_unrecorded)

    def _record_unrecorded(self) -> None:
        batch, self._unrecorded = self._unrecorded, []
        for outcome in batch:
            try:
                self._record(outcome)
            except Exception:  # one bad record must not lose the others
                log.exception("engine: could not record a finished request")
        self.fleet.touch()
        self.lifecycle.changed()

    def node_status_changed(self, node: NodeRec, old: str) -> None:
        """Publish a node status change made by a command."""
        new = node.status.value
        if new != old:
            self.bus.publish(NodeStatusChanged(node.name, old, new))
        if self.cluster is not None:
            self.cluster.drain_changed(node.name, node.drained)

    def pin_changed(self, model: str, node: str, pinned: bool) -> None:
        """Publish a pin change made by a command."""
        self.bus.publish(ModelPinChanged(model, node, pinned))
