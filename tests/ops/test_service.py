"""cortex as a systemd service: sd_notify, SIGHUP and ``cortex reload``, and a log line per request (§1, §4).

The notify socket is a real unix datagram socket the test binds; the gateway is a real ``cortex --no-tui``
process, so the signals, the exit codes and the log lines are the ones systemd and journald would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cortex.sdnotify import SdNotify
from cortex.sim import SimModel, SimNode
from tests.cli.helpers import Gateway, run_cortex_async

MSG = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def receive(sock: socket.socket, wanted: str, got: list[str], limit_s: float = 10.0) -> str:
    """Datagrams into ``got`` until one contains the line ``wanted``; returns that datagram."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + limit_s
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {wanted!r} from the gateway; got {got}"
        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), remaining)
        got.append(data.decode())
        if wanted in got[-1].split("\n"):
            return got[-1]


def test_sdnotify_speaks_the_protocol_over_a_real_socket(tmp_path: Path) -> None:
    with notify_socket(tmp_path) as sock:
        notifier = SdNotify(str(tmp_path / "notify.sock"), watchdog_usec=3_000_000)
        assert notifier.watchdog_interval_s == 1.5
        assert notifier.ready("serving 2 nodes")
        assert notifier.reloading()
        assert notifier.stopping()
        got = [sock.recv(4096).decode() for _ in range(3)]
        notifier.close()
    assert got[0] == "READY=1\nSTATUS=serving 2 nodes"
    lines = got[1].split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0
    assert got[2] == "STOPPING=1"


def test_sdnotify_is_silent_outside_systemd_and_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SdNotify.from_env().ready()
    assert SdNotify.from_env().watchdog_interval_s is None
    gone = SdNotify(str(tmp_path / "nobody-listens.sock"))
    assert gone.ready() is False  # logged once, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "@abstract-name")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog: not ours to feed
    env = SdNotify.from_env()
    assert env.address == "\0abstract-name"
    assert env.watchdog_interval_s is None


def config_text(nodes: list[tuple[str, str]], extra: str = "") -> str:
    text = (
        '[gateway]\nlisten = "127.0.0.1:0"\nmetrics_listen = ""\ndrain_s = 3\n' + extra + "\n[poll]\ninterval_s = 0.1\n"
    )
    for name, url in nodes:
        text += f'[[nodes]]\nname = "{name}"\nendpoint = "{url}"\nvram_mb = 8192\n'
    return text


async def fleet_nodes(http: aiohttp.ClientSession, url: str) -> list[str]:
    async with http.get(url + "/admin/fleet") as resp:
        return [n["name"] for n in (await resp.json())["nodes"]]


@pytest.mark.slow
async def test_a_systemd_service_notifies_reloads_and_logs_each_request(tmp_path: Path) -> None:
    a = SimNode([SimModel("m1", 1000)], name="a", vram_mb=8192, tok_s=200, load_s=0.05)
    b = SimNode([SimModel("m2", 1000)], name="b", vram_mb=8192, load_s=0.05)
    await a.start()
    await b.start()
    path = tmp_path / "cortex.toml"
    path.write_text(config_text([("a", a.url)]))
    got: list[str] = []
    gateway: Gateway | None = None
    with notify_socket(tmp_path) as sock:
        try:
            gateway = await Gateway.start(
                tmp_path, "--config", str(path), json_logs=True,
                NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="200000",
            )  # fmt: skip
            assert (await receive(sock, "READY=1", got)).startswith("READY=1\nSTATUS=serving 1 nodes")
            await receive(sock, "WATCHDOG=1", got)
            await receive(sock, "WATCHDOG=1", got)  # again, every 0.1 s (half of WATCHDOG_USEC)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                body = {"model": "m1", "messages": MSG, "max_tokens": 3, "stream": True}
                async with http.post(gateway.url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()

                # SIGHUP with a new node in the file: RELOADING=1, then READY=1, and the node is there.
                path.write_text(config_text([("a", a.url), ("b", b.url)]))
                gateway.proc.send_signal(signal.SIGHUP)
                await receive(sock, "RELOADING=1", got)
                ready = await receive(sock, "READY=1", got)
                assert "STATUS=config applied: 1 change(s)" in ready
                assert await fleet_nodes(http, gateway.url) == ["a", "b"]

                # `cortex reload` with a bad file: exit 2 and the key named, whether the CLI reads the file
                # itself or only the gateway does (a CLI config that just says where the gateway is).
                path.write_text(config_text([("a", a.url), ("b", "not-a-url")]))
                code, out, err = await run_cortex_async(
                    tmp_path, "--config", str(path), "reload", "--gateway", gateway.url
                )
                assert code == 2, (out, err)
                assert "nodes[1].endpoint: not a URL" in err
                cli = tmp_path / "cli.toml"
                cli.write_text("[gateway]\n")
                code, out, err = await run_cortex_async(
                    tmp_path, "--config", str(cli), "reload", "--gateway", gateway.url
                )
                assert code == 2, (out, err)
                assert "refused, the running config stays: nodes[1].endpoint: not a URL" in err
                assert await fleet_nodes(http, gateway.url) == ["a", "b"]

                # ...and on a good one: exit 0, what changed printed; b drains out.
                path.write_text(config_text([("a", a.url)]))
                code, out, err = await run_cortex_async(
                    tmp_path, "--config", str(path), "reload", "--gateway", gateway.url
                )
                assert code == 0, err
                assert "nodes: removing b once drained (0 in flight)" in out
                deadline = time.monotonic() + 5
                while await fleet_nodes(http, gateway.url) != ["a"]:
                    assert time.monotonic() < deadline, "b never left"
                    await asyncio.sleep(0.05)

            assert await gateway.terminate(15) == 0
            await receive(sock, "STOPPING=1", got)
        finally:
            if gateway is not None:
                await gateway.kill()
            await a.stop()
            await b.stop()
    assert gateway is not None
    logs = gateway.logs()
    [line] = [entry for entry in logs if entry["logger"] == "cortex.request"]
    assert (line["model"], line["node"], line["status"], line["api"], line["stream"]) == (
        "m1", "a", 200, "openai", True,
    )  # fmt: skip
    assert line["ttft_s"] > 0
    assert line["queue_s"] == 0
    assert line["latency_s"] >= line["ttft_s"]
    assert line["msg"].startswith("openai m1 -> a 200 ttft ")
    messages = [entry["msg"] for entry in logs]
    assert any(m.startswith("SIGHUP: config applied") for m in messages)
    assert any(m.startswith("admin API: config") and "refused" in m for m in messages), "\n".join(messages)
    assert not any("Traceback" in json.dumps(entry) for entry in logs)
