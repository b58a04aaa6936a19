"""Fixtures of the adversarial suite: a gateway in front of a malicious node, or of an honest simulated one.

Timeouts are short (a first byte within 1 s, an idle stream 0.5 s, request heads 0.5 s) so that every
hostile case ends in well under a second; the tests wait for outcomes with bounded polls, never on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from cortex.config import GatewaySettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import Servers, serve
from cortex.sim import SimModel, SimNode
from tests.hardening.evil_node import EvilNode

WAIT_S = 5.0
"""Upper bound of every wait in this suite (a hang guard, not a timing assertion)."""

FAST = {
    "listen": "127.0.0.1:0",
    "metrics_listen": "",
    "drain_s": 1.0,
    "first_byte_timeout_s": 1.0,
    "stream_idle_timeout_s": 0.5,
    "header_timeout_s": 0.5,
    "keepalive_timeout_s": 2.0,
    "max_response_mb": 1.0,
    "queue_timeout_s": 2.0,
}


@dataclass
class Gateway:
    """A running gateway and what it fronts."""

    engine: Engine
    servers: Servers
    http: aiohttp.ClientSession
    node_url: str

    @property
    def url(self) -> str:
        return self.servers.url

    @property
    def port(self) -> int:
        return self.servers.api[1]

    def in_flight(self) -> int:
        """Requests the engine counts in flight (every lease not yet released)."""
        return self.engine.snapshot().totals.in_flight

    async def settled(self) -> None:
        """Wait until no lease is held any more; fail the test if one stays."""
        await wait_until(lambda: self.in_flight() == 0, "every lease released (in flight back to 0)")

    async def alive(self) -> None:
        """The process still answers."""
        async with self.http.get(self.url + "/health") as resp:
            assert resp.status == 200


async def wait_until(predicate: Callable[[], bool], what: str, within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for: {what}")
        await asyncio.sleep(0.02)


class GatewayFactory(Protocol):
    async def __call__(self, node: str, **gateway: Any) -> Gateway: ...


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start a gateway in front of one node (``node`` is its URL); stop everything at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(node: str, **gateway: Any) -> Gateway:
            settings = Settings(
                gateway=GatewaySettings(**{**FAST, **gateway}),
                poll=PollSettings(interval_s=0.1, timeout_s=1.0, down_after=1000),
                nodes=[NodeSettings(name="n1", endpoint=node, vram_mb=8192)],
            )
            engine = await stack.enter_async_context(Engine(settings, state_path=tmp_path / "state.json"))
            servers = await stack.enter_async_context(serve(engine))
            http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))
            await asyncio.wait_for(engine.ready.wait(), WAIT_S)
            return Gateway(engine, servers, http, node)

        yield factory


@pytest.fixture
async def evil() -> AsyncIterator[EvilNode]:
    node = EvilNode()
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def sim() -> AsyncIterator[SimNode]:
    node = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()
