"""cortex's proxy benchmark: direct to a node, through cortex, through nginx and through a minimal aiohttp proxy.

    python bench/run.py [--quick] [--out bench/results/FILE.json] [--keep-logs] [--cortex-loop asyncio|uvloop|auto]

Everything runs in one go on loopback. Three simulated mistral.rs nodes (``python -m cortex.sim``, each its
own process) serve one model each: ``bench-fast`` with no token delay (request benchmarks and time to first
byte), ``bench-chunks`` emitting one SSE chunk per token at a high rate (CPU per streamed chunk) and
``bench-slow`` emitting a few tokens per second (1,000 concurrent slow streams). The targets are:

* ``direct``  — the nodes themselves (the baseline for latency);
* ``cortex``  — ``python -m cortex --no-tui --config <generated toml>`` with the three nodes, metrics on
  their own listener, polling every 2 s;
* ``nginx``   — Debian's nginx, one worker, ``proxy_pass`` with ``proxy_buffering off`` and HTTP/1.1
  keep-alive upstreams (skipped with a note when ``nginx`` is not installed);
* ``minimal`` — ``bench/minimal_proxy.py``, the floor for a Python proxy on aiohttp (asyncio's event loop);
* ``minimal-uv`` — the same proxy with ``--uvloop``: cortex runs on uvloop by default, so its floor is quoted
  on both loops (skipped with a note when uvloop is not installed);
* ``floor``   — ``bench/floor_proxy.py``, bytes copied between sockets by uvloop with nothing parsed, in the
  concurrency-1 phase only: what the extra hop costs on its own, so that a proxy's added latency can be
  split into the hop's and its own work's (``floor`` in the results).

Loads come from ``bench/loadgen.py``, one process per job, never the proxy's process. A proxy's CPU is
utime+stime from /proc/PID/stat (its children included) over the measured requests only. Targets are
interleaved (rotated round by round; at concurrency 1, shuffled every round); CPU and req/s are medians
over repetitions, latencies are pooled over rounds. The figures that matter are the ratios to the minimal
proxies measured in the same run (``ratios_to_minimal`` and ``ratios_to_minimal_uv``). ``--cortex-loop``
writes ``gateway.event_loop`` into cortex's generated config, so an A/B of cortex's event loop is one
command per loop (default: cortex's own).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    BENCH,
    PROMPT,
    PY,
    ROOT,
    Procs,
    chat_body,
    cortex_config,
    cortex_models_state,
    cpu_seconds,
    free_port,
    http,
    median,
    quantile,
    raise_nofile,
    save_results,
    sim_argv,
    term_on_sigterm,
    wait_for,
    with_descendants,
)

PHASES = {"fast": "bench-fast", "chunks": "bench-chunks", "slow": "bench-slow"}
"""Phase → the model its node serves."""

FULL = {
    "req_n": 1000,  # requests per repetition at concurrency 32 (targets rotated and interleaved)
    "req_reps": 8,
    "req_warm": 500,
    "req_max_tokens": 16,
    "lat_n": 1000,  # concurrency-1 requests (and streams) per target, interleaved across targets
    "ttfb_max_tokens": 16,
    "stream_tokens": 500,  # chunks per stream
    "stream_n": 2,  # streams per repetition (one wave at stream_conc)
    "stream_conc": 2,
    "stream_reps": 6,
    "chunk_tok_s": 500,  # tokens/s of each chunk stream: one chunk every 2 ms, 1,000 chunks/s in all
    "hold_count": 1000,
    "hold_tok_s": 1,
    "hold_tokens": 16,  # a held stream lasts hold_tokens / hold_tok_s seconds: longer than opening them all
    # add "direct" for a control of the client and the node
    "hold_targets": ["cortex", "nginx", "minimal", "minimal-uv"],
    "idle_s": 4.0,
    "anthropic_reps": 6,  # alternated with OpenAI streams; the ratio of two medians moved 1.35-1.67x at 3
    "metrics_calls": 50000,
}
QUICK = FULL | {
    "req_n": 500,
    "req_reps": 3,
    "req_warm": 200,
    "lat_n": 100,
    "stream_reps": 2,
    "hold_tokens": 10,
    "hold_targets": ["cortex"],
    "idle_s": 2.0,
    "anthropic_reps": 1,
    "metrics_calls": 20000,
}

TARGETS_RATIO = {
    "cpu_us_per_req": 1.5,
    "cpu_us_per_chunk": 1.3,
    "added_p50_ms": 1.3,
    "added_ttfb_ms": 1.3,
}
HOLD_LIMIT_MB = 150.0
ANTHROPIC_LIMIT = 3.0
METRICS_LIMIT = 0.10
I18_CHUNK_VS_NGINX = 2.0
"""Issue 18: CPU per streamed chunk at most twice nginx's."""
I18_ANTHROPIC = 1.5
I18_HOLD_MIB = 100.0
MINIMALS = ("minimal", "minimal-uv")
"""The baselines every other proxy is quoted against: the minimal aiohttp proxy on asyncio, then on uvloop."""


@dataclass
class Target:
    name: str
    endpoints: dict[str, tuple[str, int]]
    """phase → (host, port)."""
    pids: list[int] = field(default_factory=list)
    """Processes whose CPU and RSS count (empty for direct)."""


class Runner:
    """Builds loadgen jobs and runs them, each batch in one fresh loadgen process."""

    def __init__(self, cfg: dict[str, Any], tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.jobs = 0

    def run(self, job: dict[str, Any], timeout: float = 240.0) -> dict[str, Any]:
        """Run one loadgen job (or a ``steps`` batch) in its own process and return its result."""
        self.jobs += 1
        path = self.tmp / f"job{self.jobs}.json"
        path.write_text(json.dumps(job))
        proc = subprocess.run(
            [PY, str(BENCH / "loadgen.py"), str(path)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen {job['mode']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    def steps(self, steps: list[dict[str, Any]], timeout: float = 240.0) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self.run({"mode": "steps", "steps": steps}, timeout)["results"]
        return results

    def requests(self, t: Target, *, n: int, conc: int, warm: int, keep: bool = False) -> dict[str, Any]:
        host, port = t.endpoints["fast"]
        return {
            "mode": "requests",
            "target": t.name,
            "host": host,
            "port": port,
            "path": "/v1/chat/completions",
            "body": chat_body(PHASES["fast"], self.cfg["req_max_tokens"], False),
            "expect": '"usage"',
            "concurrency": conc,
            "requests": n,
            "warmup": warm,
            "pids": t.pids,
            "keep_latencies": keep,
        }

    def interleaved(self, targets: list[Target], kind: str, n: int, warm: int) -> dict[str, Any]:
        """Concurrency 1, one request to each target in turn: latency (``requests``) or first byte (``ttfb``)."""
        stream = kind == "ttfb"
        max_tokens = self.cfg["ttfb_max_tokens" if stream else "req_max_tokens"]
        return {
            "mode": "interleaved",
            "kind": kind,
            "targets": [
                {"name": t.name, "host": t.endpoints["fast"][0], "port": t.endpoints["fast"][1], "pids": t.pids}
                for t in targets
            ],
            "path": "/v1/chat/completions",
            "body": chat_body(PHASES["fast"], max_tokens, stream),
            "expect": '"usage"',
            "requests": n,
            "warmup": warm,
        }

    def stream(
        self,
        t: Target,
        *,
        n: int | None = None,
        warm: int | None = None,
        path: str = "/v1/chat/completions",
        body: str | None = None,
        warm_body: str | None = None,
        done: str = "[DONE]",
        expect: int | None = None,
    ) -> dict[str, Any]:
        host, port = t.endpoints["chunks"]
        return {
            "mode": "stream",
            "target": t.name,
            "url": f"http://{host}:{port}{path}",
            "body": body or chat_body(PHASES["chunks"], self.cfg["stream_tokens"], True),
            "warm_body": warm_body or chat_body(PHASES["chunks"], 10, True),
            "marker": "data:",
            "done": done,
            "expect_events": expect,
            "concurrency": self.cfg["stream_conc"],
            "streams": self.cfg["stream_n"] if n is None else n,
            "warmup": self.cfg["stream_conc"] if warm is None else warm,
            "pids": t.pids,
        }

    def hold(self, t: Target) -> dict[str, Any]:
        host, port = t.endpoints["slow"]
        tokens = self.cfg["hold_tokens"]
        job = {
            "mode": "hold",
            "url": f"http://{host}:{port}/v1/chat/completions",
            "body": chat_body(PHASES["slow"], tokens, True),
            "count": self.cfg["hold_count"],
            "expect_events": tokens + 1,
            "ramp_batch": 50,
            "ramp_gap_s": 0.02,
            "timeout_s": 120,
            "pids": t.pids,
        }
        return self.run(job, timeout=200)


# -- starting the targets -------------------------------------------------------------------------------


def nginx_conf(tmp: Path, routes: dict[str, tuple[int, int]]) -> Path:
    """An nginx.conf proxying each listen port to its upstream port (phase → (listen, upstream))."""
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / f"nginx-{d}").mkdir(exist_ok=True)
    upstreams, servers = [], []
    for phase, (listen, upstream) in routes.items():
        upstreams.append(
            f"  upstream up_{phase} {{ server 127.0.0.1:{upstream}; keepalive 1024; keepalive_requests 1000000; }}"
        )
        servers.append(
            f"  server {{ listen 127.0.0.1:{listen} backlog=4096; location / {{ proxy_pass http://up_{phase};"
            ' proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off;'
            " proxy_request_buffering off; proxy_read_timeout 300s; } }"
        )
    conf = f"""user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
{chr(10).join(upstreams)}
{chr(10).join(servers)}
}}
"""
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


def nginx_version() -> str | None:
    exe = shutil.which("nginx")
    if exe is None:
        return None
    out = subprocess.run([exe, "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().split("/")[-1]


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    env["XDG_STATE_HOME"] = str(tmp / "state")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_all(procs: Procs, tmp: Path, cfg: dict[str, Any], log: Any) -> tuple[list[Target], dict[str, Any]]:
    env = child_env(tmp)
    sim_ports = {phase: free_port() for phase in PHASES}
    tok = {"fast": 0.0, "chunks": float(cfg["chunk_tok_s"]), "slow": float(cfg["hold_tok_s"])}
    sims = {}
    for phase, model in PHASES.items():
        argv = sim_argv(sim_ports[phase], f"sim-{phase}", models=[f"{model}=4096"], tok_s=tok[phase])
        sims[phase] = procs.start(f"sim-{phase}", argv, env)
    for phase, proc in sims.items():
        url = f"http://127.0.0.1:{sim_ports[phase]}/health"
        wait_for(partial(lambda u: http("GET", u, timeout=1)[0] == 200, url), 30, f"sim {phase}", proc)
    targets = [Target("direct", {p: ("127.0.0.1", sim_ports[p]) for p in PHASES})]
    info: dict[str, Any] = {"sim_pids": {p: s.pid for p, s in sims.items()}}

    # cortex
    cport, mport = free_port(), free_port()
    conf = tmp / "cortex.toml"
    loop = cfg.get("cortex_loop")
    cortex_config(
        conf,
        port=cport,
        metrics_port=mport,
        nodes=[(f"sim-{p}", sim_ports[p], [m]) for p, m in PHASES.items()],
        gateway=[f'event_loop = "{loop}"'] if loop else [],
        auth=True,  # every feature on: clients send the key (the other targets pass it on)
    )
    src: Path | None = cfg.get("cortex_src")
    cortex_env, cortex_cwd = (env, ROOT) if src is None else (env | {"PYTHONPATH": str(src)}, src)
    cortex = procs.start("cortex", [PY, "-m", "cortex", "--no-tui", "--config", str(conf)], cortex_env, cortex_cwd)
    base = f"http://127.0.0.1:{cport}"
    t0 = time.monotonic()
    wait_for(
        lambda: set(cortex_models_state(base).items()) >= {(m, "loaded") for m in PHASES.values()},
        60,
        "cortex to see every model loaded",
        cortex,
    )
    log(f"cortex ready in {time.monotonic() - t0:.1f} s on {base} (metrics :{mport})")
    targets.append(Target("cortex", {p: ("127.0.0.1", cport) for p in PHASES}, [cortex.pid]))
    info["cortex_base"] = base
    info["cortex_metrics"] = f"http://127.0.0.1:{mport}/metrics"

    # nginx
    version = nginx_version()
    info["nginx_version"] = version
    if version is None:
        log("nginx not installed (apt-get install -y nginx): the nginx column is skipped")
    else:
        routes = {p: (free_port(), sim_ports[p]) for p in PHASES}
        conf_path = nginx_conf(tmp, routes)
        argv = [
            shutil.which("nginx") or "nginx",
            "-p",
            str(tmp),
            "-c",
            str(conf_path),
            "-e",
            str(tmp / "nginx-error.log"),
            "-g",
            "daemon off;",
        ]
        ngx = procs.start("nginx", argv, env)
        url = f"http://127.0.0.1:{routes['fast'][0]}/health"
        wait_for(lambda: http("GET", url, timeout=1)[0] == 200, 20, "nginx", ngx)
        time.sleep(0.2)
        targets.append(Target("nginx", {p: ("127.0.0.1", routes[p][0]) for p in PHASES}, with_descendants(ngx.pid)))

    # the minimal aiohttp proxy, on asyncio's loop then on uvloop's
    for name, flags in (("minimal", []), ("minimal-uv", ["--uvloop"])):
        if flags and importlib.util.find_spec("uvloop") is None:
            log(f"uvloop not installed (pip install uvloop): the {name} column is skipped")
            continue
        mroutes = {p: free_port() for p in PHASES}
        argv = [PY, str(BENCH / "minimal_proxy.py"), *flags]
        for p in PHASES:
            argv += ["--route", f"127.0.0.1:{mroutes[p]}=http://127.0.0.1:{sim_ports[p]}"]
        mini = procs.start(name, argv, env)
        url = f"http://127.0.0.1:{mroutes['fast']}/health"
        wait_for(partial(lambda u: http("GET", u, timeout=1)[0] == 200, url), 20, f"{name} proxy", mini)
        targets.append(Target(name, {p: ("127.0.0.1", mroutes[p]) for p in PHASES}, [mini.pid]))

    # the floor: bytes copied, nothing parsed (concurrency 1 only)
    fport = free_port()
    floor = procs.start(
        "floor", [PY, str(BENCH / "floor_proxy.py"), "--route", f"127.0.0.1:{fport}=127.0.0.1:{sim_ports['fast']}"], env
    )
    url = f"http://127.0.0.1:{fport}/health"
    wait_for(lambda: http("GET", url, timeout=1)[0] == 200, 20, "floor proxy", floor)
    info["floor"] = Target("floor", {"fast": ("127.0.0.1", fport)}, [floor.pid])
    info["all_pids"] = [pid for proc in procs.items for pid in with_descendants(proc.pid)]
    return targets, info


def sanity(targets: list[Target]) -> None:
    """One non-streaming and one streaming chat through every target and phase."""
    for t in targets:
        for phase, model in PHASES.items():
            if phase == "slow":
                continue
            host, port = t.endpoints[phase]
            url = f"http://{host}:{port}/v1/chat/completions"
            status, body = http("POST", url, {"model": model, "messages": PROMPT, "max_tokens": 4}, timeout=10)
            if status != 200 or b'"usage"' not in body:
                raise RuntimeError(f"{t.name}/{phase}: chat answered {status}: {body[:300]!r}")
            status, body = http(
                "POST", url, {"model": model, "messages": PROMPT, "max_tokens": 4, "stream": True}, timeout=10
            )
            if status != 200 or not body.rstrip().endswith(b"data:[DONE]"):
                raise RuntimeError(f"{t.name}/{phase}: stream answered {status}: {body[-300:]!r}")


def anthropic_available(base: str) -> bool:
    status, body = http(
        "POST",
        base + "/v1/messages",
        {"model": PHASES["fast"], "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    return status == 200 and b'"content"' in body


def metrics_microbench(calls: int) -> dict[str, Any]:
    """CPU of ``CortexMetrics.request_done`` for a finished stream with usage (children already cached)."""
    from cortex.engine.metrics import CortexMetrics, RequestOutcome
    from cortex.sim.frames import usage

    m = CortexMetrics()
    now = time.monotonic()
    outcome = RequestOutcome(
        api="openai",
        model="bench-fast",
        node="sim-fast",
        status=200,
        stream=True,
        started=now - 0.01,
        ended=now,
        first_byte=now - 0.008,
        queue_s=0.0,
        upstream_s=0.009,
        usage=usage(12, 16, 0.001, 0.007),
    )
    for _ in range(1000):
        m.request_done(outcome)
    best = float("inf")
    samples = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(calls // 5):
            m.request_done(outcome)
        per = (time.process_time() - t0) / (calls // 5)
        samples.append(per * 1e6)
        best = min(best, per)
    return {"us_per_call_median": median(samples), "us_per_call_min": best * 1e6, "calls": calls}


# -- the run ----------------------------------------------------------------------------------------------


def rotated(targets: list[Target], i: int) -> list[Target]:
    k = i % len(targets)
    return targets[k:] + targets[:k]


def busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all cores, every process) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def measure(cfg: dict[str, Any], targets: list[Target], info: dict[str, Any], r: Runner, log: Any) -> dict[str, Any]:
    names = [t.name for t in targets]
    by_name = {t.name: t for t in targets}
    raw: dict[str, dict[str, list[Any]]] = {n: {} for n in names}
    expect = cfg["stream_tokens"] + 1

    def collect(key: str, results: list[dict[str, Any]]) -> None:
        for res in results:
            raw[res["target"]].setdefault(key, []).append(res)

    cortex = by_name["cortex"]
    c0 = cpu_seconds(cortex.pids)
    time.sleep(cfg["idle_s"])
    idle_us_per_s = (cpu_seconds(cortex.pids) - c0) / cfg["idle_s"] * 1e6
    log(f"cortex idle (polling 3 nodes every 2 s): {idle_us_per_s:.0f} CPU-µs/s")

    ours0 = cpu_seconds([os.getpid(), *info["all_pids"]])
    busy0 = busy_cpu_s()
    wall0 = time.monotonic()

    log("warm-up")
    r.steps(
        [
            s
            for t in targets
            for s in (r.requests(t, n=cfg["req_warm"], conc=32, warm=0), r.stream(t, n=0, warm=2 * cfg["stream_conc"]))
        ]
    )

    log(f"requests at concurrency 32: {cfg['req_reps']} x {cfg['req_n']} per target")
    steps = [
        r.requests(t, n=cfg["req_n"], conc=32, warm=100)
        for rep in range(cfg["req_reps"])
        for t in rotated(targets, rep)
    ]
    collect("c32", r.steps(steps))
    for t in targets:
        rows = raw[t.name]["c32"]
        log(
            f"  {t.name:10s} {median([x['rps'] for x in rows]):7.0f} req/s  "
            f"cpu/req {fmt(median([x['cpu_us_per_req'] for x in rows]) if t.pids else None):>7s} µs  "
            f"errors {sum(x['errors'] for x in rows)}"
        )

    log(
        f"concurrency 1, targets interleaved request by request: {cfg['lat_n']} requests and {cfg['lat_n']} "
        "streams each"
    )
    floor: dict[str, dict[str, Any]] = {}
    for kind in ("requests", "ttfb"):
        res = r.run(r.interleaved([*targets, info["floor"]], kind, cfg["lat_n"], warm=20))["targets"]
        floor[kind + "_c1"] = res.pop("floor")
        for name, x in res.items():
            raw[name][kind + "_c1"] = [x]
    for t in [*targets, info["floor"]]:
        a, b = (
            (floor["requests_c1"], floor["ttfb_c1"])
            if t.name == "floor"
            else (raw[t.name]["requests_c1"][0], raw[t.name]["ttfb_c1"][0])
        )
        log(
            f"  {t.name:10s} p50 {a['p50_ms']:.3f} ms  p99 {a['p99_ms']:.3f} ms  TTFB p50 {b['p50_ms']:.3f} ms"
            f"  errors {a['errors'] + b['errors']}"
        )

    log(f"streams of {cfg['stream_tokens']} chunks at {cfg['chunk_tok_s']} tok/s, concurrency {cfg['stream_conc']}")
    steps = [r.stream(t, expect=expect) for rep in range(cfg["stream_reps"]) for t in rotated(targets, rep)]
    collect("stream", r.steps(steps))
    for t in targets:
        rows = raw[t.name]["stream"]
        log(
            f"  {t.name:10s} cpu/chunk "
            f"{fmt(median([x['cpu_us_per_event'] for x in rows]) if t.pids else None, '.2f'):>6s} µs"
            f"  chunks/read {median([x['events_per_read'] for x in rows]):.2f}"
            f"  complete {sum(x['complete'] for x in rows)}/{sum(x['streams'] for x in rows)}"
        )

    anthropic: dict[str, Any] | None = None
    if anthropic_available(info["cortex_base"]):
        log("Anthropic /v1/messages streams through cortex (translator) vs OpenAI pass-through")
        body = json.dumps(
            {
                "model": PHASES["chunks"],
                "max_tokens": cfg["stream_tokens"],
                "stream": True,
                "messages": [{"role": "user", "content": PROMPT[0]["content"]}],
            }
        )
        warm = body.replace(f'"max_tokens": {cfg["stream_tokens"]}', '"max_tokens": 10')
        steps = []
        for _ in range(cfg["anthropic_reps"]):
            steps += [
                r.stream(cortex, expect=expect),
                r.stream(cortex, path="/v1/messages", body=body, warm_body=warm, done="message_stop"),
            ]
        results = r.steps(steps)
        o_res, a_res = results[0::2], results[1::2]
        # Per upstream chunk: the node sent as many chunks as for the OpenAI stream of the same length.
        a_cpu = [a["cpu_s"] / (a["streams"] * expect) * 1e6 for a in a_res]
        o_cpu = [o["cpu_us_per_event"] for o in o_res]
        anthropic = {
            "cpu_us_per_upstream_chunk": median(a_cpu),
            "openai_cpu_us_per_chunk": median(o_cpu),
            "ratio": median(a_cpu) / median(o_cpu),
            "events_per_stream": median([a["events"] / max(1, a["streams"]) for a in a_res]),
            "complete": sum(a["complete"] for a in a_res),
            "streams": sum(a["streams"] for a in a_res),
            "target": ANTHROPIC_LIMIT,
        }
        anthropic["met"] = anthropic["ratio"] <= ANTHROPIC_LIMIT and anthropic["complete"] == anthropic["streams"]
    else:
        log("Anthropic /v1/messages not served by this cortex: translator section skipped")

    log(f"holding {cfg['hold_count']} slow streams ({cfg['hold_tokens']} tokens at {cfg['hold_tok_s']} tok/s)")
    for t in targets:
        if t.name not in cfg["hold_targets"]:
            continue
        res = r.hold(t)
        raw[t.name]["hold"] = [res]
        log(
            f"  {t.name:10s} complete {res['complete']}/{res['count']}  peak concurrent {res['peak_concurrent']}"
            f"  all open after {fmt(res['all_open_after_s'], '.1f')} s  RSS max {fmt(res['rss_max_mb'])} MB"
        )

    wall = time.monotonic() - wall0
    foreign = (busy_cpu_s() - busy0) - (cpu_seconds([os.getpid(), *info["all_pids"]]) - ours0)

    # -- summary
    summary: dict[str, dict[str, Any]] = {}
    for t in targets:
        d = raw[t.name]
        lat: dict[str, Any] = d["requests_c1"][0]
        ttfb: dict[str, Any] = d["ttfb_c1"][0]
        hold = d.get("hold", [{}])[0]
        summary[t.name] = {
            "cpu_us_per_req": median([x["cpu_us_per_req"] for x in d["c32"]]) if t.pids else None,
            "cpu_us_per_req_c1": lat["cpu_us_per_req"],
            "rps_c32": median([x["rps"] for x in d["c32"]]),
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "ttfb_p50_ms": ttfb["p50_ms"],
            "ttfb_p99_ms": ttfb["p99_ms"],
            "cpu_us_per_chunk": median([x["cpu_us_per_event"] for x in d["stream"]]) if t.pids else None,
            "chunks_per_read": median([x["events_per_read"] for x in d["stream"]]),
            "errors": sum(x["errors"] for k in ("c32", "requests_c1", "ttfb_c1", "stream") for x in d[k]),
            "incomplete_streams": sum(x["incomplete"] + x["errors"] for x in d["stream"]),
            "hold_complete": hold.get("complete"),
            "hold_dropped": hold.get("dropped"),
            "hold_peak_concurrent": hold.get("peak_concurrent"),
            "hold_held_concurrently": hold.get("held_concurrently"),
            "hold_rss_max_mb": hold.get("rss_max_mb"),
            "hold_rss_before_mb": hold.get("rss_before_mb") if t.pids else None,
            "hold_all_open_after_s": hold.get("all_open_after_s"),
        }
    direct = summary["direct"]
    for name, s in summary.items():
        s["added_p50_ms"] = s["p50_ms"] - direct["p50_ms"] if name != "direct" else None
        s["added_p99_ms"] = s["p99_ms"] - direct["p99_ms"] if name != "direct" else None
        s["added_ttfb_ms"] = s["ttfb_p50_ms"] - direct["ttfb_p50_ms"] if name != "direct" else None
    lat, ttfb = floor["requests_c1"], floor["ttfb_c1"]
    hop = {
        "p50_ms": lat["p50_ms"],
        "ttfb_p50_ms": ttfb["p50_ms"],
        "cpu_us_per_req_c1": lat["cpu_us_per_req"],
        "added_p50_ms": lat["p50_ms"] - direct["p50_ms"],
        "added_ttfb_ms": ttfb["p50_ms"] - direct["ttfb_p50_ms"],
        "errors": lat["errors"] + ttfb["errors"],
    }
    for base_name in MINIMALS:
        if base_name in summary:
            key = "added_p50_to_" + base_name.replace("-", "_")
            hop[key] = hop["added_p50_ms"] / summary[base_name]["added_p50_ms"]

    def ratios_to(base_name: str) -> dict[str, dict[str, float | None]]:
        """Each proxy's figures over the minimal proxy ``base_name``'s (empty when it did not run)."""
        out: dict[str, dict[str, float | None]] = {}
        if base_name not in summary:
            return out
        base = summary[base_name]
        for name in (n for n in names if n not in ("direct", base_name)):
            out[name] = {}
            for key in (
                "cpu_us_per_req",
                "cpu_us_per_req_c1",
                "cpu_us_per_chunk",
                "rps_c32",
                "added_p50_ms",
                "added_p99_ms",
                "added_ttfb_ms",
                "hold_rss_max_mb",
            ):
                a, b = summary[name][key], base[key]
                out[name][key] = a / b if a is not None and b is not None and b > 0 else None
        return out

    ratios = ratios_to("minimal")
    ratios_uv = ratios_to("minimal-uv")

    c = summary["cortex"]
    checks: dict[str, dict[str, Any]] = {}
    for key, limit in TARGETS_RATIO.items():
        ratio = ratios["cortex"][key]
        checks[key] = {"ratio": ratio, "limit": limit, "met": ratio is not None and ratio <= limit}
    # The spread of the CPU ratios: cortex over each minimal within each repetition (their blocks ran back to back).
    for key, phase, item in (
        ("cpu_us_per_req", "c32", "cpu_us_per_req"),
        ("cpu_us_per_chunk", "stream", "cpu_us_per_event"),
    ):
        for base_name, suffix in (("minimal", ""), ("minimal-uv", "_vs_minimal_uv")):
            if base_name not in raw:
                continue
            pairs = [a[item] / b[item] for a, b in zip(raw["cortex"][phase], raw[base_name][phase], strict=True)]
            checks[key]["per_rep_ratio_q1_median_q3" + suffix] = [
                round(quantile(pairs, 0.25), 3),
                round(median(pairs), 3),
                round(quantile(pairs, 0.75), 3),
            ]
    checks["hold_1000"] = {
        "complete": c["hold_complete"],
        "count": cfg["hold_count"],
        "peak_concurrent": c["hold_peak_concurrent"],
        "rss_max_mb": c["hold_rss_max_mb"],
        "limit_mb": HOLD_LIMIT_MB,
        "met": c["hold_dropped"] == 0
        and bool(c["hold_held_concurrently"])
        and c["hold_rss_max_mb"] is not None
        and c["hold_rss_max_mb"] <= HOLD_LIMIT_MB,
    }
    if anthropic is not None:
        checks["anthropic_chunk"] = {"ratio": anthropic["ratio"], "limit": ANTHROPIC_LIMIT, "met": anthropic["met"]}
    # Issue 18's tighter targets, reported beside the ones above, against each minimal proxy.
    for key, limit in (("cpu_us_per_req", 0.5), ("added_p50_ms", 0.5)):
        for against, suffix in ((ratios, ""), (ratios_uv, "_vs_minimal_uv")):
            if "cortex" not in against:
                continue
            ratio = against["cortex"][key]
            checks[f"i18_{key}{suffix}"] = {"ratio": ratio, "limit": limit, "met": ratio is not None and ratio <= limit}
    if "nginx" in summary and summary["nginx"]["cpu_us_per_chunk"]:
        ratio = c["cpu_us_per_chunk"] / summary["nginx"]["cpu_us_per_chunk"]
        checks["i18_cpu_us_per_chunk_vs_nginx"] = {
            "ratio": ratio,
            "limit": I18_CHUNK_VS_NGINX,
            "met": ratio <= I18_CHUNK_VS_NGINX,
        }
    if anthropic is not None:
        ratio = anthropic["ratio"]
        checks["i18_anthropic_chunk"] = {"ratio": ratio, "limit": I18_ANTHROPIC, "met": ratio <= I18_ANTHROPIC}
    mib = c["hold_rss_max_mb"]  # loadgen's "MB" are MiB (bytes / 2**20)
    checks["i18_hold_1000_mib"] = {
        "rss_max_mib": mib,
        "limit_mib": I18_HOLD_MIB,
        "met": checks["hold_1000"]["met"] and mib is not None and mib <= I18_HOLD_MIB,
    }
    mb = metrics_microbench(cfg["metrics_calls"])
    frac = mb["us_per_call_median"] / c["cpu_us_per_req"] if c["cpu_us_per_req"] else None
    mb["fraction_of_cortex_cpu_per_req"] = frac
    checks["metrics_cost"] = {
        "fraction": frac,
        "limit": METRICS_LIMIT,
        "met": frac is not None and frac <= METRICS_LIMIT,
    }
    # The hop alone (floor) and what each proxy's own work adds over it, as a share of minimal's.
    if "minimal" in summary:
        own = summary["minimal"]["added_p50_ms"] - hop["added_p50_ms"]
        hop["own_work_to_minimal"] = {
            n: (summary[n]["added_p50_ms"] - hop["added_p50_ms"]) / own if own > 0 else None
            for n in names
            if n not in ("direct", "minimal")
        }
    return {
        "summary": summary,
        "floor": hop,
        "ratios_to_minimal": ratios,
        "ratios_to_minimal_uv": ratios_uv,
        "checks": checks,
        "anthropic": anthropic,
        "metrics_microbench": mb,
        "cortex_idle_cpu_us_per_s": idle_us_per_s,
        "foreign_cpu_cores": foreign / wall,
        "raw": {
            n: {k: [{kk: vv for kk, vv in x.items() if not isinstance(vv, list)} for x in v] for k, v in d.items()}
            for n, d in raw.items()
        },
    }


# -- output -----------------------------------------------------------------------------------------------


def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float) and v != v:
        return "nan"
    return format(v, spec)


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    # (column title, ratios of that proxy): every proxy over minimal, then cortex over minimal-uv.
    cols = [(f"{n}/min", r) for n, r in result["ratios_to_minimal"].items()]
    if "cortex" in result.get("ratios_to_minimal_uv", {}):
        cols.append(("cortex/min-uv", result["ratios_to_minimal_uv"]["cortex"]))
    names = list(s)
    rows = [
        ("CPU-µs / request (c=32)", "cpu_us_per_req", ".1f", "≤ 1.5x"),
        ("CPU-µs / request (c=1)", "cpu_us_per_req_c1", ".1f", ""),
        ("req/s at c=32", "rps_c32", ".0f", ""),
        ("p50 latency c=1 (ms)", "p50_ms", ".3f", ""),
        ("p99 latency c=1 (ms)", "p99_ms", ".3f", ""),
        ("added p50 (ms)", "added_p50_ms", ".3f", "≤ 1.3x"),
        ("added p99 (ms)", "added_p99_ms", ".3f", ""),
        ("TTFB p50 stream c=1 (ms)", "ttfb_p50_ms", ".3f", ""),
        ("TTFB p99 stream c=1 (ms)", "ttfb_p99_ms", ".3f", ""),
        ("added TTFB p50 (ms)", "added_ttfb_ms", ".3f", "≤ 1.3x"),
        ("CPU-µs / streamed chunk", "cpu_us_per_chunk", ".2f", "≤ 1.3x"),
        ("chunks per client read", "chunks_per_read", ".2f", ""),
        ("1000 slow streams: RSS max (MB)", "hold_rss_max_mb", ".1f", "≤ 150 MB"),
        ("1000 slow streams: completed", "hold_complete", "d", "all"),
        ("1000 slow streams: peak open", "hold_peak_concurrent", "d", "1000"),
    ]
    width = [max(13, len(title) + 2) for title, _ in cols]
    head = f"{'metric':34s}" + "".join(f"{n:>11s}" for n in names)
    head += "".join(f"{title:>{w}s}" for (title, _), w in zip(cols, width, strict=True))
    lines = [head + f"  {'target':>9s}", "-" * (len(head) + 11)]
    for label, key, spec, target in rows:
        line = f"{label:34s}" + "".join(f"{fmt(s[n][key], spec):>11s}" for n in names)
        line += "".join(
            f"{fmt(r.get(key), '.2f') + 'x' if r.get(key) is not None else '-':>{w}s}"
            for (_, r), w in zip(cols, width, strict=True)
        )
        lines.append(line + f"  {target:>9s}")
    lines.append("")
    for key, chk in result["checks"].items():
        detail = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in chk.items() if k != "met"}
        lines.append(f"  {'MET ' if chk['met'] else 'MISS'} {key}: {detail}")
    a = result["anthropic"]
    if a:
        lines.append(
            f"  Anthropic translator: {a['cpu_us_per_upstream_chunk']:.2f} CPU-µs per upstream chunk vs "
            f"{a['openai_cpu_us_per_chunk']:.2f} OpenAI pass-through = {a['ratio']:.2f}x"
        )
    mb = result["metrics_microbench"]
    lines.append(
        f"  metrics: request_done {mb['us_per_call_median']:.1f} µs/call = "
        f"{fmt(mb['fraction_of_cortex_cpu_per_req'] and 100 * mb['fraction_of_cortex_cpu_per_req'])} % "
        f"of cortex's CPU per request"
    )
    hop = result.get("floor")
    if hop and "added_p50_to_minimal" in hop:
        own = hop.get("own_work_to_minimal", {})
        lines.append(
            f"  floor (bytes copied by uvloop, nothing parsed): added p50 {hop['added_p50_ms']:.3f} ms = "
            f"{hop['added_p50_to_minimal']:.2f}x minimal's; over the floor, each proxy's own work = "
            + ", ".join(f"{n} {fmt(v, '.2f')}x" for n, v in own.items())
            + " minimal's"
        )
    lines.append(f"  cortex idle: {result['cortex_idle_cpu_us_per_s']:.0f} CPU-µs/s (polling)")
    lines.append(f"  other work on the machine during the run: {result['foreign_cpu_cores']:.2f} cores on average")
    return "\n".join(lines)


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
        return rev.strip() + ("-dirty" if dirty.strip() else "")
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="cortex vs nginx vs a minimal aiohttp proxy (asyncio and uvloop), on loopback."
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's log")
    parser.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="scheduling priority of the benchmark and everything it starts (default %(default)s, needs root; "
        "on a shared machine it keeps other work from adding noise; 0 leaves it alone)",
    )
    parser.add_argument("--cortex-src", type=Path, help="run cortex from this copy of the source tree (A/B a change)")
    parser.add_argument(
        "--cortex-loop",
        choices=["asyncio", "uvloop", "auto"],
        help="write gateway.event_loop into cortex's config (A/B the event loop; default: cortex's own default)",
    )
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.cortex_src is not None:
        cfg["cortex_src"] = args.cortex_src.resolve()
    if args.cortex_loop is not None:
        cfg["cortex_loop"] = args.cortex_loop
    term_on_sigterm()
    nofile = raise_nofile()
    niceness = os.nice(0)
    if args.nice:
        try:
            niceness = os.nice(args.nice)
        except OSError:
            print(f"(cannot change priority by {args.nice}: not root; running at nice {niceness})")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="cortex-bench-"))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", flush=True)

    try:
        with Procs(tmp) as procs:
            targets, info = start_all(procs, tmp, cfg, log)
            sanity(targets)
            if "nginx" not in [t.name for t in targets]:
                log("note: ratios for nginx omitted")
            result = measure(cfg, targets, info, Runner(cfg, tmp), log)
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["meta"] = {
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_rev(),
        "python": platform.python_version(),
        "aiohttp": __import__("aiohttp").__version__,
        "nginx": info.get("nginx_version"),
        "cpus": os.cpu_count(),
        "nofile": nofile,
        "nice": niceness,
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "quick": args.quick,
        "cortex_event_loop": args.cortex_loop or "cortex's default",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()},
        "wall_s": time.monotonic() - started,
    }
    print()
    print(table(result))
    print(f"\nwall time {result['meta']['wall_s']:.0f} s")
    save_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
