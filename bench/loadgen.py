"""The load generator of ``bench/run.py``: one job per process, so it never shares a process with a proxy.

``python bench/loadgen.py JOB.json`` runs the job and prints one JSON line of results. Around the measured
part it reads the CPU time (and for ``hold``, the RSS) of the proxy's pids from /proc, so the figures cover
exactly the measured requests and none of the generator's start-up.

Jobs (``mode``):

* ``requests`` — non-streaming POSTs over ``concurrency`` raw HTTP/1.1 keep-alive connections (a tiny
  hand-written client: far cheaper per request than aiohttp's, so the generator is not the bottleneck);
  per-request latency, req/s, proxy CPU.
* ``interleaved`` — concurrency 1 across several targets, one request to each in turn, in a fresh random
  order every round (``seed``; ``order: rotated`` for the old fixed cycle): latency (``kind: requests``)
  or time to the first ``data:`` byte (``kind: ttfb``), with each target's CPU.
* ``stream`` — streaming POSTs at ``concurrency`` with aiohttp: SSE events and reads counted, ``[DONE]`` (or
  ``done_marker``) checked, proxy CPU.
* ``steps`` — a list of the jobs above, run in order in this one process.
* ``hold`` — ``count`` concurrent slow streams opened in a ramp; once every one has its first event, the
  proxy's RSS is sampled until the first one ends; then every stream must end complete.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import aiohttp

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from benchlib import BENCH_KEY, cpu_seconds, quantile, raise_nofile, rss_bytes

HEADERS = {
    "Content-Type": "application/json",
    "Accept": "*/*",
    "User-Agent": "cortex-bench/1",
    "Authorization": f"Bearer {BENCH_KEY}",
}


# -- a minimal HTTP/1.1 client -------------------------------------------------------------------------


def _request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nUser-Agent: cortex-bench/1\r\nAuthorization: Bearer {BENCH_KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return int(head[9:12]), head.lower()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> tuple[bytes, bool]:
    """The body after ``head`` (content-length or chunked); and whether the connection must close."""
    close = b"\r\nconnection: close" in head
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        return await reader.readexactly(int(head[i + 17 : j])), close
    if b"\r\ntransfer-encoding: chunked" in head:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts), close
            parts.append((await reader.readexactly(size + 2))[:-2])
    return await reader.read(), True


class RawConn:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, data: bytes) -> asyncio.StreamReader:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        assert self.reader is not None
        self.writer.write(data)
        return self.reader


async def run_requests(job: dict[str, Any]) -> dict[str, Any]:
    host, port, path = job["host"], job["port"], job["path"]
    req = _request_bytes(host, port, path, job["body"].encode())
    conc = job["concurrency"]
    pids = job.get("pids", [])
    expect = job.get("expect", "").encode()
    errors = 0
    latencies: list[float] = []

    async def worker(conn: RawConn, budget: list[int], record: bool) -> None:
        nonlocal errors
        while budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            reader = await conn.send(req)
            status, head = await _read_head(reader)
            body, close = await _read_body(reader, head)
            t1 = time.perf_counter()
            if status != 200 or (expect and expect not in body):
                errors += 1
            if close:
                conn.close()
            if record:
                latencies.append(t1 - t0)

    conns = [RawConn(host, port) for _ in range(conc)]
    for c in conns:
        await c.open()
    warm = [job.get("warmup", 0)]
    await asyncio.gather(*(worker(c, warm, False) for c in conns))
    errors = 0
    await asyncio.sleep(0.05)
    n = job["requests"]
    budget = [n]
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    await asyncio.gather(*(worker(c, budget, True) for c in conns))
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(0.05)
    cpu = cpu_seconds(pids) - cpu0
    for c in conns:
        c.close()
    return {
        "requests": n,
        "errors": errors,
        "elapsed_s": elapsed,
        "rps": n / elapsed,
        "cpu_s": cpu,
        "cpu_us_per_req": cpu / n * 1e6 if pids else None,
        "p50_ms": quantile(latencies, 0.5) * 1e3,
        "p99_ms": quantile(latencies, 0.99) * 1e3,
        "latencies_ms": [round(x * 1e3, 4) for x in latencies] if job.get("keep_latencies") else None,
    }


async def _timed_request(conn: RawConn, req: bytes, expect: bytes) -> tuple[float, bool]:
    """One non-streaming request: (seconds to the whole answer, ok)."""
    t0 = time.perf_counter()
    reader = await conn.send(req)
    status, head = await _read_head(reader)
    body, close = await _read_body(reader, head)
    elapsed = time.perf_counter() - t0
    if close:
        conn.close()
    return elapsed, status == 200 and expect in body


async def _timed_stream(conn: RawConn, req: bytes) -> tuple[float, bool]:
    """One streaming request: (seconds to the first ``data:`` byte, ok), read to its end."""
    t0 = time.perf_counter()
    reader = await conn.send(req)
    status, head = await _read_head(reader)
    if status != 200 or b"chunked" not in head:
        await _read_body(reader, head)
        conn.close()
        return 0.0, False
    await reader.readuntil(b"data:")
    first = time.perf_counter() - t0
    rest = await reader.readuntil(b"\r\n0\r\n\r\n")
    if b"\r\nconnection: close" in head:
        conn.close()
    return first, b"[DONE]" in rest


async def run_interleaved(job: dict[str, Any]) -> dict[str, Any]:
    """Concurrency 1, one request to each target in turn, so that whatever else the machine does falls on
    every target alike. ``kind``: ``requests`` (latency) or ``ttfb`` (streams).

    The order is shuffled every round. A fixed cycle (even rotated) puts each target after the same one
    nearly every time, and at concurrency 1 a request's time depends on what ran just before it: whose
    code and data the caches still hold, whether a CPU had gone idle. Two copies of cortex side by side
    differed by up to 20 % with a fixed order and by under 1 % shuffled.
    """
    targets = job["targets"]
    body = job["body"].encode()
    expect = job.get("expect", "").encode()
    conns, reqs = [], []
    for t in targets:
        conns.append(RawConn(t["host"], t["port"]))
        reqs.append(_request_bytes(t["host"], t["port"], job["path"], body))
        await conns[-1].open()

    async def one(j: int) -> tuple[float, bool]:
        if job["kind"] == "ttfb":
            return await _timed_stream(conns[j], reqs[j])
        return await _timed_request(conns[j], reqs[j], expect)

    k = len(targets)
    samples: list[list[float]] = [[] for _ in targets]
    errors = [0] * k
    for _ in range(job.get("warmup", 0)):
        for j in range(k):
            await one(j)
    cpu0 = [cpu_seconds(t.get("pids", [])) for t in targets]
    rng = random.Random(job.get("seed", 0))
    order = list(range(k))
    for i in range(job["requests"]):
        if job.get("order", "shuffled") == "rotated":
            order = [(i + step) % k for step in range(k)]
        else:
            rng.shuffle(order)
        for j in order:
            seconds, ok = await one(j)
            samples[j].append(seconds)
            errors[j] += not ok
    await asyncio.sleep(0.05)
    out = {}
    for j, t in enumerate(targets):
        pids = t.get("pids", [])
        cpu = cpu_seconds(pids) - cpu0[j]
        conns[j].close()
        out[t["name"]] = {
            "requests": job["requests"],
            "errors": errors[j],
            "cpu_s": cpu,
            "cpu_us_per_req": cpu / job["requests"] * 1e6 if pids else None,
            "p50_ms": quantile(samples[j], 0.5) * 1e3,
            "p99_ms": quantile(samples[j], 0.99) * 1e3,
            "samples_ms": [round(x * 1e3, 4) for x in samples[j]],
        }
    return {"targets": out}


# -- streams with aiohttp --------------------------------------------------------------------------------


class StreamStats:
    def __init__(self) -> None:
        self.events = 0
        self.reads = 0
        self.complete = 0
        self.incomplete = 0
        self.errors = 0
        self.first: list[float] = []
        self.ended: list[float] = []


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stats: StreamStats,
    *,
    marker: bytes,
    done: bytes,
    expect_events: int | None,
    on_first: Any = None,
) -> None:
    try:
        async with session.post(url, data=body, headers=HEADERS) as resp:
            if resp.status != 200:
                stats.errors += 1
                await resp.read()
                return
            carry = b""
            tail = b""
            events = 0
            async for chunk in resp.content.iter_any():
                buf = carry + chunk
                n = buf.count(marker)
                if n and events == 0:
                    stats.first.append(time.monotonic())
                    if on_first is not None:
                        on_first()
                events += n
                stats.reads += 1
                carry = buf[-(len(marker) - 1) :]
                tail = (tail + chunk)[-256:]
    except (TimeoutError, aiohttp.ClientError):
        stats.errors += 1
        return
    stats.ended.append(time.monotonic())
    stats.events += events
    if done in tail and (expect_events is None or events == expect_events):
        stats.complete += 1
    else:
        stats.incomplete += 1


def _session(limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300), auto_decompress=False)


async def run_stream(job: dict[str, Any]) -> dict[str, Any]:
    url, body = job["url"], job["body"].encode()
    marker, done = job.get("marker", "data:").encode(), job.get("done", "[DONE]").encode()
    expect = job.get("expect_events")
    pids = job.get("pids", [])
    conc = job["concurrency"]
    async with _session() as session:

        async def batch(n: int, stats: StreamStats, data: bytes, expect_events: int | None) -> None:
            left = [n]

            async def worker() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await one_stream(session, url, data, stats, marker=marker, done=done, expect_events=expect_events)

            await asyncio.gather(*(worker() for _ in range(conc)))

        await batch(job.get("warmup", 0), StreamStats(), job.get("warm_body", job["body"]).encode(), None)
        await asyncio.sleep(0.05)
        stats = StreamStats()
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        await batch(job["streams"], stats, body, expect)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.1)
        cpu = cpu_seconds(pids) - cpu0
    return {
        "streams": job["streams"],
        "complete": stats.complete,
        "incomplete": stats.incomplete,
        "errors": stats.errors,
        "events": stats.events,
        "reads": stats.reads,
        "events_per_read": stats.events / stats.reads if stats.reads else None,
        "elapsed_s": elapsed,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / stats.events * 1e6 if pids and stats.events else None,
    }


async def run_hold(job: dict[str, Any]) -> dict[str, Any]:
    url, body = job["url"], job["body"].encode()
    count = job["count"]
    pids = job.get("pids", [])
    stats = StreamStats()
    live = [0, 0]  # streams between their first event and their end; the peak

    async def stream(session: aiohttp.ClientSession) -> None:
        got = [False]

        def first() -> None:
            got[0] = True
            live[0] += 1
            live[1] = max(live[1], live[0])

        try:
            await one_stream(
                session,
                url,
                body,
                stats,
                marker=b"data:",
                done=b"[DONE]",
                expect_events=job.get("expect_events"),
                on_first=first,
            )
        finally:
            if got[0]:
                live[0] -= 1

    rss_samples: list[tuple[float, int, int]] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            rss_samples.append((time.monotonic(), live[0], rss_bytes(pids)))
            await asyncio.sleep(0.1)

    rss_before = rss_bytes(pids)
    t_start = time.monotonic()
    sampling = asyncio.ensure_future(sampler())
    async with _session() as session:
        tasks = []
        for i in range(count):
            tasks.append(asyncio.ensure_future(stream(session)))
            if (i + 1) % job.get("ramp_batch", 50) == 0:
                await asyncio.sleep(job.get("ramp_gap_s", 0.02))
        await asyncio.wait_for(asyncio.gather(*tasks), job.get("timeout_s", 120))
    stop.set()
    await sampling
    first_end = min(stats.ended) if stats.ended else None
    all_open = max(stats.first) if len(stats.first) == count else None
    at_peak = [rss for _, n, rss in rss_samples if n == live[1]]
    return {
        "count": count,
        "complete": stats.complete,
        "incomplete": stats.incomplete,
        "errors": stats.errors,
        "dropped": count - stats.complete,
        "peak_concurrent": live[1],
        "all_open_after_s": None if all_open is None else all_open - t_start,
        "first_end_after_s": None if first_end is None else first_end - t_start,
        "last_end_after_s": max(stats.ended) - t_start if stats.ended else None,
        "held_concurrently": live[1] == count,
        "rss_before_mb": rss_before / 2**20,
        "rss_max_mb": max(r for _, _, r in rss_samples) / 2**20 if pids and rss_samples else None,
        "rss_at_peak_mb": max(at_peak) / 2**20 if pids and at_peak else None,
        "rss_samples": len(rss_samples),
    }


RUNNERS = {"requests": run_requests, "interleaved": run_interleaved, "stream": run_stream, "hold": run_hold}


async def run_steps(job: dict[str, Any]) -> dict[str, Any]:
    """Several jobs one after another in this process (so interleaved targets pay no start-up)."""
    results = []
    for step in job["steps"]:
        result = await RUNNERS[step["mode"]](step)
        result["target"] = step.get("target")
        results.append(result)
    return {"results": results}


def main() -> None:
    raise_nofile()
    with open(sys.argv[1]) as f:
        job = json.load(f)
    result = asyncio.run((RUNNERS | {"steps": run_steps})[job["mode"]](job))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
