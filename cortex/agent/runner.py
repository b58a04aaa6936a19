"""Runs the agent's own restart command with a deadline and keeps the end of its output.

The command is an argv list (the operator's ``--restart-cmd``, split with :func:`shlex.split`) run without a
shell, so nothing from the gateway can ever reach a command line. Output goes to an anonymous temporary
file rather than a pipe: a restart script that starts ``mistralrs`` in the background leaves a child holding
its stdout, and with a pipe the agent would either wait for that child forever or, once it stopped
reading, block the child's writes. With a file, the agent waits for the command itself, reads the tail and
moves on. The command runs in its own session so that a timeout (or the agent stopping) kills the whole
process group it started, not just the first process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from cortex.agent.protocol import OUTPUT_TAIL_CHARS

__all__ = ["RunResult", "run_command"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """What became of one command."""

    exit_code: int | None
    """The exit status; None when the command could not start or was killed."""
    output_tail: str
    """The last characters of its combined stdout and stderr."""
    error: str
    """Why it did not start or finish; empty when it exited by itself."""
    started_at: float
    finished_at: float


async def run_command(
    argv: Sequence[str],
    timeout_s: float,
    *,
    tail_chars: int = OUTPUT_TAIL_CHARS,
    clock: Callable[[], float] = time.time,
) -> RunResult:
    """Run ``argv`` (no shell) and wait for it, killing its process group after ``timeout_s``.

    Cancelling the call kills the process group too, so the command never outlives the agent's wish to
    wait for it. Children that the command leaves running on purpose (a daemon started with ``setsid``
    or by systemd) are not waited for.

    Args:
        argv: The program and its arguments.
        timeout_s: Seconds to wait before killing the command.
        tail_chars: How many characters from the end of the output to keep.
        clock: Wall clock for the start and finish times.

    Returns:
        The exit status, the output tail and, when it did not exit by itself, why.
    """
    started = clock()
    with tempfile.TemporaryFile() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            return RunResult(None, "", f"could not start {argv[0]!r}: {reason}", started, clock())
        error = ""
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                error = f"timed out after {timeout_s:g} s; killed"
        finally:
            if proc.returncode is None:  # cancelled while waiting: stop what we started
                _kill_group(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        exit_code = None if error else proc.returncode
        return RunResult(exit_code, _tail(out, tail_chars), error, started, clock())


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the command runs in its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(out: IO[bytes], chars: int) -> str:
    """The last ``chars`` characters of the output file, decoded leniently."""
    out.flush()
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * chars))  # UTF-8 is at most 4 bytes a character
    text = out.read().decode("utf-8", errors="replace")
    return text[-chars:] if chars > 0 else ""
