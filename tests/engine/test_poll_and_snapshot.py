"""Polling: nodes go down after `poll.down_after` failures and up after one good poll; the snapshot follows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from cortex.config import GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.engine.events import Event, ModelLoaded, ModelUnloaded, NodeWentDown, NodeWentUp
from cortex.engine.state import NodeStatus, SlotState
from cortex.sim import SimModel, SimNode
from tests.conftest import FleetFactory, NodeSpec

E = TypeVar("E", bound=Event)


class Recorder:
    """Collects engine events from the moment it is started."""

    def __init__(self, engine: Engine) -> None:
        self.events: list[Event] = []
        self._stream = engine.subscribe()
        self._task: asyncio.Task[None] | None = None
        self._new = asyncio.Event()

    async def _run(self) -> None:
        async for event in self._stream:
            self.events.append(event)
            self._new.set()

    async def __aenter__(self) -> Recorder:
        self._task = asyncio.ensure_future(self._run())
        for _ in range(3):  # let the generator register its queue
            await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait(self, kind: type[E], limit_s: float = 5.0, **fields: object) -> E:
        """The first recorded event of ``kind`` whose attributes match ``fields``."""
        deadline = asyncio.get_running_loop().time() + limit_s
        while True:
            for event in self.events:
                if isinstance(event, kind) and all(getattr(event, k) == v for k, v in fields.items()):
                    return event
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no {kind.__name__} {fields} in {self.events}")
            self._new.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new.wait(), remaining)


@contextlib.asynccontextmanager
async def recording(engine: Engine) -> AsyncIterator[Recorder]:
    async with Recorder(engine) as rec:
        yield rec


async def test_down_after_n_failed_polls_and_up_after_one_good_poll(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000)]),
        NodeSpec("b", [SimModel("m1", 1000)]),
        poll={"interval_s": 0.1, "down_after": 3, "timeout_s": 0.5},
    )
    sim = f.sim("a")
    port = sim.port
    assert f.engine.snapshot().node("a").status is NodeStatus.UP  # type: ignore[union-attr]
    seen: list[tuple[int, NodeStatus]] = []

    async def watch() -> None:
        while True:
            node = f.engine.snapshot().node("a")
            assert node is not None
            seen.append((node.failures, node.status))
            await asyncio.sleep(0.01)

    async with recording(f.engine) as rec:
        watcher = asyncio.ensure_future(watch())
        try:
            await sim.stop()
            down = await rec.wait(NodeWentDown, node="a")
            assert "a" in down.node
            assert down.reason
            node = f.engine.snapshot().node("a")
            assert node is not None
            assert node.status is NodeStatus.DOWN
            assert node.failures >= 3
            assert node.last_error
            # Fewer than down_after failures never took the node out of routing.
            assert all(status is NodeStatus.UP for failures, status in seen if failures < 3), seen
            assert any(failures in (1, 2) for failures, _ in seen), seen
            assert not [e for e in rec.events if isinstance(e, NodeWentDown) and e.node == "b"]

            revived = SimNode([SimModel("m1", 1000)], name="a", port=port, vram_mb=8192, tok_s=0)
            await revived.start()
            try:
                await rec.wait(NodeWentUp, node="a")
                node = f.engine.snapshot().node("a")
                assert node is not None
                assert node.status is NodeStatus.UP
                assert node.failures == 0
                assert node.last_error == ""
                kinds = [(type(e).__name__, getattr(e, "node", None)) for e in rec.events]
                assert kinds.index(("NodeWentDown", "a")) < kinds.index(("NodeWentUp", "a"))
                status, _, headers = await f.post(
                    "/v1/chat/completions",
                    {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
                )
                assert status == 200
                assert headers["x-cortex-node"] == "a"
            finally:
                await revived.stop()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_restart_on_the_same_port_is_seen(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), poll={"interval_s": 0.05, "down_after": 1})
    async with recording(f.engine) as rec:
        await f.sim("a").restart(down_s=0.3)
        await rec.wait(NodeWentDown, node="a")
        await rec.wait(NodeWentUp, node="a")
    assert f.engine.snapshot().node("a").status is NodeStatus.UP  # type: ignore[union-attr]


async def test_snapshot_vram_follows_system_info(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("m2", 2000, loaded=False)], vram_mb=8192),
        poll={"interval_s": 0.05},
    )
    sim = f.sim("a")
    node = f.engine.snapshot().node("a")
    assert node is not None
    assert node.vram_source == "system_info"
    assert node.vram_total_mb == 8192
    assert node.vram_used_mb == sim.used_vram_mb() == 300 + 1000
    assert node.version == "0.9.2"

    async with recording(f.engine) as rec:
        # Load m2 behind cortex's back: the next poll sees the memory and the model.
        async with f.http.post(sim.url + "/v1/models/reload", json={"model_id": "m2"}) as resp:
            assert (await resp.json())["status"] == "loaded"
        await rec.wait(ModelLoaded, node="a", model="m2")
        await f.wait_for(lambda: f.engine.snapshot().node("a").vram_used_mb == 3300, what="3300 MiB used")  # type: ignore[union-attr]
        slot = f.engine.snapshot().node("a").slot("m2")  # type: ignore[union-attr]
        assert slot is not None
        assert slot.state is SlotState.LOADED

        async with f.http.post(sim.url + "/v1/models/unload", json={"model_id": "m1"}) as resp:
            assert (await resp.json())["status"] == "unloaded"
        await rec.wait(ModelUnloaded, node="a", model="m1")
        await f.wait_for(lambda: f.engine.snapshot().node("a").vram_used_mb == 2300, what="2300 MiB used")  # type: ignore[union-attr]

        sim.vram_mb = 16384  # a bigger device reported
        await f.wait_for(lambda: f.engine.snapshot().node("a").vram_total_mb == 16384, what="total 16384")  # type: ignore[union-attr]
    snap = f.engine.snapshot()
    model = snap.model("m2")
    assert model is not None
    assert model.state == "loaded"
    assert model.nodes == ("a",)
    assert snap.model("m1").state == "unloaded"  # type: ignore[union-attr]
    assert snap.to_json()["nodes"][0]["vram_free_mb"] == 16384 - 512 - 2300


async def test_snapshot_without_system_info_uses_the_config_and_footprints() -> None:
    """A node that answers no system info: total from `vram_mb`, used from the known footprints."""
    from aiohttp import web

    async def models(_r: web.Request) -> web.Response:
        data = [
            {"id": "default", "object": "model", "created": 1, "owned_by": "local"},
            {"id": "m1", "object": "model", "created": 1, "owned_by": "local", "status": "loaded"},
            {"id": "m2", "object": "model", "created": 1, "owned_by": "local", "status": "unloaded"},
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(_r: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        settings = Settings(
            gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen=""),
            poll=PollSettings(interval_s=0.1),
            nodes=[NodeSettings(name="old", endpoint=f"http://127.0.0.1:{site.port}", vram_mb=10000)],
            models=[ModelSettings(id="m1", vram_mb=3000), ModelSettings(id="m2", vram_mb=1000)],
        )
        async with Engine(settings, state_path=None) as engine:
            await asyncio.wait_for(engine.ready.wait(), 5)
            node = engine.snapshot().node("old")
            assert node is not None
            assert node.status is NodeStatus.UP
            assert (node.vram_source, node.vram_total_mb, node.vram_used_mb) == ("estimate", 10000, 3000)
            assert {s.model_id: s.state for s in node.slots} == {"m1": SlotState.LOADED, "m2": SlotState.UNLOADED}
    finally:
        await runner.cleanup()
