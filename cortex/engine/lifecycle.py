"""Loading, unloading, queueing and eviction: the engine's actions on nodes.

Requests never trigger a node's own lazy load (a real node answers concurrent requests during it with 500).
Instead a request for a model loaded nowhere joins that model's bounded queue, and one *placer* task per
model chooses a node (:func:`~cortex.engine.placement.place`), unloads victims, waits for their memory, calls
``reload`` once and wakes every waiter when the node says ``loaded``. Decisions and the state marks that
protect them (``LOADING`` on the target, ``UNLOADING`` on victims) happen without an ``await`` in between,
so two placers can never plan with the same memory. Requests for models that are loaded somewhere take the
fast path in :meth:`Lifecycle.route` and never wait behind anyone's load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from cortex.config import Settings
from cortex.engine.events import (
    DefragFinished,
    DefragStarted,
    EventBus,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoading,
    ModelUnloaded,
)
from cortex.engine.fleet import Fleet, NodeRec
from cortex.engine.metrics import CortexMetrics
from cortex.engine.mistralrs import NodeError
from cortex.engine.placement import (
    DEFAULT_LOAD_S,
    ModelStats,
    Placement,
    UseLog,
    evictable,
    in_burst,
    place,
    select_victims,
    victim_order,
)
from cortex.engine.router import pick_node
from cortex.engine.state import NodeStatus, SlotState
from cortex.engine.upstream import UpstreamPool
from cortex.errors import LoadFailed, ModelTooLarge, NoNodeAvailable, QueueFull, QueueTimeout, UnknownModel

__all__ = ["Coordinator", "Lease", "Lifecycle", "RestartFn", "RestartResult"]

log = logging.getLogger(__name__)


WARM_CONNECTIONS_MAX = 128
"""The most idle connections held open to a loading node for its waiting requests."""

QUANTUM_LOADS = 1.4
"""Under contention, a model waits this many of its own load times before it may evict a model in use."""

OOM_RETRIES = 3
"""After an out-of-memory answer, evict the next victim and retry the load at most this many times per node."""

_OOM_MARKERS = ("out of memory", "out_of_memory", "cuda_error_out_of_memory", "oom")


def _now() -> float:
    """The running loop's clock: real monotonic time in the gateway, virtual time under ``cortex replay``."""
    return asyncio.get_running_loop().time()


def _burst_over(stats: ModelStats | None) -> bool:
    """Whether the ``cost`` figures say a model's burst of requests has ended (False without them)."""
    return stats is not None and stats.since_s is not None and not in_burst(stats)


def is_oom(error: str) -> bool:
    """Whether a node's load error says the device ran out of memory."""
    text = error.lower()
    return any(marker in text for marker in _OOM_MARKERS)


@dataclass(frozen=True, slots=True)
class RestartResult:
    """What a node restart through its agent came to."""

    ok: bool
    message: str
    ran: bool = True
    """False when there was no agent, so nothing was restarted."""


RestartFn = Callable[[str, float], Awaitable[RestartResult]]


class Coordinator(Protocol):
    """What the lifecycle asks of the other gateways sharing its nodes (:mod:`cortex.cluster` implements it).

    A gateway acts on a node (reload, unload, evict, restart) only while it holds that node's lease, and
    loads a model only while it holds the model's load claim, so two gateways never act on one node at once
    and a model is loaded once across all of them. Without the store every answer is "no": the lifecycle
    turns read-only (loaded models keep serving, the rest waits).
    """

    async def acquire(self, node: str) -> bool | None:
        """Take (or re-enter) the node's lease: None when refused, True when newly taken, False when held."""
        ...

    def release(self, node: str) -> None:
        """Leave the lease taken by :meth:`acquire` (given back when this gateway's last user leaves)."""
        ...

    def holds(self, node: str) -> bool:
        """Whether the lease is still this gateway's (renewed within its TTL): checked before each node call."""
        ...

    async def claim(self, node: str, model: str) -> bool:
        """Claim the one load of ``model`` across the gateways (to run on ``node``) and take the node's lease."""
        ...

    def unclaim(self, node: str, model: str) -> None:
        """End a :meth:`claim` (the claim and the lease are given back)."""
        ...

    async def claimed_elsewhere(self, model: str) -> bool:
        """Whether another gateway is loading ``model`` now (or the store cannot say: read-only)."""
        ...

    def acted(self, node: str, model: str, what: str) -> None:
        """Tell the other gateways that ``model`` was ``loaded`` or ``unloaded`` on ``node`` (they re-read it)."""
        ...

    def remote_in_flight(self, node: str, model: str) -> int:
        """Requests other gateways have in flight for ``model`` on ``node``."""
        ...

    def remote_last_used(self, node: str, model: str) -> float:
        """Wall time another gateway last sent a request for ``model`` to ``node`` (0: never)."""
        ...


class Lease:
    """A request's claim on a (node, model): counted in flight until released."""

    __slots__ = ("_released", "fleet", "model", "node", "queue_s", "slot")

    def __init__(self, fleet: Fleet, node: NodeRec, model: str, queue_s: float) -> None:
        self.fleet = fleet
        self.node = node
        self.model = model
        self.queue_s = queue_s
        self.slot = node.slots[model]
        self._released = False
        node.in_flight += 1
        self.slot.in_flight += 1
        fleet.touch()

    def release(self, *, failed: str | None = None) -> None:
        """End the claim (idempotent); ``failed`` counts a request failure against the node.

        Only failures the node caused count: when cortex itself took the model away (an unload, an eviction,
        a restart) the broken request is cortex's doing, and the node is not marked down for it.
        """
        if self._released:
            return
        self._released = True
        self.node.in_flight -= 1
        self.slot.in_flight -= 1
        self.slot.last_used = self.fleet.clock()
        if failed is None:
            self.node.request_failures = 0
        elif self.slot.state is SlotState.LOADED and not self.node.restarting:
            self.fleet.request_failed(self.node, failed)
        self.fleet.touch()


class _ModelQueue:
    """Requests waiting for one model: one future per waiting request, all settled by :meth:`wake`.

    A future of its own per request (not one shared future behind ``shield`` and ``wait_for``) wakes each
    waiting task in a single step of the loop: with 100 requests queued behind a load, that is what lets
    the last of them leave within milliseconds of ``loaded`` (``bench/cold_load.py``).
    """

    __slots__ = ("pending", "placer", "since", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.pending: dict[asyncio.Future[None], None] = {}
        """Waiting requests in arrival order (a dict as an ordered set: released first come, first served)."""
        self.placer: asyncio.Task[Any] | None = None
        self.since = 0.0
        """Loop time the queue last became non-empty: when its oldest waiting request (about) arrived."""

    def wake(self, error: Exception | None = None) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending:
            if not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def wait(self, timeout_s: float) -> None:
        """Until :meth:`wake` (raising its error, if any) or ``timeout_s``, whichever comes first."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(timeout_s, _settle, fut)
        self.pending[fut] = None
        try:
            await fut
        finally:
            timer.cancel()
            self.pending.pop(fut, None)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Lifecycle:
    """The engine's actor on nodes (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        metrics: CortexMetrics,
        bus: EventBus,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        restart: RestartFn | None = None,
        upstream: UpstreamPool | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.metrics = metrics
        self.bus = bus
        self.spawn = spawn
        self.restart = restart
        self.upstream = upstream
        self.queues: dict[str, _ModelQueue] = {}
        self.defragging: set[str] = set()
        self.memory_wait_s = 30.0
        self.agent_alive: Callable[[str], bool] = lambda _node: restart is not None
        """Whether the node has an agent that can restart it now (the engine wires the agent hub in)."""
        self._reconciling: set[str] = set()
        self.load_s: dict[str, float] = {}
        """model → its measured load time in seconds (a moving average), which sizes its fairness quantum."""
        self.uses = UseLog()
        """Each served model's bursts of requests (the ``cost`` strategy's reuse evidence)."""
        self._changed = asyncio.Event()
        self.defrag_task: asyncio.Task[Any] | None = None
        """The last automatic defrag (tests await it)."""
        self.coord: Coordinator | None = None
        """The other gateways sharing these nodes (``[cluster] redis_url``); None: this gateway acts alone."""

    @property
    def restart_timeout_s(self) -> float:
        """How long a restarted node may take to answer again (it loads every configured model first)."""
        gateway = self.settings.gateway
        return max(gateway.queue_timeout_s, gateway.first_byte_timeout_s, gateway.load_timeout_s)

    # -- request path -------------------------------------------------------------------------------

    def route(self, model: str, exclude: tuple[str, ...] = ()) -> NodeRec | None:
        """The node to send a request for a loaded model to, or None."""
        name = pick_node(model, self.fleet.nodes.values(), exclude)
        return None if name is None else self.fleet.nodes[name]

    def lease_now(self, model: str, exclude: tuple[str, ...] = ()) -> Lease | None:
        """A lease at once where ``model`` is loaded and may take a request, else None (nothing waits).

        Every request that starts here or in :meth:`acquire` is noted in :attr:`uses` once, whichever way
        it is granted: the ``cost`` strategy's reuse evidence must see streams served at once as well.
        """
        node = self.route(model, exclude)
        if node is None:
            return None
        self.uses.note(model, self.fleet.clock())
        return Lease(self.fleet, node, model, 0.0)

    async def acquire(
        self,
        model: str,
        exclude: tuple[str, ...] = (),
        on_wait: Callable[[float], Awaitable[None]] | None = None,
    ) -> Lease:
        """A lease on a node serving ``model``, loading it first if it is loaded nowhere.

        While the request waits, ``on_wait(seconds waited)`` is awaited about once a second (the proxy keeps
        a streaming client's connection alive with it); what it raises ends the wait.

        Raises:
            UnknownModel: no node lists the model.
            QueueFull: ``max_queue`` requests already wait for it.
            QueueTimeout: it was not ready within ``queue_timeout_s``.
            LoadFailed: every node that could load it failed.
            NoNodeAvailable: every node that lists it is down.
        """
        lease = self.lease_now(model, exclude)
        if lease is not None:
            return lease
        listed = list(self.fleet.listed(model))
        if not listed:
            raise UnknownModel(f"model {model!r} is not served by any node")
        self.uses.note(model, self.fleet.clock())
        self._check_fits_somewhere(model, listed)
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = _ModelQueue()
        if queue.waiters >= self.settings.gateway.max_queue:
            raise QueueFull(f"{queue.waiters} requests already wait for {model}; try again shortly")
        started = _now()
        deadline = started + self.settings.gateway.queue_timeout_s
        if queue.waiters == 0:
            queue.since = started
        queue.waiters += 1
        self.fleet.queued[model] = queue.waiters
        self.fleet.touch()
        try:
            while True:
                node = self.route(model, exclude)
                if node is not None:
                    waited = _now() - started
                    self.metrics.queue_waited(model, waited)
                    return Lease(self.fleet, node, model, waited)
                if queue.placer is None or queue.placer.done():
                    queue.placer = self.spawn(self._placer(model, queue))
                remaining = deadline - _now()
                if remaining <= 0:
                    why = self.explain(model)
                    log.warning(
                        "a request for %s waited %.0f s and gave up: %s",
                        model,
                        self.settings.gateway.queue_timeout_s,
                        why,
                    )
                    raise QueueTimeout(
                        f"{model} was not ready within {self.settings.gateway.queue_timeout_s:g} s ({why})"
                    )
                await queue.wait(min(remaining, 1.0))
                if on_wait is not None and self.route(model, exclude) is None:
                    await on_wait(_now() - started)
        finally:
            queue.waiters -= 1
            if queue.waiters:
                self.fleet.queued[model] = queue.waiters
            else:
                self.fleet.queued.pop(model, None)
                if queue.placer is None or queue.placer.done():
                    self.queues.pop(model, None)
            self.fleet.touch()
            self.changed()

    def _check_fits_somewhere(self, model: str, listed: list[NodeRec]) -> None:
        """Raise :class:`ModelTooLarge` when the model's known size (or lower bound) fits no listing node."""
        need = max(self.fleet.footprint(model) or 0, self.fleet.floor(model))
        if need <= 0:
            return
        headroom = self.settings.eviction.headroom_mb
        usable = {n.name: self.fleet.vram(n)[0] - headroom for n in listed}
        best = max(usable, key=lambda name: usable[name])
        if need > usable[best]:
            raise ModelTooLarge(
                f"{model} needs {need} MiB of VRAM, more than any node that lists it can hold: the largest is "
                f"{best} with {usable[best]} MiB usable ({headroom} MiB headroom kept)"
            )

    def explain(self, model: str) -> str:
        """Why ``model`` is not placed right now, node by node (for the log and the queue-timeout error)."""
        fleet = self.fleet
        loading = fleet.loading.get(model)
        if loading is not None:
            return f"loading on {loading[0]} for {fleet.clock() - loading[1]:.0f} s"
        need = fleet.estimate(model)
        snap = fleet.snapshot()
        now = fleet.clock()
        protected = self.protected(model)
        parts: list[str] = []
        for name in (n.name for n in fleet.listed(model)):
            node = snap.node(name)
            if node is None:
                continue
            if node.status is not NodeStatus.UP:
                parts.append(f"{name} is {node.status.value}")
                continue
            held = []
            for s in node.slots:
                if s.state is not SlotState.LOADED:
                    continue
                if s.pinned:
                    held.append(f"{s.model_id} pinned")
                elif s.in_flight:
                    held.append(f"{s.model_id} busy")
                elif fleet.queued.get(s.model_id):
                    held.append(f"{s.model_id} queued")
                elif s.loaded_at is not None and now - s.loaded_at < self.settings.eviction.min_resident_s:
                    held.append(f"{s.model_id} loaded {now - s.loaded_at:.0f} s ago")
                elif s.model_id in protected.get(name, ()):
                    held.append(f"{s.model_id} serving its turn")
            loads = [s.model_id for s in node.slots if s.state is SlotState.LOADING]
            text = f"{name}: {max(0, node.vram_free_mb)} MiB free of {need or '?'} needed"
            if loads:
                text += f", loading {', '.join(loads)}"
            if held:
                text += f"; cannot evict {', '.join(held)}"
            parts.append(text)
        return "; ".join(parts) or "no node lists it"

    def quantum_s(self, model: str) -> float:
        """The fairness quantum of loading ``model``: :data:`QUANTUM_LOADS` times its load time.

        Its measured load time when cortex has loaded it before, else the mean of the fleet's; 0 before
        cortex has timed any load (the first switch is not delayed on a guess).
        """
        load_s = self.load_s.get(model)
        if load_s is None:
            load_s = sum(self.load_s.values()) / len(self.load_s) if self.load_s else 0.0
        return QUANTUM_LOADS * load_s

    def protected(self, model: str) -> dict[str, set[str]]:
        """Node → resident models that ``model`` may not evict now: the batching rule.

        When demand exceeds VRAM, evicting whatever is idle this instant swaps models on nearly every
        request: one load per request, and every request waits for one. Instead the models in use (a request
        within the last quantum) take turns: a model whose requests wait may evict one of them only once its
        oldest waiting request has waited a quantum (:meth:`quantum_s`, sized from the newcomer's load time),
        so each switch serves a batch (all that queued meanwhile) and loading stays a bounded share of the
        time. The switch takes, per node, the model in use that has been resident longest (turns go round;
        the least recently used would be the one whose next request comes soonest). The evicted model's own
        requests then wait their quantum in turn, which spaces the switches; several models waiting at once
        each get their turn after one quantum, not one after another. Under the ``cost`` strategy the switch
        takes the model in use that is cheapest to miss instead (:func:`~cortex.engine.placement.miss_cost`),
        and a model whose burst of requests is over (:func:`~cortex.engine.placement.in_burst`) is not in use
        any more, however recent its last request. Models nobody uses are not protected by this rule beyond
        ``min_resident_s``.
        """
        quantum = self.quantum_s(model)
        if quantum <= 0:
            return {}
        queue = self.queues.get(model)
        if queue is not None and queue.waiters > 0 and _now() - queue.since >= quantum:
            return {}  # its turn: whatever it needs may go, in the strategy's order (a big model may need two)
        now = self.fleet.clock()
        stats = self.cost_stats() or {}
        out: dict[str, set[str]] = {}
        for node in self.fleet.nodes.values():
            hot = [
                (slot.loaded_at or slot.state_since, model_id)
                for model_id, slot in node.slots.items()
                if slot.state is SlotState.LOADED
                and model_id != model
                and (
                    slot.in_flight
                    or (
                        now - max(slot.last_used, slot.loaded_at or slot.state_since) <= quantum
                        and not _burst_over(stats.get(model_id))
                    )
                )
            ]
            if not hot:
                continue
            out[node.name] = {model_id for _, model_id in hot}
        return out

    def cost_stats(self) -> dict[str, ModelStats] | None:
        """Demand and load time per model for the ``cost`` strategy (None under the other strategies)."""
        if self.settings.eviction.strategy != "cost":
            return None
        mean = sum(self.load_s.values()) / len(self.load_s) if self.load_s else DEFAULT_LOAD_S
        now = self.fleet.clock()
        out: dict[str, ModelStats] = {}
        for m in self.load_s.keys() | set(self.uses.models()):
            seen = self.uses.figures(m, now)
            since, bursts, gap, pace = seen if seen is not None else (None, 0, 0.0, math.inf)
            out[m] = ModelStats(self.load_s.get(m, mean), since, bursts, gap, pace)
        return out

    def changed(self) -> None:
        """Something that may unblock a placer happened (a request ended, a poll landed)."""
        self._changed.set()

    async def _wait_change(self, wait_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), wait_s)

    # -- placement ------------------------------------------------------------------------------------

    def plan(self, model: str, exclude: set[str], node: str | None = None) -> Placement | None:
        """Where ``model`` should be loaded now (or on ``node``), per the placement rules."""
        snap = self.fleet.snapshot()
        nodes = snap.nodes if node is None else tuple(n for n in snap.nodes if n.name == node)
        return place(
            model,
            self.fleet.estimate(model),
            nodes,
            strategy=self.settings.eviction.strategy,
            priorities=self.fleet.priorities,
            now=self.fleet.clock(),
            min_resident_s=self.settings.eviction.min_resident_s,
            queued=self.fleet.queued,
            protected=self.protected(model),
            exclude=exclude,
            exact=self.fleet.footprint(model) is not None,
            stats=self.cost_stats(),
        )

    async def _placer(self, model: str, queue: _ModelQueue) -> None:
        tried: set[str] = set()
        last_error = ""
        told = ""
        try:
            while queue.waiters > 0:
                if self.route(model) is not None:
                    queue.wake()
                    return
                if model in self.fleet.loading or (
                    self.coord is not None and await self.coord.claimed_elsewhere(model)
                ):
                    await self._wait_change(1.0)
                    continue
                candidates = [n for n in self.fleet.listed(model) if n.name not in tried and n.status is NodeStatus.UP]
                if not candidates:
                    if tried:
                        queue.wake(LoadFailed(f"loading {model} failed: {last_error}"))
                        return
                    if not any(n.status is not NodeStatus.DOWN for n in self.fleet.listed(model)):
                        queue.wake(NoNodeAvailable(f"every node that serves {model} is down"))
                        return
                    await self._wait_change(1.0)
                    continue
                for node in candidates:
                    if node.slots[model].state is SlotState.STUCK:
                        # the node itself is loading it (a lazy load) or reports a stuck reload: follow it
                        await self.not_ready(node, model)
                if self.route(model) is not None:
                    continue
                placement = self.plan(model, tried)
                if self.coord is not None:
                    placement = await self._take_turn(model, placement, candidates, tried)
                if placement is None:
                    if self.route(model) is not None:
                        continue
                    why = self.explain(model)
                    shape = re.sub(r"\d+", "#", why)
                    if shape != told:
                        log.info("%s waits for room: %s", model, why)
                        told = shape
                    # re-plan on a change, at least once a second, and the moment its turn comes (its quantum)
                    turn = queue.since + self.quantum_s(model) - _now()
                    await self._wait_change(min(1.0, max(0.01, turn)) if turn > 0 else 1.0)
                    continue
                node = self.fleet.nodes[placement.node]
                warm = self.spawn(self._warm_connections(node, queue)) if self.upstream is not None else None
                try:
                    error = await self.load_on(node, model, placement.victims)
                finally:
                    if warm is not None:
                        warm.cancel()
                    if self.coord is not None:
                        self.coord.unclaim(node.name, model)
                if error is None:
                    queue.wake()
                    return
                tried.add(node.name)
                last_error = f"{node.name}: {error}"
        finally:
            if queue.waiters == 0 and self.queues.get(model) is queue:
                self.queues.pop(model, None)

    async def _take_turn(
        self, model: str, placement: Placement | None, candidates: list[NodeRec], tried: set[str]
    ) -> Placement | None:
        """With other gateways: claim the model's load and the node's lease, re-read the node, plan again.

        The node is the truth, and another gateway may have changed it since the last poll: after the lease
        is taken the node is read afresh and the placement made again on it alone (no ``await`` between that
        plan and the load's marks). A node that reports the model ``reloading`` (a load whose gateway died
        mid-way, the lease now expired) is taken over: the load is followed there, not started again.
        Returns None, holding nothing, when the turn is not this gateway's (or nothing fits any more).
        """
        assert self.coord is not None
        if placement is not None:
            node = self.fleet.nodes[placement.node]
        else:
            stuck = [n for n in candidates if (s := n.slots.get(model)) is not None and s.state is SlotState.STUCK]
            if not stuck:
                return None
            node = stuck[0]
        if not await self.coord.claim(node.name, model):
            return None
        try:
            await self.refresh(node)
            slot = node.slots.get(model)
            if self.route(model) is None and slot is not None and model not in self.fleet.loading:
                if slot.state is SlotState.STUCK:
                    return Placement(node.name)
                again = self.plan(model, tried, node=node.name)
                if again is not None:
                    return again
        except NodeError:
            pass
        self.coord.unclaim(node.name, model)
        return None

    async def refresh(self, node: NodeRec) -> None:
        """Read the node's models and memory now and take them as the truth (after taking its lease).

        Raises:
            NodeError: the node did not answer.
        """
        models, info = await asyncio.gather(node.client.models(), node.client.system_info())
        self.fleet.poll_ok(node, models, info, fresh=True)
        self.changed()

    async def _warm_connections(self, node: NodeRec, queue: _ModelQueue) -> None:
        """While a model loads, keep one idle connection to its node per waiting request (up to a cap).

        Released requests then go out at once on a ready connection instead of each opening one
        (``bench/cold_load.py``). The pool keeps them fresh; this tops them up as requests arrive.
        """
        assert self.upstream is not None
        while True:
            with contextlib.suppress(Exception):
                await self.upstream.warm(node.client.endpoint, min(queue.waiters, WARM_CONNECTIONS_MAX))
            await asyncio.sleep(0.25)

    # -- node actions ---------------------------------------------------------------------------------

    async def load_on(
        self, node: NodeRec, model: str, victims: tuple[str, ...] = (), reason: str = "evict"
    ) -> str | None:
        """Make room on ``node`` and load ``model`` there (see :meth:`_load_on`), holding the node's lease.

        With other gateways (:attr:`coord`) the node's lease is taken first; a lease newly taken means the
        node is read again: a model another gateway loaded meanwhile is not loaded twice, and victims that
        are gone are not unloaded again.
        """
        coord = self.coord
        if coord is None:
            return await self._load_on(node, model, victims, reason)
        held = await coord.acquire(node.name)
        if held is None:
            return f"another gateway holds {node.name}'s lease, or the cluster store is down (read-only)"
        try:
            if held:
                try:
                    await self.refresh(node)
                except NodeError as exc:
                    return str(exc)
                slot = node.slots.get(model)
                if slot is not None and slot.state is SlotState.LOADED:
                    return None
                victims = tuple(
                    v for v in victims if (s := node.slots.get(v)) is not None and s.state is SlotState.LOADED
                )
            error = await self._load_on(node, model, victims, reason)
            if error is None:
                coord.acted(node.name, model, "loaded")
            return error
        finally:
            coord.release(node.name)

    async def _load_on(
        self, node: NodeRec, model: str, victims: tuple[str, ...] = (), reason: str = "evict"
    ) -> str | None:
        """Make room on ``node`` and load ``model`` there. Returns None on success, else the error.

        The target is marked LOADING and the victims UNLOADING before the first ``await``. Victims leave in
        order until the node reports room for the model's estimate (the rest stay). An out-of-memory answer
        teaches a lower bound of the model's size; then the next victim leaves and the load is retried, at
        most :data:`OOM_RETRIES` times. The load gives up when the node goes down or the load outlives
        ``gateway.load_timeout_s``.
        """
        fleet = self.fleet
        started_wall = fleet.clock()
        fleet.loading[model] = (node.name, started_wall)
        fleet.begin_load(node, model, victims)
        self.bus.publish(ModelLoading(node.name, model))
        started = _now()
        error: str | None = None
        try:
            error = await self._make_room(node, model, victims, reason)
            retries = 0
            while error is None:
                error = await self._reload_watched(node, model)
                if error is None or not is_oom(error) or retries >= OOM_RETRIES:
                    break
                retries += 1
                victim = self._next_victim(node, model)
                if victim is None:
                    error += " (nothing more can be evicted there)"
                    break
                log.info("%s: %s did not fit; evicting %s and retrying", node.name, model, victim)
                fleet.set_slot(node, model, SlotState.LOADING)
                fleet.set_slot(node, victim, SlotState.UNLOADING)
                error = await self._make_room(node, model, (victim,), reason)
        except asyncio.CancelledError:
            fleet.set_slot(node, model, SlotState.UNLOADED)
            raise
        finally:
            fleet.loading.pop(model, None)
        seconds = _now() - started
        if error is None:
            self.metrics.load_done(model, node.name, "ok", seconds)
            self.bus.publish(ModelLoaded(node.name, model, round(seconds, 3)))
            log.info("loaded %s on %s in %.1f s", model, node.name, seconds)
            self._maybe_defrag(node)
        else:
            if node.slots.get(model) is not None and node.slots[model].state is SlotState.LOADING:
                fleet.set_slot(node, model, SlotState.UNLOADED)
            self.metrics.load_done(model, node.name, "failed", None)
            self.bus.publish(ModelLoadFailed(node.name, model, error))
            log.warning("loading %s on %s failed: %s", model, node.name, error)
        self.changed()
        return error

    async def _make_room(self, node: NodeRec, model: str, victims: tuple[str, ...], reason: str) -> str | None:
        """Unload ``victims`` (marked UNLOADING) in order, stopping once the node reports room for ``model``.

        Victims not needed after all are set back to LOADED. One call that unloads anything is one eviction
        cycle. Returns None, or the error of a failed unload.
        """
        fleet = self.fleet
        unloaded = 0
        for i, victim in enumerate(victims):
            if unloaded and await self._room_for(node, model):
                for spared in victims[i:]:
                    fleet.set_slot(node, spared, SlotState.LOADED)
                break
            error = await self.unload_on(node, victim, reason, marked=True)
            if error is not None:
                for spared in victims[i + 1 :]:
                    fleet.set_slot(node, spared, SlotState.LOADED)
                return error
            unloaded += 1
        if unloaded:
            node.cycles += 1
            self.metrics.cycle(node.name)
            await self._wait_memory(node, model)
        return None

    async def _room_for(self, node: NodeRec, model: str) -> bool:
        """Whether the node reports room for ``model``'s estimate now (a fresh report; False without one)."""
        used = await self._fresh_used(node)
        if used is None:
            return False
        total = self.fleet.vram(node)[0]
        return used + self.fleet.estimate(model) <= total - self.settings.eviction.headroom_mb

    def _next_victim(self, node: NodeRec, model: str) -> str | None:
        """The next model to evict from ``node`` for ``model`` after an out-of-memory answer, per the rules."""
        snap = self.fleet.snapshot().node(node.name)
        if snap is None:
            return None
        now = self.fleet.clock()
        floor = self.settings.eviction.min_resident_s
        held = self.protected(model).get(node.name, ())  # the turn rule holds after an OOM answer too
        candidates = [
            s
            for s in snap.slots
            if s.model_id != model
            and s.model_id not in held
            and evictable(s, now=now, min_resident_s=floor, queued=self.fleet.queued)
        ]
        order = victim_order(
            candidates,
            strategy=self.settings.eviction.strategy,
            priorities=self.fleet.priorities,
            stats=self.cost_stats(),
        )
        return order[0].model_id if order else None

    async def _reload_watched(self, node: NodeRec, model: str) -> str | None:
        """:meth:`_reload`, given up when the node goes down or the load outlives ``load_timeout_s``."""
        timeout_s = self.settings.gateway.load_timeout_s
        deadline = _now() + timeout_s
        task = asyncio.ensure_future(self._reload(node, model))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if node.health is NodeStatus.DOWN:
                    return f"{node.name} went down during the load"
                if _now() >= deadline:
                    return f"the load did not finish within {timeout_s:g} s (gateway.load_timeout_s)"
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _reload(self, node: NodeRec, model: str) -> str | None:
        """Call reload only when the node says ``unloaded``; follow ``reloading`` by status polls.

        The footprint is learned only from a load that ran alone on its node (no other load or unload by
        cortex there meanwhile): overlapping loads would teach their sum. An out-of-memory answer teaches a
        lower bound instead: the model needed more than the node reported free.
        """
        fleet = self.fleet
        alone = not any(s.state is SlotState.LOADING for m, s in node.slots.items() if m != model)
        actions = node.actions
        before = await self._fresh_used(node)
        total = fleet.vram(node)[0]
        try:
            status = (await node.client.lifecycle("status", model)).status
            if status == "unloaded":
                if self.coord is not None and not self.coord.holds(node.name):
                    return f"this gateway lost {node.name}'s lease before the reload (fenced off)"
                t0 = _now()
                reply = await node.client.lifecycle("reload", model, timeout_s=self.settings.gateway.load_timeout_s)
                status, detail = reply.status, reply.error
                if status == "loaded":
                    took = _now() - t0
                    known = self.load_s.get(model)
                    self.load_s[model] = took if known is None else 0.7 * known + 0.3 * took
            else:
                detail = ""
            if status == "reloading":
                status = await self._await_status(node, model)
        except NodeError as exc:
            return str(exc)
        if status != "loaded":
            messages = {
                "internal_error": detail or "the node failed to load it",
                "not_found": "the node does not know this model",
                "no_loader_config": "the node cannot reload this model (no loader config)",
                "reloading": "the node reports it as reloading and never finished (stuck reload)",
                "unloaded": "the node reports it unloaded after the reload",
            }
            message = messages.get(status, f"unexpected status {status!r}")
            if status == "internal_error" and is_oom(message) and before is not None:
                fleet.learn_floor(model, max(0, total - before))
            return message
        fleet.set_slot(node, model, SlotState.LOADED)
        queue = self.queues.get(model)
        if queue is not None:
            # The waiting requests go now, not after the memory poll below (which only learns the footprint;
            # requests starting meanwhile can only make it larger, never let a model overcommit a node).
            queue.wake()
        # A fresh report after every load: until it comes, the load's floor keeps its memory counted.
        after = await self._fresh_used(node)
        fleet.settled(node, model)
        if fleet.footprint(model) is None:
            alone = (
                alone
                and node.actions == actions
                and not any(
                    s.state in (SlotState.LOADING, SlotState.UNLOADING) for m, s in node.slots.items() if m != model
                )
            )
            if alone and before is not None and after is not None and after > before:
                fleet.learn_footprint(model, after - before)
        return None

    async def _await_status(self, node: NodeRec, model: str) -> str:
        deadline = _now() + self.settings.gateway.load_timeout_s
        status = "reloading"
        while status == "reloading" and _now() < deadline:
            await asyncio.sleep(0.25)
            status = (await node.client.lifecycle("status", model)).status
        return status

    async def _fresh_used(self, node: NodeRec) -> int | None:
        """Poll system info now and return the reported used MiB (None when unavailable)."""
        with contextlib.suppress(NodeError):
            info = await node.client.system_info()
            if info is not None:
                node.sys_total_mb, node.sys_used_mb = info.total_mb, info.used_mb
                self.fleet.touch()
        return self.fleet.reported_used(node)

    async def _wait_memory(self, node: NodeRec, model: str) -> None:
        """After unloading, wait (bounded) until the node reports room for ``model``.

        Room means both: the device's reported use plus the model's estimate fits the budget (the victims'
        memory is really free), and cortex's own count, which already holds this load and any other load in
        progress on the node, fits it.
        """
        deadline = _now() + self.memory_wait_s
        while True:
            used = await self._fresh_used(node)
            if used is None:
                return
            need_mb = self.fleet.estimate(model)  # after the fresh report: an estimate can rest on it
            total, counted, _ = self.fleet.vram(node)
            budget = total - self.settings.eviction.headroom_mb
            if max(used + need_mb, counted) <= budget or _now() >= deadline:
                if _now() >= deadline:
                    log.warning("%s: memory not released after %.0f s; loading anyway", node.name, self.memory_wait_s)
                return
            await asyncio.sleep(0.2)

    async def not_ready(self, node: NodeRec, model: str) -> None:
        """A node answered a request for ``model`` with "being reloaded" or "not available": re-read its state.

        The node lazily loads a model it lists as unloaded (a restart cortex did not see, an outside unload);
        concurrent requests then get a 500. The slot takes the node's word (``reloading`` is left to finish,
        ``unloaded`` is loaded by cortex's own placer), so the request can wait in the queue instead.
        """
        try:
            status = (await node.client.lifecycle("status", model)).status
        except NodeError:
            return
        slot = node.slots.get(model)
        if slot is None or slot.state in (SlotState.LOADING, SlotState.UNLOADING):
            return
        new = {"loaded": SlotState.LOADED, "reloading": SlotState.STUCK}.get(status, SlotState.UNLOADED)
        if slot.state is not new:
            self.fleet.set_slot(node, model, new)
            log.info("%s reports %s as %s; requests for it wait for cortex to load it", node.name, model, status)
        self.changed()

    async def unload_on(self, node: NodeRec, model: str, reason: str, *, marked: bool = False) -> str | None:
        """Unload a model from a node. Returns None on success, else the error.

        With other gateways the node's lease is held for it (refused: the error says so, the slot is left
        as it was) and the others are told, so they re-read the node.
        """
        coord = self.coord
        if coord is None:
            return await self._unload_on(node, model, reason, marked=marked)
        if await coord.acquire(node.name) is None:
            slot = node.slots.get(model)
            if marked and slot is not None and slot.state is SlotState.UNLOADING:
                self.fleet.set_slot(node, model, SlotState.LOADED)
            return f"another gateway holds {node.name}'s lease, or the cluster store is down (read-only)"
        try:
            error = await self._unload_on(node, model, reason, marked=marked)
            if error is None:
                coord.acted(node.name, model, "unloaded")
            return error
        finally:
            coord.release(node.name)

    async def _unload_on(self, node: NodeRec, model: str, reason: str, *, marked: bool = False) -> str | None:
        fleet = self.fleet
        slot = node.slots.get(model)
        previous = slot.state if slot is not None else SlotState.UNLOADED
        if not marked:
            fleet.set_slot(node, model, SlotState.UNLOADING)
        node.actions += 1
        try:
            if self.coord is not None and not self.coord.holds(node.name):
                raise NodeError(f"this gateway lost {node.name}'s lease before the unload (fenced off)")
            reply = await node.client.lifecycle("unload", model)
        except NodeError as exc:
            fleet.set_slot(node, model, previous if previous is not SlotState.UNLOADING else SlotState.LOADED)
            return str(exc)
        if reply.status not in ("unloaded", "not_found"):
            fleet.set_slot(node, model, SlotState.LOADED)
            return f"unload answered {reply.status}: {reply.error}".rstrip(": ")
        fleet.set_slot(node, model, SlotState.UNLOADED)
        self.metrics.unloaded(model, node.name, reason)
        self.bus.publish(ModelUnloaded(node.name, model, reason))
        log.info("unloaded %s from %s (%s)", model, node.name, reason)
        self.changed()
        return None

    # -- background duties ----------------------------------------------------------------------------

    async def reconcile(self, node: NodeRec, *, budget: bool = True) -> None:
        """Enforce the VRAM budget (``budget``) and the pins on a node; one run per node at a time.

        Runs when a node comes (back) up or restarted, and after any poll that finds a pinned model not
        loaded: pins are enforced on every poll, not only when a node returns.
        """
        if node.name in self.defragging or node.name in self._reconciling:
            return
        coord = self.coord
        if coord is not None and await coord.acquire(node.name) is None:
            return  # the lease holder reconciles it (or, read-only, nobody until the store is back)
        self._reconciling.add(node.name)
        try:
            if budget:
                await self.enforce_budget(node, "reconcile")
            await self.load_pins(node)
        finally:
            self._reconciling.discard(node.name)
            if coord is not None:
                coord.release(node.name)

    def pins_missing(self, node: NodeRec) -> bool:
        """Whether a model pinned on an up node is unloaded there with no load under way."""
        if node.status is not NodeStatus.UP or node.name in self.defragging or node.name in self._reconciling:
            return False
        for model in self.fleet.pins.get(node.name, ()):
            slot = node.slots.get(model)
            if slot is not None and slot.state is SlotState.UNLOADED and model not in self.fleet.loading:
                return True
        return False

    async def enforce_budget(self, node: NodeRec, reason: str) -> None:
        """Unload unpinned, idle, unqueued models (least recently used first) while the node is over budget."""
        fleet = self.fleet
        total, used, _ = fleet.vram(node)
        budget = total - self.settings.eviction.headroom_mb
        if used > budget:
            snap = fleet.snapshot().node(node.name)
            extras = [s for s in (snap.slots if snap else ()) if s.state is SlotState.LOADED]
            for slot in victim_order(extras, strategy="lru", priorities=fleet.priorities):
                if used <= budget:
                    break
                # Checked on the live record right before the unload: the awaits of earlier unloads may have
                # let a request, a queue or a pin claim this model since the snapshot.
                live = node.slots.get(slot.model_id)
                if (
                    live is None
                    or live.state is not SlotState.LOADED
                    or live.in_flight > 0
                    or self._remote_busy(node, slot.model_id)
                    or fleet.queued.get(slot.model_id, 0) > 0
                    or fleet.is_pinned(node.name, slot.model_id)
                ):
                    continue
                if await self.unload_on(node, slot.model_id, reason) is None:
                    used -= slot.vram_mb or 0
                    with contextlib.suppress(NodeError):
                        await self._fresh_used(node)
                        used = fleet.vram(node)[1]

    async def load_pins(self, node: NodeRec) -> None:
        """Load every model pinned on the node that is not loaded there."""
        for model in sorted(self.fleet.pins.get(node.name, ())):
            slot = node.slots.get(model)
            if slot is None:
                log.warning("%s is pinned on %s, but the node does not list it", model, node.name)
                continue
            if slot.state is not SlotState.UNLOADED or model in self.fleet.loading:
                continue
            # The last report may predate an unload just done (a defrag's trim, a reconcile): read it again,
            # or memory already free would look taken and the pin would be skipped until the node restarts.
            await self._fresh_used(node)
            slot = node.slots.get(model)
            if slot is None or slot.state is not SlotState.UNLOADED or model in self.fleet.loading:
                continue
            snap = self.fleet.snapshot().node(node.name)
            if snap is None:
                continue
            victims = select_victims(
                snap,
                self.fleet.estimate(model),
                strategy=self.settings.eviction.strategy,
                priorities=self.fleet.priorities,
                now=self.fleet.clock(),
                min_resident_s=self.settings.eviction.min_resident_s,
                queued=self.fleet.queued,
                stats=self.cost_stats(),
            )
            if victims is None:
                log.warning("no room for pinned %s on %s without breaking the eviction rules", model, node.name)
                continue
            await self.load_on(node, model, tuple(v.model_id for v in victims))

    async def ttl_sweep(self) -> None:
        """Unload idle, unpinned models older than ``idle_ttl_s`` (one pass)."""
        ttl = self.settings.eviction.idle_ttl_s
        if ttl <= 0:
            return
        now = self.fleet.clock()
        for node in list(self.fleet.nodes.values()):
            if node.status is not NodeStatus.UP:
                continue
            for slot in list(node.slots.values()):
                # state_since: a model found loaded by a poll counts as used long ago for eviction, but its
                # idle time starts when cortex first saw it, not at the epoch.
                idle_since = max(slot.last_used, slot.loaded_at or 0.0, slot.state_since)
                if self.coord is not None:
                    idle_since = max(idle_since, self.coord.remote_last_used(node.name, slot.model_id))
                if (
                    slot.state is SlotState.LOADED
                    and slot.in_flight == 0
                    and not self._remote_busy(node, slot.model_id)
                    and not self.fleet.is_pinned(node.name, slot.model_id)
                    and self.fleet.queued.get(slot.model_id, 0) == 0
                    and now - idle_since >= ttl
                ):
                    await self.unload_on(node, slot.model_id, "ttl")

    def _remote_busy(self, node: NodeRec, model: str) -> bool:
        """Whether another gateway has requests in flight for ``model`` on ``node`` (never evict under them)."""
        return self.coord is not None and self.coord.remote_in_flight(node.name, model) > 0

    def _maybe_defrag(self, node: NodeRec) -> None:
        after = self.settings.eviction.defrag_after_cycles
        if after > 0 and node.cycles >= after and node.name not in self.defragging:
            if not self.agent_alive(node.name):
                log.warning(
                    "%s: %d eviction cycles call for a defrag restart, but it has no live agent; skipped",
                    node.name,
                    node.cycles,
                )
                node.cycles = 0
                self.fleet.touch()
                return
            self.defrag_task = self.spawn(self.defrag(node, reason="defrag"))

    async def defrag(self, node: NodeRec, *, reason: str) -> RestartResult:
        """Drain, restart through the agent, wait for health, trim to pins and residents, reload pins.

        Without a live agent nothing could restart the node: that is said at once, before any drain. With
        other gateways the node's lease is held throughout (refused: nothing is done, and that is said).
        """
        coord = self.coord
        if coord is None or node.name in self.defragging:
            return await self._defrag(node, reason=reason)
        if await coord.acquire(node.name) is None:
            return RestartResult(
                False, f"another gateway holds {node.name}'s lease, or the cluster store is down", ran=False
            )
        try:
            return await self._defrag(node, reason=reason)
        finally:
            coord.release(node.name)

    async def _defrag(self, node: NodeRec, *, reason: str) -> RestartResult:
        if node.name in self.defragging:
            return RestartResult(False, f"{node.name} is already restarting", ran=False)
        if self.restart is None or not self.agent_alive(node.name):
            message = f"no agent for {node.name}: restart skipped"
            log.warning("%s", message)
            return RestartResult(False, message, ran=False)
        self.defragging.add(node.name)
        fleet = self.fleet
        was_drained = node.drained
        keep = {m for m, s in node.slots.items() if s.state is SlotState.LOADED} | set(fleet.pins.get(node.name, ()))
        self.bus.publish(DefragStarted(node.name, node.cycles))
        # The requests that waited for the load that triggered this defrag get their leases first.
        deadline = _now() + 2.0
        while _now() < deadline and any(
            fleet.queued.get(m) for m, s in node.slots.items() if s.state is SlotState.LOADED
        ):
            await asyncio.sleep(0.01)
        node.drained = True
        fleet.touch()
        try:
            deadline = _now() + self.settings.gateway.drain_s
            while node.in_flight > 0 and _now() < deadline:
                await asyncio.sleep(0.1)
            if self.restart is None:
                result = RestartResult(False, f"no agent for {node.name}: restart skipped", ran=False)
            else:
                node.restarting = True
                fleet.touch()
                result = await self.restart(node.name, self.restart_timeout_s)
            if not result.ran:
                log.warning("%s", result.message)
            elif result.ok:
                self.metrics.restarted(node.name)
                await self._wait_healthy(node)
            node.restarting = False
            fleet.touch()
            with contextlib.suppress(NodeError):
                models = await node.client.models()
                fleet.poll_ok(node, models, await node.client.system_info(), fresh=True)
            for model, slot in list(node.slots.items()):
                if (
                    slot.state is SlotState.LOADED
                    and model not in keep
                    and slot.in_flight == 0
                    and not self._remote_busy(node, model)
                    and not fleet.queued.get(model)
                    and not fleet.is_pinned(node.name, model)
                ):
                    await self.unload_on(node, model, reason)
            # What requests wait for was kept; if that leaves the node over budget, the rest gives way.
            await self.enforce_budget(node, reason)
            await self.load_pins(node)
            node.cycles = 0
            ok = result.ok or not result.ran
            self.bus.publish(DefragFinished(node.name, ok, result.message))
            return result
        finally:
            node.restarting = False
            node.drained = was_drained
            self.defragging.discard(node.name)
            fleet.touch()
            self.changed()

    async def _wait_healthy(self, node: NodeRec) -> None:
        deadline = _now() + self.restart_timeout_s
        while _now() < deadline:
            try:
                await node.client.health()
                return
            except NodeError:
                await asyncio.sleep(0.25)
        log.warning("%s did not come back within %.0f s after its restart", node.name, self.restart_timeout_s)
