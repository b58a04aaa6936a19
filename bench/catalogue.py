"""The catalogue at scale: ``GET /v1/models`` and polling with 64 nodes of 32 models each (issue 18 point 4).

    python bench/catalogue.py [--nodes 64] [--models 32] [--requests 600] [--idle-s 10] [--out FILE]
                              [--cortex-src DIR] [--keep-logs] [--nice N]

One process (``bench/catalogue.py --serve-fleet``) runs every simulated node (``cortex.sim.SimNode``, each
on its own loopback port, one event loop: a many-node fleet in one process); cortex runs as its own process
with all of them in its config. Two scenarios, each with a fresh fleet and a fresh cortex:

* ``shared``   — every node lists the same ``--models`` ids (the catalogue has ``--models`` entries);
* ``distinct`` — every node lists its own ids (``--nodes`` x ``--models`` entries: 2,048 by default).

Per scenario: cortex's CPU while idle (nothing but polling every node every 2 s) as a share of one core;
then ``--requests`` sequential ``GET /v1/models`` on one keep-alive connection (OpenAI shape) and as many
with ``anthropic-version`` and ``limit=1000`` (Anthropic shape, first page), latency p50/p95/max as the
client sees it, and cortex's CPU per request. The requests run while the polls go on (the same 2 s
interval), so a poll that changes nothing must not make the next answer slow; halfway through, one model
is loaded on one node through the admin API (a fleet change) and the answers after it must show it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    PY,
    ROOT,
    Procs,
    cortex_config,
    cpu_seconds,
    free_port,
    median,
    quantile,
    raise_nofile,
    save_results,
    term_on_sigterm,
    wait_for,
)

P50_LIMIT_MS = 2.0
P95_LIMIT_MS = 5.0
POLL_LIMIT = 0.05  # share of one core


def model_ids(scenario: str, node: int, models: int) -> list[str]:
    if scenario == "shared":
        return [f"org/shared-model-{j:02d}" for j in range(models)]
    return [f"org{node:02d}/model-{node:02d}-{j:02d}" for j in range(models)]


# -- the fleet process ------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def serve_fleet(port_file: Path, scenario: str, nodes: int, models: int) -> None:
    """Start ``nodes`` SimNodes in this loop, write their ports to ``port_file``, run until SIGTERM."""
    from cortex.sim.models import SimModel
    from cortex.sim.node import SimNode

    sims = []
    for i in range(nodes):
        ids = model_ids(scenario, i, models)
        # Two models loaded per node (most of a real catalogue sits unloaded), 1 GiB each.
        specs = [SimModel(m, 1024, loaded=j < 2) for j, m in enumerate(ids)]
        sim = SimNode(specs, name=f"n{i:02d}", vram_mb=65536, load_s=0.05, tok_s=0.0)
        sim.record_requests = False
        await sim.start()
        sims.append(sim)
    write_atomic(port_file, json.dumps([s.port for s in sims]))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    for sim in sims:
        await sim.stop()


# -- the client ---------------------------------------------------------------------------------------------


def get_models(conn: http.client.HTTPConnection, anthropic: bool) -> tuple[float, int, bytes]:
    headers = {"anthropic-version": "2023-06-01"} if anthropic else {}
    path = "/v1/models?limit=1000" if anthropic else "/v1/models"
    t0 = time.perf_counter()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    body = resp.read()
    return time.perf_counter() - t0, resp.status, body


def measure_requests(
    port: int, n: int, cortex_pid: int, anthropic: bool, on_half: Any = None
) -> tuple[dict[str, Any], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(20):
        get_models(conn, anthropic)
    lat: list[float] = []
    errors = 0
    cpu0 = cpu_seconds([cortex_pid])
    body = b""
    for i in range(n):
        if on_half is not None and i == n // 2:
            on_half()
        dt_s, status, body = get_models(conn, anthropic)
        lat.append(dt_s * 1000)
        errors += status != 200
    cpu = cpu_seconds([cortex_pid]) - cpu0
    conn.close()
    return {
        "requests": n,
        "errors": errors,
        "p50_ms": median(lat),
        "p95_ms": quantile(lat, 0.95),
        "max_ms": max(lat),
        "cpu_us_per_req": cpu / n * 1e6,
        "bytes": len(body),
    }, body


def admin(port: int, method: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=json.dumps(body), headers={"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def run_scenario(scenario: str, args: argparse.Namespace, tmp: Path, log: Any) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["XDG_STATE_HOME"] = str(tmp / f"state-{scenario}")
    env["PYTHONUNBUFFERED"] = "1"
    port_file = tmp / f"ports-{scenario}.json"
    with Procs(tmp) as procs:
        fleet = procs.start(
            f"fleet-{scenario}",
            [PY, __file__, "--serve-fleet", str(port_file), scenario, str(args.nodes), str(args.models)],
            env,
        )
        wait_for(port_file.exists, 60, "the fleet to listen", fleet)
        ports: list[int] = json.loads(port_file.read_text())
        cport, mport = free_port(), free_port()
        conf = tmp / f"cortex-{scenario}.toml"
        cortex_config(conf, port=cport, metrics_port=mport, nodes=[(f"n{i:02d}", p, []) for i, p in enumerate(ports)])
        src: Path | None = args.cortex_src
        cortex_env, cwd = (env, ROOT) if src is None else (env | {"PYTHONPATH": str(src)}, src)
        cortex = procs.start(
            f"cortex-{scenario}", [PY, "-m", "cortex", "--no-tui", "--config", str(conf)], cortex_env, cwd
        )
        expected = args.models if scenario == "shared" else args.nodes * args.models
        conn = http.client.HTTPConnection("127.0.0.1", cport, timeout=30)

        def listed() -> bool:
            try:
                _, status, body = get_models(conn, False)
            except OSError:
                conn.close()
                return False
            return status == 200 and len(json.loads(body)["data"]) == expected

        t0 = time.monotonic()
        wait_for(listed, 120, f"cortex to list {expected} models", cortex)
        conn.close()
        log(f"{scenario}: cortex lists {expected} models after {time.monotonic() - t0:.1f} s; settling")
        time.sleep(3.0)
        c0 = cpu_seconds([cortex.pid])
        time.sleep(args.idle_s)
        idle_share = (cpu_seconds([cortex.pid]) - c0) / args.idle_s
        log(f"{scenario}: idle (polling {args.nodes} nodes every 2 s): {100 * idle_share:.2f} % of a core")

        target = model_ids(scenario, 0, args.models)[-1]  # unloaded on n00

        def change() -> None:
            status, body = admin(cport, "POST", f"/admin/models/{target}/load", {"node": "n00"})
            if status != 200:
                raise RuntimeError(f"load {target}: {status} {body[:200]!r}")

        openai, body = measure_requests(cport, args.requests, cortex.pid, False, on_half=change)
        entry = next(e for e in json.loads(body)["data"] if e["id"] == target)
        seen_change = entry["cortex"]["state"] == "loaded" and "n00" in entry["cortex"]["nodes"]
        log(
            f"{scenario}: OpenAI /v1/models ({openai['bytes']} bytes) p50 {openai['p50_ms']:.2f} ms  "
            f"p95 {openai['p95_ms']:.2f} ms  max {openai['max_ms']:.1f} ms  cpu/req {openai['cpu_us_per_req']:.0f} µs"
            f"  load seen: {seen_change}"
        )
        anthropic, abody = measure_requests(cport, args.requests, cortex.pid, True)
        page = json.loads(abody)
        log(
            f"{scenario}: Anthropic /v1/models (first page of {len(page['data'])}) p50 {anthropic['p50_ms']:.2f} ms"
            f"  p95 {anthropic['p95_ms']:.2f} ms  max {anthropic['max_ms']:.1f} ms"
            f"  cpu/req {anthropic['cpu_us_per_req']:.0f} µs"
        )
        return {
            "entries": expected,
            "idle_core_share": idle_share,
            "openai": openai,
            "anthropic": anthropic,
            "change_seen": seen_change,
        }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-fleet":
        _, _, port_file, scenario, nodes, models = sys.argv
        asyncio.run(serve_fleet(Path(port_file), scenario, int(nodes), int(models)))
        return 0
    parser = argparse.ArgumentParser(description="/v1/models and polling at 64 nodes x 32 models.")
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--scenario", choices=["shared", "distinct", "both"], default="both")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--cortex-src", type=Path)
    parser.add_argument("--nice", type=int, default=-10)
    args = parser.parse_args()
    if args.cortex_src is not None:
        args.cortex_src = args.cortex_src.resolve()
    term_on_sigterm()
    raise_nofile()
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            print(f"(cannot change priority by {args.nice}: not root)")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="cortex-catalogue-"))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    result: dict[str, Any] = {}
    try:
        scenarios = ["shared", "distinct"] if args.scenario == "both" else [args.scenario]
        for scenario in scenarios:
            result[scenario] = run_scenario(scenario, args, tmp, log)
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    checks = {}
    if "distinct" in result:
        d = result["distinct"]
        checks["p50"] = {
            "ms": d["openai"]["p50_ms"],
            "limit": P50_LIMIT_MS,
            "met": d["openai"]["p50_ms"] <= P50_LIMIT_MS,
        }
        checks["p95"] = {
            "ms": d["openai"]["p95_ms"],
            "limit": P95_LIMIT_MS,
            "met": d["openai"]["p95_ms"] <= P95_LIMIT_MS,
        }
        checks["change_seen"] = {"met": d["change_seen"]}
    for name, r in result.items():
        checks[f"polling_{name}"] = {
            "share": r["idle_core_share"],
            "limit": POLL_LIMIT,
            "met": r["idle_core_share"] <= POLL_LIMIT,
        }
    result["checks"] = checks
    result["meta"] = {
        "command": " ".join(["python", "bench/catalogue.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nodes": args.nodes,
        "models": args.models,
        "wall_s": time.monotonic() - started,
    }
    print()
    for key, chk in checks.items():
        detail = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in chk.items() if k != "met"}
        print(f"  {'MET ' if chk['met'] else 'MISS'} {key}: {detail}")
    save_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
