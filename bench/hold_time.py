"""How long a proxy holds a request and its answer at concurrency 1, timed on the wire.

Usage (root, or ``CAP_NET_RAW``, for the packet tap)::

    python bench/hold_time.py [--requests 400] [--gap-ms 2] [--out bench/results/hold_time.json]

Added latency at c=1 (``run.py``) is the proxy's own time plus the extra hop that any proxy adds (one more
TCP exchange each way, one more process woken). This separates the two: one simulated node, then cortex
and the minimal aiohttp proxy (asyncio, and uvloop when installed) in front of it in turn, each driven by
one blocking client, request after request with ``--gap-ms`` of idle between them (as the interleaved
phase of ``run.py`` leaves each target idle while the others are served). A kernel-timestamped tap on
``lo`` (:mod:`wiretap`) stamps four packets per request: the request reaching the proxy, the request
leaving for the node, the node's answer reaching the proxy, the answer leaving for the client. The two
spans inside the proxy are reported (medians, µs), and their sum as a ratio to the minimal proxy's.
Every process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import functools
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    BENCH,
    BENCH_KEY,
    PY,
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
from wiretap import WireTap

MODEL = "bench-fast"
BODY = chat_body(MODEL, 16).encode()


def _exchange(sock: socket.socket, request: bytes) -> None:
    """Send one request and read its whole answer (a ``Content-Length`` body)."""
    sock.sendall(request)
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            continue
        head = buf[:end].decode("latin-1").lower()
        length = int(head.split("content-length:", 1)[1].split("\r\n", 1)[0])
        if len(buf) >= end + 4 + length:
            return


def measure(port: int, node_port: int, requests: int, gap_s: float) -> dict[str, float]:
    """Median µs the proxy on ``port`` holds a request, and an answer, over ``requests`` sequential ones."""
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (BENCH_KEY.encode(), len(BODY), BODY)
    )
    held_in: list[float] = []
    held_out: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(200):  # warm-up
            _exchange(sock, request)
        for _ in range(requests):
            with WireTap(port) as front, WireTap(node_port) as back:
                _exchange(sock, request)
                time.sleep(gap_s)
                at_front, at_back = front.captured(), back.captured()
            try:
                arrived = next(p.at for p in at_front if p.dst == port and p.payload.startswith(b"POST"))
                answered = next(p.at for p in at_front if p.src == port and p.payload.startswith(b"HTTP/1.1"))
                forwarded = next(p.at for p in at_back if p.dst == node_port and p.payload.startswith(b"POST"))
                returned = next(p.at for p in at_back if p.src == node_port and p.payload.startswith(b"HTTP/1.1"))
            except StopIteration:
                continue  # a packet the tap missed: not counted
            held_in.append((forwarded - arrived) * 1e6)
            held_out.append((answered - returned) * 1e6)
    return {
        "samples": len(held_in),
        "request_us": statistics.median(held_in),
        "answer_us": statistics.median(held_out),
        "total_us": statistics.median(held_in) + statistics.median(held_out),
    }


def _cortex_ready(base: str) -> bool:
    return cortex_models_state(base).get(MODEL) == "loaded"


def _answers(url: str) -> bool:
    return http("GET", url, timeout=1)[0] == 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cortex-hold-"))
    results: dict[str, dict[str, float]] = {}
    with Procs(tmp) as procs:
        node = free_port()
        procs.start("sim", sim_argv(node, "sim-fast", models=[f"{MODEL}=4096"], tok_s=0.0))
        wait_for(lambda: http("GET", f"http://127.0.0.1:{node}/health", timeout=1)[0] == 200, 30, "sim")
        targets: list[tuple[str, list[str]]] = [("cortex", [])]
        for name, flags in (("minimal", []), ("minimal-uv", ["--uvloop"])):
            if name == "minimal-uv":
                try:
                    import uvloop  # noqa: F401
                except ImportError:
                    continue
            targets.append((name, flags))
        for name, flags in targets:
            port = free_port()
            if name == "cortex":
                conf = tmp / "cortex.toml"
                cortex_config(conf, port=port, metrics_port=free_port(), nodes=[("sim-fast", node, [MODEL])], auth=True)
                proc = procs.start(name, [PY, "-m", "cortex", "--no-tui", "--config", str(conf)])
                ready = functools.partial(_cortex_ready, f"http://127.0.0.1:{port}")
            else:
                route = f"127.0.0.1:{port}=http://127.0.0.1:{node}"
                proc = procs.start(name, [PY, str(BENCH / "minimal_proxy.py"), "--route", route, *flags])
                ready = functools.partial(_answers, f"http://127.0.0.1:{port}/health")
            wait_for(ready, 60, name, proc)
            results[name] = measure(port, node, args.requests, args.gap_ms / 1000)
            proc.stop()
            r = results[name]
            print(
                f"{name:<11} request {r['request_us']:6.0f} µs  answer {r['answer_us']:6.0f} µs"
                f"  ({r['samples']:.0f} samples)"
            )
    base = results.get("minimal")
    if base is not None:
        for r in results.values():
            r["total_to_minimal"] = r["total_us"] / base["total_us"]
        print(f"cortex / minimal, time held: {results['cortex']['total_to_minimal']:.2f}x")
    save_results(args.out, {"meta": {"requests": args.requests, "gap_ms": args.gap_ms}, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
