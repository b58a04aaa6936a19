"""``cortex --no-tui`` and ``cortex status`` as processes: serve, report, drain on SIGTERM (§1)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

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


async def test_headless_gateway_serves_reports_and_drains_on_sigterm(tmp_path: Path) -> None:
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

            (code, text, err), (jcode, jtext, jerr), _ = await asyncio.gather(
                run_cortex_async(tmp_path, "status", "--gateway", url),
                run_cortex_async(tmp_path, "status", "--json", "--gateway", url),
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
            assert pieces and pieces[-1][0] - sigterm_at > 0.2, (pieces[-1][0] - sigterm_at if pieces else None)
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
        assert "a " in text and " up " in text and "m1*" in text, text
        assert jcode == 0, jerr
        fleet = json.loads(jtext)
        assert [n["name"] for n in fleet["nodes"]] == ["a"]
        assert fleet["nodes"][0]["status"] == "up"
        assert fleet["nodes"][0]["vram_source"] == "system_info"
        assert fleet["nodes"][0]["vram_total_mb"] == 8192
        model = next(m for m in fleet["models"] if m["id"] == "m1")
        assert model["pinned"] is True and model["nodes"] == ["a"]

        # --log-format json: every stderr line is one JSON object.
        await gateway.kill()
        logs = gateway.logs()
        assert logs, "no log lines"
        for entry in logs:
            assert {"ts", "level", "logger", "msg"} <= set(entry), entry
        messages = [e["msg"] for e in logs]
        assert any("SIGTERM" in m and "draining" in m for m in messages), messages
        assert not [e for e in logs if e["level"] in ("error", "critical")], logs

        # Nothing listens there any more: one clear line, exit 1.
        code, text, err = await run_cortex_async(tmp_path, "status", "--gateway", url)
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cortex: cannot reach the gateway at " + url), err
        assert text == ""
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
            await wait_ready(http, gateway.url)
            async with http.get(gateway.url + "/v1/models") as resp:
                assert resp.status == 200
                listed = (await resp.json())["data"]
        assert {m["id"] for m in listed} == expected
        by_id = {m["id"]: m for m in listed}
        assert by_id["Qwen/Qwen3-32B"]["cortex"]["nodes"] == ["gpu-large"]
        assert by_id["Qwen/Qwen3-32B"]["cortex"]["pinned"] is True
        assert by_id["google/gemma-3-4b-it"]["cortex"]["state"] == "unloaded"
        assert await gateway.terminate(timeout=10) == 0, "\n".join(gateway.log_lines)
    finally:
        await gateway.kill()
