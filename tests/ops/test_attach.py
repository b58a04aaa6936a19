"""``cortex attach``: the console on a gateway running elsewhere, through its admin API (issue 16 §2).

The console runs under Pilot on :class:`~cortex.remote.RemoteEngine`; the gateway is a real headless
``cortex --no-tui`` process (the first test) or an in-process one that goes away and comes back on the
same port (the reconnect test).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cortex.config import GatewaySettings, NodeSettings, PollSettings, Settings
from cortex.engine import commands, events
from cortex.engine.engine import Engine
from cortex.proxy.app import serve
from cortex.remote import RemoteEngine, event_from_json, snapshot_from_json
from cortex.sim import SimModel, SimNode
from cortex.tui.app import CortexApp
from cortex.tui.messages import CommandFinished, EngineEventReceived
from cortex.tui.widgets.fleet_table import FleetTable
from tests.cli.helpers import Gateway
from tests.tui.fakes import build_fleet
from tests.tui.pilots import Messages, select, settle

SIZE = (120, 40)


async def until(predicate: Callable[[], object], what: str, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def node_status(app: CortexApp, name: str) -> str:
    table = app.dashboard.query_one("#nodes", FleetTable)
    return table.cell_text(table.keys.index(name), "status")


@pytest.mark.slow
async def test_attach_drives_a_headless_gateway(tmp_path: Path) -> None:
    sim = SimNode([SimModel("m1", 1000), SimModel("m2", 1000)], name="a", vram_mb=8192, load_s=0.05)
    await sim.start()
    config = tmp_path / "gw.toml"
    config.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\n[poll]\ninterval_s = 0.2\n'
        f'[[nodes]]\nname = "a"\nendpoint = "{sim.url}"\nvram_mb = 8192\n'
    )
    gateway = await Gateway.start(tmp_path, "--config", str(config))
    messages = Messages()
    try:
        async with RemoteEngine(gateway.url, refresh_s=0.2) as remote:
            await until(lambda: remote.snapshot().node("a") is not None, "the first snapshot")
            app = CortexApp(remote, Settings(), gateway_url=gateway.url, clock=remote.clock, attached=True)
            async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
                await until(lambda: node_status(app, "a") == "up", "node a up on screen")
                assert app.dashboard.query_one("#models", FleetTable).keys == ["m1", "m2"]
                await select(pilot, "node", "a")
                await pilot.press("d")  # drain, through POST /admin/nodes/a/drain
                await settle(pilot)
                [finished] = [m for m in messages if isinstance(m, CommandFinished)]
                assert finished.result is not None
                assert finished.result.ok, finished.result.message
                # The gateway's event comes back over SSE; the table follows the next snapshot.
                await until(
                    lambda: any(
                        isinstance(m, EngineEventReceived) and isinstance(m.event, events.NodeStatusChanged)
                        for m in messages
                    ),
                    "the node_status event over the link",
                )
                await until(lambda: node_status(app, "a") == "draining", "node a draining on screen")
                assert app.engine.link_status() == ""  # type: ignore[attr-defined]
                await pilot.press("q")  # attached: quits at once, the gateway keeps running
            assert app.return_code == 0
        assert gateway.proc.returncode is None
        assert await gateway.terminate(15) == 0
    finally:
        await gateway.kill()
        await sim.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_console_says_when_the_gateway_goes_and_reconnects_when_it_is_back(tmp_path: Path) -> None:
    sim = SimNode([SimModel("m1", 1000)], name="a", vram_mb=8192, load_s=0.05)
    await sim.start()
    port = free_port()
    settings = Settings(
        gateway=GatewaySettings(listen=f"127.0.0.1:{port}", metrics_listen="", drain_s=0.5),
        poll=PollSettings(interval_s=0.1),
        nodes=[NodeSettings(name="a", endpoint=sim.url, vram_mb=8192)],
    )
    url = f"http://127.0.0.1:{port}"
    messages = Messages()
    try:
        async with Engine(settings, state_path=tmp_path / "state.json") as engine:
            server = serve(engine)
            await server.__aenter__()
            async with RemoteEngine(url, refresh_s=0.2) as remote:
                app = CortexApp(remote, settings, gateway_url=url, clock=remote.clock, attached=True)
                async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
                    await until(lambda: remote.connects == 1 and remote.link_status() == "", "the link up")
                    await server.__aexit__(None, None, None)  # the gateway goes away
                    await until(lambda: remote.link_status().startswith("reconnecting in"), "the link down")
                    await until(lambda: "reconnecting in" in str(app.dashboard.header.render()), "the header")
                    notes = [n.message for n in messages.notifications()]
                    assert any(n.startswith(f"lost the gateway at {url}: reconnecting in") for n in notes), notes
                    assert remote.snapshot().node("a") is not None  # the last fleet stays on screen
                    server = serve(engine)
                    await server.__aenter__()  # back on the same port
                    await until(lambda: remote.connects == 2 and remote.link_status() == "", "the reconnect")
                    await until(
                        lambda: any(n.message == f"connected to {url}" for n in messages.notifications()),
                        "the reconnected notice",
                    )
                    await until(lambda: "reconnecting" not in str(app.dashboard.header.render()), "a clean header")
                    await pilot.pause()
            await server.__aexit__(None, None, None)
    finally:
        await sim.stop()


async def test_commands_fail_cleanly_when_the_gateway_is_unreachable() -> None:
    async with RemoteEngine(f"http://127.0.0.1:{free_port()}") as remote:
        result = await remote.submit(commands.DrainNode("a"))
        assert not result.ok
        assert result.message.startswith("cannot reach the gateway at http://127.0.0.1:")
        await until(lambda: remote.link_status().startswith("reconnecting in"), "the first failed try")


def test_snapshots_and_events_survive_the_json_round_trip() -> None:
    fleet = build_fleet()
    assert snapshot_from_json(fleet.to_json()) == fleet
    for event in (
        events.NodeWentDown("a", "refused", at=1.0),
        events.ModelLoaded("a", "m1", 2.5, at=2.0),
        events.RequestCompleted(fleet.requests[0], at=3.0),
        events.ConfigReloaded(False, "refused", errors=("nodes[0].endpoint: not a URL",), at=4.0),
    ):
        assert event_from_json(event.to_json()) == event
    assert event_from_json({"kind": "from-the-future", "at": 1.0}) is None
