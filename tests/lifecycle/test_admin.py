"""The admin API and the CLI against a running gateway: pins kept across restarts, events, auth, commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from cortex.config import ModelSettings
from cortex.engine.lifecycle import RestartResult
from cortex.engine.state import NodeStatus, SlotState
from cortex.proxy.admin import check_admin
from cortex.proxy.app import Servers
from cortex.sim import SimModel
from tests.lifecycle.conftest import SimFactory
from tests.lifecycle.support import (
    RELOAD,
    admin,
    make_settings,
    node_cfg,
    recorded,
    running,
    slot_state,
    snap_node,
    wait_until,
)


async def test_live_pin_and_unpin_persist_across_an_engine_restart(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("p", 1000), SimModel("x", 2000, loaded=False)])
    b = await sims("b", [SimModel("x", 2000, loaded=False)])
    state = tmp_path / "state.json"
    settings = make_settings([node_cfg(a, pinned=["p"]), node_cfg(b)], [ModelSettings(id="x", vram_mb=2000)])
    async with running(settings, state) as (eng, srv):
        status, reply = await admin(http, srv, "/admin/models/x/pin", {"node": "a"})
        assert status == 200, reply
        assert reply["ok"]
        assert slot_state(eng, "a", "x") is SlotState.LOADED
        status, reply = await admin(http, srv, "/admin/models/p/unpin")
        assert status == 200, reply
        status, reply = await admin(http, srv, "/admin/models/p/unpin")
        assert status == 409  # not pinned any more
    saved = json.loads(state.read_text())
    assert saved["pins_added"]["a"] == ["x"]
    assert saved["pins_removed"]["a"] == ["p"]
    assert not saved["pins_added"].get("b")
    a.models.unload("x", 0)  # lost while cortex was down: the pin must bring it back
    async with running(settings, state) as (eng, _srv):
        await wait_until(lambda: a.model_status("x") == "loaded", "the live pin reloaded on a after the restart")
        node = snap_node(eng, "a")
        pinned = {s.model_id for s in node.slots if s.pinned}
        assert pinned == {"x"}
        model = eng.snapshot().model("x")
        assert model is not None
        assert model.pinned_on == ("a",)
    assert b.model_status("x") == "unloaded"


async def test_admin_events_deliver_model_loaded(sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    a = await sims("a", [SimModel("x", 2000, loaded=False)])
    async with running(make_settings([node_cfg(a)]), tmp_path / "state.json") as (_eng, srv):
        async with http.get(srv.url + "/admin/events") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(resp.content.readline(), 2)
            assert first.startswith(b":")
            status, reply = await admin(http, srv, "/admin/models/x/load")
            assert status == 200, reply

            async def next_loaded() -> dict[str, object]:
                kind = ""
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:") and kind == "model_loaded":
                        data: dict[str, object] = json.loads(line[5:])
                        return data
                raise AssertionError("the event stream ended")

            event = await asyncio.wait_for(next_loaded(), 5)
        assert event["kind"] == "model_loaded"
        assert event["model"] == "x"
        assert event["node"] == "a"


async def test_admin_auth_with_a_token(sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    a = await sims("a", [SimModel("x", 2000, loaded=False)])
    settings = make_settings([node_cfg(a)], admin_token="s3cret")
    async with running(settings, tmp_path / "state.json") as (_eng, srv):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with http.get(srv.url + "/admin/fleet", headers=headers) as resp:
                assert resp.status == 401, headers
            async with http.post(srv.url + "/admin/models/x/load", json={}, headers=headers) as resp:
                assert resp.status == 401
            async with http.get(srv.url + "/admin/events", headers=headers) as resp:
                assert resp.status == 401
        assert recorded(a, RELOAD) == []
        async with http.get(srv.url + "/admin/fleet", headers={"Authorization": "Bearer s3cret"}) as resp:
            assert resp.status == 200
            fleet = await resp.json()
        assert [n["name"] for n in fleet["nodes"]] == ["a"]
        assert "vram_free_mb" in fleet["nodes"][0]
        # the CLI sends the configured token
        good = _toml(tmp_path / "good.toml", token="s3cret")
        bad = _toml(tmp_path / "bad.toml", token="nope")
        async with cli_session(good, srv) as run_cli:
            rc_good, out, _ = await run_cli("status", "--json")
            rc_bad, _, err = await run_cli("status", config=bad)
        assert rc_good == 0
        assert json.loads(out)["nodes"][0]["name"] == "a"
        assert rc_bad == 1
        assert "bearer token" in err


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param(("127.0.0.1", 40000), None, id="ipv4-loopback"),
        pytest.param(("::1", 40000, 0, 0), None, id="ipv6-loopback"),
        pytest.param(("10.1.2.3", 40000), 403, id="lan-client"),
        pytest.param(("192.168.0.9", 40000), 403, id="private-client"),
    ],
)
def test_admin_without_a_token_is_loopback_only(peer: tuple[object, ...], expected: int | None) -> None:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda key, default=None: peer if key == "peername" else default
    request = make_mocked_request("GET", "/admin/fleet", transport=transport)
    denied = check_admin(request, "")
    assert (None if denied is None else denied.status) == expected


async def test_admin_without_a_token_serves_loopback(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("m", 1000)])
    async with (
        running(make_settings([node_cfg(a)]), tmp_path / "state.json") as (_eng, srv),
        http.get(srv.url + "/admin/fleet") as resp,
    ):
        assert resp.status == 200


# -- the CLI as subprocesses ---------------------------------------------------------------------------


def _toml(path: Path, token: str = "") -> Path:
    path.write_text(f'[gateway]\nlisten = "127.0.0.1:9"\nadmin_token = "{token}"\n')
    return path


async def cli(*args: str, config: Path, srv: Servers | None = None, gateway: str | None = None) -> tuple[int, str, str]:
    """Run ``python -m cortex ARGS --config CONFIG --gateway URL``; (exit code, stdout, stderr)."""
    url = gateway or (srv.url if srv is not None else "")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex",
        *args,
        "--config",
        str(config),
        "--gateway",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=config.parent,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class CliSession:
    """A driver process that runs one CLI command per call (see ``cli_driver.py``)."""

    def __init__(self, proc: asyncio.subprocess.Process, config: Path, srv: Servers) -> None:
        self.proc = proc
        self.config = config
        self.srv = srv

    async def __call__(self, *args: str, config: Path | None = None) -> tuple[int, str, str]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        argv = [*args, "--config", str(config or self.config), "--gateway", self.srv.url]
        self.proc.stdin.write(json.dumps(argv).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line, "the CLI driver exited"
        reply = json.loads(line)
        return int(reply["rc"]), str(reply["out"]), str(reply["err"])


@contextlib.asynccontextmanager
async def cli_session(config: Path, srv: Servers) -> AsyncIterator[CliSession]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).with_name("cli_driver.py")),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=config.parent,
        env=env,
    )
    try:
        yield CliSession(proc, config, srv)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_cli_commands_against_a_running_gateway(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    a = await sims("a", [SimModel("p", 1000), SimModel("x", 2000, loaded=False), SimModel("y", 1000, loaded=False)])
    b = await sims("b", [SimModel("x", 2000, loaded=False), SimModel("w", 1000)])
    settings = make_settings([node_cfg(a, pinned=["p"]), node_cfg(b)], [ModelSettings(id="x", vram_mb=2000)])
    config = _toml(tmp_path / "cortex.toml")
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        # read-only commands, and an unreachable gateway, side by side
        (rc_text, text, _), (rc_json, raw, _), (rc_down, _, down_err) = await asyncio.gather(
            cli("status", config=config, srv=srv),
            cli("status", "--json", config=config, srv=srv),
            cli("status", config=config, gateway=f"http://127.0.0.1:{_closed_port()}"),
        )
        assert rc_text == 0
        assert "a" in text
        assert "p*" in text  # loaded and pinned
        assert rc_json == 0
        fleet = json.loads(raw)
        assert [n["name"] for n in fleet["nodes"]] == ["a", "b"]
        assert {m["id"] for m in fleet["models"]} == {"p", "x", "y", "w"}
        assert rc_down == 1
        assert "cannot reach the gateway" in down_err
        assert down_err.count("\n") == 1  # one clear line

        async with cli_session(config, srv) as run_cli:
            rc, out, err = await run_cli("pin", "x", "--node", "a")
            assert rc == 0, err
            assert "pinned x on a" in out
            assert a.model_status("x") == "loaded"
            assert eng.fleet.is_pinned("a", "x")

            rc, out, err = await run_cli("unload", "x")
            assert rc == 1
            assert "pinned" in err
            assert "force" in err
            assert a.model_status("x") == "loaded"

            rc, out, err = await run_cli("unload", "x", "--force")
            assert rc == 0, err
            assert a.model_status("x") == "unloaded"
            assert not eng.fleet.is_pinned("a", "x")

            rc, out, err = await run_cli("load", "y", "--node", "a")
            assert rc == 0, err
            assert "loaded y on a" in out
            assert a.model_status("y") == "loaded"

            rc, out, err = await run_cli("unpin", "p")
            assert rc == 0, err
            assert "unpinned p on a" in out
            assert not eng.fleet.is_pinned("a", "p")

            rc, out, err = await run_cli("drain", "a")
            assert rc == 0, err
            assert snap_node(eng, "a").status is NodeStatus.DRAINING
            rc, out, err = await run_cli("undrain", "a")
            assert rc == 0, err
            assert snap_node(eng, "a").status is NodeStatus.UP

            rc, out, err = await run_cli("restart", "b")
            assert rc == 1
            assert "no agent for b" in err

            restarted: list[str] = []

            async def restart(node: str, timeout_s: float) -> RestartResult:
                restarted.append(node)
                await b.restart()
                return RestartResult(True, "ok")

            eng.lifecycle.restart = restart
            eng.lifecycle.agent_alive = lambda _node: True
            rc, out, err = await run_cli("restart", "b")
            assert rc == 0, err
            assert "restarted b" in out
            assert restarted == ["b"]
            assert snap_node(eng, "b").status is NodeStatus.UP
            # the restart loaded x on b; it was not resident before, so it was unloaded again
            assert b.model_status("x") == "unloaded"
            assert b.model_status("w") == "loaded"
