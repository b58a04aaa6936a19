"""The Redis connection, the key names, and one rule for every call: a store that does not answer is *down*.

Every module of the cluster goes through :meth:`Store.run`, so "Redis is down" is decided in one place: a
connection error or a timeout marks the store down (the lifecycle turns read-only) and raises
:class:`StoreDown`; the next call that succeeds marks it up again. Commands time out after
:data:`TIMEOUT_S`, so a stopped or frozen Redis never holds a request or a placer for long.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["PREFIX", "TIMEOUT_S", "Keys", "Store", "StoreDown", "describe_url"]

log = logging.getLogger(__name__)

PREFIX = "cortex:"
"""Every key and the channel start with this (give each fleet its own Redis database: ``redis://host/1``)."""
TIMEOUT_S = 1.0
"""Seconds one Redis command (or connection attempt) may take before the store counts as down."""

T = TypeVar("T")


class StoreDown(Exception):
    """Redis did not answer; the caller falls back to what it knows locally (read-only lifecycle)."""


def describe_url(url: str) -> str:
    """The URL without credentials, for logs (``redis://:secret@host:6379/0`` → ``redis://host:6379/0``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Keys:
    """The names of every key the cluster uses (one place, one prefix)."""

    channel = PREFIX + "events"
    gateways = PREFIX + "gateways"
    pins = PREFIX + "pins"
    footprints = PREFIX + "footprints"
    floors = PREFIX + "floors"
    drained = PREFIX + "drained"
    responses = PREFIX + "responses"
    responses_order = PREFIX + "responses:order"

    @staticmethod
    def lease(node: str) -> str:
        return f"{PREFIX}lease:{node}"

    @staticmethod
    def fence(node: str) -> str:
        return f"{PREFIX}fence:{node}"

    @staticmethod
    def loading(model: str) -> str:
        return f"{PREFIX}loading:{model}"

    @staticmethod
    def inflight(gateway: str) -> str:
        return f"{PREFIX}inflight:{gateway}"


class Store:
    """One Redis client and whether it answers (see the module docstring).

    Args:
        url: The Redis URL (may hold a password: only :func:`describe_url` of it is ever logged).
        on_change: Called with the new state when the store goes down or comes back.
    """

    def __init__(self, url: str, on_change: Callable[[bool], None]) -> None:
        self.url = url
        # Any: redis-py types its commands for the sync and the asyncio client at once (``Awaitable[T] | T``),
        # and its pipelines as awaitables; every reply is checked where it is read instead.
        self.redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, decode_responses=True
        )
        self.up = False
        self._on_change = on_change

    async def run(self, call: Awaitable[T]) -> T:
        """Await one Redis call.

        Raises:
            StoreDown: Redis did not answer (the store is marked down).
        """
        try:
            result = await call
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.mark(False, str(exc))
            raise StoreDown(str(exc)) from None
        self.mark(True)
        return result

    def mark(self, up: bool, why: str = "") -> None:
        """Record whether the store answers (logged and reported on every change)."""
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("cluster store %s answers: lifecycle actions allowed", describe_url(self.url))
        else:
            log.warning(
                "cluster store %s does not answer (%s): read-only lifecycle, loaded models keep serving",
                describe_url(self.url),
                why or "no answer",
            )
        self._on_change(up)

    async def close(self) -> None:
        """Close the connections."""
        try:
            await self.redis.aclose()
        except Exception as exc:  # closing a dead connection may fail in many ways; none matters now
            log.debug("closing the cluster store: %s", exc)
