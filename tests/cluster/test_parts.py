"""The cluster's parts against a real Redis in this process: leases, fencing, expiry; and how it is shown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from cortex.admin_client import format_status
from cortex.cluster.lease import Leases
from cortex.cluster.store import Keys, Store, describe_url
from cortex.engine.state import ClusterView, FleetSnapshot, GatewayInfo, LeaseInfo
from cortex.tui.render import header_line, node_rows
from tests.cli.helpers import ROOT
from tests.cluster.support import RedisServer, redis_server


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async for server in redis_server(tmp_path):
        yield server


async def _leases(url: str, name: str, ttl_s: float, tasks: set[asyncio.Task[Any]]) -> Leases:
    store = Store(url, lambda _up: None)
    await store.run(store.redis.ping())

    def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        tasks.add(task)
        return task

    return Leases(store, name, ttl_s, spawn, lambda _n: None, lambda _n: None)


async def test_lease_is_exclusive_reentrant_fenced_and_taken_over_after_its_ttl(redis: RedisServer) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    a = await _leases(redis.url, "a", 0.6, tasks)
    b = await _leases(redis.url, "b", 0.6, tasks)
    try:
        assert await a.acquire("n1") is True
        assert await a.acquire("n1") is False  # re-entered, not taken again
        assert await b.acquire("n1") is None
        first = a.token("n1")
        assert await a.store.run(a.store.redis.get(Keys.lease("n1"))) == f"a|{first}"
        await a.renew()
        assert a.holds("n1")
        # a stops renewing (it hangs or died): the lease expires and b takes it with a larger token
        await asyncio.sleep(0.8)
        assert not a.holds("n1")  # fenced off by its own clock before b could act
        assert await b.acquire("n1") is True
        assert b.token("n1") > first
        # a's late give-back does not delete b's lease (compare-and-delete)
        a.release("n1")
        a.release("n1")
        await asyncio.gather(*tasks)
        assert await b.store.run(b.store.redis.get(Keys.lease("n1"))) == f"b|{b.token('n1')}"
        await a.renew()
        assert not a.holds("n1")
        # a load claim is one per model across gateways
        assert await b.claim("n1", "m") is True
        assert await a.claimed_elsewhere("m") is True
        assert await a.claim("n1", "m") is False
        b.unclaim("n1", "m")
        b.release("n1")
        await asyncio.gather(*tasks)
        assert await a.claimed_elsewhere("m") is False
        assert await a.store.run(a.store.redis.get(Keys.lease("n1"))) is None
    finally:
        await a.store.close()
        await b.store.close()


async def test_a_stopped_store_refuses_leases_and_says_so(redis: RedisServer) -> None:
    seen: list[bool] = []
    store = Store(redis.url, seen.append)
    leases = Leases(store, "a", 1.0, asyncio.ensure_future, lambda _n: None, lambda _n: None)
    await store.run(store.redis.ping())
    await redis.stop()
    assert await leases.acquire("n1") is None
    assert await leases.claimed_elsewhere("m") is True  # cannot tell: nothing is loaded
    assert seen == [True, False]
    assert not store.up
    await store.close()


def test_urls_are_logged_without_credentials() -> None:
    assert describe_url("redis://:s3cret@redis.internal:6379/2") == "redis://redis.internal:6379/2"
    assert "s3cret" not in describe_url("rediss://user:s3cret@h/0")


def _snapshot(store_up: bool) -> FleetSnapshot:
    from cortex.engine.state import NodeSnapshot, NodeStatus

    node = NodeSnapshot("n1", "http://127.0.0.1:1", NodeStatus.UP, 24000, 1000, "estimate", 512)
    cluster = ClusterView(
        name="gw-a",
        store_up=store_up,
        gateways=(GatewayInfo("gw-a", "10.0.0.1:8000", 100.0, me=True), GatewayInfo("gw-b", "10.0.0.2:8000", 99.0)),
        leases=(LeaseInfo("n1", "gw-b", 7),),
    )
    return FleetSnapshot(taken_at=100.0, started_at=90.0, gateway="10.0.0.1:8000", nodes=(node,), cluster=cluster)


def test_status_and_console_show_gateways_and_lease_holders() -> None:
    snap = _snapshot(True)
    text = format_status(snap.to_json())
    assert "gw-b" in text
    assert "10.0.0.2:8000" in text
    assert "gw-a (this)" in text
    assert "gw-b (token 7)" in text
    header = "".join(span for span, _ in header_line(snap, 100.0, address="", read_only=False))
    assert "cluster gw-a + gw-b" in header
    ((_, cells),) = node_rows(snap, 100.0)
    assert "".join(text for text, _ in cells[1]) == "up @gw-b"
    down = "".join(span for span, _ in header_line(_snapshot(False), 100.0, address="", read_only=False))
    assert "redis down: read-only" in down
    assert "DOWN: read-only" in format_status(_snapshot(False).to_json())


def test_a_single_gateway_never_imports_the_cluster_or_redis(tmp_path: Path) -> None:
    code = (
        "import sys, asyncio\n"
        "from cortex.config import Settings\n"
        "from cortex.engine.engine import Engine\n"
        "from cortex.proxy.app import create_app\n"
        "async def main():\n"
        "    async with Engine(Settings()) as engine:\n"
        "        create_app(engine)\n"
        "        assert engine.cluster is None\n"
        "asyncio.run(main())\n"
        "bad = [m for m in sys.modules if m == 'redis' or m.startswith(('redis.', 'cortex.cluster'))]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "XDG_STATE_HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
