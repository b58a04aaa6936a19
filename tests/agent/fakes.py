"""Test doubles for the agent tests: a fake NVML, the simulated mistralrs, and small gateways on loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from aiohttp import web
from pydantic import SecretStr

from cortex.config import NodeSettings, Settings
from cortex.engine.agents import AgentHub
from cortex.sim import SimModel, SimNode

MIB = 1024 * 1024


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_settings(**tokens: str) -> Settings:
    """Settings with one node per keyword: ``make_settings(n1="tok", n2="")``."""
    return Settings(
        nodes=[
            NodeSettings(name=name, endpoint="http://127.0.0.1:9", vram_mb=80_000, agent_token=SecretStr(token))
            for name, token in tokens.items()
        ]
    )


def make_hub(clock: Callable[[], float] = time.time, **tokens: str) -> tuple[AgentHub, list[int]]:
    """A hub over ``make_settings(**tokens)`` and the list its on_change appends to."""
    changes: list[int] = []
    hub = AgentHub(make_settings(**tokens), lambda: changes.append(1), clock=clock)
    return hub, changes


def report_body(node: str = "n1", **overrides: Any) -> dict[str, Any]:
    """A valid report body, with top-level keys overridden."""
    body: dict[str, Any] = {
        "node": node,
        "agent_version": "0.1.0",
        "time": 1.0,
        "interval_s": 2.0,
        "nvml": True,
        "gpus": [
            {"index": 0, "name": "GPU-A", "total_mb": 80_000, "used_mb": 1_000, "util_pct": 10.0},
            {"index": 1, "name": "GPU-B", "total_mb": 40_000, "used_mb": 500, "util_pct": None},
        ],
        "gpu_error": "",
        "mistralrs": {"up": True, "models": [{"id": "m", "status": "loaded"}], "error": ""},
        "results": [],
    }
    body.update(overrides)
    return body


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until(predicate: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


# -- NVML -------------------------------------------------------------------------------------------------


@dataclass
class FakeGpu:
    name: str | bytes
    total_mb: int
    used_mb: int
    util: int | None = 0
    """None: utilisation not supported."""
    broken: bool = False
    """Memory reads fail with GPU_IS_LOST."""


@dataclass
class FakeNvml:
    """Replaces the pynvml functions cortex.agent.nvml uses (at that module's boundary)."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: Exception | None = None
    inits: int = 0
    shutdowns: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        target = pynvml  # the very module cortex.agent.nvml calls into
        monkeypatch.setattr(target, "nvmlInit", self.init)
        monkeypatch.setattr(target, "nvmlShutdown", self.shutdown)
        monkeypatch.setattr(target, "nvmlDeviceGetCount", lambda: len(self.gpus))
        monkeypatch.setattr(target, "nvmlDeviceGetHandleByIndex", self.handle)
        monkeypatch.setattr(target, "nvmlDeviceGetName", lambda h: self.gpus[h].name)
        monkeypatch.setattr(target, "nvmlDeviceGetMemoryInfo", self.memory)
        monkeypatch.setattr(target, "nvmlDeviceGetUtilizationRates", self.utilization)

    def init(self) -> None:
        self.inits += 1
        if self.init_error is not None:
            raise self.init_error

    def shutdown(self) -> None:
        self.shutdowns += 1

    def handle(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def memory(self, handle: int) -> SimpleNamespace:
        gpu = self.gpus[handle]
        if gpu.broken:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return SimpleNamespace(total=gpu.total_mb * MIB, used=gpu.used_mb * MIB, free=0)

    def utilization(self, handle: int) -> SimpleNamespace:
        gpu = self.gpus[handle]
        if gpu.util is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=gpu.util, memory=0)


# -- HTTP servers -----------------------------------------------------------------------------------------


class LoopbackServer:
    """An aiohttp app on 127.0.0.1 (aiohttp's examples/fake_server.py shape): start() → port, stop()."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.port = 0

    async def start(self, port: int = 0) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_mistralrs() -> tuple[str, Callable[[], Awaitable[None]]]:
    """The project's simulated mistral.rs node with a loaded ``m`` and an unloaded ``u``. Returns URL, stop."""
    node = SimNode([SimModel("m", 1000), SimModel("u", 500, loaded=False)])
    port = await node.start()
    return f"http://127.0.0.1:{port}", node.stop


class HubGateway(LoopbackServer):
    """The one gateway route the agent uses, wired to an :class:`AgentHub` the way the real gateway is."""

    def __init__(self, hub: AgentHub) -> None:
        self.hub = hub
        self.statuses: list[int] = []
        self.arrivals: list[float] = []
        """Monotonic arrival time of every report."""
        app = web.Application()
        app.router.add_post("/admin/agents/{node}/report", self._report)
        super().__init__(app)

    async def _report(self, request: web.Request) -> web.Response:
        try:
            body: object = await request.json()
        except ValueError:
            body = None
        status, data = self.hub.handle_report(request.match_info["node"], request.headers.get("Authorization"), body)
        self.statuses.append(status)
        self.arrivals.append(time.monotonic())
        return web.json_response(data, status=status)


class ScriptedGateway(LoopbackServer):
    """Records every report and answers each with the same, scripted commands."""

    def __init__(self, commands: list[dict[str, Any]], status: int = 200) -> None:
        self.commands = commands
        self.status = status
        self.reports: list[tuple[float, dict[str, Any]]] = []
        """(arrival time, body) of every report."""
        self.authorizations: list[str | None] = []
        app = web.Application()
        app.router.add_post("/admin/agents/{node}/report", self._report)
        super().__init__(app)

    async def _report(self, request: web.Request) -> web.Response:
        self.reports.append((time.time(), await request.json()))
        self.authorizations.append(request.headers.get("Authorization"))
        if self.status != 200:
            return web.json_response({"error": {"message": "scripted", "type": "x"}}, status=self.status)
        return web.json_response({"commands": self.commands})

    def results(self) -> list[dict[str, Any]]:
        """Every command result in every report, in arrival order."""
        return [result for _, body in self.reports for result in body["results"]]
