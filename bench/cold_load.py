"""Cold loads through cortex: time to first token, and how fast queued requests are released.

    python bench/cold_load.py [--quick] [--load-s 2] [--queued 100] [--out bench/results/FILE.json]

Issue 3 point 12: time from request to first token for a model loaded nowhere must be the node's load time
plus at most 50 ms of cortex; 100 requests queued behind one load must be released within 20 ms of
``loaded``.

Set-up, all on loopback: one simulated node (``bench/tapped_sim.py``: ``cortex sim`` that also prints the
``time.monotonic()`` of every reload start and answer and of every chat request's arrival) with
``bench-warm`` loaded and ``bench-cold`` unloaded, ``--load-s`` seconds per load and no token delay; and
cortex (``python -m cortex --no-tui``) in front of it. This script is the client, in its own process.

1. **Direct TTFT**: streaming requests for the loaded model straight to the node; time to the first
   ``data:`` byte (median). Also the same through cortex, for reference.
2. **Cold TTFT** (repeated): the cold model is unloaded through cortex's admin API, then one streaming
   request asks for it through cortex. ``extra = TTFT - load - direct TTFT``, where ``load`` is the
   node's own reload time (answer - start, from the node's timestamps). The parts of the extra: request
   sent → reload asked (cortex deciding), reload answered → chat request at the node (cortex releasing),
   and the rest (the node's answer and the way back, compared with a direct request).
3. **Queued release**: after another unload, ``--queued`` streaming requests for the cold model at once.
   Reported: reloads the node saw (must be one), requests completed, and the time from the node's reload
   answer to the last queued request arriving at the node (cortex's release, target ≤ 20 ms), and to the
   first and last first token at the client (which also include the node serving them all).

Uses ``time.monotonic()`` throughout, so the node's timestamps and the client's are on one clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    BENCH,
    PY,
    Procs,
    chat_body,
    cortex_config,
    cortex_models_state,
    free_port,
    http,
    median,
    raise_nofile,
    save_results,
    term_on_sigterm,
    wait_for,
)
from wiretap import WireTap, released

WARM, COLD = "bench-warm", "bench-cold"
EXTRA_LIMIT_MS = 50.0
RELEASE_LIMIT_MS = 20.0


def body(model: str, max_tokens: int = 16) -> bytes:
    return chat_body(model, max_tokens, stream=True).encode()


async def first_token(session: aiohttp.ClientSession, url: str, data: bytes) -> dict[str, Any]:
    """Send one streaming request; when it was sent, when the first ``data:`` arrived, and whether it ended."""
    sent = time.monotonic()
    first = None
    tail = b""
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp:
        buf = b""
        async for chunk in resp.content.iter_any():
            if first is None:
                buf += chunk
                if b"data:" in buf:  # ": loading ..." comments before it do not count
                    first = time.monotonic()
            tail = (tail + chunk)[-64:]
        status = resp.status
    return {"sent": sent, "first": first, "status": status, "done": b"[DONE]" in tail}


class Tap:
    """The node's event lines (``bench/tapped_sim.py``), read from its log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def events(self, since: float = 0.0) -> list[tuple[str, float, str]]:
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 2)
            if len(parts) >= 2 and parts[0] in ("reload_start", "reload_answer", "chat", "http"):
                try:
                    at = float(parts[1])
                except ValueError:
                    continue
                if at >= since:
                    out.append((parts[0], at, parts[2] if len(parts) > 2 else ""))
        return out


async def queued_round(
    session: aiohttp.ClientSession, base: str, tap: Tap, n: int, wire: WireTap | None
) -> dict[str, Any]:
    """``n`` streaming requests for the unloaded cold model at once; when the node saw them, and the client."""
    t0 = time.monotonic()
    if wire is not None:
        wire.clear()
    results = await asyncio.gather(
        *(first_token(session, base + "/v1/chat/completions", body(COLD)) for _ in range(n)), return_exceptions=True
    )
    await asyncio.sleep(0.1)
    on_wire = (
        released(wire.captured(), wire.port, b"/v1/models/reload", b'"loaded"', b"/v1/chat/completions")
        if wire is not None
        else {"loaded_seen": False, "sends_ms": []}
    )
    sends = on_wire["sends_ms"]
    assert isinstance(sends, list)
    ok = [r for r in results if isinstance(r, dict) and r["status"] == 200 and r["done"] and r["first"]]
    ev = tap.events(since=t0)
    starts = [t for k, t, _ in ev if k == "reload_start"]
    answers = [t for k, t, d in ev if k == "reload_answer" and d.endswith(" loaded")]
    chats = sorted(t for k, t, d in ev if k == "chat" and d == COLD)
    if not answers:
        raise RuntimeError(f"queued: the node never answered a reload ({ev[:5]})")
    loaded = answers[0]
    firsts = sorted(r["first"] for r in ok)
    return {
        "requests": n,
        "completed": len(ok),
        "errors": [repr(r)[:200] for r in results if not (isinstance(r, dict) and r in ok)][:5],
        "reloads_at_node": len(starts),
        "chats_at_node": len(chats),
        "chat_before_loaded": sum(1 for t in chats if t < loaded),
        "node_load_ms": (loaded - starts[0]) * 1e3 if starts else None,
        "wire_tap": wire is not None,
        "sent_on_wire": len(sends),
        "tap_dropped_packets": wire.dropped if wire is not None else None,
        "loaded_on_wire_at": on_wire.get("loaded_at"),
        "loaded_to_first_send_on_wire_ms": sends[0] if sends else None,
        "loaded_to_last_send_on_wire_ms": sends[-1] if sends else None,
        "loaded_to_first_chat_at_node_ms": (chats[0] - loaded) * 1e3 if chats else None,
        "loaded_to_last_chat_at_node_ms": (chats[-1] - loaded) * 1e3 if chats else None,
        "first_to_last_chat_at_node_ms": (chats[-1] - chats[0]) * 1e3 if chats else None,
        "loaded_to_first_token_first_ms": (firsts[0] - loaded) * 1e3 if firsts else None,
        "loaded_to_first_token_last_ms": (firsts[-1] - loaded) * 1e3 if firsts else None,
        "node_saw_between_loaded_and_first_chat": [
            f"{(t - loaded) * 1e3:8.2f} ms  {k} {d}"
            for k, t, d in ev
            if k == "http" and loaded < t < (chats or [1e18])[0]
        ],
    }


def unload_cold(base: str) -> None:
    """Unload the cold model through cortex (when it is loaded) and wait until cortex lists it unloaded."""
    if cortex_models_state(base).get(COLD) == "unloaded":
        return
    status, text = http("POST", f"{base}/admin/models/{COLD}/unload", {}, timeout=30)
    if status != 200:
        raise RuntimeError(f"admin unload answered {status}: {text[:300]!r}")
    wait_for(lambda: cortex_models_state(base).get(COLD) == "unloaded", 30, f"cortex to show {COLD} unloaded")


async def run(
    args: argparse.Namespace, base: str, node_url: str, tap: Tap, log: Any, wire: WireTap | None
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        # 1. direct (and through cortex) TTFT for a loaded model
        for _ in range(10):
            await first_token(session, node_url + "/v1/chat/completions", body(WARM))
            await first_token(session, base + "/v1/chat/completions", body(WARM))
        direct, via = [], []
        for _ in range(args.warm_n):
            r = await first_token(session, node_url + "/v1/chat/completions", body(WARM))
            direct.append(r["first"] - r["sent"])
            r = await first_token(session, base + "/v1/chat/completions", body(WARM))
            via.append(r["first"] - r["sent"])
        direct_ms, via_ms = median(direct) * 1e3, median(via) * 1e3
        log(f"loaded model, TTFT p50: direct {direct_ms:.2f} ms, through cortex {via_ms:.2f} ms")

        # 2. one cold request at a time
        trials = []
        for i in range(args.trials):
            await asyncio.to_thread(unload_cold, base)
            await asyncio.sleep(0.2)
            r = await first_token(session, base + "/v1/chat/completions", body(COLD))
            await asyncio.sleep(0.1)
            ev = tap.events(since=r["sent"])
            starts = [t for k, t, _ in ev if k == "reload_start"]
            answers = [t for k, t, d in ev if k == "reload_answer" and d.endswith(" loaded")]
            chats = [t for k, t, d in ev if k == "chat" and d == COLD]
            if r["first"] is None or not starts or not answers or not chats or not r["done"]:
                raise RuntimeError(f"cold trial {i}: incomplete ({r}, node events {ev})")
            ttft = r["first"] - r["sent"]
            load = answers[0] - starts[0]
            trial = {
                "ttft_ms": ttft * 1e3,
                "node_load_ms": load * 1e3,
                "extra_ms": (ttft - load) * 1e3 - direct_ms,
                "request_to_reload_ms": (starts[0] - r["sent"]) * 1e3,
                "loaded_to_chat_at_node_ms": (chats[0] - answers[0]) * 1e3,
                "chat_at_node_to_first_token_ms": (r["first"] - chats[0]) * 1e3,
                "reloads": len(starts),
                "node_saw": [f"{(t - r['sent']) * 1e3:9.2f} ms  {k} {d}" for k, t, d in ev if t <= r["first"]],
            }
            trials.append(trial)
            log(
                f"cold trial {i + 1}: TTFT {trial['ttft_ms']:.1f} ms = load {trial['node_load_ms']:.1f} ms "
                f"+ direct {direct_ms:.2f} ms + extra {trial['extra_ms']:.2f} ms "
                f"(request→reload {trial['request_to_reload_ms']:.2f}, loaded→chat at node "
                f"{trial['loaded_to_chat_at_node_ms']:.2f}, chat at node→first token "
                f"{trial['chat_at_node_to_first_token_ms']:.2f})"
            )
            if i == 0:
                log("  what the node saw, from the request being sent to its first token:")
                for line in trial["node_saw"]:
                    log(f"    {line}")

        # 3. many requests queued behind one load: first with only the connections cortex already holds to
        # the node, then with as many idle connections as requests (made by a burst for the warm model)
        queued: dict[str, list[dict[str, Any]]] = {"cold_pool": [], "warm_pool": []}
        for rnd in range(args.rounds):
            for pool in ("cold_pool", "warm_pool"):
                await asyncio.to_thread(unload_cold, base)
                if pool == "warm_pool":
                    await asyncio.gather(
                        *(first_token(session, base + "/v1/chat/completions", body(WARM)) for _ in range(args.queued))
                    )
                await asyncio.sleep(0.2)
                q = await queued_round(session, base, tap, args.queued, wire)
                queued[pool].append(q)
                name = f"{args.queued} queued ({pool.replace('_', ' ')}, round {rnd + 1}/{args.rounds})"
                if wire is not None:
                    log(
                        f"{name}: on the wire, cortex sent {q['sent_on_wire']} of them from "
                        f"{q['loaded_to_first_send_on_wire_ms']:.1f} to {q['loaded_to_last_send_on_wire_ms']:.1f} ms "
                        "after the node's `loaded` answer"
                    )
                log(
                    f"{name}: {q['completed']} completed, {q['reloads_at_node']} reload(s); after `loaded` the node "
                    f"saw the first of them at {q['loaded_to_first_chat_at_node_ms']:.1f} ms and the last at "
                    f"{q['loaded_to_last_chat_at_node_ms']:.1f} ms; first tokens at the client from "
                    f"{q['loaded_to_first_token_first_ms']:.1f} to {q['loaded_to_first_token_last_ms']:.1f} ms"
                )
                if rnd == 0:
                    for line in q["node_saw_between_loaded_and_first_chat"]:
                        log(f"    between `loaded` and the first chat the node saw: {line}")

    extra = median([t["extra_ms"] for t in trials])
    # cortex's release: the last queued request written to the node's socket (kernel timestamps on lo);
    # without the tap (not root), the last arrival at the node's handler, which includes the node's own cost
    measure = "loaded_to_last_send_on_wire_ms" if wire is not None else "loaded_to_last_chat_at_node_ms"
    every = queued["cold_pool"] + queued["warm_pool"]
    releases = sorted(q[measure] for q in every if q[measure] is not None)
    release = median(releases) if releases else None
    sound = all(
        q["completed"] == args.queued
        and q["reloads_at_node"] == 1
        and q["chat_before_loaded"] == 0
        and not q["tap_dropped_packets"]
        for q in every
    )
    return {
        "direct_ttft_ms": direct_ms,
        "warm_ttft_via_cortex_ms": via_ms,
        "cold_trials": trials,
        "cold_extra_ms_median": extra,
        "queued": queued,
        "checks": {
            "cold_extra": {"extra_ms": extra, "limit_ms": EXTRA_LIMIT_MS, "met": extra <= EXTRA_LIMIT_MS},
            "queued_release": {
                "median_loaded_to_last_release_ms": release,
                "measured_as": measure,
                "rounds": len(releases),
                "each_ms": [round(r, 1) for r in releases],
                "limit_ms": RELEASE_LIMIT_MS,
                "every_round_sound": sound,
                "met": release is not None and release <= RELEASE_LIMIT_MS and sound,
                "median_last_arrival_at_node_ms": median([q["loaded_to_last_chat_at_node_ms"] for q in every]),
            },
        },
    }


def cortex_env(env: dict[str, str], args: argparse.Namespace) -> tuple[dict[str, str], Path]:
    """The environment and working directory of the cortex process (``--cortex-src`` puts a copy first)."""
    if args.cortex_src is None:
        return env, BENCH.parent
    src = args.cortex_src.resolve()
    return env | {"PYTHONPATH": str(src)}, src


def main() -> int:
    parser = argparse.ArgumentParser(description="Cold-load TTFT and queued release through cortex.")
    parser.add_argument("--quick", action="store_true", help="one cold trial instead of three")
    parser.add_argument("--load-s", type=float, default=2.0, help="the node's load time (default %(default)s)")
    parser.add_argument("--queued", type=int, default=100, help="requests queued behind one load")
    parser.add_argument("--rounds", type=int, default=5, help="queued rounds per pool state (default %(default)s)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's log")
    parser.add_argument("--cortex-src", type=Path, help="run cortex from this copy of the source tree (A/B a change)")
    parser.add_argument("--nice", type=int, default=-10, help="priority change for everything started (root; 0: none)")
    args = parser.parse_args()
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            print(f"(cannot change priority by {args.nice}: not root)")
    args.trials = 1 if args.quick else 3
    args.rounds = 1 if args.quick else args.rounds
    args.warm_n = 20 if args.quick else 50
    term_on_sigterm()
    raise_nofile()
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="cortex-cold-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["XDG_STATE_HOME"] = str(tmp / "state")
    env["PYTHONUNBUFFERED"] = "1"
    try:
        with Procs(tmp) as procs:
            sim_port, port, mport = free_port(), free_port(), free_port()
            sim = procs.start(
                "sim",
                [
                    PY,
                    str(BENCH / "tapped_sim.py"),
                    "--port",
                    str(sim_port),
                    "--vram-mb",
                    "49152",
                    "--model",
                    f"{WARM}=4096",
                    "--model",
                    f"{COLD}=4096",
                    "--unloaded",
                    COLD,
                    "--load-s",
                    str(args.load_s),
                    "--tok-s",
                    "0",
                ],
                env,
            )
            node_url = f"http://127.0.0.1:{sim_port}"
            wait_for(lambda: http("GET", node_url + "/health", timeout=1)[0] == 200, 30 + args.load_s, "sim", sim)
            conf = tmp / "cortex.toml"
            cortex_config(
                conf,
                port=port,
                metrics_port=mport,
                nodes=[("node", sim_port, [WARM])],
                extra="[eviction]\nmin_resident_s = 0\n",
            )
            cortex = procs.start(
                "cortex", [PY, "-m", "cortex", "--no-tui", "--config", str(conf)], *cortex_env(env, args)
            )
            base = f"http://127.0.0.1:{port}"
            wait_for(
                lambda: cortex_models_state(base) == {WARM: "loaded", COLD: "unloaded"},
                60,
                "cortex to list the warm model loaded and the cold one unloaded",
                cortex,
            )
            log(f"node (load {args.load_s:g} s) and cortex ready")
            try:
                wire: WireTap | None = WireTap(sim_port)
            except PermissionError:
                wire = None
                log("no packet tap (needs root or CAP_NET_RAW): release is timed at the node's handler instead")
            with wire or contextlib.nullcontext():
                result = asyncio.run(run(args, base, node_url, Tap(sim.log_path), log, wire))
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["meta"] = {
        "command": " ".join(["python", "bench/cold_load.py", *sys.argv[1:]]),
        "load_s": args.load_s,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    print()
    for name, chk in result["checks"].items():
        detail = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in chk.items() if k != "met"}
        print(f"  {'MET ' if chk['met'] else 'MISS'} {name}: {detail}")
    save_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
