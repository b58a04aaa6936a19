"""Requests in flight per (node, model), summed over the gateways.

A gateway must not evict a model another gateway is streaming from, and must not call a model idle that
another gateway keeps busy. Each gateway writes its own counters (and when it last used each model) to one
Redis hash, ``inflight:NAME``, on every heartbeat, with a TTL of a few heartbeats: a gateway that dies
stops counting by itself. Each reads the others' hashes on the same beat and sums them.
"""

from __future__ import annotations

from collections.abc import Iterable

from cortex.cluster.store import Keys, Store
from cortex.engine.fleet import Fleet

__all__ = ["InFlight"]

RECENT_S = 600.0
"""A model used within this many seconds is reported with its last use even when nothing is in flight."""


class InFlight:
    """This gateway's counters out, the other gateways' in (see the module docstring)."""

    def __init__(self, store: Store, name: str, ttl_ms: int) -> None:
        self.store = store
        self.name = name
        self.ttl_ms = ttl_ms
        self.remote: dict[tuple[str, str], int] = {}
        self.remote_used: dict[tuple[str, str], float] = {}

    def local(self, fleet: Fleet) -> dict[str, str]:
        """``NODE<tab>MODEL`` → ``COUNT|LAST_USED`` for every slot busy or recently used here."""
        now = fleet.clock()
        out: dict[str, str] = {}
        for node in fleet.nodes.values():
            for model, slot in node.slots.items():
                if slot.in_flight > 0 or (slot.last_used and now - slot.last_used < RECENT_S):
                    out[f"{node.name}\t{model}"] = f"{slot.in_flight}|{slot.last_used:.3f}"
        return out

    async def beat(self, fleet: Fleet, others: Iterable[str]) -> bool:
        """Write this gateway's counters and read the others'; True when the sums changed.

        Raises:
            StoreDown: Redis did not answer (the last sums stay, and expire with the others' keys).
        """
        redis = self.store.redis
        key = Keys.inflight(self.name)
        mine = self.local(fleet)
        pipe = redis.pipeline(transaction=True)
        pipe.delete(key)
        if mine:
            pipe.hset(key, mapping=mine)
            pipe.pexpire(key, self.ttl_ms)
        names = sorted(others)
        for name in names:
            pipe.hgetall(Keys.inflight(name))
        replies = await self.store.run(pipe.execute())
        remote: dict[tuple[str, str], int] = {}
        used: dict[tuple[str, str], float] = {}
        for fields in replies[len(replies) - len(names) :] if names else ():
            for field, value in dict(fields).items():
                node, _, model = str(field).partition("\t")
                count, _, last = str(value).partition("|")
                pair = (node, model)
                if count.isdigit() and int(count) > 0:
                    remote[pair] = remote.get(pair, 0) + int(count)
                try:
                    used[pair] = max(used.get(pair, 0.0), float(last))
                except ValueError:
                    continue
        changed = remote != self.remote
        self.remote, self.remote_used = remote, used
        return changed

    async def leave(self) -> None:
        """Remove this gateway's counters (a clean stop)."""
        await self.store.run(self.store.redis.delete(Keys.inflight(self.name)))
