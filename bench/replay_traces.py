"""Generated traces for ``cortex replay``, and the strategy figures measured on them.

Three workloads, each with the fleet it runs on (seeded, so the same files every time):

* ``homelab``: a day of a small lab: two nodes (48 and 24 GiB), eight models of 4-30 GiB, a diurnal
  arrival rate, Zipf popularity and sessions (a user keeps to one model for a while). 7,835 requests.
* ``scan``: an evaluation harness walks 16 models one after another (200 prompts each, 4 in flight), twice,
  while chat traffic for two everyday models goes on.
* ``swarm``: eight agents loop plan, code x3, review over three models that never fit on their node
  together (any two do), for two hours.

::

    python bench/replay_traces.py --out-dir bench/results/traces          # write the traces and fleets
    python bench/replay_traces.py --out-dir bench/results/traces --replay --out bench/results/replay.json

``--replay`` runs every strategy on every trace (``cortex.replay.replay_all``) and prints one row per
(trace, strategy) with the real seconds each replay took. ``--frontier`` adds a lower bound for the swarm
(:func:`swarm_frontier`): the fewest loads *any* policy needs to keep its p95 wait within 120 s and 150 s,
which shows what the swarm target asks is out of reach (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Trace = list[dict[str, Any]]
Fleet = dict[str, Any]


def _dur(rng: random.Random, median: float, sigma: float = 0.8, cap: float = 120.0) -> float:
    return round(min(cap, rng.lognormvariate(math.log(median), sigma)), 3)


def homelab(seed: int = 1, target: int = 7835) -> tuple[Trace, Fleet]:
    """A day of home-lab traffic (see the module docstring)."""
    rng = random.Random(seed)
    models = [
        ("Qwen/Qwen3-32B", 30_000, 75.0),
        ("Qwen/Qwen3-14B", 15_000, 40.0),
        ("google/gemma-3-27b-it", 26_000, 65.0),
        ("mistralai/Devstral-Small", 22_000, 55.0),
        ("Qwen/Qwen3-8B", 9_000, 25.0),
        ("google/gemma-3-12b-it", 12_000, 32.0),
        ("microsoft/Phi-4", 14_000, 36.0),
        ("Qwen/Qwen3-4B", 4_500, 12.0),
    ]
    fleet: Fleet = {
        "nodes": [
            {"name": "gpu-large", "vram_mb": 49_152, "models": [m for m, _, _ in models], "pinned": []},
            {
                "name": "gpu-small",
                "vram_mb": 24_576,
                "models": [m for m, mb, _ in models if mb <= 22_000],
                "pinned": [],
            },
        ],
        "models": [{"id": m, "mb": mb, "load_s": ls, "priority": 0} for m, mb, ls in models],
    }
    weights = [1 / (i + 1) ** 1.3 for i in range(len(models))]
    trace: Trace = []
    t = 0.0
    day = 86_400.0
    while True:
        # sessions start at a diurnal rate (busy 7-23 h); a session keeps to one model, a request every ~15 s
        hour = (t / 3600.0) % 24
        busy = 0.1 + 0.9 * math.sin(math.pi * (hour - 7) / 16) if 7 <= hour <= 23 else 0.1
        t += rng.expovariate(busy / 105.0)
        if t >= day:
            break
        model = rng.choices(models, weights)[0][0]
        at = t
        for _ in range(1 + int(rng.expovariate(1 / 20.0))):
            trace.append({"t": round(at, 3), "model": model, "dur": _dur(rng, 6.0)})
            at += rng.expovariate(1 / 15.0)
            if at >= day:
                break
    if len(trace) > target:  # exactly `target` requests: drop a random few
        trace = [trace[i] for i in sorted(rng.sample(range(len(trace)), target))]
    trace.sort(key=lambda r: r["t"])
    return trace, fleet


def scan(seed: int = 2) -> tuple[Trace, Fleet]:
    """An evaluation scan over 16 models, twice, beside chat traffic (see the module docstring)."""
    rng = random.Random(seed)
    sizes = [rng.choice((4_500, 9_000, 15_000, 24_000)) for _ in range(16)]
    evals = [(f"eval/model-{i:02d}", mb, round(8 + mb / 500, 1)) for i, mb in enumerate(sizes)]
    chat = [("Qwen/Qwen3-14B", 15_000, 40.0), ("Qwen/Qwen3-4B", 4_500, 12.0)]
    everything = evals + chat
    fleet: Fleet = {
        "nodes": [
            {"name": "gpu-a", "vram_mb": 49_152, "models": [m for m, _, _ in everything], "pinned": []},
            {"name": "gpu-b", "vram_mb": 49_152, "models": [m for m, _, _ in everything], "pinned": []},
        ],
        "models": [{"id": m, "mb": mb, "load_s": ls, "priority": 0} for m, mb, ls in everything],
    }
    trace: Trace = []
    t = 60.0
    for _ in range(2):
        for model, _, _ in evals:
            # 200 prompts, 4 in flight: arrivals spaced by a quarter of a typical answer
            for _ in range(200):
                trace.append({"t": round(t, 3), "model": model, "dur": _dur(rng, 2.0, 0.5, 20.0)})
                t += rng.expovariate(1 / 0.5)
            t += 30.0
    end = t
    c = 0.0
    while c < end:
        c += rng.expovariate(1 / 45.0)
        trace.append({"t": round(c, 3), "model": rng.choice(chat)[0], "dur": _dur(rng, 8.0)})
    trace.sort(key=lambda r: r["t"])
    return trace, fleet


def swarm(seed: int = 3, agents: int = 8, hours: float = 2.0) -> tuple[Trace, Fleet]:
    """Agents cycling three models that never fit on their node together (see the module docstring)."""
    rng = random.Random(seed)
    planner, coder, reviewer = "swarm/planner-32b", "swarm/coder-24b", "swarm/reviewer-14b"
    fleet: Fleet = {
        "nodes": [{"name": "gpu", "vram_mb": 49_152, "models": [planner, coder, reviewer], "pinned": []}],
        "models": [
            {"id": planner, "mb": 24_000, "load_s": 60.0, "priority": 0},
            {"id": coder, "mb": 20_000, "load_s": 50.0, "priority": 0},
            {"id": reviewer, "mb": 14_000, "load_s": 35.0, "priority": 0},
        ],
    }
    trace: Trace = []
    end = hours * 3600.0
    for _ in range(agents):
        t = rng.uniform(0, 120)
        while t < end:
            for model, steps, median in ((planner, 1, 12.0), (coder, 3, 8.0), (reviewer, 1, 5.0)):
                for _ in range(steps):
                    dur = _dur(rng, median, 0.5, 60.0)
                    trace.append({"t": round(t, 3), "model": model, "dur": dur})
                    t += dur + rng.expovariate(1 / 3.0)  # the agent's own work between calls
            t += rng.expovariate(1 / 20.0)
    trace.sort(key=lambda r: r["t"])
    return trace, fleet


WORKLOADS = {"homelab": homelab, "scan": scan, "swarm": swarm}


def swarm_frontier(trace: Trace, fleet: Fleet, wait_s: float, step: float = 0.5, most: int = 200) -> int:
    """The fewest loads ANY policy needs on a one-node fleet where any two models fit, never all three, to keep
    all but 5 % of the requests waiting at most ``wait_s`` (-1: more than ``most`` switches).

    A relaxation, so a true lower bound: one model is always out; a switch at s evicts V and loads the out
    model X (ready at s + load_s(X)); V stays out until the next switch, which must load it, is done. A
    request for V arriving in V's out time [s, s' + load_s(V)) waits until its end; the dynamic programme
    over switch times (on a ``step`` grid, counting only arrivals strictly inside, so never too many) finds
    the fewest such requests that wait more than ``wait_s`` for each number of switches. Busy models, request
    durations and the two first loads are ignored (they only add waits), so it is optimistic.
    """
    load = {m["id"]: float(m["load_s"]) for m in fleet["models"]}
    models = sorted(load)
    t0 = trace[0]["t"]
    cells = int((trace[-1]["t"] - t0) / step) + 2
    cum: dict[str, list[float]] = {}
    for m in models:
        counts = [0.0] * (cells + 3)
        for r in trace:
            if r["model"] == m:
                counts[int((r["t"] - t0) / step) + 1] += 1
        run, acc = [], 0.0
        for c in counts:
            acc += c
            run.append(acc)
        cum[m] = run  # cum[m][i]: arrivals in cells < i

    def inside(m: str, a: int, e: int) -> float:  # arrivals surely in [a, e) cells: a+1 .. e-2
        run = cum[m]
        hi, lo = min(max(e - 1, 0), cells + 2), min(max(a + 1, 0), cells + 2)
        return max(0.0, run[hi] - run[min(lo, hi)])

    allowed = len(trace) - math.ceil(0.95 * len(trace))
    w = int(wait_s // step)
    inf = float("inf")
    # best[(X, V)][s]: fewest long waits settled before a switch at cell s that loads X and evicts V
    best = {
        (x, v): [inside(x, 0, s + int(load[x] // step) - w) for s in range(cells + 1)]
        for x in models
        for v in models
        if v != x
    }
    for switches in range(1, most + 1):
        last = min(min(d[s] + inside(v, s, cells - w) for s in range(cells + 1)) for (_, v), d in best.items())
        if last <= allowed:
            return switches + 2  # and the two loads that fill the node at the start
        nxt: dict[tuple[str, str], list[float]] = {}
        for (x, v), d in best.items():
            lx, lv, run = math.ceil(load[x] / step), int(load[v] // step), cum[v]
            prefix, low = [], inf
            for s in range(cells + 1):
                low = min(low, d[s] - run[min(s + 1, cells + 2)])
                prefix.append(low)
            row = [inf] * (cells + 1)
            window: list[tuple[int, float]] = []  # monotonic queue: min of d where a zero-cost switch may start
            for s2 in range(cells + 1):
                j = s2 + lv - w - 3  # switches at s <= j leave some of V's requests waiting too long
                if 0 <= j <= s2 - lx:
                    row[s2] = prefix[j] + run[min(max(s2 + lv - w - 1, 0), cells + 2)]
                hi = s2 - lx
                if hi >= 0:
                    while window and window[-1][1] >= d[hi]:
                        window.pop()
                    window.append((hi, d[hi]))
                    while window and window[0][0] < max(0, j + 1):
                        window.pop(0)
                    if window:
                        row[s2] = min(row[s2], window[0][1])
            for v2 in models:
                if v2 != v:
                    key = (v, v2)
                    old = nxt.get(key)
                    nxt[key] = row if old is None else [min(a, b) for a, b in zip(old, row, strict=True)]
        best = nxt
    return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="bench/results/traces", help="where the traces and fleets go")
    parser.add_argument("--replay", action="store_true", help="replay every trace under every strategy")
    parser.add_argument("--out", help="write the replay figures here as JSON")
    parser.add_argument(
        "--frontier",
        action="store_true",
        help="also print the fewest loads any policy needs on the swarm for a p95 wait of 120 and 150 s (~15 s)",
    )
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    for name, make in WORKLOADS.items():
        trace, fleet = make()
        trace_path = out_dir / f"{name}.jsonl"
        trace_path.write_text("".join(json.dumps(r) + "\n" for r in trace))
        (out_dir / f"{name}.fleet.json").write_text(json.dumps(fleet, indent=1) + "\n")
        print(f"{trace_path}: {len(trace)} requests")
        if not args.replay:
            continue
        from cortex.replay import STRATEGIES, read_fleet, read_trace, replay

        requests = read_trace(trace_path)
        spec = read_fleet(out_dir / f"{name}.fleet.json")
        figures[name] = {}
        for strategy in STRATEGIES:
            started = time.perf_counter()
            result = replay(requests, spec, strategy).as_dict()
            result["real_s"] = round(time.perf_counter() - started, 2)
            result.pop("hourly_wait_s")
            figures[name][strategy] = result
            print(f"  {strategy:8} " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        if args.frontier and name == "swarm":
            for wait_s in (120.0, 150.0):
                need = swarm_frontier(trace, fleet, wait_s)
                print(f"  swarm: any policy needs >= {need} loads for a p95 wait <= {wait_s:g} s", flush=True)
    if args.out and figures:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
