"""A soak: cortex under mixed, partly hostile traffic for minutes, with node restarts; does anything leak?

    python bench/soak.py [--minutes 10] [--clients 24] [--restart-every-s 30] [--out bench/results/FILE.json]

Issue 13: after the fixes for leaked leases, hung reads and exhausted connections, a long run must end
where it started. Not a test (it takes minutes); run it before a release, and ``--minutes 1`` for a check.

Set-up, all on loopback: two simulated mistral.rs nodes (``python -m cortex.sim``, 40 tokens/s, the same
two models on each) and the gateway, each its own process. The gateway runs from this script in
``--gateway`` mode: the real ``Engine`` and ``serve()``, plus a side port that reports the gateway
process's open file descriptors, asyncio tasks and RSS, so the figures are the gateway's alone.

The load (this process, ``--clients`` workers in a loop until the time is up), per request, at random:
OpenAI and Anthropic, streaming and not; one stream in four is dropped by the client after its first
chunk; one request in ten is hostile (broken JSON, a wrong type, an ``x-request-id`` that is not Latin-1,
a body that stalls). Every ``--restart-every-s`` one node is killed (SIGKILL, streams cut) and started
again on the same port a second later.

Reported: fds, tasks and RSS of the gateway at the start (after 10 s of the same load) and at the end,
both taken once the gateway settled (nothing in flight, then 20 s idle: kept-alive connections close
after 15 s), requests by outcome, node restarts, and ``in_flight`` at the end (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    PY,
    Proc,
    Procs,
    free_port,
    http,
    raise_nofile,
    rss_bytes,
    save_results,
    sim_argv,
    term_on_sigterm,
    wait_for,
)

MODELS = ("soak-a", "soak-b")
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


# -- the gateway, in its own process -------------------------------------------------------------------------


def gateway_main(config: Path, stats_port: int, state: Path) -> None:
    """Run cortex's engine and gateway from ``config``, with a stats side port; until SIGTERM."""
    from aiohttp import web

    from cortex.config import load_settings
    from cortex.engine.engine import Engine
    from cortex.proxy.app import serve
    from cortex.runtime import configure_logging

    configure_logging(fmt="text")

    async def run() -> None:
        settings = load_settings(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def stats(_request: web.Request) -> web.Response:
            fds = len(os.listdir("/proc/self/fd"))
            rss = rss_bytes([os.getpid()])
            in_flight = engine.snapshot().totals.in_flight
            tasks = len(asyncio.all_tasks())
            return web.json_response({"fds": fds, "tasks": tasks, "rss": rss, "in_flight": in_flight})

        async with Engine(settings, state_path=state) as engine, serve(engine):
            app = web.Application()
            app.router.add_get("/stats", stats)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", stats_port).start()
            try:
                await stop.wait()
            finally:
                await runner.cleanup()

    asyncio.run(run())


# -- the load -----------------------------------------------------------------------------------------------------


class Load:
    def __init__(self, base: str, seed: int) -> None:
        self.base = base
        self.rng = random.Random(seed)
        self.outcomes: Counter[str] = Counter()

    async def one(self, http: aiohttp.ClientSession) -> None:
        rng = self.rng
        model = rng.choice(MODELS)
        anthropic = rng.random() < 0.5
        stream = rng.random() < 0.6
        path = MESSAGES if anthropic else CHAT
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, 40), "stream": stream}
        body["messages"] = [{"role": "user", "content": "soak " * rng.randint(1, 50)}]
        headers = {"x-request-id": f"soak-{rng.getrandbits(32):x}"}
        roll = rng.random()
        if roll < 0.1:
            await self.hostile(http, path, body)
            return
        drop = stream and roll < 0.3
        try:
            async with http.post(self.base + path, json=body, headers=headers) as resp:
                if stream and resp.status == 200:
                    async for _chunk in resp.content.iter_any():
                        if drop:
                            self.outcomes["dropped by the client"] += 1
                            resp.close()
                            return
                else:
                    await resp.read()
                self.outcomes[f"{resp.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes[f"client error: {type(exc).__name__}"] += 1

    async def hostile(self, http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> None:
        kind = self.rng.choice(["json", "type", "request-id", "stall"])
        port = int(self.base.rsplit(":", 1)[1])
        if kind == "json":
            raw = json.dumps(body).encode()[:-3]
        elif kind == "type":
            raw = json.dumps({**body, "max_tokens": "many"}).encode()
        else:
            raw = json.dumps({**body, "stream": False}).encode()
        extra = b"x-request-id: soak-\xe2\x82\xac\r\n" if kind == "request-id" else b""
        length = len(raw) + (100 if kind == "stall" else 0)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n"
        ).encode()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(head + extra + b"\r\n" + raw)
                await writer.drain()
                async with asyncio.timeout(30):
                    status_line = await reader.readline()
                status = status_line.split(b" ")[1].decode() if status_line else "closed"
                self.outcomes[f"hostile {kind}: {status}"] += 1
            finally:
                writer.transport.abort()
        except (OSError, TimeoutError, IndexError) as exc:
            self.outcomes[f"hostile {kind}: {type(exc).__name__}"] += 1

    async def worker(self, http: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            await self.one(http)


async def settled(port: int) -> dict[str, int]:
    """The gateway's figures once nothing is in flight and idle keep-alive connections (15 s) have gone."""
    wait_for(lambda: stats(port)["in_flight"] == 0, 60, "nothing in flight")
    await asyncio.sleep(20)
    return stats(port)


def stats(port: int) -> dict[str, int]:
    status, body = http("GET", f"http://127.0.0.1:{port}/stats", timeout=5.0)
    if status != 200:
        raise RuntimeError("the gateway's stats port does not answer")
    data: dict[str, int] = json.loads(body)
    return data


async def drive(
    args: argparse.Namespace, procs: Procs, nodes: list[tuple[str, int]], base: str, stats_port: int
) -> dict[str, Any]:
    load = Load(base, args.seed)
    restarts = 0
    sims: dict[str, Proc] = {p.name: p for p in procs.items if p.name in dict(nodes)}

    async def restarter(until: float) -> None:
        nonlocal restarts
        i = 0
        while time.monotonic() + args.restart_every_s < until:
            await asyncio.sleep(args.restart_every_s)
            name, port = nodes[i % len(nodes)]
            i += 1
            sims[name].stop(signal.SIGKILL, timeout=5)
            await asyncio.sleep(1.0)
            sims[name] = procs.start(f"{name}-{i}", node_argv(name, port))
            restarts += 1

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        warm_until = time.monotonic() + 10
        await asyncio.gather(*(load.worker(session, warm_until) for _ in range(args.clients)))
        start = await settled(stats_port)
        print(f"start (10 s of load, then idle): {start}")
        until = time.monotonic() + args.minutes * 60
        await asyncio.gather(restarter(until), *(load.worker(session, until) for _ in range(args.clients)))
    end = await settled(stats_port)
    print(f"end (the soak, then idle): {end}")
    return {"start": start, "end": end, "outcomes": dict(load.outcomes), "restarts": restarts}


def node_argv(name: str, port: int) -> list[str]:
    return sim_argv(port, name, models=[f"{m}=4000" for m in MODELS], tok_s=40, load_s=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--restart-every-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--gateway", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stats-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gateway is not None:
        gateway_main(args.gateway, args.stats_port, args.state)
        return

    term_on_sigterm()
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="cortex-soak-") as tmp_name:
        tmp = Path(tmp_name)
        nodes = [("soak-1", free_port()), ("soak-2", free_port())]
        port, stats_port = free_port(), free_port()
        lines = [
            "[gateway]",
            f'listen = "127.0.0.1:{port}"',
            'metrics_listen = ""',
            "drain_s = 2",
            "first_byte_timeout_s = 30",
            "stream_idle_timeout_s = 10",
            "queue_timeout_s = 30",
            "header_timeout_s = 5",
            "[poll]",
            "interval_s = 0.5",
            "timeout_s = 1.0",
        ]
        for name, node_port in nodes:
            lines += ["[[nodes]]", f'name = "{name}"', f'endpoint = "http://127.0.0.1:{node_port}"', "vram_mb = 16384"]
            lines += ['pinned = ["soak-a", "soak-b"]']
        config = tmp / "cortex.toml"
        config.write_text("\n".join(lines) + "\n")
        with Procs(tmp) as procs:
            for name, node_port in nodes:
                procs.start(name, node_argv(name, node_port))
            gateway = procs.start(
                "gateway",
                [
                    PY,
                    str(Path(__file__).resolve()),
                    "--gateway",
                    str(config),
                    "--stats-port",
                    str(stats_port),
                    "--state",
                    str(tmp / "state.json"),
                ],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: http("GET", base + "/ready")[0] == 200, 30, "the gateway ready", gateway)
            result = asyncio.run(drive(args, procs, nodes, base, stats_port))
            if not gateway.alive():
                raise RuntimeError("the gateway died during the soak")
    start, end = result["start"], result["end"]
    print(f"\nsoak: {args.minutes:g} min, {args.clients} clients, {result['restarts']} node restarts")
    for key in ("fds", "tasks", "rss"):
        ratio = end[key] / start[key] if start[key] else float("nan")
        print(f"  {key:6} start {start[key]:>12,}  end {end[key]:>12,}  end/start {ratio:.2f}")
    print(f"  in flight at the end: {end['in_flight']}")
    for outcome, count in sorted(result["outcomes"].items(), key=lambda kv: -kv[1]):
        print(f"  {count:>7}  {outcome}")
    save_results(args.out, {"minutes": args.minutes, "clients": args.clients, **result})


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
