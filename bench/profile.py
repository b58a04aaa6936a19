"""Where cortex's CPU goes per non-streamed request: a py-spy profile of the gateway under ``loadgen`` at c=32.

Issue 18 asks for the profile's top entries before and after a change; this script makes them repeatable.
One simulated node (no token delay), one cortex (``--no-tui``, metrics on, as in ``run.py``), the load from
``bench/loadgen.py`` in its own process; py-spy samples cortex for the whole load (raw folded stacks), and
the script prints the top functions by self and by inclusive share, and the share per area (aiohttp,
asyncio, cortex, prometheus, the rest).

::

    python bench/profile.py [--requests 20000] [--rate 250] [--top 25] [--cortex-src DIR] [--folded OUT]
    python bench/profile.py --stream --requests 6000     # CPU per streamed chunk (6,000 chunks in 12 streams)

Needs ``py-spy`` (``pip install py-spy``) and permission to ptrace the child (root, or
``kernel.yama.ptrace_scope = 0``). Every process it starts is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    BENCH,
    PY,
    ROOT,
    Procs,
    chat_body,
    cortex_config,
    cortex_models_state,
    free_port,
    http,
    raise_nofile,
    sim_argv,
    wait_for,
)

MODEL = "bench-fast"
BODY = chat_body(MODEL, 16)

AREAS = (
    ("aiohttp", "aiohttp/"),
    ("prometheus", "prometheus_client/"),
    ("asyncio", "asyncio/"),
    ("asyncio", "(selectors.py"),
    ("uvloop", "uvloop"),
    ("cortex", "cortex/"),
)


def area(frame: str) -> str:
    """The area a py-spy frame (``func (file:line)``) belongs to."""
    for name, needle in AREAS:
        if needle in frame:
            return name
    return "other"


def summarise(folded: Path, top: int) -> str:
    """Top functions by self and inclusive share, and the self share per area, from py-spy's raw output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f.split(" (")[0] + " " + f[f.rfind("/") + 1 :].rstrip(")") for f in stack.split(";")]
        raw_frames = stack.split(";")
        total += n
        self_n[frames[-1]] += n
        areas[area(raw_frames[-1])] += n
        for f in set(frames):
            incl_n[f] += n
    if not total:
        return "no samples (is py-spy allowed to attach?)"
    out = [f"{total} samples"]
    out.append("self share per area: " + ", ".join(f"{k} {v / total:.1%}" for k, v in areas.most_common()))
    out.append(f"top {top} by self time:")
    out += [f"  {v / total:6.1%}  {k}" for k, v in self_n.most_common(top)]
    out.append(f"top {top} by inclusive time:")
    out += [f"  {v / total:6.1%}  {k}" for k, v in incl_n.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cortex-src", type=Path, help="run cortex from this copy of the source tree")
    parser.add_argument("--folded", type=Path, help="keep py-spy's folded stacks here")
    parser.add_argument("--pythonpath", help="prepend this to cortex's PYTHONPATH (a sitecustomize, say)")
    parser.add_argument("--cprofile", type=Path, help="run cortex under cProfile instead, writing its stats here")
    parser.add_argument("--no-spy", action="store_true", help="measure CPU only (no profiler): for an A/B")
    parser.add_argument("--anthropic", action="store_true", help="with --stream: POST /v1/messages streams")
    parser.add_argument(
        "--stream", action="store_true", help="streamed chunks instead: 2 streams at a time of 500 chunks at 500/s"
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="cortex-profile-"))
    folded = args.folded or tmp / "profile.folded"
    with Procs(tmp) as procs:
        sport, cport, mport = free_port(), free_port(), free_port()
        procs.start("sim", sim_argv(sport, "sim-fast", models=[f"{MODEL}=4096"], tok_s=500.0 if args.stream else 0.0))
        wait_for(lambda: http("GET", f"http://127.0.0.1:{sport}/health", timeout=1)[0] == 200, 30, "sim")
        conf = tmp / "cortex.toml"
        cortex_config(conf, port=cport, metrics_port=mport, nodes=[("sim-fast", sport, [MODEL])], auth=True)
        src = args.cortex_src
        paths = [p for p in (args.pythonpath, str(src) if src else None) if p]
        env = {**os.environ, "PYTHONPATH": ":".join(paths)} if paths else None
        prof = ["-m", "cProfile", "-o", str(args.cprofile.resolve())] if args.cprofile else []
        argv = [PY, *prof, "-m", "cortex", "--no-tui", "--config", str(conf)]
        cortex = procs.start("cortex", argv, env, src or ROOT)
        base = f"http://127.0.0.1:{cport}"
        wait_for(lambda: cortex_models_state(base).get(MODEL) == "loaded", 60, "cortex", cortex)
        job = {
            "mode": "requests",
            "target": "cortex",
            "host": "127.0.0.1",
            "port": cport,
            "path": "/v1/chat/completions",
            "body": BODY,
            "expect": '"usage"',
            "concurrency": args.concurrency,
            "requests": 2000,
            "warmup": 200,
            "pids": [cortex.pid],
        }
        if args.stream:
            body = json.loads(BODY) | {"max_tokens": 500, "stream": True}
            path, done = ("/v1/messages", "message_stop") if args.anthropic else ("/v1/chat/completions", "[DONE]")
            job = {
                "mode": "stream",
                "target": "cortex",
                "url": f"http://127.0.0.1:{cport}{path}",
                "body": json.dumps(body),
                "warm_body": json.dumps(body | {"max_tokens": 10}),
                "marker": "data:",
                "done": done,
                "expect_events": None,
                "concurrency": 2,
                "streams": max(2, args.requests // 500),
                "warmup": 2,
                "pids": [cortex.pid],
            }
        else:
            warm = tmp / "warm.json"
            warm.write_text(json.dumps(job))
            subprocess.run([PY, str(BENCH / "loadgen.py"), str(warm)], check=True, capture_output=True, timeout=120)
            job["requests"] = args.requests
        main_job = tmp / "job.json"
        main_job.write_text(json.dumps(job))
        spy_argv = [spy, "record", "--pid", str(cortex.pid), "--rate", str(args.rate), "--format", "raw"]
        spy_argv += ["-o", str(folded)]
        rec = procs.start("py-spy", spy_argv if not (args.cprofile or args.no_spy) else ["sleep", "3600"])
        time.sleep(1.0)
        t0 = time.monotonic()
        done = subprocess.run(
            [PY, str(BENCH / "loadgen.py"), str(main_job)], check=True, capture_output=True, text=True, timeout=600
        )
        wall = time.monotonic() - t0
        rec.stop(sig=2, timeout=20)  # SIGINT: py-spy writes its output and exits
        result = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = result.get("cpu_s", 0.0)
    if args.stream:
        events = result.get("events", 0)
        print(f"{events} streamed events in {wall:.1f} s; cortex CPU {1e6 * cpu / max(events, 1):.1f} µs per chunk")
    else:
        reqs = result.get("requests", args.requests)
        print(f"{reqs} requests in {wall:.1f} s; cortex CPU {1e6 * cpu / max(reqs, 1):.1f} µs per request")
    if not (args.cprofile or args.no_spy):
        print(summarise(folded, args.top))
    if args.folded is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
