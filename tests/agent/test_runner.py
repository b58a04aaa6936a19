from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from cortex.agent.runner import run_command
from tests.agent.fakes import wait_until

PY = sys.executable


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_exit_code_and_the_tail_of_stdout_and_stderr() -> None:
    script = "import sys; print('x' * 5000); print('to stderr', file=sys.stderr); print('END'); sys.exit(3)"

    result = await run_command([PY, "-c", script], 10)

    assert result.exit_code == 3
    assert result.error == ""
    assert len(result.output_tail) == 2000
    assert result.output_tail.endswith("to stderr\nEND\n") or result.output_tail.endswith("END\nto stderr\n")
    assert result.started_at <= result.finished_at


async def test_timeout_kills_the_command() -> None:
    started = time.monotonic()

    result = await run_command([PY, "-c", "import time; print('waiting', flush=True); time.sleep(30)"], 0.5)

    assert time.monotonic() - started < 5
    assert result.exit_code is None
    assert result.error == "timed out after 0.5 s; killed"
    assert result.output_tail == "waiting\n"


async def test_a_daemon_left_holding_the_output_does_not_block(tmp_path: Path) -> None:
    pid_file = tmp_path / "daemon.pid"
    script = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
        " start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('daemon started')"
    )
    started = time.monotonic()
    try:
        result = await run_command([PY, "-c", script], 20)
        assert time.monotonic() - started < 5
        assert result.exit_code == 0
        assert result.output_tail == "daemon started\n"
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_a_missing_program_is_an_error_result() -> None:
    result = await run_command(["/nonexistent/restart-mistralrs"], 5)

    assert result.exit_code is None
    assert result.error.startswith("could not start '/nonexistent/restart-mistralrs'")


async def test_cancelling_kills_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = (
        "import os, subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{c.pid}}'); time.sleep(30)"
    )
    task = asyncio.create_task(run_command([PY, "-c", script], 60))
    pids: list[int] = []
    try:
        await wait_until(lambda: pid_file.exists() and len(pid_file.read_text().split()) == 2, 10, "pid file")
        pids = [int(p) for p in pid_file.read_text().split()]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # the command and the child it started are both gone (the child may linger as a zombie briefly)
        await wait_until(lambda: not alive(pids[0]), 5, "command exit")
        await wait_until(lambda: not alive(pids[1]) or _zombie(pids[1]), 5, "child exit")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
