"""A real gateway over a simulated node, and real traffic through it, for the what-if tests.

One node ``a`` lists three models of which two fit at once, so a short sequence makes the engine load and
evict; the gateway records its traffic (``[gateway] record``) so a test can replay the very file
``cortex replay`` would read and compare with what the console shows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import openai
from pydantic import SecretStr

from cortex.config import EvictionSettings, GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import serve
from cortex.replay import FleetSpec, ModelSpec, NodeSpec
from cortex.sim import SimModel, SimNode

MB = 3000
VRAM = 8192
MODELS = ("m1", "m2", "m3")
SEQUENCE = ("m1", "m2", "m3", "m1", "m2")
"""Loads m1, m2, m3 (evicting m1), m1 (evicting m2), m2 (evicting m3): m1 and m2 twice, m3 once."""


@dataclass
class Live:
    """The running gateway."""

    engine: Engine
    url: str
    settings: Settings
    record: Path


@contextlib.asynccontextmanager
async def live_gateway(tmp_path: Path, *, token: str = "") -> AsyncIterator[Live]:
    """Engine and gateway over node ``a`` (all models unloaded), recording to ``tmp_path/traffic.jsonl``."""
    sim = SimNode([SimModel(m, MB, loaded=False) for m in MODELS], name="a", vram_mb=VRAM, base_vram_mb=0, load_s=0.05)
    await sim.start()
    record = tmp_path / "traffic.jsonl"
    settings = Settings(
        gateway=GatewaySettings(
            listen="127.0.0.1:0", metrics_listen="", record=str(record), admin_token=SecretStr(token)
        ),
        poll=PollSettings(interval_s=0.2),
        eviction=EvictionSettings(strategy="lru"),  # the live loads below are lru's, whatever the default
        nodes=[NodeSettings(name="a", endpoint=sim.url, vram_mb=VRAM)],
        models=[ModelSettings(id=m, vram_mb=MB) for m in MODELS],
    )
    try:
        async with Engine(settings, state_path=tmp_path / "state.json") as engine, serve(engine) as servers:
            await asyncio.wait_for(engine.ready.wait(), 5)
            yield Live(engine, servers.url, settings, record)
    finally:
        await sim.stop()


async def drive(live: Live, sequence: Sequence[str] = SEQUENCE) -> None:
    """Send the requests one after the other (OpenAI SDK) and write the record out."""
    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    try:
        for model in sequence:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert reply.choices[0].message.content
            await asyncio.sleep(0.05)
    finally:
        await client.close()
    await asyncio.sleep(0.05)  # the engine counts loads from its events, a loop turn after they happen
    assert live.engine.recorder is not None
    await live.engine.recorder.flush()


def hand_fleet(live: Live) -> FleetSpec:
    """The fleet as written by hand from the setup, with the load times the engine measured."""
    measured = live.engine.history.load_seconds()
    mean = sum(measured.values()) / len(measured)
    return FleetSpec(
        nodes=(NodeSpec("a", VRAM, MODELS),),
        models=tuple(ModelSpec(m, MB, measured.get(m, mean)) for m in MODELS),
    )
