"""``cortex --no-tui`` and ``cortex status`` as processes: serve, report, drain on SIGTERM (§1)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cortex.cli import main
from cortex.demo import DEMO_FLEET
from cortex.sim import SimModel, SimNode
from tests.cli.helpers import Gateway, run_cortex_async

pytestmark = pytest.mark.slow

DRAIN_S = 6.0


def config(tmp_path: Path, sim: SimNode) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(
        f"""
[gateway]
listen = "127.0.0.1:0"
metrics_listen = ""
drain_s = {DRAIN_S}
[poll]
interval_s = 0.2
[[nodes]]
name = "a"
endpoint = "{sim.url}"
vram_mb = 8192
pinned = ["m1"]
"""
    )
    return path


async def wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with http.get(url + "/ready") as resp:
            if resp.status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway never became ready")


def data_events(raw: bytes) -> list[str]:
    return [f.strip()[5:].strip() for f in raw.decode().split("\n\n") if f.strip().startswith("data:")]


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_headless_gateway_serves_reports_and_drains_on_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = closed_port_url()
    sim = SimNode([SimModel("m1", 1000)], name="a", vram_mb=8192, tok_s=12, load_s=0.05)
    await sim.start()
    gateway: Gateway | None = None
    try:
        gateway = await Gateway.start(tmp_path, "--config", str(config(tmp_path, sim)), json_logs=True)
        url = gateway.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            await wait_ready(http, url)
            body: dict[str, Any] = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

            async def one_request() -> None:
                async with http.post(url + "/v1/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-cortex-node"] == "a"
                    assert (await resp.json())["model"] == "m1"

            def status_json() -> tuple[int, str]:  # in-process: the same code as the process, cheaper
                code = main(["status", "--json", "--gateway", url])
                return code, capsys.readouterr().out

            capsys.readouterr()
            (code, text, err), (nocode, notext, noerr), (jcode, jtext), _ = await asyncio.gather(
                run_cortex_async(tmp_path, "status", "--gateway", url),
                run_cortex_async(tmp_path, "status", "--gateway", nowhere),
                asyncio.to_thread(status_json),
                one_request(),
            )

            # A slow stream (30 tokens at 12 tok/s ≈ 2.5 s) is live when SIGTERM comes: it must finish.
            stream_body = {**body, "max_tokens": 30, "stream": True}
            async with http.post(url + "/v1/chat/completions", json=stream_body) as resp:
                assert resp.status == 200
                first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                assert first.startswith(b"data:")
                sigterm_at = time.monotonic()
                gateway.proc.terminate()
                pieces: list[tuple[float, bytes]] = []

                async def drain() -> None:
                    async for piece in resp.content.iter_any():
                        pieces.append((time.monotonic(), piece))

                await asyncio.wait_for(drain(), DRAIN_S + 5)
            raw = first + b"".join(p for _, p in pieces)
            # The stream was still running when the signal came, and went on after it.
            assert pieces
            assert pieces[-1][0] - sigterm_at > 0.2, pieces[-1][0] - sigterm_at
            events = data_events(raw)
            assert events[-1] == "[DONE]", raw[-300:]
            chunks = [json.loads(e) for e in events[:-1]]
            assert len(chunks) == 30
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            exit_code = await asyncio.wait_for(gateway.proc.wait(), DRAIN_S + 5)
            assert exit_code == 0, "\n".join(gateway.log_lines)
            assert time.monotonic() - sigterm_at < DRAIN_S + 2

        # `cortex status` printed the fleet from the live gateway.
        assert code == 0, err
        node_line = next(line for line in text.splitlines() if line.startswith("a "))
        assert " up " in node_line, text
        assert "m1*" in node_line, text
        assert jcode == 0
        fleet = json.loads(jtext)
        assert [n["name"] for n in fleet["nodes"]] == ["a"]
        assert fleet["nodes"][0]["status"] == "up"
        assert fleet["nodes"][0]["vram_source"] == "system_info"
        assert fleet["nodes"][0]["vram_total_mb"] == 8192
        model = next(m for m in fleet["models"] if m["id"] == "m1")
        assert model["pinned"] is True
        assert model["nodes"] == ["a"]

        # --log-format json: every stderr line is one JSON object.
        await gateway.kill()
        logs = gateway.logs()
        assert logs, "no log lines"
        for entry in logs:
            assert {"ts", "level", "logger", "msg"} <= set(entry), entry
        messages = [e["msg"] for e in logs]
        assert any("SIGTERM" in m and "draining" in m for m in messages), messages
        assert not [e for e in logs if e["level"] in ("error", "critical")], logs

        # Where nothing listens: one clear line, exit 1.
        assert nocode == 1
        lines = noerr.strip().splitlines()
        assert len(lines) == 1, noerr
        assert lines[0].startswith("cortex: cannot reach the gateway at " + nowhere), noerr
        assert notext == ""
    finally:
        if gateway is not None:
            await gateway.kill()
        await sim.stop()


async def test_demo_serves_the_simulated_fleet_and_stops_on_sigterm(tmp_path: Path) -> None:
    gateway = await Gateway.start(
        tmp_path,
        "--demo",
        CORTEX_GATEWAY__LISTEN="127.0.0.1:0",
        CORTEX_GATEWAY__METRICS_LISTEN="127.0.0.1:0",
        CORTEX_GATEWAY__DRAIN_S="2",
    )
    try:
        expected = {mid for _, models, _ in DEMO_FLEET.values() for mid, _, _ in models}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await wait_ready(http, gateway.url)  # one node up; the other two may not be polled yet
            deadline = time.monotonic() + 10
            while True:
                async with http.get(gateway.url + "/v1/models") as resp:
                    assert resp.status == 200
                    listed = (await resp.json())["data"]
                if {m["id"] for m in listed} == expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        assert {m["id"] for m in listed} == expected
        by_id = {m["id"]: m for m in listed}
        assert by_id["Qwen/Qwen3-32B"]["cortex"]["nodes"] == ["gpu-large"]
        assert by_id["Qwen/Qwen3-32B"]["cortex"]["pinned"] is True
        assert by_id["google/gemma-3-4b-it"]["cortex"]["state"] == "unloaded"
        assert await gateway.terminate(limit_s=10) == 0, "\n".join(gateway.log_lines)
    finally:
        await gateway.kill()
