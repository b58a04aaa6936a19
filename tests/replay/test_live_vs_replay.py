"""Replay and the live engine make the same decisions on the same sequence (issue 14 §6).

A real gateway (in-process, real sockets) over two simulated nodes serves a short scripted sequence of
requests for four models on nodes where only two (on ``a``) and one (on ``b``) fit at once. The requests
are sequential and spaced, so nothing overlaps and the outcome does not hang on timing jitter. The live
decisions (each node's loads and evictions, in order) come from the engine's own events; the trace comes
from the traffic record (``[gateway] record``), as ``cortex replay`` reads it; the replay runs on the
same fleet. Both must agree exactly, and a replay under another strategy must not (so the comparison can
fail).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai

from cortex.config import EvictionSettings, GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine import events
from cortex.engine.engine import Engine
from cortex.proxy.app import serve
from cortex.replay import FleetSpec, ModelSpec, NodeSpec, read_trace, replay
from cortex.sim import SimModel, SimNode

MB = 3000
"""Every model's size: two fit on ``a`` (8 GiB less 512 MiB headroom), one on ``b`` (4 GiB)."""
SEQUENCE = ("m1", "m2", "m3", "m1", "m4", "m3", "m2", "m1", "m4", "m3", "m1", "m2", "m4")
LISTS = {"a": ("m1", "m2", "m3"), "b": ("m3", "m4")}
VRAM = {"a": 8192, "b": 4096}
PRIORITY = {"m1": 10}
"""Only the ``priority`` strategy cares: it keeps m1 where lru would evict it."""

Decisions = dict[str, list[tuple[str, str]]]


def per_node(actions: list[tuple[str, str, str]]) -> Decisions:
    out: Decisions = {name: [] for name in LISTS}
    for action, node, model in actions:
        out[node].append((action, model))
    return out


async def test_replay_makes_the_live_engines_loads_and_evictions(tmp_path: Path) -> None:
    sims = {
        name: SimNode(
            [SimModel(m, MB, loaded=False) for m in models],
            name=name,
            vram_mb=VRAM[name],
            base_vram_mb=0,  # the replay's nodes report exactly the loaded footprints
            load_s=0.05,
            tok_s=500.0,
        )
        for name, models in LISTS.items()
    }
    for sim in sims.values():
        await sim.start()
    record = tmp_path / "traffic.jsonl"
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="", record=str(record)),
        poll=PollSettings(interval_s=0.2),
        eviction=EvictionSettings(strategy="lru"),
        nodes=[NodeSettings(name=n, endpoint=sims[n].url, vram_mb=VRAM[n]) for n in LISTS],
        models=[ModelSettings(id=f"m{i}", vram_mb=MB, priority=PRIORITY.get(f"m{i}", 0)) for i in range(1, 5)],
    )
    live: list[tuple[str, str, str]] = []
    try:
        async with Engine(settings, state_path=tmp_path / "state.json") as engine, serve(engine) as servers:
            await asyncio.wait_for(engine.ready.wait(), 5)

            async def watch() -> None:
                async for event in engine.subscribe(requests=False):
                    if isinstance(event, events.ModelLoaded) and event.seconds is not None:
                        live.append(("load", event.node, event.model))
                    elif isinstance(event, events.ModelUnloaded) and event.reason != "external":
                        live.append(("unload", event.node, event.model))

            watcher = asyncio.ensure_future(watch())
            await asyncio.sleep(0)
            client = openai.AsyncOpenAI(base_url=servers.url + "/v1", api_key="unused", max_retries=0)
            try:
                for model in SEQUENCE:
                    reply = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                    )
                    assert reply.choices[0].message.content
                    await asyncio.sleep(0.1)  # spaced: each request starts after the last one's load and reply
            finally:
                await client.close()
                watcher.cancel()
            assert engine.recorder is not None
            await engine.recorder.flush()
            measured = engine.history.load_seconds()
    finally:
        for sim in sims.values():
            await sim.stop()

    decisions = per_node(live)
    evictions = [a for a in live if a[0] == "unload"]
    assert len(evictions) >= 4, live  # the sequence makes the engine choose victims, not just load
    trace = read_trace(record)
    assert [r.model for r in trace] == list(SEQUENCE)
    fleet = FleetSpec(
        nodes=tuple(NodeSpec(n, VRAM[n], models) for n, models in LISTS.items()),
        models=tuple(ModelSpec(m, MB, measured.get(m, 0.05), PRIORITY.get(m, 0)) for m in ("m1", "m2", "m3", "m4")),
    )
    # In a worker thread, as the console's what-if runs it (a replay runs its own loop).
    replayed = await asyncio.to_thread(replay, trace, fleet, "lru", base=settings)
    assert per_node(replayed.actions) == decisions
    assert replayed.loads == sum(1 for a in live if a[0] == "load")
    assert replayed.failed == 0

    # The comparison can fail: the priority strategy keeps m1 on a, and its decisions differ.
    other = await asyncio.to_thread(replay, trace, fleet, "priority", base=settings)
    assert per_node(other.actions) != decisions
