"""Helpers shared by the bench scripts: child processes, free ports, /proc readings, blocking HTTP calls.

Every process a bench script starts is a :class:`Proc` in a :class:`Procs` set, started in its own
process group and stopped by pid (SIGTERM, then SIGKILL for whatever of its group is left) when the set
closes, so an interrupted run leaves nothing listening.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (benchmarks run from there)."""
BENCH = ROOT / "bench"
PY = sys.executable
BENCH_KEY = "sk-cortex-bench"
"""The API key every benchmark client sends (cortex checks it where the config asks; the others pass it on)."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's open-file limit (inherited by children) as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def term_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the children."""

    def handler(_sig: int, _frame: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    """An unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after ``comm`` (index 0 is field 3, ``state``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2 :].decode().split()


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of ``pids`` and their reaped children, summed, in seconds.

    utime+stime as /proc/PID/stat counts them, but read from each thread's /proc/PID/task/TID/schedstat
    (the same on-CPU time, in nanoseconds rather than 10 ms ticks) where the kernel provides it; the
    reaped children's cutime+cstime can only come from /proc/PID/stat.
    """
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = _stat_fields(pid)
            ticks = int(f[13]) + int(f[14])
            precise = _schedstat_ns(pid)
            if precise is None:
                ticks += int(f[11]) + int(f[12])
            else:
                total += precise / 1e9
            total += ticks / CLK_TCK
    return total


def _schedstat_ns(pid: int) -> int | None:
    """On-CPU nanoseconds of every live thread of ``pid`` (None without schedstat)."""
    ns = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended: its time is lost either way
        except (OSError, ValueError, IndexError):
            return None
    return ns


def rss_bytes(pids: Sequence[int]) -> int:
    """VmRSS of ``pids``, summed, in bytes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def _all_stats() -> list[tuple[int, list[str]]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError):
                out.append((int(entry), _stat_fields(int(entry))))
    return out


def with_descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for p, f in _all_stats():
        children.setdefault(int(f[1]), []).append(p)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    return [p for p, f in _all_stats() if int(f[2]) == pgid and f[0] != "Z"]


class Proc:
    """A child process in its own process group, its output in ``log_dir/NAME.log``."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the process, wait, then SIGKILL it and anything left in its group, by pid."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        kill_group(self.popen.pid)
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """The processes of one run, stopped in reverse order when the block exits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.items: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> Proc:
        proc = Proc(name, argv, self.log_dir, env, cwd)
        self.items.append(proc)
        return proc

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None and exc_type is not KeyboardInterrupt:
            for proc in self.items:
                sys.stderr.write(f"--- last lines of {proc.name} ({proc.log_path}):\n{proc.tail()}\n")
        for proc in reversed(self.items):
            proc.stop()


def kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of a process group (children a stopped process left behind), for up to 5 s."""
    for _ in range(50):
        left = group_members(pgid)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def http(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """A blocking request (with :data:`BENCH_KEY`); (status, body), status 0 when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None) -> None:
    """Poll ``check`` every 50 ms until it holds; raise if ``timeout`` passes or ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def sim_argv(
    port: int,
    name: str,
    *,
    models: Sequence[str],
    unloaded: Sequence[str] = (),
    load_s: float = 0.0,
    tok_s: float = 0.0,
    vram_mb: int = 49152,
    extra: Sequence[str] = (),
) -> list[str]:
    """``python -m cortex.sim`` with these flags (``models``: ``ID=MB``)."""
    argv = [PY, "-m", "cortex.sim", "--port", str(port), "--name", name, "--vram-mb", str(vram_mb)]
    for m in models:
        argv += ["--model", m]
    for m in unloaded:
        argv += ["--unloaded", m]
    return [*argv, "--load-s", str(load_s), "--tok-s", str(tok_s), *extra]


def cortex_config(
    path: Path,
    *,
    port: int,
    metrics_port: int,
    nodes: Sequence[tuple[str, int, Sequence[str]]],
    extra: str = "",
    gateway: Sequence[str] = (),
    auth: bool = False,
) -> None:
    """Write a cortex TOML for benchmarks: loopback listeners, poll every 2 s, ``nodes`` as (name, port, pins).

    Args:
        path: Where to write the file.
        port: The gateway's listen port.
        metrics_port: The metrics listener's port.
        nodes: (name, port, pinned models) of each node.
        extra: TOML appended after ``[poll]``, with its own table headers (``[eviction]`` ...).
        gateway: Lines added under ``[gateway]`` (``event_loop = "asyncio"`` ...).
        auth: Require :data:`BENCH_KEY` (``gateway.api_keys``), which ``loadgen`` and :func:`http` send.
    """
    lines = [
        "[gateway]",
        f'listen = "127.0.0.1:{port}"',
        f'metrics_listen = "127.0.0.1:{metrics_port}"',
        "drain_s = 1",
        "first_byte_timeout_s = 120",
        "stream_idle_timeout_s = 120",
        "queue_timeout_s = 120",
        "max_queue = 4096",
        *([f'api_keys = ["{BENCH_KEY}"]'] if auth else []),
        *gateway,
        "[poll]",
        "interval_s = 2.0",
        "timeout_s = 2.0",
        extra,
    ]
    for name, node_port, pins in nodes:
        lines += [
            "[[nodes]]",
            f'name = "{name}"',
            f'endpoint = "http://127.0.0.1:{node_port}"',
            "vram_mb = 49152",
            "pinned = [" + ", ".join(f'"{p}"' for p in pins) + "]",
        ]
    path.write_text("\n".join(lines) + "\n")


def cortex_models_state(base: str) -> dict[str, str]:
    """{model id: state} from a running cortex's ``GET /v1/models`` (empty when it does not answer)."""
    status, body = http("GET", base + "/v1/models", timeout=2.0)
    if status != 200:
        return {}
    try:
        return {m["id"]: m.get("cortex", {}).get("state", "?") for m in json.loads(body)["data"]}
    except (ValueError, KeyError, TypeError):
        return {}


PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]
"""The one user message every chat benchmark sends."""


def chat_body(model: str, max_tokens: int, stream: bool = False) -> str:
    """A chat completions request body with :data:`PROMPT`."""
    return json.dumps({"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": stream})


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of unsorted ``values`` (NaN when empty)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(values: Sequence[float]) -> float:
    """The median (the mean of the middle two for an even count; NaN when empty)."""
    if not values:
        return float("nan")
    return statistics.median(values)


def save_results(path: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON (when a path was given) and say where."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {path}")
