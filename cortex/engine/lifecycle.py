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
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

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
from cortex.engine.placement import Placement, place, select_victims, victim_order
from cortex.engine.router import pick_node
from cortex.engine.state import NodeStatus, SlotState
from cortex.engine.upstream import UpstreamPool
from cortex.errors import LoadFailed, NoNodeAvailable, QueueFull, QueueTimeout, UnknownModel

__all__ = ["Lease", "Lifecycle", "RestartFn", "RestartResult"]

log = logging.getLogger(__name__)


WARM_CONNECTIONS_MAX = 128
"""The most idle connections held open to a loading node for its waiting requests."""


@dataclass(frozen=True, slots=True)
class RestartResult:
    """What a node restart through its agent came to."""

    ok: bool
    message: str
    ran: bool = True
    """False when there was no agent, so nothing was restarted."""


RestartFn = Callable[[str, float], Awaitable[RestartResult]]


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
        """End the claim (idempotent); ``failed`` counts a request failure against the node."""
        if self._released:
            return
        self._released = True
        self.node.in_flight -= 1
        self.slot.in_flight -= 1
        self.slot.last_used = self.fleet.clock()
        if failed is not None:
            self.fleet.request_failed(self.node, failed)
        else:
            self.node.request_failures = 0
        self.fleet.touch()


class _ModelQueue:
    """Requests waiting for one model: one future per waiting request, all settled by :meth:`wake`.

    A future of its own per request (not one shared future behind ``shield`` and ``wait_for``) wakes each
    waiting task in a single step of the loop: with 100 requests queued behind a load, that is what lets
    the last of them leave within milliseconds of ``loaded`` (``bench/cold_load.py``).
    """

    __slots__ = ("pending", "placer", "waiters")

    def __init__(self) -> None:
        self.waiters = 0
        self.pending: set[asyncio.Future[None]] = set()
        self.placer: asyncio.Task[Any] | None = None

    def wake(self, error: Exception | None = None) -> None:
        pending, self.pending = self.pending, set()
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
        self.pending.add(fut)
        try:
            await fut
        finally:
            timer.cancel()
            self.pending.discard(fut)


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
        self.load_timeout_s = max(settings.gateway.queue_timeout_s, settings.gateway.first_byte_timeout_s)
        self.memory_wait_s = 30.0
        self._changed = asyncio.Event()
        self.defrag_task: asyncio.Task[Any] | None = None
        """The last automatic defrag (tests await it)."""

    # -- request path -------------------------------------------------------------------------------

    def route(self, model: str, exclude: tuple[str, ...] = ()) -> NodeRec | None:
        """The node to send a request for a loaded model to, or None."""
        name = pick_node(model, self.fleet.nodes.values(), exclude)
        return None if name is None else self.fleet.nodes[name]

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
        node = self.route(model, exclude)
        if node is not None:
            return Lease(self.fleet, node, model, 0.0)
        listed = list(self.fleet.listed(model))
        if not listed:
            raise UnknownModel(f"model {model!r} is not served by any node")
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = _ModelQueue()
        if queue.waiters >= self.settings.gateway.max_queue:
            raise QueueFull(f"{queue.waiters} requests already wait for {model}; try again shortly")
        started = time.monotonic()
        deadline = started + self.settings.gateway.queue_timeout_s
        queue.waiters += 1
        self.fleet.queued[model] = queue.waiters
        self.fleet.touch()
        try:
            while True:
                node = self.route(model, exclude)
                if node is not None:
                    waited = time.monotonic() - started
                    self.metrics.queue_waited(model, waited)
                    return Lease(self.fleet, node, model, waited)
                if queue.placer is None or queue.placer.done():
                    queue.placer = self.spawn(self._placer(model, queue))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueTimeout(f"{model} was not ready within {self.settings.gateway.queue_timeout_s:g} s")
                await queue.wait(min(remaining, 1.0))
                if on_wait is not None and self.route(model, exclude) is None:
                    await on_wait(time.monotonic() - started)
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
            self.fleet.footprint(model) or 0,
            nodes,
            strategy=self.settings.eviction.strategy,
            priorities=self.fleet.priorities,
            now=self.fleet.clock(),
            min_resident_s=self.settings.eviction.min_resident_s,
            queued=self.fleet.queued,
            exclude=exclude,
        )

    async def _placer(self, model: str, queue: _ModelQueue) -> None:
        tried: set[str] = set()
        last_error = ""
        try:
            while queue.waiters > 0:
                if self.route(model) is not None:
                    queue.wake()
                    return
                if model in self.fleet.loading:
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
                placement = self.plan(model, tried)
                if placement is None:
                    await self._wait_change(1.0)
                    continue
                node = self.fleet.nodes[placement.node]
                warm = self.spawn(self._warm_connections(node, queue)) if self.upstream is not None else None
                try:
                    error = await self.load_on(node, model, placement.victims)
                finally:
                    if warm is not None:
                        warm.cancel()
                if error is None:
                    queue.wake()
                    return
                tried.add(node.name)
                last_error = f"{node.name}: {error}"
        finally:
            if queue.waiters == 0 and self.queues.get(model) is queue:
                self.queues.pop(model, None)

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
        """Unload ``victims`` then load ``model`` on ``node``. Returns None on success, else the error.

        The target is marked LOADING and the victims UNLOADING before the first ``await``.
        """
        fleet = self.fleet
        started_wall = fleet.clock()
        fleet.loading[model] = (node.name, started_wall)
        fleet.begin_load(node, model, victims)
        self.bus.publish(ModelLoading(node.name, model))
        started = time.monotonic()
        error: str | None = None
        try:
            for victim in victims:
                error = await self.unload_on(node, victim, reason, marked=True)
                if error is not None:
                    break
            if error is None and victims:
                node.cycles += 1
                self.metrics.cycle(node.name)
                await self._wait_memory(node, model)
            if error is None:
                error = await self._reload(node, model)
        except asyncio.CancelledError:
            fleet.set_slot(node, model, SlotState.UNLOADED)
            raise
        finally:
            fleet.loading.pop(model, None)
        seconds = time.monotonic() - started
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

    async def _reload(self, node: NodeRec, model: str) -> str | None:
        """Call reload only when the node says ``unloaded``; follow ``reloading`` by status polls."""
        fleet = self.fleet
        # Measuring the footprint needs a fresh figure before the load; a known footprint does not.
        learn = fleet.footprint(model) is None
        before = await self._fresh_used(node) if learn else None
        try:
            status = (await node.client.lifecycle("status", model)).status
            if status == "unloaded":
                reply = await node.client.lifecycle("reload", model, timeout_s=self.load_timeout_s)
                status, detail = reply.status, reply.error
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
            return messages.get(status, f"unexpected status {status!r}")
        fleet.set_slot(node, model, SlotState.LOADED)
        queue = self.queues.get(model)
        if queue is not None:
            # The waiting requests go now, not after the memory poll below (which only learns the footprint;
            # requests starting meanwhile can only make it larger, never let a model overcommit a node).
            queue.wake()
        after = await self._fresh_used(node)
        if learn and before is not None and after is not None and after > before:
            fleet.learn_footprint(model, after - before)
        return None

    async def _await_status(self, node: NodeRec, model: str) -> str:
        deadline = time.monotonic() + self.load_timeout_s
        status = "reloading"
        while status == "reloading" and time.monotonic() < deadline:
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

        Room means both: the device's reported use plus the model's footprint fits the budget (the victims'
        memory is really free), and cortex's own count, which already holds this load and any other load in
        progress on the node, fits it.
        """
        need_mb = self.fleet.footprint(model) or 0
        deadline = time.monotonic() + self.memory_wait_s
        while True:
            used = await self._fresh_used(node)
            if used is None:
                return
            total, counted, _ = self.fleet.vram(node)
            budget = total - self.settings.eviction.headroom_mb
            if max(used + need_mb, counted) <= budget or time.monotonic() >= deadline:
                if time.monotonic() >= deadline:
                    log.warning("%s: memory not released after %.0f s; loading anyway", node.name, self.memory_wait_s)
                return
            await asyncio.sleep(0.2)

    async def unload_on(self, node: NodeRec, model: str, reason: str, *, marked: bool = False) -> str | None:
        """Unload a model from a node. Returns None on success, else the error."""
        fleet = self.fleet
        slot = node.slots.get(model)
        previous = slot.state if slot is not None else SlotState.UNLOADED
        if not marked:
            fleet.set_slot(node, model, SlotState.UNLOADING)
        try:
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

    async def reconcile(self, node: NodeRec) -> None:
        """Enforce the VRAM budget and the pins on a node that just came (back) up."""
        if node.name in self.defragging:
            return
        await self.enforce_budget(node, "reconcile")
        await self.load_pins(node)

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
                self.fleet.footprint(model) or 0,
                strategy=self.settings.eviction.strategy,
                priorities=self.fleet.priorities,
                now=self.fleet.clock(),
                min_resident_s=self.settings.eviction.min_resident_s,
                queued=self.fleet.queued,
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
                idle_since = max(slot.last_used, slot.loaded_at or 0.0)
                if (
                    slot.state is SlotState.LOADED
                    and slot.in_flight == 0
                    and not self.fleet.is_pinned(node.name, slot.model_id)
                    and self.fleet.queued.get(slot.model_id, 0) == 0
                    and now - idle_since >= ttl
                ):
                    await self.unload_on(node, slot.model_id, "ttl")

    def _maybe_defrag(self, node: NodeRec) -> None:
        after = self.settings.eviction.defrag_after_cycles
        if after > 0 and node.cycles >= after and node.name not in self.defragging:
            self.defrag_task = self.spawn(self.defrag(node, reason="defrag"))

    async def defrag(self, node: NodeRec, *, reason: str) -> RestartResult:
        """Drain, restart through the agent, wait for health, trim to pins and residents, reload pins."""
        if node.name in self.defragging:
            return RestartResult(False, f"{node.name} is already restarting", ran=False)
        self.defragging.add(node.name)
        fleet = self.fleet
        was_drained = node.drained
        keep = {m for m, s in node.slots.items() if s.state is SlotState.LOADED} | set(fleet.pins.get(node.name, ()))
        self.bus.publish(DefragStarted(node.name, node.cycles))
        # The requests that waited for the load that triggered this defrag get their leases first.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(
            fleet.queued.get(m) for m, s in node.slots.items() if s.state is SlotState.LOADED
        ):
            await asyncio.sleep(0.01)
        node.drained = True
        fleet.touch()
        try:
            deadline = time.monotonic() + self.settings.gateway.drain_s
            while node.in_flight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if self.restart is None:
                result = RestartResult(False, f"no agent for {node.name}: restart skipped", ran=False)
            else:
                node.restarting = True
                fleet.touch()
                result = await self.restart(node.name, self.load_timeout_s)
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
        deadline = time.monotonic() + self.load_timeout_s
        while time.monotonic() < deadline:
            try:
                await node.client.health()
                return
            except NodeError:
                await asyncio.sleep(0.25)
        log.warning("%s did not come back within %.0f s after its restart", node.name, self.load_timeout_s)
