"""Slow and numerous clients: a slowloris cannot hold connections, a flood cannot exhaust them.

Every test is bounded: the gateway's own limits are set small (heads within 0.3 s, 20 connections) and
each wait has a hang guard, so a regression fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import pytest

from cortex.sim import SimNode
from tests.hardening.conftest import WAIT_S, Gateway, GatewayFactory, wait_until
from tests.hardening.rawhttp import read_reply, request_bytes

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (bounded by the hang guard)."""
    return await asyncio.wait_for(reader.read(), WAIT_S)


async def chat_ok(gw: Gateway) -> None:
    async with gw.http.post(gw.url + "/v1/chat/completions", data=CHAT) as resp:
        assert resp.status == 200, await resp.text()


async def test_a_slowloris_cannot_hold_connections(sim: SimNode, gateway: GatewayFactory) -> None:
    """Twenty clients trickle a head that never ends: each is closed after the head timeout, while a real
    client is served alongside."""
    gw = await gateway(sim.url, header_timeout_s=0.3, max_connections=50)
    conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(20)]

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(100):  # 10 s of headers at most, unless the gateway hangs up first
                writer.write(b"X-Slow-%d: 1\r\n" % i)
                await writer.drain()
                await asyncio.sleep(0.1)

    trickling = [asyncio.ensure_future(trickle(w)) for _, w in conns]
    try:
        await chat_ok(gw)  # served while the slow ones hang on
        answers = await asyncio.gather(*(closed_by_server(r) for r, _ in conns))
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
    finally:
        for task in trickling:
            task.cancel()
        await asyncio.gather(*trickling, return_exceptions=True)
        for _, writer in conns:
            writer.transport.abort()
    await chat_ok(gw)


async def test_a_connection_that_sends_nothing_is_closed(sim: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim.url, header_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 408")
    finally:
        writer.transport.abort()


async def test_a_stalled_body_is_a_408_in_the_dialect(sim: SimNode, gateway: GatewayFactory) -> None:
    """The head is complete, the body stops after 10 of 1000 bytes: 408 in the client's envelope, no lease."""
    gw = await gateway(sim.url, header_timeout_s=0.3)
    for path, anthropic in (("/v1/chat/completions", False), ("/v1/messages", True)):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(request_bytes(path, b'{"model": ', [(b"Content-Length", b"1000")]))
            reply = await asyncio.wait_for(read_reply(reader), WAIT_S)
            assert reply.status == 408
            body = reply.json()
            assert (body["type"] == "error") if anthropic else ("param" in body["error"])
        finally:
            writer.transport.abort()
    await gw.settled()


async def test_an_idle_keepalive_connection_is_closed(sim: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim.url, keepalive_timeout_s=0.3, header_timeout_s=5.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        head = request_bytes("/health", method=b"GET").replace(b"Connection: close\r\n", b"")
        writer.write(head)
        reply = await asyncio.wait_for(read_reply(reader), WAIT_S)
        assert reply.status == 200
        assert await closed_by_server(reader) == b"", "the idle connection was closed by the gateway"
    finally:
        writer.transport.abort()


async def test_a_flood_is_refused_beyond_the_limit_and_logged_once(
    sim: SimNode, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cortex.proxy.app")
    gw = await gateway(sim.url, max_connections=20, header_timeout_s=5.0)
    conns = []
    try:
        for _ in range(60):
            conns.append(await asyncio.open_connection("127.0.0.1", gw.port))
        refusals = [await closed_by_server(r) for r, _ in conns[20:]]  # admitted in order: the first 20 stay
        assert all(a.startswith(b"HTTP/1.1 503") for a in refusals)
        assert b'"too_many_connections"' in refusals[0]
        # a real client is refused too while the gateway is full, with a clean 503
        async with gw.http.post(gw.url + "/v1/chat/completions", data=CHAT) as resp:
            assert resp.status == 503
        full = [r for r in caplog.records if "refusing new ones" in r.getMessage()]
        assert len(full) == 1, "one line per episode, not one per refused connection"
    finally:
        for _, writer in conns:
            writer.transport.abort()
    await wait_until(lambda: any("accepting connections again" in r.getMessage() for r in caplog.records), "recovery")
    await chat_ok(gw)
    await gw.settled()
