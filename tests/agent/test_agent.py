"""The agent's loop, in process, against real loopback servers (a hub gateway or a scripted one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cortex.agent.agent import Agent, AgentConfig
from cortex.agent.nvml import NvmlReader
from tests.agent.fakes import (
    FakeGpu,
    FakeNvml,
    HubGateway,
    ScriptedGateway,
    free_port,
    make_hub,
    start_mistralrs,
    wait_until,
)

TOKEN = "agent-secret-7f3a"


@pytest.fixture
async def mistralrs() -> AsyncIterator[str]:
    url, stop = await start_mistralrs()
    try:
        yield url
    finally:
        await stop()


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([FakeGpu("GPU-A", 81_920, 2_048, util=50), FakeGpu("GPU-B", 81_920, 1_024, util=0)]).install(monkeypatch)


def write_restart_script(tmp_path: Path, exit_code: int = 0, linger_s: float = 0.0) -> tuple[tuple[str, ...], Path]:
    """A restart command that appends a line to a marker file and prints; returns (argv, marker)."""
    marker = tmp_path / "restarts.txt"
    script = tmp_path / "restart.py"
    script.write_text(
        "import sys\n"
        "with open(sys.argv[1], 'a') as fh:\n"
        "    fh.write('ran\\n')\n"
        "print('restarting mistralrs')\n"
        f"import time; time.sleep({linger_s})\n"
        f"sys.exit({exit_code})\n"
    )
    return (sys.executable, str(script), str(marker)), marker


def config(gateway: str, mistralrs: str, restart_argv: tuple[str, ...] = ("true",), **kw: Any) -> AgentConfig:
    values: dict[str, Any] = {"interval_s": 0.1, "restart_timeout_s": 10.0, "max_backoff_s": 0.3}
    values.update(kw)
    return AgentConfig(
        node="n1", gateway=gateway, token=TOKEN, mistralrs=mistralrs, restart_argv=restart_argv, **values
    )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def serving(server: HubGateway | ScriptedGateway, port: int = 0) -> Callable[[], Awaitable[None]]:
    await server.start(port)
    return server.stop


async def test_reports_reach_the_hub(mistralrs: str, two_gpus: None) -> None:
    hub, changes = make_hub(n1=TOKEN)
    gateway = HubGateway(hub)
    stop_gateway = await serving(gateway)
    try:
        async with running(Agent(config(gateway.url, mistralrs))):
            await wait_until(lambda: hub.info("n1") is not None, what="a report")
        info = hub.info("n1")
        assert info is not None
        assert info.fresh
        assert info.mistralrs_up is True
        assert info.nvml is True
        assert [(g.index, g.name, g.used_mb, g.util_pct) for g in info.gpus] == [
            (0, "GPU-A", 2_048, 50.0),
            (1, "GPU-B", 1_024, 0.0),
        ]
        assert hub.vram("n1") == (163_840, 3_072)
        assert set(gateway.statuses) == {200}
        assert changes
    finally:
        await stop_gateway()


async def test_report_lists_models_without_default_and_mistralrs_down(mistralrs: str, two_gpus: None) -> None:
    gateway = ScriptedGateway([])
    stop_gateway = await serving(gateway)
    closed = f"http://127.0.0.1:{free_port()}"
    try:
        async with running(Agent(config(gateway.url, mistralrs))):
            await wait_until(lambda: len(gateway.reports) >= 1, what="a report")
        body = gateway.reports[0][1]
        models = {m["id"]: m["status"] for m in body["mistralrs"]["models"]}
        assert models == {"m": "loaded", "u": "unloaded"}  # the synthetic "default" entry is skipped
        assert body["mistralrs"]["up"] is True
        assert body["node"] == "n1"
        assert body["interval_s"] == 0.1
        assert gateway.authorizations[0] == f"Bearer {TOKEN}"

        gateway.reports.clear()
        async with running(Agent(config(gateway.url, closed))):
            await wait_until(lambda: len(gateway.reports) >= 1, what="a report")
        down = gateway.reports[0][1]["mistralrs"]
        assert down["up"] is False
        assert down["models"] == []
        assert down["error"].startswith("/health: ")
    finally:
        await stop_gateway()


async def test_commands_run_once_unknown_kinds_never(tmp_path: Path, mistralrs: str, two_gpus: None) -> None:
    argv, marker = write_restart_script(tmp_path, exit_code=4)
    # the gateway re-sends the same commands in every reply, as a gateway does until it sees results
    gateway = ScriptedGateway([{"id": "c1", "kind": "restart"}, {"id": "c2", "kind": "format-disk"}])
    stop_gateway = await serving(gateway)
    try:
        async with running(Agent(config(gateway.url, mistralrs, argv, interval_s=2.0))):
            await wait_until(lambda: any(r["id"] == "c1" for r in gateway.results()), what="the restart result")
            arrivals = [t for t, body in gateway.reports if any(r["id"] == "c1" for r in body["results"])]
            await asyncio.sleep(0.3)
        results = {r["id"]: r for r in gateway.results()}
        assert marker.read_text() == "ran\n"  # once, though sent in every reply
        assert results["c1"]["exit_code"] == 4
        assert results["c1"]["output_tail"] == "restarting mistralrs\n"
        assert results["c1"]["error"] == ""
        assert results["c2"]["exit_code"] is None
        assert results["c2"]["error"] == "unknown command kind 'format-disk': not run"
        # the result went out as soon as the command ended, not a 2 s interval later
        assert arrivals[0] - results["c1"]["finished_at"] < 0.5
        # and each result was sent once: the report carrying it was accepted
        assert [r["id"] for r in gateway.results()].count("c1") == 1
    finally:
        await stop_gateway()


async def test_outage_is_logged_once_and_recovered_from(
    mistralrs: str, two_gpus: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.agent")
    port = free_port()
    hub, _ = make_hub(n1=TOKEN)
    gateway = HubGateway(hub)
    stop_gateway: Callable[[], Awaitable[None]] | None = None
    try:
        async with running(Agent(config(f"http://127.0.0.1:{port}", mistralrs, interval_s=0.05))):
            await asyncio.sleep(1.0)  # several attempts: 0.05, 0.1, 0.2, 0.3, 0.3 ...
            unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
            assert len(unreachable) == 1
            assert unreachable[0].levelno == logging.WARNING
            stop_gateway = await serving(gateway, port)
            await wait_until(lambda: hub.info("n1") is not None, what="a report after the outage")
        assert any("accepted a report again after" in r.getMessage() for r in caplog.records)
        assert TOKEN not in caplog.text
    finally:
        if stop_gateway is not None:
            await stop_gateway()


async def test_wrong_token_is_logged_clearly_and_retried(
    mistralrs: str, two_gpus: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.agent")
    hub, _ = make_hub(n1="the-right-token")
    gateway = HubGateway(hub)
    stop_gateway = await serving(gateway)
    try:
        async with running(Agent(config(gateway.url, mistralrs, interval_s=0.05, max_backoff_s=0.4))) as task:
            await wait_until(lambda: len(gateway.statuses) >= 3, what="three refused reports")
            assert not task.done()
        assert set(gateway.statuses) == {401}
        # a wrong token does not fix itself quickly: straight to the capped interval, no fast doubling
        gaps = [b - a for a, b in zip(gateway.arrivals, gateway.arrivals[1:], strict=False)]
        assert min(gaps) > 0.35
        assert hub.info("n1") is None
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "wrong or missing agent token" in errors[0].getMessage()
        assert TOKEN not in caplog.text
        assert "the-right-token" not in caplog.text
    finally:
        await stop_gateway()


async def test_results_survive_a_refused_report(tmp_path: Path, mistralrs: str, two_gpus: None) -> None:
    argv, marker = write_restart_script(tmp_path, linger_s=0.5)
    gateway = ScriptedGateway([{"id": "c1", "kind": "restart"}])
    stop_gateway = await serving(gateway)
    try:
        async with running(Agent(config(gateway.url, mistralrs, argv, max_backoff_s=0.1))):
            await wait_until(marker.exists, what="the restart")
            gateway.status = 503  # the command lingers 0.5 s: the reports carrying its result are refused
            await wait_until(lambda: sum(bool(b["results"]) for _, b in gateway.reports) >= 2, what="retries")
            gateway.status = 200
            count = len(gateway.reports)
            await wait_until(lambda: len(gateway.reports) >= count + 3, what="more reports")
        carrying = [b for _, b in gateway.reports if b["results"]]
        assert all(b["results"][0]["id"] == "c1" for b in carrying)
        assert not gateway.reports[-1][1]["results"]  # dropped once accepted
        assert marker.read_text() == "ran\n"
    finally:
        await stop_gateway()


async def test_without_nvml_reports_no_gpu_figures(mistralrs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    FakeNvml(init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)).install(monkeypatch)
    gateway = ScriptedGateway([])
    stop_gateway = await serving(gateway)
    try:
        async with running(Agent(config(gateway.url, mistralrs), nvml=NvmlReader())):
            await wait_until(lambda: len(gateway.reports) >= 2, what="reports")
        body = gateway.reports[-1][1]
        assert body["nvml"] is False
        assert body["gpus"] == []
        assert "Driver Not Loaded" in body["gpu_error"]
    finally:
        await stop_gateway()
