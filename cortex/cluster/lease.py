"""Per-node lifecycle leases and per-model load claims, with renewal and fencing tokens.

A gateway acts on a node (reload, unload, evict, restart) only while it holds the node's lease: a Redis key
set with ``SET NX PX`` to ``NAME|TOKEN``, where the token comes from a per-node counter that grows with every
grant (the fencing token). The holder renews it every third of the TTL, only while the value is still its
own; a gateway that dies stops renewing and the lease expires within the TTL, so another gateway takes over.
A mistral.rs node cannot check a token itself, so the gateway fences itself: before each reload or unload
call it checks that its lease was renewed within the TTL (:meth:`Leases.holds`), and a gateway cut off
from Redis stops acting before anyone else may start.

Inside one gateway a lease is re-entrant (a load that evicts holds it once for the load and once per
unload) and given back when its last user leaves. A *load claim* (``loading:MODEL``) makes a model's load
happen once across all gateways even when their views differ on where it should go; it is renewed with
the leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from cortex.cluster.store import Keys, Store, StoreDown

__all__ = ["Leases", "parse_holder"]

log = logging.getLogger(__name__)

_ACQUIRE = """
local token = redis.call('incr', KEYS[2])
if redis.call('set', KEYS[1], ARGV[1] .. '|' .. token, 'NX', 'PX', ARGV[2]) then return token end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
VALID_SHARE = 0.8
"""A lease counts as held for this share of the TTL after its last renewal (the rest is a safety margin)."""


def parse_holder(value: str | None) -> tuple[str, int]:
    """``NAME|TOKEN`` → (name, token); ("", 0) for no holder."""
    if not value:
        return "", 0
    name, _, token = value.rpartition("|")
    return name, int(token) if token.isdigit() else 0


@dataclass(slots=True)
class _Held:
    value: str
    token: int
    renewed: float
    users: int
    lost: bool = False


class Leases:
    """This gateway's node leases and load claims (see the module docstring).

    Args:
        store: The Redis store.
        name: This gateway's name.
        ttl_s: The lease TTL.
        spawn: Runs a background coroutine (the engine's task set).
        on_free: Called with a node whose lease this gateway just gave back (others are told).
        on_taken: Called with a node whose lease this gateway just took (metrics).
    """

    def __init__(
        self,
        store: Store,
        name: str,
        ttl_s: float,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        on_free: Callable[[str], None],
        on_taken: Callable[[str], None],
    ) -> None:
        self.store = store
        self.name = name
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.ttl_s = ttl_s
        self._spawn = spawn
        self._on_free = on_free
        self._on_taken = on_taken
        self._held: dict[str, _Held] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._claims: dict[str, tuple[str, float]] = {}
        """model → (claim value, last renewal)."""

    def _lock(self, node: str) -> asyncio.Lock:
        lock = self._locks.get(node)
        if lock is None:
            lock = self._locks[node] = asyncio.Lock()
        return lock

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    # -- node leases ----------------------------------------------------------------------------------

    def token(self, node: str) -> int:
        """The fencing token of this gateway's lease on ``node`` (0 when it holds none)."""
        held = self._held.get(node)
        return held.token if held is not None else 0

    def held_nodes(self) -> list[str]:
        """The nodes whose lease this gateway holds now."""
        return [node for node in self._held if self.holds(node)]

    def holds(self, node: str) -> bool:
        """Whether this gateway's lease on ``node`` is valid now (renewed recently, not lost)."""
        held = self._held.get(node)
        return held is not None and not held.lost and self._now() - held.renewed < self.ttl_s * VALID_SHARE

    async def acquire(self, node: str) -> bool | None:
        """Take or re-enter the lease: None refused, True newly taken, False already held by this gateway."""
        async with self._lock(node):
            held = self._held.get(node)
            if held is not None:
                if not self.holds(node):
                    return None
                held.users += 1
                return False
            if not self.store.up:
                return None
            try:
                token = await self.store.run(
                    self.store.redis.eval(_ACQUIRE, 2, Keys.lease(node), Keys.fence(node), self.name, self.ttl_ms)
                )
            except StoreDown:
                return None
            if not token:
                return None
            self._held[node] = _Held(f"{self.name}|{token}", int(token), self._now(), 1)
            self._on_taken(node)
            log.debug("took %s's lease (token %s)", node, token)
            return True

    def release(self, node: str) -> None:
        """Leave the lease; the last user gives it back (in the background)."""
        held = self._held.get(node)
        if held is None:
            return
        held.users -= 1
        if held.users <= 0:
            _ = self._spawn(self._give_back(node, held))

    async def _give_back(self, node: str, held: _Held) -> None:
        async with self._lock(node):
            if self._held.get(node) is not held or held.users > 0:
                return
            del self._held[node]
            try:
                await self.store.run(self.store.redis.eval(_RELEASE, 1, Keys.lease(node), held.value))
            except StoreDown:
                return  # it expires by itself
        self._on_free(node)

    # -- load claims ----------------------------------------------------------------------------------

    async def claim(self, node: str, model: str) -> bool:
        """Claim ``model``'s one load (to run on ``node``) and take ``node``'s lease; False: not now."""
        if model in self._claims or not self.store.up:
            return False
        value = f"{self.name}|{node}|{secrets.token_hex(4)}"
        try:
            ok = await self.store.run(self.store.redis.set(Keys.loading(model), value, nx=True, px=self.ttl_ms))
        except StoreDown:
            return False
        if not ok:
            return False
        self._claims[model] = (value, self._now())
        if await self.acquire(node) is None:
            self._drop_claim(model)
            return False
        return True

    def unclaim(self, node: str, model: str) -> None:
        """End a claim: the claim key and the lease are given back."""
        if model in self._claims:
            self._drop_claim(model)
            self.release(node)

    def _drop_claim(self, model: str) -> None:
        value, _ = self._claims.pop(model)
        _ = self._spawn(self._delete_claim(model, value))

    async def _delete_claim(self, model: str, value: str) -> None:
        with contextlib.suppress(StoreDown):  # else it expires by itself
            await self.store.run(self.store.redis.eval(_RELEASE, 1, Keys.loading(model), value))

    async def claimed_elsewhere(self, model: str) -> bool:
        """Whether another gateway claims ``model``'s load now; True when the store cannot say."""
        if model in self._claims:
            return False
        if not self.store.up:
            return True
        try:
            value = await self.store.run(self.store.redis.get(Keys.loading(model)))
        except StoreDown:
            return True
        return bool(value)

    # -- renewal --------------------------------------------------------------------------------------

    async def renew(self) -> None:
        """Renew every lease and claim this gateway holds (one pass; the coordinator runs it every TTL/3)."""
        redis = self.store.redis
        for node, held in list(self._held.items()):
            if held.lost:
                continue
            try:
                ok = await self.store.run(redis.eval(_RENEW, 1, Keys.lease(node), held.value, self.ttl_ms))
            except StoreDown:
                return  # the leases lapse by themselves: holds() turns False within the TTL
            if ok:
                held.renewed = self._now()
            else:
                held.lost = True
                log.warning("lost %s's lease (expired or taken): no more actions there until it is taken again", node)
        for model, (value, _) in list(self._claims.items()):
            try:
                ok = await self.store.run(redis.eval(_RENEW, 1, Keys.loading(model), value, self.ttl_ms))
            except StoreDown:
                return
            if ok and model in self._claims:
                self._claims[model] = (value, self._now())

    async def give_back_all(self) -> None:
        """Give back every lease and claim now (a clean stop: the others need not wait out the TTL)."""
        for model in list(self._claims):
            value, _ = self._claims.pop(model)
            await self._delete_claim(model, value)
        for node, held in list(self._held.items()):
            self._held.pop(node, None)
            try:
                await self.store.run(self.store.redis.eval(_RELEASE, 1, Keys.lease(node), held.value))
            except StoreDown:
                return
