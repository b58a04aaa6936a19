"""cortex's own HTTP/1.1 front (``cortex/proxy/fast.py``): what it takes, what it hands to aiohttp, and how.

Every request here goes over a raw socket, so the bytes are exactly the test's. ``Connections.served``
counts the requests the fast front took: each test checks both the answer and which front gave it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import pytest
from aiohttp import web

from cortex.proxy import fast
from cortex.proxy.common import cortex_lines
from cortex.proxy.fast import FAST_BODY_MAX, ClientProtocol, Connections, Handler, WholeAnswer, open_stream
from cortex.proxy.forward import Call
from cortex.sim import SimModel, SimNode
from tests.hardening.conftest import WAIT_S, Gateway, GatewayFactory, wait_until
from tests.hardening.rawhttp import Reply, exchange, read_reply, request_bytes

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def served(gw: Gateway) -> int:
    conns = gw.servers.connections
    assert conns is not None
    return conns.served


def keep_alive(raw: bytes) -> bytes:
    return raw.replace(b"Connection: close\r\n", b"")


async def replies(reader: asyncio.StreamReader, count: int) -> list[Reply]:
    return [await asyncio.wait_for(read_reply(reader), WAIT_S) for _ in range(count)]


def chat_ok(reply: Reply) -> None:
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] >= 1


async def test_keepalive_pipelining_then_another_route(sim: SimNode, gateway: GatewayFactory) -> None:
    """Three chat requests written at once come back in order on one connection; a GET on the same
    connection hands it to aiohttp, which serves it and what follows."""
    gw = await gateway(sim.url)
    before = served(gw)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        ids = [f"req-{i}".encode() for i in range(3)]
        chat = "/v1/chat/completions"
        writer.write(b"".join(keep_alive(request_bytes(chat, CHAT, [(b"x-request-id", i)])) for i in ids))
        got = await replies(reader, 3)
        for reply, rid in zip(got, ids, strict=True):
            chat_ok(reply)
            assert reply.headers["x-request-id"] == rid.decode()  # in order, each its own
        assert served(gw) == before + 3
        writer.write(keep_alive(request_bytes("/v1/models", method=b"GET", length=False)))
        (models,) = await replies(reader, 1)
        assert models.status == 200
        assert models.json()["data"][0]["id"] == "m"
        writer.write(request_bytes("/v1/chat/completions", CHAT))
        (last,) = await replies(reader, 1)
        chat_ok(last)
        assert served(gw) == before + 3, "after the hand-over aiohttp serves the connection"
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b"", "Connection: close was honoured"
    finally:
        writer.transport.abort()
    await gw.settled()


async def test_a_query_string_and_the_anthropic_route_are_fast(sim: SimNode, gateway: GatewayFactory) -> None:
    """Claude Code posts to ``/v1/messages?beta=true``: the query does not route, the fast front serves it."""
    gw = await gateway(sim.url)
    before = served(gw)
    message = json.dumps({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).encode()
    got = []
    for path, body in (("/v1/messages?beta=true", message), ("/v1/chat/completions?x=1", CHAT)):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(request_bytes(path, body, [(b"anthropic-version", b"2023-06-01")]))
            (reply,) = await replies(reader, 1)
            got.append((reply.status, reply.json().get("type") or reply.json().get("object")))
        finally:
            writer.transport.abort()
    assert got == [(200, "message"), (200, "chat.completion")]
    assert served(gw) == before + 2


async def test_a_body_in_pieces(sim: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim.url)
    before = served(gw)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        raw = request_bytes("/v1/chat/completions", CHAT)
        cut = raw.index(b"\r\n\r\n") + 4
        for piece in (raw[: cut - 3], raw[cut - 3 : cut + 5], raw[cut + 5 : cut + 20], raw[cut + 20 :]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        (reply,) = await replies(reader, 1)
        chat_ok(reply)
        assert reply.headers.get("connection") == "close"
    finally:
        writer.transport.abort()
    assert served(gw) == before + 1


async def test_unusual_requests_are_aiohttps(sim: SimNode, gateway: GatewayFactory) -> None:
    """HTTP/1.0, a chunked body, ``Expect``, a compressed body, a body over the fast limit, a percent-encoded
    path: each is answered correctly, by aiohttp."""
    gw = await gateway(sim.url)
    path = "/v1/chat/completions"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT)
    big = CHAT + b" " * (FAST_BODY_MAX + 10)  # JSON may end in whitespace: big, and still a short prompt
    cases = {
        "http/1.0": request_bytes(path, CHAT).replace(b"HTTP/1.1", b"HTTP/1.0"),
        "chunked": request_bytes(path, chunked, [(b"Transfer-Encoding", b"chunked")]),
        "gzip": request_bytes(path, gzip.compress(CHAT), [(b"Content-Encoding", b"gzip")]),
        "big": request_bytes(path, big),
        "percent-encoded path": request_bytes(path.replace("/completions", "/%63ompletions"), CHAT),
    }
    before = served(gw)
    for name, raw in cases.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(raw)
            (reply,) = await replies(reader, 1)
            assert reply.status == 200, (name, reply.body)
        finally:
            writer.transport.abort()
    expect = request_bytes(path, CHAT, [(b"Expect", b"100-continue")])
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        head = expect[: expect.index(b"\r\n\r\n") + 4]
        writer.write(head)
        cont = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        assert cont.startswith(b"HTTP/1.1 100")
        writer.write(CHAT)
        (reply,) = await replies(reader, 1)
        assert reply.status == 200
    finally:
        writer.transport.abort()
    assert served(gw) == before, "none of these went through the fast front"
    await gw.settled()


async def test_errors_keep_the_dialect_and_the_connection(sim: SimNode, gateway: GatewayFactory) -> None:
    """A 400 and a 404 from the fast front are OpenAI envelopes, and the connection carries on."""
    gw = await gateway(sim.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        bad = keep_alive(request_bytes("/v1/chat/completions", b"{not json"))
        unknown = keep_alive(request_bytes("/v1/chat/completions", CHAT.replace(b'"m"', b'"nope"')))
        writer.write(bad + unknown + request_bytes("/v1/chat/completions", CHAT))
        first, second, third = await replies(reader, 3)
        assert first.status == 400
        assert "not valid JSON" in first.json()["error"]["message"]
        assert second.status == 404
        assert second.json()["error"]["code"] == "model_not_found"
        chat_ok(third)
    finally:
        writer.transport.abort()


async def test_a_client_that_hangs_up_releases_its_lease(gateway: GatewayFactory) -> None:
    """A non-streaming request waiting on a slow answer: the client leaves, the handler is cancelled and
    the lease comes back long before the node would have answered."""
    node = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01, tok_s=2.0)
    await node.start()
    try:
        gw = await gateway(node.url, first_byte_timeout_s=30.0, stream_idle_timeout_s=30.0)
        slow = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40})
        _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(request_bytes("/v1/chat/completions", slow.encode()))
        await wait_until(lambda: gw.in_flight() == 1, "the request holds a lease")
        writer.transport.abort()
        await gw.settled()  # within WAIT_S; the node needs 20 s for 40 tokens
    finally:
        await node.stop()


async def test_an_idle_connection_after_an_answer_is_closed(sim: SimNode, gateway: GatewayFactory) -> None:
    """After an answer the connection has ``keepalive_timeout_s`` for a whole head; a partial one does not
    keep it open."""
    gw = await gateway(sim.url, keepalive_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(keep_alive(request_bytes("/v1/chat/completions", CHAT)))
        (reply,) = await replies(reader, 1)
        chat_ok(reply)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    finally:
        writer.transport.abort()


async def test_a_connection_in_use_outlives_its_first_keepalive_deadline(sim: SimNode, gateway: GatewayFactory) -> None:
    """The keep-alive deadline counts from the last answer: a connection that carries a request every third of
    the timeout stays open past several timeouts, then closes once it idles (not before its time)."""
    timeout_s = 0.45
    gw = await gateway(sim.url, keepalive_timeout_s=timeout_s)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        started = loop.time()
        for _ in range(10):  # 10 x 0.15 s: over three timeouts
            writer.write(keep_alive(request_bytes("/v1/chat/completions", CHAT)))
            (reply,) = await replies(reader, 1)
            chat_ok(reply)
            await asyncio.sleep(timeout_s / 3)
        assert loop.time() - started > 3 * timeout_s
        writer.write(keep_alive(request_bytes("/v1/chat/completions", CHAT)))
        (reply,) = await replies(reader, 1)
        chat_ok(reply)
        idle_from = loop.time()
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b"", "closed once idle"
        assert loop.time() - idle_from >= timeout_s * 0.9, "not before its keep-alive time"
    finally:
        writer.transport.abort()


async def test_a_slow_reader_pauses_the_node_and_gets_every_chunk(gateway: GatewayFactory) -> None:
    """A spliced stream to a client that does not read: once the client's socket and the gateway's buffer
    are full, reading from the node pauses (no unbounded buffering); when the client reads, the stream
    resumes and arrives whole."""
    node = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01, tok_s=0.0)
    await node.start()
    try:
        gw = await gateway(node.url, stream_idle_timeout_s=10.0, first_byte_timeout_s=10.0)
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "stream": True}
        ).encode()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            conns = gw.servers.connections
            assert conns is not None
            await wait_until(lambda: len(conns.fast) == 1, "the connection is the fast front's")
            (front,) = conns.fast
            assert front.transport is not None  # a small kernel buffer on the gateway's side too (no autotuning)
            front.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await loop.sock_sendall(sock, request_bytes("/v1/chat/completions", body))  # and read nothing yet
            await wait_until(lambda: any(c.on_resume is not None for c in conns.fast), "the node's reads paused")
            parts = []
            async with asyncio.timeout(WAIT_S * 2):
                while part := await loop.sock_recv(sock, 65536):  # to the end (Connection: close)
                    parts.append(part)
            data = b"".join(parts)
        finally:
            sock.close()
        assert data.startswith(b"HTTP/1.1 200")
        assert data.count(b"data:") >= 4000  # every token's chunk (and the finish chunk), in order
        assert b"[DONE]" in data[-200:]
        await gw.settled()
    finally:
        await node.stop()


async def test_a_handler_that_fails_gets_a_500_only_before_its_answer_began() -> None:
    """A bug in a handler: before any byte went out the client gets a 500; after a stream's head went out
    the connection is closed, never a second status line inside the stream."""

    async def fails_early(_request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug before the answer")

    async def fails_late(request: web.Request) -> web.StreamResponse:
        response = open_stream(request, 200, {"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        raise RuntimeError("a bug mid-stream")

    async def unused(_request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=404)

    conns = Connections(10, 5.0, 5.0)
    routes: dict[bytes, Handler] = {b"/early": fails_early, b"/late": fails_late}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientProtocol(web.Server(unused), conns, routes), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        answers = {}
        for path in ("/early", "/late"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(keep_alive(request_bytes(path, b"{}")))
                answers[path] = await asyncio.wait_for(reader.read(), WAIT_S)  # to the close
            finally:
                writer.transport.abort()
    finally:
        server.close()
        await server.wait_closed()
    assert answers["/early"].startswith(b"HTTP/1.1 500 ")
    late = answers["/late"]
    assert late.startswith(b"HTTP/1.1 200 ")
    assert b"data: 1" in late
    assert late.count(b"HTTP/1.1") == 1


async def test_every_request_counts_as_a_use_streamed_or_not(sim: SimNode, gateway: GatewayFactory) -> None:
    """The ``cost`` strategy's reuse evidence sees each request once: a stream served at once from a
    loaded model too (it does not pass through ``Lifecycle.acquire``'s queue)."""
    gw = await gateway(sim.url)
    stream = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    for body in (CHAT, stream, stream):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(request_bytes("/v1/chat/completions", body))
            assert (await asyncio.wait_for(reader.read(), WAIT_S)).startswith(b"HTTP/1.1 200")
        finally:
            writer.transport.abort()
    lifecycle = gw.engine.lifecycle
    figures = lifecycle.uses.figures("m", lifecycle.fleet.clock())
    assert figures is not None
    _since, bursts, _gap, pace = figures
    assert bursts == 1
    assert pace < 60  # three requests close together: a pace was measured, so all three were noted


async def test_a_whole_answer_has_the_head_aiohttp_gives(sim: SimNode, gateway: GatewayFactory) -> None:
    """The fast front writes a whole answer without a ``web.Response``: its headers are the ones aiohttp's
    server gives the same request (a chunked body sends it there), Date and length aside. OpenAI and Anthropic."""
    gw = await gateway(sim.url)
    message = json.dumps({"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).encode()
    rid = [(b"x-request-id", b"same-id")]
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/messages", message)):
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        before = served(gw)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(request_bytes(path, body, rid))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        finally:
            writer.transport.abort()
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.count(b"Content-Length:") == 1
        fast = await exchange(gw.port, request_bytes(path, body, rid))
        slow = await exchange(gw.port, request_bytes(path, chunked, [*rid, (b"Transfer-Encoding", b"chunked")]))
        assert served(gw) == before + 2, "the chunked one went to aiohttp"
        assert fast.status == slow.status == 200
        assert fast.json().keys() == slow.json().keys()
        for reply in (fast, slow):
            assert reply.headers.pop("date")
            assert int(reply.headers.pop("content-length")) == len(reply.body)  # the node's answers vary
        assert fast.headers == slow.headers, path
        assert fast.headers["x-request-id"] == "same-id"
        assert fast.headers["connection"] == "close"
    await gw.settled()


def test_a_whole_answer_escapes_what_it_cannot_send() -> None:
    """A model or node name with a line break (they come from nodes and config) cannot add a header."""
    call = Call(api="openai", started=0.0, model="evil\r\nX-Injected: 1", node="gpu\n0", queue_s=0.012)
    answer = WholeAnswer(201, b"{}", cortex_lines(call, "req\r\nX-Other: 2"))
    wire = answer.encode(keep_alive=True)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert body == b"{}"
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 201 Created"
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert b"x-injected" not in names
    assert b"x-other" not in names
    assert b"x-request-id" not in names, "an unusable id is not passed back"
    assert b"connection" not in names
    assert b"x-cortex-queue-ms: 12" in lines
    assert b"Connection: close" in answer.encode(keep_alive=False)
    resp = answer.to_response()
    assert resp.status == 201
    assert resp.body == b"{}"
    assert resp.headers["x-cortex-model"] == "evil%0D%0AX-Injected: 1"
    assert resp.headers["x-cortex-node"] == "gpu%0A0"


async def test_the_cpu_is_handed_on_after_an_answer_only_when_nothing_else_is_answered(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a whole answer (a success or an error) that was the front's only work, cortex yields its CPU
    to the client it woke; while a stream is being answered it does not, and once the stream is over it
    does again."""
    calls: list[int] = []
    monkeypatch.setattr(fast, "_yield_cpu", lambda: calls.append(1))
    node = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01, tok_s=20.0)
    await node.start()
    try:
        gw = await gateway(node.url, first_byte_timeout_s=30.0, stream_idle_timeout_s=30.0)
        conns = gw.servers.connections
        assert conns is not None
        unknown = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode()
        for body, status in ((CHAT, 200), (unknown, 404)):
            reply = await exchange(gw.port, request_bytes("/v1/chat/completions", body))
            assert reply.status == status, reply.body
        assert len(calls) == 2

        long = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "stream": True}
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(request_bytes("/v1/chat/completions", json.dumps(long).encode()))
            assert (await asyncio.wait_for(reader.readuntil(b"data:"), WAIT_S)).startswith(b"HTTP/1.1 200")
            assert conns.answering == 1
            chat_ok(await exchange(gw.port, request_bytes("/v1/chat/completions", CHAT)))
            assert len(calls) == 2, "the stream was still being answered"
        finally:
            writer.transport.abort()
        await wait_until(lambda: conns.answering == 0, "the stream's handler ends")
        chat_ok(await exchange(gw.port, request_bytes("/v1/chat/completions", CHAT)))
        assert len(calls) == 3
        await gw.settled()
    finally:
        await node.stop()
