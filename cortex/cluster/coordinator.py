"""The cluster as the engine sees it: one object that starts, wires and stops every cluster duty.

:class:`Cluster` implements the lifecycle's :class:`~cortex.engine.lifecycle.Coordinator` (leases, load
claims, other gateways' in-flight counts), hands the fleet its snapshot view (gateways, lease holders,
whether Redis answers) and runs three engine tasks: the heartbeat (lease renewal, registry, in-flight
counters, lease holders), the subscription to the cluster channel, and the writer of shared response ids.

Messages on the channel are small JSON objects ``{"from": NAME, "kind": ...}``: ``loaded``/``unloaded``
(re-read that node now: the node is the truth), ``free`` (a node's lease was given back: waiting placers
try again), and the shared-state kinds of :mod:`cortex.cluster.shared`. A gateway ignores its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from cortex.cluster.gateways import Registry
from cortex.cluster.inflight import InFlight
from cortex.cluster.lease import Leases, parse_holder
from cortex.cluster.shared import SharedState
from cortex.cluster.store import Keys, Store, StoreDown, describe_url
from cortex.config import parse_listen
from cortex.engine.state import ClusterView, LeaseInfo

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["HEARTBEAT_S", "Cluster", "default_name"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
"""Seconds between heartbeats (at most; a third of the lease TTL when that is shorter)."""


def default_name(listen: str) -> str:
    """``HOSTNAME:PORT`` of the listen address (``HOSTNAME:pPID`` when the port is picked at bind time)."""
    _, port = parse_listen(listen)
    return f"{socket.gethostname()}:{port if port else f'p{os.getpid()}'}"


class Cluster:
    """Several gateways on one fleet (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        settings = engine.settings.cluster
        self.engine = engine
        self.name = settings.name or default_name(engine.settings.gateway.listen)
        self.ttl_s = settings.lease_ttl_s
        self.heartbeat_s = min(HEARTBEAT_S, self.ttl_s / 3)
        self.store = Store(settings.redis_url.get_secret_value(), self._store_changed)
        self.leases = Leases(self.store, self.name, self.ttl_s, engine.spawn, self._lease_freed, self._lease_taken)
        self.inflight = InFlight(self.store, self.name, max(1, int(self.heartbeat_s * 4 * 1000)))
        self.registry = Registry(self.store, self.name, engine.clock)
        self.shared = SharedState(engine, self.store, self.name, engine.spawn)
        self.holders: dict[str, tuple[str, int]] = {}
        """node → (lease holder, token) as last read (the snapshot's view; "" when free)."""
        self._synced = False
        registry = engine.metrics.registry
        self._up_gauge = Gauge(
            "cortex_cluster_store_up", "1 while the cluster's Redis answers, 0 while it does not", registry=registry
        )
        self._ro_gauge = Gauge(
            "cortex_cluster_read_only",
            "1 while this gateway may not load, unload, evict or restart (Redis does not answer)",
            registry=registry,
        )
        self._gateways_gauge = Gauge("cortex_cluster_gateways", "Gateways heard from in the cluster", registry=registry)
        self._taken = Counter(
            "cortex_cluster_leases_taken", "Node lifecycle leases this gateway took", ["node"], registry=registry
        )
        self._ro_gauge.set(1)

    # -- lifecycle seam (cortex.engine.lifecycle.Coordinator) ---------------------------------------------

    async def acquire(self, node: str) -> bool | None:
        return await self.leases.acquire(node)

    def release(self, node: str) -> None:
        self.leases.release(node)

    def holds(self, node: str) -> bool:
        return self.leases.holds(node)

    async def claim(self, node: str, model: str) -> bool:
        return await self.leases.claim(node, model)

    def unclaim(self, node: str, model: str) -> None:
        self.leases.unclaim(node, model)

    async def claimed_elsewhere(self, model: str) -> bool:
        return await self.leases.claimed_elsewhere(model)

    def acted(self, node: str, model: str, what: str) -> None:
        self._publish({"kind": what, "node": node, "model": model, "token": self.leases.token(node)})

    def remote_in_flight(self, node: str, model: str) -> int:
        return self.inflight.remote.get((node, model), 0)

    def remote_last_used(self, node: str, model: str) -> float:
        return self.inflight.remote_used.get((node, model), 0.0)

    def may_act(self, node: str) -> bool:
        """Whether this gateway could take ``node``'s lease now, as far as it knows (no Redis call)."""
        holder = self.holders.get(node, ("", 0))[0]
        return self.store.up and holder in ("", self.name)

    def drain_changed(self, node: str, drained: bool) -> None:
        """An operator drained or undrained ``node`` here: tell the others."""
        self.shared.drain_changed(node, drained)

    # -- start and stop -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Wire the engine to the cluster and start its tasks (Redis down: read-only, retried on every beat)."""
        engine = self.engine
        engine.lifecycle.coord = self
        engine.fleet.remote_in_flight = self.remote_in_flight
        engine.fleet.cluster_view = self.view
        log.info("cluster: gateway %s, store %s, lease TTL %g s", self.name, describe_url(self.store.url), self.ttl_s)
        with contextlib.suppress(StoreDown):
            await self.store.run(self.store.redis.ping())
        engine.background(self._subscription())
        engine.background(self._heartbeat())
        engine.background(self.shared.run_responses())

    async def stop(self) -> None:
        """Give back leases and claims, leave the registry and close the connections (best effort)."""
        if self.store.up:
            with contextlib.suppress(StoreDown):
                await self.leases.give_back_all()
                await self.registry.leave()
                await self.inflight.leave()
                for node in self.engine.fleet.nodes:
                    await self._publish_now({"kind": "free", "node": node})
        await self.store.close()

    # -- the snapshot's view ------------------------------------------------------------------------------

    def view(self) -> ClusterView:
        """The gateways and lease holders, as last read."""
        leases = tuple(LeaseInfo(node, *self.holders.get(node, ("", 0))) for node in self.engine.fleet.nodes)
        return ClusterView(name=self.name, store_up=self.store.up, gateways=self.registry.gateways, leases=leases)

    def _store_changed(self, up: bool) -> None:
        self._up_gauge.set(1 if up else 0)
        self._ro_gauge.set(0 if up else 1)
        if not up:
            self._synced = False
        self.engine.fleet.touch()
        self.engine.lifecycle.changed()

    def _lease_taken(self, node: str) -> None:
        self._taken.labels(node=node).inc()
        self.holders[node] = (self.name, self.leases.token(node))
        self.engine.fleet.touch()

    def _lease_freed(self, node: str) -> None:
        if self.holders.get(node, ("", 0))[0] == self.name:
            self.holders[node] = ("", 0)
            self.engine.fleet.touch()
        self._publish({"kind": "free", "node": node})

    # -- messages -----------------------------------------------------------------------------------------

    def _publish(self, message: dict[str, Any]) -> None:
        _ = self.engine.spawn(self._publish_now(message))

    async def _publish_now(self, message: dict[str, Any]) -> None:
        message["from"] = self.name
        with contextlib.suppress(StoreDown):
            await self.store.run(self.store.redis.publish(Keys.channel, json.dumps(message)))

    def _on_message(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("from") == self.name:
            return
        kind = message.get("kind")
        engine = self.engine
        if kind in ("loaded", "unloaded"):
            node = engine.fleet.nodes.get(str(message.get("node")))
            if node is not None:
                engine.background(engine.poll_once(node))  # the node says what it holds now
        elif kind == "free":
            node_name = str(message.get("node"))
            if self.holders.get(node_name, ("", 0))[0] == message.get("from"):
                self.holders[node_name] = ("", 0)
                engine.fleet.touch()
            engine.lifecycle.changed()
        else:
            self.shared.apply(message)

    async def _subscription(self) -> None:
        """Follow the cluster channel, re-reading the shared state on every (re)subscription."""
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                await self.store.run(pubsub.subscribe(Keys.channel))
                await self.shared.sync()
                self._synced = True
                while True:
                    message = await self.store.run(pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0))
                    if message is not None and message.get("type") == "message":
                        self._on_message(str(message["data"]))
            except StoreDown:
                await asyncio.sleep(self.heartbeat_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _heartbeat(self) -> None:
        """Renew leases, beat in the registry, swap in-flight counters and read the lease holders."""
        fleet = self.engine.fleet
        while True:
            try:
                if not self.store.up:
                    await self.store.run(self.store.redis.ping())
                await self.leases.renew()
                await self.registry.beat(self.engine.gateway)
                self._gateways_gauge.set(len(self.registry.gateways))
                others = self.registry.others(self.heartbeat_s * 4)
                changed = await self.inflight.beat(fleet, others)
                nodes = list(fleet.nodes)
                values = await self.store.run(self.store.redis.mget([Keys.lease(n) for n in nodes])) if nodes else []
                holders = {node: parse_holder(value) for node, value in zip(nodes, values, strict=True)}
                if changed or holders != self.holders:
                    self.holders = holders
                    fleet.touch()
                    self.engine.lifecycle.changed()
                await self.shared.trim_responses()
            except StoreDown:
                pass
            await asyncio.sleep(self.heartbeat_s)
