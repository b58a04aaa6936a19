"""Added latency at concurrency 1, for one or more copies of cortex side by side: an A/B for the latency path.

    python bench/latency_ab.py [--src NAME=PATH ...] [--rounds 3] [--requests 1000] [--order shuffled|rotated]

One simulated node (no token delay) and, in front of it, every copy of cortex named by ``--src`` (default:
this checkout, as ``cortex``), the minimal aiohttp proxy and the floor (``floor_proxy.py``: bytes copied,
nothing parsed). ``loadgen``'s interleaved job sends one request to each target in turn, in a fresh random
order every round, so that each target follows every other as often. For each of ``--rounds`` jobs it
prints every target's added p50 (its p50 minus the node's own), as a ratio to the minimal proxy's, and each
later copy of cortex as a ratio to the first. Two copies of the same tree measure the noise.

``run.py`` gives the figures to quote; this is for deciding whether a change to the latency path pays
(``git worktree add /tmp/base HEAD~1`` for the tree before it). Every process it starts is stopped when it
ends.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
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
    free_port,
    http,
    save_results,
    sim_argv,
    wait_for,
)

MODEL = "bench-fast"
BODY = chat_body(MODEL, 16)


def _up(url: str) -> bool:
    return http("GET", url, timeout=1)[0] == 200


def _loaded(base: str) -> bool:
    return cortex_models_state(base).get(MODEL) == "loaded"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", action="append", default=[], help="NAME=PATH: a copy of the source tree to run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000, help="requests per target and round")
    parser.add_argument("--order", choices=["shuffled", "rotated"], default="shuffled")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sources = dict(s.split("=", 1) for s in args.src) if args.src else {"cortex": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="cortex-latab-"))
    rounds: list[dict[str, Any]] = []
    with Procs(tmp) as procs:
        node = free_port()
        procs.start("sim", sim_argv(node, "sim-fast", models=[f"{MODEL}=4096"], tok_s=0.0))
        wait_for(functools.partial(_up, f"http://127.0.0.1:{node}/health"), 30, "sim")
        ports: dict[str, int] = {"direct": node}
        pids: dict[str, list[int]] = {"direct": []}
        for name, src in sources.items():
            port = free_port()
            conf = tmp / f"{name}.toml"
            cortex_config(conf, port=port, metrics_port=free_port(), nodes=[("sim-fast", node, [MODEL])], auth=True)
            argv = [PY, "-m", "cortex", "--no-tui", "--config", str(conf)]
            proc = procs.start(name, argv, os.environ | {"PYTHONPATH": str(Path(src).resolve())}, Path(src).resolve())
            wait_for(functools.partial(_loaded, f"http://127.0.0.1:{port}"), 60, name, proc)
            ports[name], pids[name] = port, [proc.pid]
        for name, script, route in (
            ("minimal", "minimal_proxy.py", "http://127.0.0.1:%d"),
            ("floor", "floor_proxy.py", "127.0.0.1:%d"),
        ):
            port = free_port()
            proc = procs.start(name, [PY, str(BENCH / script), "--route", f"127.0.0.1:{port}=" + route % node])
            wait_for(functools.partial(_up, f"http://127.0.0.1:{port}/health"), 30, name, proc)
            ports[name], pids[name] = port, [proc.pid]
        for i in range(args.rounds):
            job = {
                "mode": "interleaved",
                "kind": "requests",
                "targets": [{"name": n, "host": "127.0.0.1", "port": p, "pids": pids[n]} for n, p in ports.items()],
                "path": "/v1/chat/completions",
                "body": BODY,
                "expect": '"usage"',
                "requests": args.requests,
                "warmup": 50,
                "seed": i,
                "order": args.order,
            }
            path = tmp / f"job{i}.json"
            path.write_text(json.dumps(job))
            out = subprocess.run([PY, str(BENCH / "loadgen.py"), str(path)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(f"loadgen failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])["targets"]
            direct = res["direct"]["p50_ms"]
            added = {n: (r["p50_ms"] - direct) * 1000 for n, r in res.items() if n != "direct"}
            errors = sum(r["errors"] for r in res.values())
            first = next(iter(sources))
            row: dict[str, Any] = {
                "added_p50_us": added,
                "to_minimal": {n: a / added["minimal"] for n, a in added.items()},
                "to_first": {n: added[n] / added[first] for n in sources},
                "errors": errors,
            }
            rounds.append(row)
            print(
                f"round {i + 1}: "
                + "  ".join(f"{n} {a:.0f} µs ({row['to_minimal'][n]:.2f}x min)" for n, a in added.items())
                + (f"  | vs {first}: " + "  ".join(f"{n} {v:.3f}x" for n, v in row["to_first"].items() if n != first))
                * (len(sources) > 1)
                + (f"  ERRORS {errors}" if errors else ""),
                flush=True,
            )
    save_results(args.out, {"meta": vars(args) | {"out": str(args.out)}, "sources": sources, "rounds": rounds})
    return 1 if any(r["errors"] for r in rounds) else 0


if __name__ == "__main__":
    raise SystemExit(main())
