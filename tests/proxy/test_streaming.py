"""Streams pass through chunk by chunk, and the gateway's timeouts hold (product §2 `[gateway]`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from cortex.sim import SimModel
from tests.conftest import FleetFactory, NodeSpec

HI: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]


def events(raw: bytes) -> list[str]:
    """The data payloads of an SSE body (either `data:` spacing)."""
    out = []
    for frame in raw.decode().split("\n\n"):
        frame = frame.strip()
        if frame.startswith("data:"):
            out.append(frame[5:].strip())
    return out


async def test_chunks_reach_the_client_as_the_node_sends_them(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=12))
    body = {"model": "m1", "messages": HI, "max_tokens": 12, "stream": True}
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-cortex-node"] == "a"
        async for chunk in resp.content.iter_any():
            arrivals.append((time.monotonic() - started, chunk))
    raw = b"".join(c for _, c in arrivals)
    payloads = events(raw)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 12
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    first_data = next(t for t, c in arrivals if b"data:" in c)
    end = arrivals[-1][0]
    # At 12 tok/s the node needs ~1 s; the first token must not wait for the last one.
    assert end >= 0.9, end
    assert first_data < end - 0.6, (first_data, end)
    assert len(arrivals) >= 4, "the stream arrived in one or two large pieces, not chunk by chunk"


async def test_first_byte_timeout(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), gateway={"first_byte_timeout_s": 0.3})
    f.sim("a").set_first_byte_delay(2.0)
    for stream in (False, True):
        started = time.monotonic()
        status, body, _ = await f.post(
            "/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 2, "stream": stream}
        )
        elapsed = time.monotonic() - started
        assert status in (502, 504), (stream, status, body)
        assert elapsed < 1.5, elapsed
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "first byte" in body["error"]["message"]


async def test_first_byte_timeout_fails_over_to_another_node(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000)]),
        NodeSpec("b", [SimModel("m1", 1000)]),
        gateway={"first_byte_timeout_s": 0.3},
    )
    f.sim("a").set_first_byte_delay(2.0)
    status, body, headers = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 2})
    assert status == 200, body
    assert headers["x-cortex-node"] == "b"
    assert len(f.inference_requests("a")) == 1


async def test_stream_idle_timeout_ends_a_silent_stream_with_an_error_event(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=1.0), gateway={"stream_idle_timeout_s": 0.3})
    body = {"model": "m1", "messages": HI, "max_tokens": 5, "stream": True}
    started = time.monotonic()
    async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, elapsed  # not the node's 5 s
    payloads = events(raw)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "0.3" in error["message"]


async def test_mid_stream_drop_ends_the_client_stream_with_an_error(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=50))
    f.sim("a").drop_stream_after(3, abort=True)
    body = {"model": "m1", "messages": HI, "max_tokens": 10, "stream": True}
    async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 5)
    payloads = events(raw)
    assert len([p for p in payloads if p.startswith('{"id"')]) == 3
    assert payloads[-1] == "[DONE]"
    assert "error" in json.loads(payloads[-2])


async def test_client_disconnect_mid_stream_frees_the_node(
    fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)], tok_s=20))
    caplog.set_level(logging.DEBUG)
    body = {"model": "m1", "messages": HI, "max_tokens": 200, "stream": True}
    resp = await f.http.post(f.url + "/v1/chat/completions", json=body)
    assert resp.status == 200
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert f.engine.snapshot().node("a").in_flight == 1  # type: ignore[union-attr]
    resp.close()  # the client hangs up
    await f.wait_for(lambda: f.engine.snapshot().node("a").in_flight == 0, what="lease released")  # type: ignore[union-attr]
    await f.wait_for(lambda: f.sim("a").running == 0, what="the node's generation cancelled")
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # The node is still fine for the next client.
    status, _, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 1})
    assert status == 200


async def test_stream_waiting_for_a_load_gets_keepalive_comments(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000), SimModel("cold", 1000, loaded=False)], load_s=1.6, tok_s=50))
    body = {"model": "cold", "messages": HI, "max_tokens": 3, "stream": True}
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["x-cortex-model"] == "cold"
        async for chunk in resp.content.iter_any():
            arrivals.append((time.monotonic() - started, chunk))
    raw = b"".join(c for _, c in arrivals)
    # A comment came first, while the model loaded (cortex only sends one when the wait passes 1 s).
    assert raw.startswith(b":"), raw[:100]
    assert b"loading cold" in raw.split(b"\n\n")[0]
    payloads = events(raw)
    assert payloads[-1] == "[DONE]"
    assert len(payloads) == 4


async def test_unknown_model_on_a_stream_is_a_plain_404(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    async with f.http.post(
        f.url + "/v1/chat/completions", json={"model": "ghost", "messages": HI, "stream": True}
    ) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["param"] == "model"


async def test_a_client_hanging_up_during_a_load_logs_no_traceback(
    fleet: FleetFactory, caplog: pytest.LogCaptureFixture
) -> None:
    f = await fleet(NodeSpec("a", [SimModel("cold", 1000, loaded=False)], load_s=1.5))
    body = {"model": "cold", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    caplog.set_level(logging.DEBUG)
    async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readline(), 5)
        assert first.startswith(b": loading cold on a")
    # The connection is closed here, while cortex still waits for the load.
    await asyncio.sleep(2.0)
    assert not [r for r in caplog.records if r.exc_info is not None], [r.getMessage() for r in caplog.records]
    snap = f.engine.snapshot()
    assert snap.totals.in_flight == 0
    assert snap.requests[0].status == 499
