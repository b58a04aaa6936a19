"""Demand that exceeds VRAM: three models round-robin over two slots. Loads per minute and waits.

One simulated node holds two of three 5000 MiB models at a time; an open-loop client sends a request every
``--interval`` seconds for the next model in turn (a, b, c, a, ...), each generating for a few tenths of a
second. Every request for a model that is not resident waits for a load (``--load-s``), so the eviction and
queueing policy decides how many loads happen and how long requests wait.

Each configuration runs in a child process with ``PYTHONPATH`` set to a source tree, so "before" is the
code of an earlier commit (checked out into a temporary worktree) and "after" is this checkout, measured in
the same run on the same machine::

    python bench/thrash.py --before 8785e6b --out bench/results/thrash.json

Reported per configuration: requests, failures, loads, loads per minute, and the wait for a model (the
gateway's ``x-cortex-queue-ms``) at p50, p95 and max; the verdict compares "after" with the better of the
two "before" settings of ``min_resident_s`` (0: one load per switch; 30: the anti-thrash stall).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "--child" not in sys.argv:  # a child imports cortex from the tree its PYTHONPATH names, not this one
    sys.path.insert(0, str(ROOT))


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


MODELS = ("org/a", "org/b", "org/c")


async def _one_run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in this process (the cortex imported is whatever PYTHONPATH gives)."""
    import aiohttp

    from cortex.config import EvictionSettings, GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
    from cortex.engine.engine import Engine
    from cortex.proxy.app import serve
    from cortex.sim import SimModel, SimNode

    sim = SimNode(
        [SimModel(MODELS[0], 5000), SimModel(MODELS[1], 5000), SimModel(MODELS[2], 5000, loaded=False)],
        name="n",
        vram_mb=10_600,
        base_vram_mb=300,
        load_s=args.load_s,
        tok_s=args.tok_s,
    )
    await sim.start()
    sim.record_requests = True
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="", queue_timeout_s=120, drain_s=0.5),
        poll=PollSettings(interval_s=0.5, timeout_s=2.0),
        eviction=EvictionSettings(strategy="lru", headroom_mb=0, min_resident_s=args.min_resident_s),
        nodes=[NodeSettings(name="n", endpoint=sim.url, vram_mb=10_600)],
        models=[ModelSettings(id=m, vram_mb=5000) for m in MODELS],
    )
    state = Path(tempfile.mkdtemp()) / "state.json"
    waits: list[float] = []
    statuses: list[int] = []
    try:
        async with Engine(settings, state_path=state) as eng, serve(eng) as srv, aiohttp.ClientSession() as http:
            await asyncio.wait_for(eng.ready.wait(), 10)

            async def one(model: str) -> None:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": args.tokens}
                try:
                    async with http.post(srv.url + "/v1/chat/completions", json=body) as resp:
                        await resp.read()
                        statuses.append(resp.status)
                        if resp.status == 200:
                            waits.append(float(resp.headers.get("x-cortex-queue-ms", "0")) / 1000)
                except aiohttp.ClientError:
                    statuses.append(0)

            started = time.monotonic()
            tasks = []
            count = int(args.seconds / args.interval)
            for i in range(count):
                delay = started + i * args.interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(MODELS[i % len(MODELS)])))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
    finally:
        await sim.stop()
    loads = sum(
        1
        for r in sim.requests
        if r.path == "/v1/models/reload" and isinstance(r.json, dict) and r.json.get("model_id") in MODELS
    )
    return {
        "requests": len(statuses),
        "failed": sum(1 for s in statuses if s != 200),
        "loads": loads,
        "loads_per_min": round(loads * 60 / elapsed, 1),
        "p50_wait_s": round(quantile(waits, 0.5), 3) if waits else None,
        "p95_wait_s": round(quantile(waits, 0.95), 3) if waits else None,
        "max_wait_s": round(max(waits), 3) if waits else None,
        "seconds": round(elapsed, 1),
    }


def _child(src: Path, args: argparse.Namespace, min_resident_s: float) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--min-resident-s",
        str(min_resident_s),
        "--seconds",
        str(args.seconds),
        "--interval",
        str(args.interval),
        "--load-s",
        str(args.load_s),
        "--tok-s",
        str(args.tok_s),
        "--tokens",
        str(args.tokens),
    ]
    env = {**os.environ, "PYTHONPATH": str(src)}
    check = "import cortex, sys; sys.stdout.write(cortex.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", check], env=env, cwd=src, capture_output=True, text=True, check=True
    ).stdout
    assert where.startswith(str(src)), f"{src}: cortex imported from {where}"
    out = subprocess.run(
        argv, env=env, cwd=src, capture_output=True, text=True, timeout=args.seconds * 4 + 120, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed ({src}, min_resident_s={min_resident_s}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="8785e6b", help="the commit whose behaviour is 'before'")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the traffic in each run")
    parser.add_argument("--interval", type=float, default=0.4, help="seconds between two requests")
    parser.add_argument("--load-s", type=float, default=1.5, help="seconds a model load takes")
    parser.add_argument("--tok-s", type=float, default=100.0, help="decode speed of the simulated node")
    parser.add_argument("--tokens", type=int, default=20, help="max_tokens of each request")
    parser.add_argument("--min-resident-s", type=float, default=30.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_one_run(args))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before],
            check=True,
            capture_output=True,
        )
        try:
            results = {
                "before min_resident_s=0": _child(old, args, 0.0),
                "before min_resident_s=30": _child(old, args, 30.0),
                "after (defaults: min_resident_s=0)": _child(ROOT, args, 0.0),
                "after min_resident_s=30": _child(ROOT, args, 30.0),
            }
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False, capture_output=True
            )
    for name, row in results.items():
        print(f"{name:38s} " + "  ".join(f"{k}={v}" for k, v in row.items()))
    base = results["before min_resident_s=0"]
    after = results["after (defaults: min_resident_s=0)"]
    ratio = after["loads"] / base["loads"] if base["loads"] else float("nan")
    print(
        f"\nloads after/before(min_resident_s=0): {ratio:.2f}   "
        f"p95 wait after/before: {after['p95_wait_s']} / {base['p95_wait_s']}"
    )
    from bench.benchlib import save_results

    save_results(args.out, {"args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results})


if __name__ == "__main__":
    main()
