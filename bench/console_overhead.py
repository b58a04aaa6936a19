"""What the console costs the proxy: cortex with the Textual console drawn in a pseudo-terminal vs ``--no-tui``.

    python bench/console_overhead.py [--quick] [--out bench/results/console.json] [--rounds N] [--keep-logs]
                                     [--nice N] [--no-wait] [--cortex-src DIR] [--refresh-hz HZ]

Issue 6 point 4: with the console running, the ``bench/`` throughput must stay at or above 90 % of
``--no-tui``. One simulated node (``python -m cortex.sim``, ``bench-fast``, no token delay) serves both
set-ups. Each round starts a fresh cortex twice, in alternating order so that background noise falls on both:

* ``no-tui``  — ``python -m cortex --no-tui --config CFG`` (stdout a log file);
* ``console`` — ``python -m cortex --config CFG`` with a pseudo-terminal as stdin, stdout and stderr (and as
  its controlling terminal), 120x40, ``TERM=xterm-256color``: the Textual console really runs and draws at
  ``tui.refresh_hz``. A thread of this script reads the pty's master side all the time (counting the bytes,
  discarding them) so the console never blocks on a full pty buffer. The console must prove it ran: more
  than ``MIN_TTY_BYTES`` written and its header text (``cortex``) among them.

Per start: cortex's CPU while idle (the console redrawing, nothing else), then one ``bench/loadgen.py`` job in
its own process — non-streaming chats at concurrency 32 over raw keep-alive connections after a warm-up
(req/s, p50/p99, cortex's CPU-µs per request) and, unless ``--quick``, a short burst of streams (streams/s,
CPU-µs per stream). Then the console is quit with ``q`` (the real key; SIGTERM and SIGKILL after it if it
does not exit), ``--no-tui`` with SIGTERM. Reported: medians per mode and the ratios console / no-tui.
Always exits 0: it is a report, the verdict is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    BENCH,
    PY,
    ROOT,
    Procs,
    chat_body,
    cortex_config,
    cortex_models_state,
    cpu_seconds,
    free_port,
    http,
    kill_group,
    median,
    raise_nofile,
    save_results,
    sim_argv,
    term_on_sigterm,
    wait_for,
)

MODEL = "bench-fast"
TARGET = 0.90
"""console req/s ÷ no-tui req/s must be at least this (issue 6 point 4)."""
MIN_TTY_BYTES = 20_000
"""What the console must have written to the pty for the round to count as 'the console ran'."""
COLS, ROWS = 120, 40

FULL = {
    "rounds": 5,
    "req_n": 3000,  # measured requests per start, concurrency 32
    "req_warm": 500,
    "conc": 32,
    "max_tokens": 16,
    "settle_s": 6.0,  # after ready, before anything is measured (see one_start)
    "idle_s": 2.0,  # cortex CPU sampled this long with no load (the console's own redraw cost)
    "stream_n": 2000,  # streams per start (0: none); about 2 s, so the 1 Hz busy redraw falls in it
    "stream_conc": 16,
    "stream_tokens": 32,
    "budget_s": 480,  # no new round once the next one would end past this (after any wait for bench/run.py)
}
QUICK = FULL | {"rounds": 2, "req_n": 1500, "req_warm": 300, "idle_s": 1.0, "stream_n": 0, "budget_s": 90}
MODES = ("no-tui", "console")


# -- cortex in a pseudo-terminal -----------------------------------------------------------------------


class PtyReader(threading.Thread):
    """Drains the master side of a pty: counts the bytes, keeps the first 64 KiB, looks for a marker."""

    def __init__(self, fd: int, marker: bytes) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.marker = marker
        self.bytes = 0
        self.head = bytearray()
        self.seen_marker = False
        self._carry = b""

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO once the slave side is closed everywhere, EBADF once closed here
                return
            if not data:
                return
            self.bytes += len(data)
            if len(self.head) < 65536:
                self.head += data[: 65536 - len(self.head)]
            if not self.seen_marker:
                buf = self._carry + data
                self.seen_marker = self.marker in buf
                self._carry = buf[-len(self.marker) :]


class PtyCortex:
    """``python -m cortex`` with a pseudo-terminal as its stdin/stdout/stderr and controlling terminal."""

    def __init__(self, argv: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.reader = PtyReader(self.master, b"cortex")
        self.reader.start()
        self.exit_how = ""
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,  # setsid() runs before preexec_fn: the pty can become its terminal
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
                cwd=cwd,
                env=env,
            )
        finally:
            os.close(slave)
        self.name = "cortex-console"
        self.log_path = log_dir / "state" / "cortex" / "cortex.log"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """``q`` (the console's own quit), then SIGTERM, then SIGKILL; then anything left in its group."""
        try:
            for sig, wait_s in ((None, 8.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                if self.popen.poll() is not None:
                    break
                if sig is None:
                    with contextlib.suppress(OSError):
                        os.write(self.master, b"q")
                    self.exit_how = "q"
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.popen.pid, sig)
                    self.exit_how = sig.name
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(wait_s)
            kill_group(self.popen.pid)
        finally:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.reader.join(2)


# -- one start, measured ---------------------------------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    total = sum(f[:8])
    return total - idle, total


def run_loadgen(job: dict[str, Any], tmp: Path, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    path = tmp / f"job{n}.json"
    path.write_text(json.dumps(job))
    proc = subprocess.run(
        [PY, str(BENCH / "loadgen.py"), str(path)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    return results


def one_start(
    mode: str, cfg: dict[str, Any], tmp: Path, sim_port: int, env: dict[str, str], n: int, log: Any
) -> dict[str, Any]:
    cport, mport = free_port(), free_port()
    conf = tmp / f"cortex-{n}.toml"
    extra = f"[tui]\nrefresh_hz = {cfg['refresh_hz']:g}" if cfg.get("refresh_hz") else ""
    cortex_config(conf, port=cport, metrics_port=mport, nodes=[("sim-fast", sim_port, [MODEL])], extra=extra)
    src: Path | None = cfg.get("cortex_src")
    cwd = ROOT if src is None else src
    if src is not None:
        env = env | {"PYTHONPATH": str(src)}
    base = f"http://127.0.0.1:{cport}"
    argv = [PY, "-m", "cortex", "--config", str(conf)]
    proc: Any
    t0 = time.monotonic()
    with Procs(tmp) as procs:
        if mode == "no-tui":
            proc = procs.start(f"cortex-{n}", [*argv[:3], "--no-tui", *argv[3:]], env, cwd)
        else:
            tty_env = env | {"TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)}
            proc = PtyCortex(argv, tty_env, tmp, cwd)
        try:
            wait_for(lambda: cortex_models_state(base).get(MODEL) == "loaded", 60, f"cortex ({mode}) ready", proc)
            ready_s = time.monotonic() - t0
            # Past start-up, in both modes alike: the console's first full paint, the first poll, and the
            # start-up notices ("node up"), which Textual keeps 5 s; their removal is a one-off full layout
            # that would otherwise land inside the short measured load.
            time.sleep(cfg["settle_s"])
            cpu0, i0 = cpu_seconds([proc.pid]), time.monotonic()
            time.sleep(cfg["idle_s"])
            idle_cores = (cpu_seconds([proc.pid]) - cpu0) / (time.monotonic() - i0)
            tty0 = proc.reader.bytes if mode == "console" else 0
            steps: list[dict[str, Any]] = [
                {
                    "mode": "requests",
                    "target": "requests",
                    "host": "127.0.0.1",
                    "port": cport,
                    "path": "/v1/chat/completions",
                    "body": chat_body(MODEL, cfg["max_tokens"]),
                    "expect": '"usage"',
                    "concurrency": cfg["conc"],
                    "requests": cfg["req_n"],
                    "warmup": cfg["req_warm"],
                    "pids": [proc.pid],
                }
            ]
            if cfg["stream_n"]:
                steps.append(
                    {
                        "mode": "stream",
                        "target": "streams",
                        "url": base + "/v1/chat/completions",
                        "body": chat_body(MODEL, cfg["stream_tokens"], stream=True),
                        "concurrency": cfg["stream_conc"],
                        "streams": cfg["stream_n"],
                        "warmup": cfg["stream_conc"] * 2,
                        "expect_events": cfg["stream_tokens"] + 1,  # a chunk per token, then [DONE]
                        "pids": [proc.pid],
                    }
                )
            b0, w0 = machine_busy()
            l0 = time.monotonic()
            results = run_loadgen({"mode": "steps", "steps": steps}, tmp, n)
            load_s = time.monotonic() - l0
            b1, w1 = machine_busy()
            out: dict[str, Any] = {
                "mode": mode,
                "ready_s": ready_s,
                "idle_cpu_cores": idle_cores,
                "machine_busy_cores": (b1 - b0) / (w1 - w0) * (os.cpu_count() or 1) if w1 > w0 else None,
                "requests": results[0],
                "streams": results[1] if len(results) > 1 else None,
            }
            if mode == "console":
                out["tty_bytes_under_load_per_s"] = (proc.reader.bytes - tty0) / load_s
        finally:
            if mode == "console":
                proc.stop()
                out_extra = {
                    "tty_bytes": proc.reader.bytes,
                    "tty_header_seen": proc.reader.seen_marker,
                    "exit": proc.exit_how,
                    "returncode": proc.popen.returncode,
                }
    if mode == "console":
        out |= out_extra
        out["console_ran"] = out["tty_bytes"] > MIN_TTY_BYTES and out["tty_header_seen"]
    r = out["requests"]
    extra = ""
    if out.get("streams"):
        s = out["streams"]
        extra = f", streams {s['streams'] / s['elapsed_s']:.0f}/s {s['cpu_s'] / s['streams'] * 1e6:.0f} µs/stream"
        if s["complete"] != s["streams"]:
            extra += f" ({s['streams'] - s['complete']} incomplete!)"
    if mode == "console":
        extra += f", tty {out['tty_bytes'] / 1024:.0f} KiB, header {'seen' if out['tty_header_seen'] else 'NOT seen'}"
        extra += f", quit by {out['exit']} (rc {out['returncode']})"
    errors = f" ({r['errors']} errors!)" if r["errors"] else ""
    log(
        f"  {mode:8s} ready {ready_s:4.1f} s, idle {out['idle_cpu_cores'] * 100:4.1f} % of a core, "
        f"{r['rps']:6.0f} req/s{errors}, {r['cpu_us_per_req']:5.0f} CPU-µs/req, p50 {r['p50_ms']:.1f} ms{extra}"
    )
    return out


# -- the report ------------------------------------------------------------------------------------------


def summarize(starts: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        runs = [s for s in starts if s["mode"] == mode]
        rps = [s["requests"]["rps"] for s in runs]
        cpu = [s["requests"]["cpu_us_per_req"] for s in runs]
        per[mode] = {
            "starts": len(runs),
            "rps": rps,
            "rps_median": median(rps),
            "cpu_us_per_req": cpu,
            "cpu_us_per_req_median": median(cpu),
            "p50_ms_median": median([s["requests"]["p50_ms"] for s in runs]),
            "p99_ms_median": median([s["requests"]["p99_ms"] for s in runs]),
            "idle_cpu_cores_median": median([s["idle_cpu_cores"] for s in runs]),
            "errors": sum(s["requests"]["errors"] for s in runs),
            "ready_s_median": median([s["ready_s"] for s in runs]),
            "machine_busy_cores_median": median([s["machine_busy_cores"] or 0.0 for s in runs]),
        }
        streams = [s["streams"] for s in runs if s.get("streams")]
        if streams:
            per[mode]["streams_per_s_median"] = median([x["streams"] / x["elapsed_s"] for x in streams])
            per[mode]["cpu_us_per_stream_median"] = median([x["cpu_s"] / x["streams"] * 1e6 for x in streams])
            per[mode]["streams_incomplete"] = sum(x["streams"] - x["complete"] for x in streams)
    con, base = per["console"], per["no-tui"]
    # Per-round ratios (the two starts of a round ran back to back) show how stable the medians' ratio is.
    by_round: dict[int, dict[str, Any]] = {}
    for s in starts:
        by_round.setdefault(s["round"], {})[s["mode"]] = s
    pairs = [(r["no-tui"], r["console"]) for r in by_round.values() if len(r) == 2]
    round_rps = [c["requests"]["rps"] / b["requests"]["rps"] for b, c in pairs]
    round_cpu = [c["requests"]["cpu_us_per_req"] / b["requests"]["cpu_us_per_req"] for b, c in pairs]
    ratios: dict[str, Any] = {
        "rps": con["rps_median"] / base["rps_median"],
        "cpu_us_per_req": con["cpu_us_per_req_median"] / base["cpu_us_per_req_median"],
        "p50_ms": con["p50_ms_median"] / base["p50_ms_median"],
        "rps_per_round": round_rps,
        "rps_per_round_min_max": [min(round_rps), max(round_rps)],
        "cpu_per_round": round_cpu,
    }
    if "streams_per_s_median" in con and "streams_per_s_median" in base:
        ratios["streams_per_s"] = con["streams_per_s_median"] / base["streams_per_s_median"]
        ratios["cpu_us_per_stream"] = con["cpu_us_per_stream_median"] / base["cpu_us_per_stream_median"]
    console_ran = all(s.get("console_ran") for s in starts if s["mode"] == "console")
    return {
        "per_mode": per,
        "ratios": ratios,
        "console_ran_every_time": console_ran,
        "target_rps_ratio": TARGET,
        "met": console_ran and ratios["rps"] >= TARGET,
    }


def table(summary: dict[str, Any]) -> str:
    per, ratios = summary["per_mode"], summary["ratios"]
    b, c = per["no-tui"], per["console"]
    rows = [
        ("req/s at c=32 (median)", f"{b['rps_median']:.0f}", f"{c['rps_median']:.0f}", f"**{ratios['rps']:.3f}**"),
        (
            "CPU-µs / request (median)",
            f"{b['cpu_us_per_req_median']:.0f}",
            f"{c['cpu_us_per_req_median']:.0f}",
            f"{ratios['cpu_us_per_req']:.3f}",
        ),
        ("p50 latency, c=32 (ms)", f"{b['p50_ms_median']:.2f}", f"{c['p50_ms_median']:.2f}", f"{ratios['p50_ms']:.3f}"),
        ("p99 latency, c=32 (ms)", f"{b['p99_ms_median']:.2f}", f"{c['p99_ms_median']:.2f}", ""),
    ]
    if "streams_per_s" in ratios:
        rows += [
            (
                "streams/s (median)",
                f"{b['streams_per_s_median']:.0f}",
                f"{c['streams_per_s_median']:.0f}",
                f"{ratios['streams_per_s']:.3f}",
            ),
            (
                "CPU-µs / stream (median)",
                f"{b['cpu_us_per_stream_median']:.0f}",
                f"{c['cpu_us_per_stream_median']:.0f}",
                f"{ratios['cpu_us_per_stream']:.3f}",
            ),
        ]
    rows.append(
        (
            "cortex CPU idle (% of a core)",
            f"{b['idle_cpu_cores_median'] * 100:.1f}",
            f"{c['idle_cpu_cores_median'] * 100:.1f}",
            "",
        )
    )
    lines = ["| metric | --no-tui | console | console / no-tui |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lo, hi = ratios["rps_per_round_min_max"]
    verdict = "met" if summary["met"] else "NOT met"
    ran = "" if summary["console_ran_every_time"] else " (the console did NOT run every time: see the JSON)"
    lines.append("")
    lines.append(
        f"req/s console / no-tui = {ratios['rps']:.3f} (per round {lo:.3f} to {hi:.3f}); "
        f"target ≥ {TARGET:.2f}: {verdict}{ran}"
    )
    return "\n".join(lines)


def wait_quiet(log: Any, limit_s: float = 300.0) -> float:
    """Wait (up to ``limit_s``) until no ``bench/run.py`` is running; the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        busy = subprocess.run(["pgrep", "-f", "bench/run.py"], capture_output=True, text=True).stdout.split()
        busy = [p for p in busy if int(p) != os.getpid()]
        if not busy:
            return time.monotonic() - t0
        log(f"bench/run.py is running (pid {', '.join(busy)}): waiting")
        time.sleep(5)
    log("bench/run.py still running after the wait: measuring anyway (noisy)")
    return time.monotonic() - t0


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "cortex"], capture_output=True, text=True, cwd=ROOT)
        return rev.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description="cortex with the console in a pty vs --no-tui, on loopback.")
    parser.add_argument("--quick", action="store_true", help="two rounds, no streams (under a minute)")
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "console.json", help="JSON (%(default)s)")
    parser.add_argument("--rounds", type=int, help="rounds (each: one start of each mode, order alternating)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's log")
    parser.add_argument("--nice", type=int, default=-10, help="priority change, as bench/run.py (default -10)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a running bench/run.py")
    parser.add_argument("--cortex-src", type=Path, help="run cortex from this copy of the source tree (A/B a change)")
    parser.add_argument("--refresh-hz", type=float, help="the console's tui.refresh_hz (default: cortex's, 4)")
    args = parser.parse_args()
    cfg: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.cortex_src is not None:
        cfg["cortex_src"] = args.cortex_src.resolve()
    if args.refresh_hz:
        cfg["refresh_hz"] = args.refresh_hz
    term_on_sigterm()
    nofile = raise_nofile()
    niceness = os.nice(0)
    if args.nice:
        try:
            niceness = os.nice(args.nice)
        except OSError:
            print(f"(cannot change priority by {args.nice}: not root; running at nice {niceness})")
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    waited = 0.0 if args.no_wait else wait_quiet(log)
    tmp = Path(tempfile.mkdtemp(prefix="cortex-console-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORTEX_", "TEXTUAL", "NO_COLOR"))}
    env["XDG_STATE_HOME"] = str(tmp / "state")
    env["PYTHONUNBUFFERED"] = "1"
    starts: list[dict[str, Any]] = []
    error = None
    try:
        with Procs(tmp) as procs:
            sim_port = free_port()
            sim = procs.start("sim", sim_argv(sim_port, "sim-fast", models=[f"{MODEL}=4096"], tok_s=0.0), env)
            wait_for(lambda: http("GET", f"http://127.0.0.1:{sim_port}/health", timeout=1)[0] == 200, 30, "sim", sim)
            n = 0
            t_rounds, round_s = time.monotonic(), 0.0
            for rnd in range(cfg["rounds"]):
                if rnd and time.monotonic() - t_rounds + round_s > cfg["budget_s"]:
                    log(f"time budget ({cfg['budget_s']} s) spent: stopping after {rnd} rounds")
                    break
                r0 = time.monotonic()
                order = MODES if rnd % 2 == 0 else MODES[::-1]
                log(f"round {rnd + 1}/{cfg['rounds']}")
                for mode in order:
                    n += 1
                    start = one_start(mode, cfg, tmp, sim_port, env, n, log)
                    start["round"] = rnd
                    starts.append(start)
                round_s = max(round_s, time.monotonic() - r0)
    except Exception as exc:  # a report: say what went wrong, keep what was measured
        error = f"{type(exc).__name__}: {exc}"
        log(f"ERROR {error}")
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {"starts": starts, "error": error}
    if any(s["mode"] == "console" for s in starts) and any(s["mode"] == "no-tui" for s in starts):
        result["summary"] = summarize(starts)
    result["meta"] = {
        "command": " ".join(["python", "bench/console_overhead.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_rev(),
        "python": platform.python_version(),
        "textual": _version("textual"),
        "aiohttp": _version("aiohttp"),
        "cpus": os.cpu_count(),
        "nofile": nofile,
        "nice": niceness,
        "waited_for_other_bench_s": waited,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "quick": args.quick,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()},
        "pty": f"{COLS}x{ROWS} TERM=xterm-256color",
        "wall_s": time.monotonic() - started,
    }
    print()
    if "summary" in result:
        print(table(result["summary"]))
        busy = [s["machine_busy_cores"] for s in starts if s["machine_busy_cores"] is not None]
        print(f"machine busy during the loads: median {median(busy):.2f} of {os.cpu_count()} cores")
    else:
        print("no complete round: nothing to compare")
    print(f"\nwall time {result['meta']['wall_s']:.0f} s")
    with contextlib.suppress(OSError):
        save_results(args.out, result)
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
