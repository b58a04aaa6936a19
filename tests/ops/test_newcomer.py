"""Regression tests for what a new user ran into (issue 16 §3), one per item.

The console's items (read-only footer, restart without an agent, the theme notice, loading models in the
nodes table, column widths) are in ``tests/tui``; these are the gateway and CLI ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from cortex.config import GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine import commands
from cortex.engine.engine import Engine
from cortex.proxy.app import Servers, serve
from cortex.runtime import _announce
from cortex.sim import SimModel
from tests.cli.helpers import ANNOUNCE, cortex_env, run_cortex
from tests.conftest import FleetFactory, NodeSpec

MSG = [{"role": "user", "content": "hi"}]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the demo keeps its own state ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_demo_never_writes_the_real_state_file(tmp_path: Path) -> None:
    env = cortex_env(tmp_path, CORTEX_GATEWAY__LISTEN="127.0.0.1:0", CORTEX_GATEWAY__METRICS_LISTEN="")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cortex", "--demo", "--no-tui", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        url = ""
        deadline = time.monotonic() + 20
        while not url and time.monotonic() < deadline:
            line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
            assert line, "the demo exited before announcing its address"
            if match := ANNOUNCE.search(line):
                url = match.group(1)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for _ in range(100):
                async with http.get(url + "/ready") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
            path = f"{url}/admin/models/Qwen/Qwen3-32B/unpin"
            async with http.post(path, json={"node": "gpu-large"}) as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(url + "/admin/fleet") as resp:
                fleet = await resp.json()
        large = next(n for n in fleet["nodes"] if n["name"] == "gpu-large")
        assert not next(s for s in large["slots"] if s["model_id"] == "Qwen/Qwen3-32B")["pinned"]  # it took
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert not (tmp_path / "state" / "cortex" / "state.json").exists()
    assert not list((tmp_path / "state").rglob("state.json"))


# -- check-config says what it read, and refuses what serving would refuse ------------------------------------


def test_check_config_without_a_file_says_so_and_exits_2(tmp_path: Path) -> None:
    done = run_cortex(tmp_path, "check-config")
    assert done.returncode == 2
    assert "no config file found" in done.stderr
    assert "nodes: no [[nodes]] configured" in done.stderr
    assert done.stdout == ""


def test_check_config_with_an_empty_file_names_it_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "cortex.toml").write_text("")
    done = run_cortex(tmp_path, "check-config")
    assert done.returncode == 2
    assert f"read {(tmp_path / 'cortex.toml').resolve()}" in done.stderr
    assert "nodes: no [[nodes]] configured" in done.stderr


def test_check_config_with_nodes_names_the_file_and_prints_them(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.toml"
    path.write_text('[[nodes]]\nname = "a"\nendpoint = "http://127.0.0.1:1"\nvram_mb = 100\n')
    done = run_cortex(tmp_path, "--config", str(path), "check-config")
    assert done.returncode == 0, done.stderr
    assert f"read {path.resolve()}" in done.stderr
    assert json.loads(done.stdout)["nodes"][0]["name"] == "a"


# -- every node unreachable: a retryable 503 naming them, not a 404 ------------------------------------------


async def test_every_node_down_is_a_503_naming_the_nodes_not_a_404(tmp_path: Path) -> None:
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen=""),
        poll=PollSettings(interval_s=0.05, timeout_s=0.5, down_after=1),
        nodes=[
            NodeSettings(name="a", endpoint=f"http://127.0.0.1:{closed_port()}", vram_mb=8192, pinned=["m1"]),
            NodeSettings(name="b", endpoint=f"http://127.0.0.1:{closed_port()}", vram_mb=8192),
        ],
        models=[ModelSettings(id="m2", aliases=["gpt-x"])],
    )
    async with Engine(settings, state_path=tmp_path / "state.json") as engine, serve(engine) as servers:
        deadline = time.monotonic() + 5
        while any(n.status.value != "down" for n in engine.snapshot().nodes):
            assert time.monotonic() < deadline, "the nodes were never marked down"
            await asyncio.sleep(0.02)
        oai = openai.AsyncOpenAI(base_url=servers.url + "/v1", api_key="x", max_retries=0)
        ant = anthropic.AsyncAnthropic(base_url=servers.url, api_key="x", max_retries=0)
        async with oai, ant:
            for model, named in (("m1", ["a"]), ("gpt-x", ["a", "b"]), ("anything", ["a", "b"])):
                with pytest.raises(openai.APIStatusError) as caught:
                    await oai.chat.completions.create(model=model, messages=MSG)  # type: ignore[arg-type]
                assert caught.value.status_code == 503, model
                assert caught.value.response.headers.get("retry-after"), model
                message = caught.value.response.json()["error"]["message"]
                assert all(f"{name} (down)" in message for name in named), message
                assert "127.0.0.1" not in message  # a node's address is not the client's business
                assert "not served by this gateway" not in message
            with pytest.raises(openai.APIStatusError) as caught:  # no model: the first pinned one, same answer
                await oai.post("/chat/completions", body={"messages": MSG}, cast_to=object)
            assert caught.value.status_code == 503
            with pytest.raises(anthropic.APIStatusError) as refused:
                await ant.messages.create(model="m1", max_tokens=5, messages=MSG)  # type: ignore[arg-type]
            assert refused.value.status_code == 529  # the Anthropic dialect's retryable "overloaded"
            assert "a (down)" in refused.value.message


async def test_an_unknown_model_is_still_a_404_while_nodes_are_up(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    status, body, _ = await f.post("/v1/chat/completions", {"model": "typo", "messages": MSG})
    assert status == 404
    assert "available models: m1" in body["error"]["message"]


# -- where the gateway and the metrics really are ----------------------------------------------------------


def test_the_announcement_says_all_interfaces_and_where_metrics_are(caplog: pytest.LogCaptureFixture) -> None:
    servers = Servers()
    servers.api = ("0.0.0.0", 8000)
    servers.metrics = ("0.0.0.0", 9100)
    settings = Settings(nodes=[NodeSettings(name="a", endpoint="http://127.0.0.1:1", vram_mb=1)])
    with caplog.at_level(logging.INFO, logger="cortex"):
        _announce(servers, settings, demo=True)
    text = caplog.text
    assert "cortex gateway on 0.0.0.0:8000, all interfaces (http://127.0.0.1:8000 from this machine; 1 nodes)" in text
    assert "metrics on port 9100, all interfaces (http://127.0.0.1:9100/metrics from this machine)" in text
    assert "curl http://127.0.0.1:9100/metrics" in text
    assert ANNOUNCE.search(text) is not None
    assert ANNOUNCE.search(text).group(1) == "http://127.0.0.1:8000"  # type: ignore[union-attr]
    caplog.clear()
    servers.api, servers.metrics = ("127.0.0.1", 8001), None
    with caplog.at_level(logging.INFO, logger="cortex"):
        _announce(servers, settings, demo=False)
    assert "cortex gateway on http://127.0.0.1:8001 (1 nodes)" in caplog.text
    assert "metrics on http://127.0.0.1:8001/metrics" in caplog.text


# -- `cortex status --json | head` ---------------------------------------------------------------------------


async def test_status_into_a_closed_pipe_exits_quietly(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) is gone before cortex writes
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cortex", "status", "--json", "--gateway", f.url,
            stdout=write_end, stderr=asyncio.subprocess.PIPE, cwd=tmp_path, env=cortex_env(tmp_path),
        )  # fmt: skip
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert "Traceback" not in err.decode()
    assert "BrokenPipeError" not in err.decode()
    assert proc.returncode == 141


# -- TTFT of non-streaming requests ---------------------------------------------------------------------------


async def test_a_non_streaming_request_adds_no_ttft(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=200))
    for stream in (False, False, True):
        status, _, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": MSG, "stream": stream})
        assert status == 200
    await f.wait_for(lambda: f.engine.metrics.requests_total == 3, what="requests recorded")
    exposition = f.engine.metrics.exposition().decode()
    count = next(
        line for line in exposition.splitlines() if line.startswith("cortex_time_to_first_token_seconds_count{")
    )
    assert count.endswith(" 1.0")
    assert "streaming requests only" in exposition  # the HELP says so
    records = f.engine.snapshot().requests
    assert [r.ttft_s is None for r in records] == [False, True, True]  # newest first: the stream has one


# -- a draining node's model: keep-alives for streams, Retry-After for the rest ------------------------------


async def test_waiting_for_a_draining_nodes_model_keeps_streams_alive_and_ends_in_retry_after(
    fleet: FleetFactory,
) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), gateway={"queue_timeout_s": 1.3})
    assert (await f.engine.submit(commands.DrainNode("a"))).ok

    async def openai_stream() -> tuple[bytes, bytes]:
        body = {"model": "m1", "messages": MSG, "stream": True}
        async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200  # headers go out while it waits
            return await resp.content.readline(), await resp.content.read()

    async def anthropic_stream() -> str:
        body = {"model": "m1", "max_tokens": 5, "messages": MSG, "stream": True}
        async with f.http.post(f.url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
            return (await resp.content.read()).decode()

    (first, rest), text, (status, data, headers) = await asyncio.gather(
        openai_stream(), anthropic_stream(), f.post("/v1/chat/completions", {"model": "m1", "messages": MSG})
    )
    # The stream heard from cortex before the queue timeout ended it: a keep-alive comment came first.
    assert first.startswith(b": waiting for m1 (")
    assert b"was not ready within 1.3 s" in rest
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert text.index("event: ping") < text.index("event: error")
    # A non-streaming client can hear nothing meanwhile: it gets a 503 it may retry, and when.
    assert status == 503
    assert headers["Retry-After"]
    assert "not ready within 1.3 s" in data["error"]["message"]
