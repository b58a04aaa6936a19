"""Running the ``cortex`` command as a user would: a separate process, with a clean environment."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ANNOUNCE = re.compile(r"cortex gateway on .*?(http://[^\s;)]+)")


def cortex_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for a cortex process: no CORTEX_* from outside, state and home under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["HOME"] = str(tmp_path / "home")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cortex(tmp_path: Path, *args: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cortex ARGS`` to completion in ``tmp_path``."""
    return subprocess.run(
        [sys.executable, "-m", "cortex", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=cortex_env(tmp_path, **env),
    )


async def run_cortex_async(tmp_path: Path, *args: str, limit_s: float = 30) -> tuple[int, str, str]:
    """Like :func:`run_cortex`, without blocking the event loop (for use beside in-process servers)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cortex",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=cortex_env(tmp_path),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Gateway:
    """A ``cortex --no-tui`` process: started, its address read from its log, stopped by SIGTERM."""

    def __init__(self, proc: asyncio.subprocess.Process, json_logs: bool) -> None:
        self.proc = proc
        self.json_logs = json_logs
        self.url = ""
        self.log_lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, tmp_path: Path, *args: str, json_logs: bool = False, **env: str) -> Gateway:
        flags = ["--no-tui", *(["--log-format", "json"] if json_logs else []), *args]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cortex",
            *flags,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
            env=cortex_env(tmp_path, **env),
        )
        gateway = cls(proc, json_logs)
        try:
            await asyncio.wait_for(gateway._wait_announce(), 20)
        except BaseException:
            await gateway.kill()
            raise
        gateway._reader = asyncio.ensure_future(gateway._read_rest())
        return gateway

    def _message(self, line: str) -> str:
        if not self.json_logs:
            return line
        return str(json.loads(line)["msg"])

    async def _wait_announce(self) -> None:
        assert self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                raise AssertionError("cortex exited before announcing its address:\n" + "\n".join(self.log_lines))
            line = raw.decode().rstrip("\n")
            self.log_lines.append(line)
            match = ANNOUNCE.search(self._message(line))
            if match:
                self.url = match.group(1)
                return

    async def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.log_lines.append(raw.decode().rstrip("\n"))

    async def terminate(self, limit_s: float) -> int:
        """SIGTERM, then the exit code (killed and failed if it takes longer than ``limit_s``)."""
        self.proc.terminate()
        try:
            code = await asyncio.wait_for(self.proc.wait(), limit_s)
        finally:
            await self.kill()
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)

    def logs(self) -> list[dict[str, Any]]:
        """The log lines as JSON objects (``--log-format json``)."""
        return [json.loads(line) for line in self.log_lines if line.strip()]
