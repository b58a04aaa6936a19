"""The gateways of a cluster: a Redis hash of name → address and last heartbeat.

Every gateway writes its entry on each heartbeat and reads everyone's, so ``cortex status`` and the console
list them all with the age of their last beat. An entry whose beat is older than :data:`FORGET_S` is
removed by whoever sees it; a clean stop removes its own at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from cortex.cluster.store import Keys, Store
from cortex.engine.state import GatewayInfo

__all__ = ["FORGET_S", "Registry"]

FORGET_S = 60.0
"""Seconds after its last heartbeat a gateway is dropped from the list."""


class Registry:
    """This gateway's heartbeat, and the list of all of them."""

    def __init__(self, store: Store, name: str, clock: Callable[[], float]) -> None:
        self.store = store
        self.name = name
        self.clock = clock
        self.started = clock()
        self.gateways: tuple[GatewayInfo, ...] = ()

    async def beat(self, address: str) -> None:
        """Write this gateway's entry and read every entry (dropping long-dead ones).

        Raises:
            StoreDown: Redis did not answer.
        """
        now = self.clock()
        redis = self.store.redis
        entry = json.dumps({"address": address, "heartbeat": now, "started": self.started})
        pipe = redis.pipeline(transaction=False)
        pipe.hset(Keys.gateways, self.name, entry)
        pipe.hgetall(Keys.gateways)
        _, rows = await self.store.run(pipe.execute())
        found: list[GatewayInfo] = []
        dead: list[str] = []
        for name, raw in dict(rows).items():
            try:
                data = json.loads(raw)
                info = GatewayInfo(str(name), str(data["address"]), float(data["heartbeat"]), me=name == self.name)
            except (ValueError, KeyError, TypeError):
                dead.append(name)
                continue
            (dead.append(name) if now - info.heartbeat > FORGET_S else found.append(info))
        if dead:
            await self.store.run(redis.hdel(Keys.gateways, *dead))
        self.gateways = tuple(sorted(found, key=lambda g: g.name))

    def others(self, fresh_s: float) -> list[str]:
        """The other gateways whose last beat is at most ``fresh_s`` old."""
        now = self.clock()
        return [g.name for g in self.gateways if not g.me and now - g.heartbeat <= fresh_s]

    async def leave(self) -> None:
        """Remove this gateway's entry (a clean stop)."""
        await self.store.run(self.store.redis.hdel(Keys.gateways, self.name))
