"""Helpers for the lifecycle integration tests: settings, a running gateway, bounded waits, sim records."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from cortex.config import (
    EvictionSettings,
    GatewaySettings,
    ModelSettings,
    NodeSettings,
    PollSettings,
    Settings,
)
from cortex.engine.engine import Engine
from cortex.engine.state import NodeSnapshot, SlotState
from cortex.proxy.app import Servers, serve
from cortex.sim import RecordedRequest, SimNode

RELOAD = "/v1/models/reload"
UNLOAD = "/v1/models/unload"
CHAT = "/v1/chat/completions"


def node_cfg(sim: SimNode, *, vram_mb: int | None = None, pinned: Sequence[str] = ()) -> NodeSettings:
    """The config of a simulated node (same name, its URL, its VRAM unless given)."""
    return NodeSettings(name=sim.name, endpoint=sim.url, vram_mb=vram_mb or sim.vram_mb, pinned=list(pinned))


def make_settings(
    nodes: Sequence[NodeSettings],
    models: Sequence[ModelSettings] = (),
    *,
    queue_timeout_s: float = 5.0,
    max_queue: int = 1024,
    admin_token: str = "",
    strategy: str = "lru",
    idle_ttl_s: float = 0.0,
    headroom_mb: int = 0,
    min_resident_s: float = 0.0,
    defrag_after_cycles: int = 0,
    poll_s: float = 0.1,
) -> Settings:
    """Settings for a loopback gateway with fast polls and no metrics listener."""
    return Settings(
        gateway=GatewaySettings(
            listen="127.0.0.1:0",
            metrics_listen="",
            queue_timeout_s=queue_timeout_s,
            max_queue=max_queue,
            admin_token=admin_token,
            drain_s=1.0,
        ),
        poll=PollSettings(interval_s=poll_s, timeout_s=2.0),
        eviction=EvictionSettings(
            strategy=strategy,
            idle_ttl_s=idle_ttl_s,
            headroom_mb=headroom_mb,
            min_resident_s=min_resident_s,
            defrag_after_cycles=defrag_after_cycles,
        ),
        nodes=list(nodes),
        models=list(models),
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, state_path: Path) -> AsyncIterator[tuple[Engine, Servers]]:
    """An engine and its gateway on loopback, ready (every node polled once); both stopped on exit."""
    async with Engine(settings, state_path=state_path) as eng, serve(eng) as srv:
        await asyncio.wait_for(eng.ready.wait(), 5)
        yield eng, srv


async def wait_until(pred: Callable[[], bool], what: str, within: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``pred`` until true; fail the test with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for: {what}")
        await asyncio.sleep(interval)


def slot_state(eng: Engine, node: str, model: str) -> SlotState | None:
    snap = eng.snapshot().node(node)
    slot = snap.slot(model) if snap is not None else None
    return slot.state if slot is not None else None


def snap_node(eng: Engine, node: str) -> NodeSnapshot:
    snap = eng.snapshot().node(node)
    assert snap is not None
    return snap


def recorded(sim: SimNode, path: str, model: str | None = None) -> list[RecordedRequest]:
    """The requests ``sim`` received on ``path`` (for ``model`` when given)."""
    out = []
    for req in sim.requests:
        if req.path != path:
            continue
        body = req.json if isinstance(req.json, dict) else {}
        if model is None or body.get("model_id", body.get("model")) == model:
            out.append(req)
    return out


def chat_body(model: str, *, stream: bool = False, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


async def chat(
    http: aiohttp.ClientSession, srv: Servers, model: str, *, max_tokens: int = 4
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A unary chat request: (status, headers, JSON body)."""
    async with http.post(srv.url + CHAT, json=chat_body(model, max_tokens=max_tokens)) as resp:
        body = await resp.json(content_type=None)
        return resp.status, dict(resp.headers), body


async def admin(
    http: aiohttp.ClientSession, srv: Servers, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST an admin command (JSON body) and return (status, reply)."""
    async with http.post(srv.url + path, json=body or {}) as resp:
        return resp.status, await resp.json(content_type=None)
