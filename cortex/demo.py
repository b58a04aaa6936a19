"""``cortex --demo``: three simulated mistral.rs nodes in-process, light traffic, no config, no GPU.

The fleet mirrors the example ``cortex.toml`` (gpu-large 48 GiB, gpu-medium 24 GiB, gpu-small 12 GiB, one
pinned model each), with more models than fit so that the traffic makes cortex load on demand and evict.
The traffic is a real HTTP client talking to the real gateway, so everything the console shows
(loads, evictions, TTFT, tok/s) is what a real client would cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp

from cortex.config import ModelSettings, NodeSettings, Settings
from cortex.sim import SimModel, SimNode

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["DEMO_FLEET", "DemoFleet"]

log = logging.getLogger(__name__)

# node name → (VRAM MiB, [(model id, MiB, loaded at start)], pinned model)
DEMO_FLEET: dict[str, tuple[int, list[tuple[str, int, bool]], str]] = {
    "gpu-large": (
        49152,
        [
            ("Qwen/Qwen3-32B", 20480, True),
            ("meta-llama/Llama-3.3-70B-Instruct-Q3", 26624, False),
            ("Qwen/Qwen2.5-Coder-32B-Instruct", 20480, False),
        ],
        "Qwen/Qwen3-32B",
    ),
    "gpu-medium": (
        24576,
        [
            ("Qwen/Qwen3-14B", 10240, True),
            ("mistralai/Devstral-Small-2505", 12288, False),
            ("google/gemma-3-12b-it", 9216, False),
            ("Qwen/Qwen3-4B", 4096, True),
        ],
        "Qwen/Qwen3-14B",
    ),
    "gpu-small": (
        12288,
        [
            ("Qwen/Qwen3-Embedding-0.6B", 1536, True),
            ("microsoft/Phi-4-mini-instruct", 4608, False),
            ("google/gemma-3-4b-it", 4096, False),
            ("Qwen/Qwen3-4B", 4096, False),
        ],
        "Qwen/Qwen3-Embedding-0.6B",
    ),
}
_ALIASES = {
    "meta-llama/Llama-3.3-70B-Instruct-Q3": ["claude-opus-*", "gpt-4o"],
    "Qwen/Qwen3-32B": ["claude-sonnet-*"],
    "Qwen/Qwen3-4B": ["claude-haiku-*", "gpt-4o-mini"],
}


class DemoFleet:
    """Starts and stops the simulated nodes; drives the synthetic traffic."""

    @staticmethod
    @contextlib.asynccontextmanager
    async def maybe(enabled: bool, settings: Settings) -> AsyncIterator[Settings]:
        """Yield ``settings`` unchanged, or settings for a freshly started simulated fleet."""
        if not enabled:
            yield settings
            return
        sims: list[SimNode] = []
        try:
            nodes: list[NodeSettings] = []
            facts: dict[str, ModelSettings] = {}
            for name, (vram, models, pinned) in DEMO_FLEET.items():
                sim = SimNode(
                    [SimModel(mid, mb, loaded) for mid, mb, loaded in models],
                    name=name,
                    vram_mb=vram,
                    load_s=3.0,
                    tok_s=40.0,
                )
                await sim.start()
                sims.append(sim)
                nodes.append(NodeSettings(name=name, endpoint=sim.url, vram_mb=vram, pinned=[pinned]))
                for mid, mb, _ in models:
                    facts.setdefault(
                        mid,
                        ModelSettings(
                            id=mid, vram_mb=mb, aliases=_ALIASES.get(mid, []), priority=10 if mid == pinned else 0
                        ),
                    )
            eviction = settings.eviction.model_copy(update={"min_resident_s": 10.0, "defrag_after_cycles": 25})
            gateway = settings.gateway
            if "CORTEX_GATEWAY__LISTEN" not in os.environ and gateway.listen == "0.0.0.0:8000":
                # A demo is for this machine: loopback unless the user asked for more.
                gateway = gateway.model_copy(update={"listen": "127.0.0.1:8000", "metrics_listen": "127.0.0.1:9100"})
            yield settings.model_copy(
                update={"nodes": nodes, "models": list(facts.values()), "eviction": eviction, "gateway": gateway}
            )
        finally:
            for sim in sims:
                await sim.stop()

    @staticmethod
    async def traffic(base_url: str, engine: Engine, *, seed: int | None = None) -> None:
        """Light synthetic traffic (a request every second or two) until cancelled."""
        rng = random.Random(seed)
        await engine.ready.wait()
        chat_models = [m for _, (_, models, _) in DEMO_FLEET.items() for m, _, _ in models if "Embedding" not in m]
        weights = [6 if m.endswith(("Qwen3-32B", "Qwen3-14B")) else 1 for m in chat_models]
        pending: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            try:
                await _loop(session, base_url, rng, chat_models, weights, pending)
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)


async def _loop(
    session: aiohttp.ClientSession,
    base_url: str,
    rng: random.Random,
    chat_models: list[str],
    weights: list[int],
    pending: set[asyncio.Task[None]],
) -> None:
    while True:
        await asyncio.sleep(rng.uniform(0.6, 2.0))
        body: dict[str, object]
        if rng.random() < 0.1:
            body = {"model": "Qwen/Qwen3-Embedding-0.6B", "input": "hello cortex"}
            path = "/v1/embeddings"
        else:
            body = {
                "model": rng.choices(chat_models, weights)[0],
                "messages": [{"role": "user", "content": "Tell me about the fleet."}],
                "max_tokens": rng.randint(16, 96),
                "stream": rng.random() < 0.7,
            }
            path = "/v1/chat/completions"
        task = asyncio.ensure_future(_one(session, base_url + path, body))
        pending.add(task)
        task.add_done_callback(pending.discard)


async def _one(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
        async with session.post(url, json=body) as resp:
            async for _ in resp.content.iter_any():
                pass
