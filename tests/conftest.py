"""Shared fixtures: a whole in-process fleet (simulated nodes + engine + gateway) on loopback sockets.

``fleet`` is a factory: each call starts the simulated nodes it is given, an :class:`Engine` over them
(state file under ``tmp_path``) and the gateway on an ephemeral port, waits until every node was polled,
and hands back a :class:`Fleet` with the URLs, the nodes, an aiohttp session and an OpenAI client. The
fixture stops everything it started, in reverse order, whatever the test did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import pytest

from cortex.config import GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import Servers, serve
from cortex.sim import SimModel, SimNode

if TYPE_CHECKING:
    import openai

WAIT_S = 5.0
"""Upper bound of every wait on the fleet (readiness, a poll, a state change)."""


@pytest.fixture(autouse=True)
def _state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep state files (learned footprints, live pins) out of the real home directory."""
    state = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@dataclass
class NodeSpec:
    """One simulated node of a test fleet, and how the gateway's config describes it."""

    name: str
    models: Sequence[SimModel]
    vram_mb: int = 8192
    pinned: Sequence[str] = ()
    load_s: float = 0.05
    tok_s: float = 0.0
    sim: dict[str, Any] = field(default_factory=dict)
    """Extra SimNode keyword arguments (``max_seq_len``, ``keepalive_s``...)."""


@dataclass
class Fleet:
    """A running test fleet."""

    engine: Engine
    servers: Servers
    sims: dict[str, SimNode]
    settings: Settings
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return self.servers.url

    def sim(self, name: str) -> SimNode:
        return self.sims[name]

    def openai(self, api_key: str = "none", **kwargs: Any) -> openai.AsyncOpenAI:
        """An official OpenAI SDK client pointed at the gateway (no retries, so failures show)."""
        import openai  # slow to import: only the tests that use it pay

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10.0)
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, **kwargs)

    def inference_requests(self, name: str, path: str = "/v1/chat/completions") -> list[Any]:
        """The requests a simulated node received on an inference path."""
        return [r for r in self.sims[name].requests if r.path == path]

    async def wait_for(self, predicate: Any, limit_s: float = WAIT_S, what: str = "condition") -> None:
        """Poll ``predicate()`` every 20 ms until it is true (bounded)."""
        deadline = asyncio.get_running_loop().time() + limit_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def post(self, path: str, body: object, **kwargs: Any) -> tuple[int, Any, Any]:
        """POST JSON to the gateway; returns (status, decoded body or text, headers)."""
        async with self.http.post(self.url + path, json=body, **kwargs) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text), resp.headers
            except ValueError:
                return resp.status, text, resp.headers


class FleetFactory(Protocol):
    async def __call__(
        self,
        *nodes: NodeSpec,
        models: Sequence[ModelSettings] = (),
        gateway: dict[str, Any] | None = None,
        poll: dict[str, Any] | None = None,
        wait_ready: bool = True,
    ) -> Fleet: ...


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FleetFactory]:
    """Start simulated nodes, an engine and the gateway; stop all of it at teardown."""
    async with contextlib.AsyncExitStack() as stack:
        count = 0

        async def factory(
            *nodes: NodeSpec,
            models: Sequence[ModelSettings] = (),
            gateway: dict[str, Any] | None = None,
            poll: dict[str, Any] | None = None,
            wait_ready: bool = True,
        ) -> Fleet:
            nonlocal count
            count += 1
            sims: dict[str, SimNode] = {}
            for spec in nodes:
                sim = SimNode(
                    list(spec.models),
                    name=spec.name,
                    vram_mb=spec.vram_mb,
                    load_s=spec.load_s,
                    tok_s=spec.tok_s,
                    **spec.sim,
                )
                await sim.start()
                stack.push_async_callback(sim.stop)
                sims[spec.name] = sim
            settings = Settings(
                gateway=GatewaySettings(
                    **{"listen": "127.0.0.1:0", "metrics_listen": "", "drain_s": 2.0, **(gateway or {})}
                ),
                poll=PollSettings(**{"interval_s": 0.1, "timeout_s": 1.0, **(poll or {})}),
                nodes=[
                    NodeSettings(name=s.name, endpoint=sims[s.name].url, vram_mb=s.vram_mb, pinned=list(s.pinned))
                    for s in nodes
                ],
                models=list(models),
            )
            engine = await stack.enter_async_context(Engine(settings, state_path=tmp_path / f"state-{count}.json"))
            servers = await stack.enter_async_context(serve(engine))
            http = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)))
            if wait_ready:
                await asyncio.wait_for(engine.ready.wait(), WAIT_S)
            return Fleet(engine, servers, sims, settings, http)

        yield factory
