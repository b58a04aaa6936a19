"""Replay a trace through the engine's own lifecycle on virtual time, and count what the fleet did.

The engine under test is the real one: :class:`~cortex.engine.fleet.Fleet` and
:class:`~cortex.engine.lifecycle.Lifecycle` (placement, eviction order, queues, placers, the fairness
quantum, OOM retries), not a model of them, so a replay answers "what would cortex do with this traffic"
and changes to the engine show up in replays at once. What is simulated is everything around it: nodes are
in-memory objects with the :class:`~cortex.engine.mistralrs.MistralRsClient` surface (a load makes the model
ready ``load_s`` later, an unload is instant, memory is the sum of the loaded footprints), polls are a small
loop over :meth:`Fleet.poll_ok`, and time is a :class:`~cortex.replay.vclock.VirtualLoop`, so a day of
traffic takes seconds. Requests are open-loop: each arrives at its trace time, whatever earlier ones are
waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cortex.config import EvictionSettings, GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.events import EventBus
from cortex.engine.fleet import Fleet, NodeRec, StateStore
from cortex.engine.lifecycle import Lifecycle
from cortex.engine.metrics import CortexMetrics
from cortex.engine.mistralrs import LifecycleReply, MistralRsClient, SystemInfo
from cortex.engine.placement import Strategy
from cortex.errors import CortexError
from cortex.replay.bound import lower_bound_loads
from cortex.replay.spec import FleetSpec, ModelSpec, NodeSpec, Request
from cortex.replay.vclock import VirtualLoop

__all__ = ["STRATEGIES", "ReplayNode", "ReplayResult", "replay", "replay_all"]

STRATEGIES: tuple[Strategy, ...] = ("lru", "priority", "cost")

_EPOCH = 1_000_000.0
"""Virtual time of the trace's first arrival (a small origin keeps float steps far below the timer resolution)."""


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of ``values`` by nearest rank (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(slots=True)
class ReplayResult:
    """What one strategy did with one trace."""

    requests: int = 0
    loads: int = 0
    """Loads the nodes carried out (pins loaded at the start are not counted)."""
    unloads: int = 0
    gb_loaded: float = 0.0
    """GiB moved onto devices by those loads."""
    waited: int = 0
    """Requests that waited for a load (any wait above zero)."""
    p50_wait_s: float = 0.0
    p95_wait_s: float = 0.0
    max_wait_s: float = 0.0
    lower_bound_loads: int = 0
    """The offline bound (:func:`~cortex.replay.bound.lower_bound_loads`) for the requests in the order this
    strategy served them: the fewest loads a clairvoyant eviction needs for the same service order."""
    failed: int = 0
    """Requests that got an error instead of a lease (queue timeout, unknown or too large a model)."""
    hourly_wait_s: list[float] = field(default_factory=list)
    """Seconds waited by the requests that arrived in each hour of the trace (the sparkline)."""
    actions: list[tuple[str, str, str]] = field(default_factory=list)
    """``("load" | "unload", node, model)`` in the order the nodes carried them out (not in :meth:`as_dict`):
    the decisions themselves, which a test compares with the live engine's."""

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON values (waits rounded to the millisecond)."""
        return {
            "requests": self.requests,
            "loads": self.loads,
            "unloads": self.unloads,
            "gb_loaded": round(self.gb_loaded, 3),
            "waited": self.waited,
            "p50_wait_s": round(self.p50_wait_s, 3),
            "p95_wait_s": round(self.p95_wait_s, 3),
            "max_wait_s": round(self.max_wait_s, 3),
            "lower_bound_loads": self.lower_bound_loads,
            "failed": self.failed,
            "hourly_wait_s": [round(w, 3) for w in self.hourly_wait_s],
        }


class ReplayNode:
    """An in-memory mistral.rs node with virtual load times (the surface of ``MistralRsClient``)."""

    def __init__(
        self, spec: NodeSpec, models: dict[str, ModelSpec], actions: list[tuple[str, str, str]] | None = None
    ) -> None:
        self.spec = spec
        self.actions = actions if actions is not None else []
        """Where this node notes each load and unload it carries out (shared by the world's nodes)."""
        self.endpoint = f"replay://{spec.name}"
        self.created: int | None = 1
        self._models = models
        self.loaded: set[str] = set(spec.pinned)
        self.loading: set[str] = set()
        self.loads = 0
        self.unloads = 0
        self.mb_loaded = 0

    def used_mb(self) -> int:
        """Memory held by loaded and loading models (a load holds its weights from the start)."""
        return sum(self._models[m].mb for m in self.loaded | self.loading)

    async def health(self) -> None:
        """Always healthy."""

    async def models(self) -> dict[str, str]:
        """Every listed model with its state."""
        return {
            m: "reloading" if m in self.loading else "loaded" if m in self.loaded else "unloaded"
            for m in self.spec.models
        }

    async def system_info(self) -> SystemInfo | None:
        """Total and used memory."""
        return SystemInfo(self.spec.vram_mb, self.used_mb(), "replay")

    async def lifecycle(self, action: str, model: str, *, timeout_s: float | None = None) -> LifecycleReply:
        """``status``, ``unload`` (instant) or ``reload`` (ready ``load_s`` later; out of memory if it does not fit)."""
        if model not in self.spec.models:
            return LifecycleReply("not_found")
        if action == "status":
            state = "reloading" if model in self.loading else "loaded" if model in self.loaded else "unloaded"
            return LifecycleReply(state)
        if action == "unload":
            if model in self.loaded:
                self.loaded.discard(model)
                self.unloads += 1
                self.actions.append(("unload", self.spec.name, model))
            return LifecycleReply("unloaded")
        if model in self.loaded or model in self.loading:
            return LifecycleReply("loaded" if model in self.loaded else "reloading")
        spec = self._models[model]
        if self.used_mb() + spec.mb > self.spec.vram_mb:
            return LifecycleReply("internal_error", f"CUDA out of memory ({spec.mb} MiB for {model})")
        self.loading.add(model)
        try:
            await asyncio.sleep(spec.load_s)
        finally:
            self.loading.discard(model)
        self.loaded.add(model)
        self.loads += 1
        self.mb_loaded += spec.mb
        self.actions.append(("load", self.spec.name, model))
        return LifecycleReply("loaded")


class _ThisThreadQuiet(logging.Filter):
    """Drops the records below ERROR that the thread which made it logs (the replay's own)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether the record may go on."""
        return record.thread != self.thread or record.levelno >= logging.ERROR


class _MemoryStore(StateStore):
    """No state file: a replay learns nothing it should keep."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/cortex-replay/state.json"))

    def save(self) -> None:
        """Nothing to write."""


def replay_settings(fleet: FleetSpec, strategy: Strategy, base: Settings | None = None) -> Settings:
    """The settings of the replayed engine: the fleet's nodes and models, ``base``'s tunables otherwise.

    Defrag restarts are off (simulated nodes have no agent to restart them) and the queue timeout is long:
    a replay measures how long requests wait, so it lets them wait.
    """
    base = base or Settings()
    eviction = {**base.eviction.model_dump(), **dict(fleet.eviction), "strategy": strategy, "defrag_after_cycles": 0}
    gateway = base.gateway.model_copy(update={"queue_timeout_s": 86_400.0, "max_queue": 1_000_000})
    return Settings(
        gateway=GatewaySettings.model_validate(gateway.model_dump()),
        poll=PollSettings.model_validate(base.poll.model_dump()),
        eviction=EvictionSettings.model_validate(eviction),
        nodes=[
            NodeSettings(
                name=n.name, endpoint=f"http://{n.name}.replay.invalid:1", vram_mb=n.vram_mb, pinned=list(n.pinned)
            )
            for n in fleet.nodes
        ],
        models=[ModelSettings(id=m.id, vram_mb=m.mb, priority=m.priority) for m in fleet.models],
    )


class _World:
    """One replay's engine parts, nodes and request tasks."""

    def __init__(self, fleet: FleetSpec, settings: Settings) -> None:
        specs = {m.id: m for m in fleet.models}
        self.actions: list[tuple[str, str, str]] = []
        self.nodes = {n.name: ReplayNode(n, specs, self.actions) for n in fleet.nodes}
        loop = asyncio.get_running_loop()
        self.settings = settings
        self.fleet = Fleet(
            settings,
            {name: cast(MistralRsClient, node) for name, node in self.nodes.items()},
            EventBus(),
            _MemoryStore(),
            gateway="replay",
            clock=loop.time,
        )
        self.tasks: set[asyncio.Task[Any]] = set()
        self.lifecycle = Lifecycle(settings, self.fleet, CortexMetrics(clock=loop.time), self.fleet.bus, self.spawn)
        self.waits: list[tuple[float, float]] = []
        """(arrival, seconds waited) per granted request."""
        self.served: list[Request] = []
        """The requests in the order they got their lease, at the time they got it (for the bound)."""
        self.failed = 0

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def poll_once(self, node: NodeRec) -> None:
        """What the engine's poller does with a good poll: apply it, reconcile on (re)appearance or a missing pin."""
        await node.client.health()
        models = await node.client.models()
        info = await node.client.system_info()
        if self.fleet.poll_ok(node, models, info):
            _ = self.spawn(self.lifecycle.reconcile(node))
        elif self.lifecycle.pins_missing(node):
            _ = self.spawn(self.lifecycle.reconcile(node, budget=False))
        self.lifecycle.changed()

    async def poll_loop(self, node: NodeRec) -> None:
        while True:
            await asyncio.sleep(self.settings.poll.interval_s)
            await self.poll_once(node)

    async def ttl_loop(self) -> None:
        ttl = self.settings.eviction.idle_ttl_s
        while ttl > 0:
            await asyncio.sleep(max(0.2, min(ttl / 4, 10.0)))
            await self.lifecycle.ttl_sweep()

    async def request(self, arrival: float, req: Request) -> None:
        try:
            lease = await self.lifecycle.acquire(req.model)
        except CortexError:
            self.failed += 1
            return
        self.waits.append((arrival, lease.queue_s))
        self.served.append(Request(asyncio.get_running_loop().time(), req.model, req.dur))
        try:
            await asyncio.sleep(req.dur)
        finally:
            lease.release()

    async def run(self, requests: Sequence[Request]) -> None:
        loop = asyncio.get_running_loop()
        for node in self.fleet.nodes.values():
            await self.poll_once(node)
        background = [self.spawn(self.poll_loop(n)) for n in self.fleet.nodes.values()]
        background.append(self.spawn(self.ttl_loop()))
        t0 = requests[0].t if requests else 0.0
        pending: list[asyncio.Task[Any]] = []
        for req in requests:
            at = _EPOCH + (req.t - t0)
            if at > loop.time():
                await asyncio.sleep(at - loop.time())
            pending.append(self.spawn(self.request(req.t - t0, req)))
        if pending:
            await asyncio.wait(pending)
        for task in background:
            task.cancel()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _result(world: _World, requests: Sequence[Request], fleet: FleetSpec) -> ReplayResult:
    waits = [w for _, w in world.waits]
    hours = int((requests[-1].t - requests[0].t) // 3600) + 1 if requests else 0
    hourly = [0.0] * hours
    for arrival, wait in world.waits:
        hourly[min(hours - 1, int(arrival // 3600))] += wait
    mb = sum(n.mb_loaded for n in world.nodes.values())
    return ReplayResult(
        requests=len(requests),
        loads=sum(n.loads for n in world.nodes.values()),
        unloads=sum(n.unloads for n in world.nodes.values()),
        gb_loaded=mb / 1024,
        waited=sum(1 for w in waits if w > 0),
        p50_wait_s=quantile(waits, 0.50),
        p95_wait_s=quantile(waits, 0.95),
        max_wait_s=max(waits, default=0.0),
        lower_bound_loads=lower_bound_loads(world.served, fleet, headroom_mb=world.settings.eviction.headroom_mb),
        failed=world.failed,
        hourly_wait_s=hourly,
        actions=world.actions,
    )


def replay(
    requests: Sequence[Request],
    fleet: FleetSpec,
    strategy: Strategy,
    *,
    base: Settings | None = None,
) -> ReplayResult:
    """Replay ``requests`` (sorted by ``t``) on ``fleet`` under ``strategy``; deterministic for the same input.

    Args:
        requests: the trace, in arrival order.
        fleet: the simulated nodes and models.
        strategy: the eviction strategy of the replayed engine.
        base: settings whose tunables (eviction, poll) the replayed engine takes; the defaults when None.
    """
    settings = replay_settings(fleet, strategy, base)
    # A replay's loads and waits are its result, not news for the log. Only this thread's records are
    # held back: the console's what-if replays in a worker thread beside a live engine that keeps logging.
    quiet = _ThisThreadQuiet()
    loggers = [
        logger
        for name, logger in list(logging.Logger.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and (name == "cortex.engine" or name.startswith("cortex.engine."))
    ]
    for logger in loggers:
        logger.addFilter(quiet)
    loop = VirtualLoop(_EPOCH)
    try:

        async def main() -> _World:
            world = _World(fleet, settings)
            await world.run(requests)
            return world

        world = loop.run_until_complete(main())
    finally:
        loop.close()
        for logger in loggers:
            logger.removeFilter(quiet)
    return _result(world, requests, fleet)


def replay_all(
    requests: Sequence[Request],
    fleet: FleetSpec,
    strategies: Sequence[Strategy] = STRATEGIES,
    *,
    base: Settings | None = None,
) -> dict[str, ReplayResult]:
    """:func:`replay` under each strategy."""
    return {s: replay(requests, fleet, s, base=base) for s in strategies}
