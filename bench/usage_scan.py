"""What finding the usage of a stream costs: cortex's tail scan against parsing every chunk's JSON.

    python bench/usage_scan.py [--chunks 200] [--json-out FILE]

A stream is recorded from the simulator (a ``SimNode`` in this process, ``tok_s`` 0, so the bytes are
exactly what the simulated mistral.rs sends): ``--chunks`` content chunks, the finish chunk with the
nine-field usage, and ``data:[DONE]``. It is split into one read per SSE event, as a proxy reads a paced
stream, and each method is timed over the whole stream:

* ``tail``   — cortex's :class:`cortex.proxy.forward.UsageTail`: ``add`` per read, ``usage()`` once;
* ``orjson`` — every ``data:`` line of every read parsed with ``orjson.loads``, the last usage kept;
* ``json``   — the same with the standard library's ``json.loads``;
* ``loop``   — the per-read loop alone with nothing done (the floor every method pays).

All three must find the same usage. Figures are µs per stream (median of repeats, and the minimum) and the
ratios of the per-chunk parsers to the tail scan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from cortex.proxy.forward import UsageTail
from cortex.sim.models import SimModel
from cortex.sim.node import SimNode


async def record_stream(chunks: int) -> bytes:
    """The body of one simulated streaming chat answer with ``chunks`` content chunks before the finish."""
    node = SimNode([SimModel("bench-model", 4096)], tok_s=0, load_s=0)
    async with node:
        body = {
            "model": "bench-model",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": chunks + 1,  # the last token rides on the finish chunk
            "stream": True,
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(node.url + "/v1/chat/completions", json=body) as resp,
        ):
            assert resp.status == 200, resp.status
            return await resp.read()


def split_events(body: bytes) -> list[bytes]:
    """One read per SSE event (each ending with its blank line)."""
    return [part + b"\n\n" for part in body.split(b"\n\n") if part]


def by_tail(reads: list[bytes]) -> dict[str, Any] | None:
    tail = UsageTail()
    for chunk in reads:
        tail.add(chunk)
    return tail.usage()


def _per_chunk(loads: Any) -> Any:
    def scan(reads: list[bytes]) -> Any:
        usage = None
        for chunk in reads:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload and payload != b"[DONE]":
                        event = loads(payload)
                        if isinstance(event, dict) and event.get("usage"):
                            usage = event["usage"]
        return usage

    return scan


by_orjson = _per_chunk(orjson.loads)
by_json = _per_chunk(json.loads)


def loop_only(reads: list[bytes]) -> None:
    for _chunk in reads:
        pass


def measure(fn: Any, reads: list[bytes], repeat: int, target_s: float = 0.2) -> dict[str, float]:
    """µs per stream: median and minimum over ``repeat`` timings of about ``target_s`` each."""
    timer = timeit.Timer(lambda: fn(reads))
    number, _ = timer.autorange()
    number = max(1, int(number * target_s / 0.2))
    samples = [t / number * 1e6 for t in timer.repeat(repeat=repeat, number=number)]
    return {"median_us": statistics.median(samples), "min_us": min(samples), "number": number}


def main() -> int:
    parser = argparse.ArgumentParser(description="Usage tail scan vs per-chunk JSON parsing, per stream.")
    parser.add_argument("--chunks", type=int, default=200, help="content chunks before the finish chunk")
    parser.add_argument("--repeat", type=int, default=9, help="timings per method")
    parser.add_argument("--json-out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    body = asyncio.run(record_stream(args.chunks))
    reads = split_events(body)
    finish = reads[-2]
    assert reads[-1] == b"data:[DONE]\n\n", "the stream must end with [DONE]"
    assert b'"usage":{' in finish, "the finish chunk must carry the usage"
    expected = by_orjson(reads)
    assert expected is not None, "no usage found"
    assert len(expected) == 9, expected
    for fn in (by_tail, by_json):
        assert fn(reads) == expected, fn.__name__

    results = {
        name: measure(fn, reads, args.repeat)
        for name, fn in (("loop", loop_only), ("tail", by_tail), ("orjson", by_orjson), ("json", by_json))
    }
    tail = results["tail"]["median_us"]
    out = {
        "stream": {"reads": len(reads), "content_chunks": args.chunks, "bytes": len(body), "usage": expected},
        "us_per_stream": results,
        "ratio_orjson_to_tail": results["orjson"]["median_us"] / tail,
        "ratio_json_to_tail": results["json"]["median_us"] / tail,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(
        f"stream: {len(reads)} reads ({args.chunks} content chunks, finish chunk with usage, [DONE]), {len(body)} bytes"
    )
    print(f"{'method':28s}{'µs/stream (median)':>20s}{'min':>10s}{'µs/chunk':>10s}{'vs tail':>9s}")
    labels = {
        "loop": "loop alone (floor)",
        "tail": "UsageTail (add + usage())",
        "orjson": "orjson.loads every chunk",
        "json": "json.loads every chunk",
    }
    for name, r in results.items():
        ratio = f"{r['median_us'] / tail:.1f}x" if name != "loop" else ""
        print(
            f"{labels[name]:28s}{r['median_us']:20.1f}{r['min_us']:10.1f}{r['median_us'] / len(reads):10.2f}{ratio:>9s}"
        )
    print(
        f"per-chunk parsing costs {out['ratio_orjson_to_tail']:.1f}x (orjson) and {out['ratio_json_to_tail']:.1f}x "
        f"(json) the tail scan"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
