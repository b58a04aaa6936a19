"""What the gateways agree on besides leases: pins, learned sizes, drain flags and response ids.

Each gateway keeps its own copy (the engine reads it on every request and must not wait for Redis) and
Redis holds the shared one. A change made here is written to Redis and published on the cluster channel;
the other gateways apply the message to their copy within milliseconds (:meth:`SharedState.apply`). On
start, and whenever the subscription comes back after Redis was away (messages may have been missed), the
whole shared state is read again (:meth:`SharedState.sync`): Redis wins over the local copy, and what only
this gateway knew is added to Redis.

Pins, footprints and floors already go through the state file (:class:`~cortex.engine.fleet.StateStore`):
:class:`SharedStore` is that store, with its :meth:`~SharedStore.save` also telling the cluster what changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.cluster.store import Keys, Store, StoreDown
from cortex.engine.affinity import Holder
from cortex.engine.events import NodeStatusChanged
from cortex.engine.fleet import StateStore

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["SharedState", "SharedStore"]

log = logging.getLogger(__name__)

RESPONSES_MAX = 100_000
"""Response ids kept in Redis at most (the oldest go first), as in each gateway's own map."""


class SharedStore(StateStore):
    """The state file, whose saves are also shared with the other gateways (see the module docstring)."""

    def __init__(self, path: Path, on_save: Callable[[], None]) -> None:
        super().__init__(path)
        self.on_save = on_save
        self.quiet = False
        """True while applying another gateway's change: saved locally, not sent back."""

    def save(self) -> None:
        super().save()
        if not self.quiet:
            self.on_save()


def _pins_entry(store: StateStore, node: str) -> str:
    return json.dumps(
        {"added": sorted(store.pins_added.get(node, [])), "removed": sorted(store.pins_removed.get(node, []))}
    )


class SharedState:
    """Pins, footprints, floors, drains and response ids, shared through Redis (see the module docstring).

    Args:
        engine: The engine whose fleet and affinity map are shared.
        store: The Redis store.
        name: This gateway's name (its own messages are ignored).
        spawn: Runs a background coroutine.
    """

    def __init__(
        self, engine: Engine, store: Store, name: str, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
    ) -> None:
        self.engine = engine
        self.store = store
        self.name = name
        self._spawn = spawn
        fleet = engine.fleet
        self.local = SharedStore(fleet.store.path, self._saved)
        fleet.store = self.local
        self._sent: dict[str, dict[str, str]] = self._current()
        """What Redis is known to hold for footprints, floors and pins (diffed on every save)."""
        self._responses: list[tuple[str, Holder | None]] = []
        self._responses_due = asyncio.Event()
        engine.affinity.on_change = self._response_changed

    # -- local changes → Redis ------------------------------------------------------------------------

    def _current(self) -> dict[str, dict[str, str]]:
        local = self.local
        return {
            Keys.footprints: {m: str(v) for m, v in local.footprints.items()},
            Keys.floors: {m: str(v) for m, v in local.floors.items()},
            Keys.pins: {n: _pins_entry(local, n) for n in self.engine.fleet.nodes},
        }

    def _saved(self) -> None:
        now = self._current()
        changes: dict[str, dict[str, str | None]] = {}
        for key, fields in now.items():
            sent = self._sent.get(key, {})
            diff: dict[str, str | None] = {f: v for f, v in fields.items() if sent.get(f) != v}
            diff.update({f: None for f in sent if f not in fields})
            if diff:
                changes[key] = diff
        self._sent = now
        if changes:
            _ = self._spawn(self._push_state(changes))

    async def _push_state(self, changes: dict[str, dict[str, str | None]]) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        for key, diff in changes.items():
            sets = {f: v for f, v in diff.items() if v is not None}
            if sets:
                pipe.hset(key, mapping=sets)
            dels = [f for f, v in diff.items() if v is None]
            if dels:
                pipe.hdel(key, *dels)
        pipe.publish(Keys.channel, json.dumps({"from": self.name, "kind": "state", "changes": changes}))
        try:
            await self.store.run(pipe.execute())
        except StoreDown:
            log.warning("a pin or learned size could not be shared (the cluster store is down); kept locally")

    def drain_changed(self, node: str, drained: bool) -> None:
        """Share an operator's drain or undrain of ``node``."""
        _ = self._spawn(self._push_drain(node, drained))

    async def _push_drain(self, node: str, drained: bool) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        if drained:
            pipe.hset(Keys.drained, node, "1")
        else:
            pipe.hdel(Keys.drained, node)
        pipe.publish(Keys.channel, json.dumps({"from": self.name, "kind": "drain", "node": node, "drained": drained}))
        try:
            await self.store.run(pipe.execute())
        except StoreDown:
            log.warning("the drain of %s could not be shared (the cluster store is down)", node)

    def _response_changed(self, response_id: str, holder: Holder | None) -> None:
        self._responses.append((response_id, holder))
        self._responses_due.set()

    async def run_responses(self) -> None:
        """Write remembered and forgotten response ids to Redis in batches, until cancelled (an engine task)."""
        while True:
            await self._responses_due.wait()
            self._responses_due.clear()
            batch, self._responses = self._responses, []
            pipe = self.store.redis.pipeline(transaction=False)
            now = self.engine.clock()
            rows: list[tuple[str, list[Any] | None]] = []
            for response_id, holder in batch:
                if holder is None:
                    pipe.hdel(Keys.responses, response_id)
                    pipe.zrem(Keys.responses_order, response_id)
                    rows.append((response_id, None))
                else:
                    row = [holder.node, holder.model, holder.epoch]
                    pipe.hset(Keys.responses, response_id, json.dumps(row))
                    pipe.zadd(Keys.responses_order, {response_id: now})
                    rows.append((response_id, row))
            pipe.publish(Keys.channel, json.dumps({"from": self.name, "kind": "responses", "rows": rows}))
            try:
                await self.store.run(pipe.execute())
            except StoreDown:
                log.warning("%d response ids could not be shared (the cluster store is down)", len(batch))

    async def trim_responses(self) -> None:
        """Keep at most :data:`RESPONSES_MAX` response ids in Redis (the oldest go)."""
        redis = self.store.redis
        try:
            excess = int(await self.store.run(redis.zcard(Keys.responses_order))) - RESPONSES_MAX
            if excess > 0:
                old = await self.store.run(redis.zpopmin(Keys.responses_order, excess))
                ids = [row[0] for row in old]
                if ids:
                    await self.store.run(redis.hdel(Keys.responses, *ids))
        except StoreDown:
            return

    # -- Redis → local copy ---------------------------------------------------------------------------

    def apply(self, message: dict[str, Any]) -> None:
        """Apply another gateway's message (``state``, ``drain`` or ``responses``)."""
        kind = message.get("kind")
        if kind == "state":
            changes = message.get("changes")
            if isinstance(changes, dict):
                self._adopt(changes)
        elif kind == "drain":
            node, drained = message.get("node"), message.get("drained")
            if isinstance(node, str) and isinstance(drained, bool):
                self._adopt_drain(node, drained)
        elif kind == "responses":
            for row in message.get("rows") or ():
                self._adopt_response(row)

    def _adopt(self, changes: dict[str, Any]) -> None:
        local, fleet = self.local, self.engine.fleet
        local.quiet = True
        try:
            for key, target in ((Keys.footprints, local.footprints), (Keys.floors, local.floors)):
                for model, value in dict(changes.get(key) or {}).items():
                    if value is None:
                        target.pop(model, None)
                    elif str(value).isdigit():
                        target[model] = int(value)
            for node, raw in dict(changes.get(Keys.pins) or {}).items():
                rec = fleet.nodes.get(node)
                if rec is None or raw is None:
                    continue
                entry = json.loads(raw)
                wanted = (set(rec.settings.pinned) | set(entry.get("added", []))) - set(entry.get("removed", []))
                for model in sorted(wanted ^ fleet.pins.get(node, set())):
                    pinned = model in wanted
                    fleet.set_pin(node, model, pinned)
                    self.engine.pin_changed(model, node, pinned)
            local.save()
        finally:
            local.quiet = False
        self._sent = self._current()
        fleet.touch()
        self.engine.lifecycle.changed()

    def _adopt_drain(self, node: str, drained: bool) -> None:
        rec = self.engine.fleet.nodes.get(node)
        if rec is None or rec.drained == drained:
            return
        old = rec.status.value
        rec.drained = drained
        self.engine.fleet.touch()
        if rec.status.value != old:
            self.engine.bus.publish(NodeStatusChanged(node, old, rec.status.value))
        self.engine.lifecycle.changed()
        log.info("%s %s by another gateway", node, "drained" if drained else "undrained")

    def _adopt_response(self, row: Any) -> None:
        if not isinstance(row, list) or len(row) != 2 or not isinstance(row[0], str):
            return
        response_id, holder = row
        if holder is None:
            self.engine.affinity.adopt(response_id, None)
        elif isinstance(holder, list) and len(holder) == 3:
            node, model, epoch = holder
            if isinstance(node, str) and isinstance(model, str) and (epoch is None or isinstance(epoch, int)):
                self.engine.affinity.adopt(response_id, Holder(node, model, epoch))

    async def sync(self) -> None:
        """Read the whole shared state: Redis wins; what only this gateway knew is added to Redis.

        Raises:
            StoreDown: Redis did not answer.
        """
        redis, store = self.store.redis, self.store
        remote: dict[str, dict[str, str]] = {}
        for key in (Keys.footprints, Keys.floors, Keys.pins):
            remote[key] = dict(await store.run(redis.hgetall(key)))
        drained = dict(await store.run(redis.hgetall(Keys.drained)))
        mine = self._current()
        self._adopt({key: fields for key, fields in remote.items()})
        missing = {key: {f: v for f, v in fields.items() if f not in remote[key]} for key, fields in mine.items()}
        pipe = redis.pipeline(transaction=False)
        for key, fields in missing.items():
            for field_name, value in fields.items():
                pipe.hsetnx(key, field_name, value)
        await store.run(pipe.execute())
        self._sent = self._current()
        for node in self.engine.fleet.nodes:
            self._adopt_drain(node, node in drained)
        cursor: int = 0
        while True:
            cursor, rows = await store.run(redis.hscan(Keys.responses, cursor, count=2000))
            for response_id, raw in rows.items():
                try:
                    self._adopt_response([response_id, json.loads(raw)])
                except ValueError:
                    continue
            if not cursor:
                break
