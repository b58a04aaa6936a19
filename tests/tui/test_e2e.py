"""The real console on the real engine and gateway, over simulated nodes: a key press reaches a node."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cortex.config import GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import serve
from cortex.sim import SimModel, SimNode
from cortex.tui.app import CortexApp
from cortex.tui.screens.confirm import ConfirmScreen
from tests.tui.pilots import select, settle


async def test_pressing_u_and_confirming_unloads_on_the_node(tmp_path: Path) -> None:
    node = SimNode([SimModel("m1", 2000), SimModel("m2", 2000)], name="a", vram_mb=8192, load_s=0.05)
    await node.start()
    try:
        settings = Settings(
            gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen=""),
            poll=PollSettings(interval_s=0.2),
            nodes=[NodeSettings(name="a", endpoint=node.url, vram_mb=8192, pinned=["m1"])],
            models=[ModelSettings(id="m1", vram_mb=2000), ModelSettings(id="m2", vram_mb=2000)],
        )
        async with Engine(settings, state_path=tmp_path / "state.json") as engine, serve(engine) as servers:
            await asyncio.wait_for(engine.ready.wait(), 5)
            app = CortexApp(engine, settings, gateway_url=servers.url)
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.pause(0.5)  # a refresh tick puts the engine's models in the table
                await select(pilot, "model", "m2")
                await pilot.press("u")
                assert isinstance(app.screen, ConfirmScreen)
                await pilot.press("y")
                await settle(pilot)
                unloads = [r for r in node.requests if r.path == "/v1/models/unload"]
                assert [r.json for r in unloads] == [{"model_id": "m2"}]
                assert node.model_status("m2") == "unloaded"
                assert node.model_status("m1") == "loaded"
                slot = engine.snapshot().node("a").slot("m2")  # type: ignore[union-attr]
                assert slot is not None
                assert slot.state.value == "unloaded"
                await pilot.press("q")
    finally:
        await node.stop()
