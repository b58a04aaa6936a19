"""The real agent as a subprocess (``python -m cortex.agent``) against a test gateway built on AgentHub.

The full gateway's route is the lead's to test; this gateway is the same three lines around the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.agent.fakes import HubGateway, make_hub, start_mistralrs, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-5b1c"


@pytest.fixture
async def mistralrs() -> AsyncIterator[str]:
    url, stop = await start_mistralrs()
    try:
        yield url
    finally:
        await stop()


@contextlib.asynccontextmanager
async def agent_process(log_path: Path, *args: str, token: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``python -m cortex.agent ARGS`` with the token in the environment; stop it afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["CORTEX_AGENT_TOKEN"] = token
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cortex.agent", *args, stdout=log, stderr=log, env=env, cwd=REPO
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def restart_script(tmp_path: Path) -> tuple[str, Path]:
    marker = tmp_path / "restarted.txt"
    script = tmp_path / "restart mistralrs.py"  # a space, to prove the command is split, not mangled
    script.write_text(
        "import sys\n"
        "with open(sys.argv[1], 'a') as fh:\n"
        "    fh.write('restart\\n')\n"
        "print('stopping mistralrs ' + 'x' * 3000)\n"
        "print('mistralrs restarted', file=sys.stderr)\n"
    )
    return shlex.join([sys.executable, str(script), str(marker)]), marker


async def test_reports_flow_and_a_restart_runs_once_and_reports_back(tmp_path: Path, mistralrs: str) -> None:
    hub, _ = make_hub(n1=TOKEN)
    gateway = HubGateway(hub)
    await gateway.start()
    restart_cmd, marker = restart_script(tmp_path)
    log_path = tmp_path / "agent.log"
    try:
        async with agent_process(
            log_path,
            *("--node", "n1", "--gateway", gateway.url, "--mistralrs", mistralrs),
            *("--restart-cmd", restart_cmd, "--interval", "0.2", "--restart-timeout", "20"),
            token=TOKEN,
        ) as proc:
            await wait_until(lambda: hub.info("n1") is not None, 15, "the agent's first report")
            info = hub.info("n1")
            assert info is not None
            assert info.fresh
            assert info.mistralrs_up is True
            if info.nvml:  # a machine with a GPU
                assert info.gpus
                assert not info.gpu_error
            else:  # no NVML here: said in the report, not fatal
                assert info.gpus == ()
                assert "NVML unavailable" in info.gpu_error
            nvml = info.nvml
            assert info.version

            outcome = await hub.restart("n1", timeout_s=15)

            assert outcome.ok, outcome.message
            assert outcome.exit_code == 0
            assert outcome.output_tail.endswith("mistralrs restarted\n")
            assert len(outcome.output_tail) == 2000
            reports_then = len(gateway.statuses)
            await wait_until(lambda: len(gateway.statuses) >= reports_then + 5, 10, "five more reports")
            assert marker.read_text() == "restart\n"  # exactly once
            info = hub.info("n1")
            assert info is not None
            assert info.last_command is not None
            assert info.last_command["id"] == outcome.command_id
            assert proc.returncode is None

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = log_path.read_text()
        assert TOKEN not in log
        assert log.count("NVML unavailable") == (0 if nvml else 1)
    finally:
        await gateway.stop()


async def test_a_wrong_token_is_refused_and_the_agent_keeps_trying(tmp_path: Path, mistralrs: str) -> None:
    hub, _ = make_hub(n1=TOKEN)
    gateway = HubGateway(hub)
    await gateway.start()
    log_path = tmp_path / "agent.log"
    try:
        async with agent_process(
            log_path,
            *("--node", "n1", "--gateway", gateway.url, "--mistralrs", mistralrs),
            *("--restart-cmd", "true", "--interval", "0.1", "--max-backoff", "0.2"),
            token="not-the-token",
        ) as proc:
            await wait_until(lambda: len(gateway.statuses) >= 3, 15, "three refused reports")
            assert proc.returncode is None
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert set(gateway.statuses) == {401}
        assert hub.info("n1") is None
        log = log_path.read_text()
        assert log.count("wrong or missing agent token") == 1
        assert "not-the-token" not in log
    finally:
        await gateway.stop()


async def test_missing_settings_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["PYTHONPATH"] = str(REPO)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex.agent",
        "--node",
        "n1",
        env=env,
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2
    assert err.decode().strip().startswith("cortex agent: missing --gateway, --token")
