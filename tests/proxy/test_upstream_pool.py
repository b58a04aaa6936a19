"""The upstream HTTP/1.1 pool (cortex/engine/upstream.py) against real servers on loopback.

aiohttp servers for well-formed HTTP; small raw asyncio servers where a node misbehaves on the wire
(closing an idle connection, answering without a length, sending garbage or unasked bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from cortex.engine.upstream import HIGH_WATER, UpstreamPool
from tests.hardening.threaded import ThreadedNode
from tests.hardening.threaded import read_request as read_request_blocking

pytestmark = pytest.mark.asyncio

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """An aiohttp server that records each request's connection (peer port), path and headers."""

    def __init__(self) -> None:
        self.peers: list[int] = []
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""

    def wrap(self, handler: Handler) -> Handler:
        async def recorded(request: web.Request) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.peers.append(peer[1] if peer else -1)
            self.seen.append((request.path, dict(request.headers), await request.read()))
            return await handler(request)

        return recorded


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Server:
        server = Server()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.wrap(handler))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        server.url = f"http://127.0.0.1:{port}"
        return server

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout_s=2.0)
    yield p
    p.close()


OnConn = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(on_conn: OnConn) -> tuple[asyncio.Server, str]:
    """A raw TCP server on loopback and its base URL."""
    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def answer_then_close(answer: bytes) -> OnConn:
    """A node that reads one request, writes ``answer`` (raw bytes) and closes the connection."""

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    return on_conn


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request (head and Content-Length body) from a raw connection; b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


async def test_keeps_one_connection_for_sequential_requests(serve: Any, pool: UpstreamPool) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"x-request-id": "r1"})

    server = await serve(ok)
    for _ in range(3):
        resp = await pool.post(server.url, "/v1/x", b"{}", {"Content-Type": "application/json"})
        assert resp.status == 200
        assert resp.headers.get("X-Request-Id") == "r1"
        assert await resp.read() == b'{"ok": true}'
        resp.release()
    assert len(server.peers) == 3
    assert len(set(server.peers)) == 1, "sequential requests must reuse the connection"


async def test_sends_only_the_headers_given_and_the_path_prefix(serve: Any, pool: UpstreamPool) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    server = await serve(ok)
    resp = await pool.post(server.url + "/prefix/", "/v1/chat", b'{"a":1}', {"Content-Type": "application/json"})
    assert await resp.read() == b"fine"
    path, headers, body = server.seen[0]
    assert path == "/prefix/v1/chat"
    assert body == b'{"a":1}'
    assert {k.lower() for k in headers} == {"host", "content-length", "content-type"}
    assert headers["Host"] == server.url.removeprefix("http://")


async def test_a_line_break_in_a_header_is_refused(pool: UpstreamPool) -> None:
    with pytest.raises(ValueError, match="line break"):
        await pool.post("http://127.0.0.1:9", "/x", b"", {"x-request-id": "a\r\nEvil: 1"})


async def test_streams_chunks_as_they_come(serve: Any, pool: UpstreamPool) -> None:
    go_on = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data:one\n\n")
        await go_on.wait()
        await response.write(b"data:two\n\n")
        await response.write_eof()
        return response

    server = await serve(stream)
    resp = await pool.post(server.url, "/s", b"", {})
    got = []
    async for chunk in resp.content.iter_any():
        got.append(chunk)
        if chunk == b"data:one\n\n":
            go_on.set()  # the second chunk is only sent once the first was read: no buffering
    assert b"".join(got) == b"data:one\n\ndata:two\n\n"
    assert got[0] == b"data:one\n\n"
    # the connection went back to the pool once the answer ended
    assert pool.idle_count(server.url) == 1


async def test_a_body_delimited_by_close(pool: UpstreamPool) -> None:
    server, url = await raw_server(answer_then_close(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"))
    async with server:
        resp = await pool.post(url, "/x", b"{}", {})
        assert resp.status == 200
        assert await resp.read() == b"all of it"
        assert pool.idle_count(url) == 0


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), as a kernel does for a socket closed with unread bytes."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_an_idle_connection_the_node_closed_is_not_used(pool: UpstreamPool) -> None:
    """The node closes its side of an idle connection right after answering: nothing is sent on it."""
    seen: list[int] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(len(seen))
        if await read_request(reader):
            writer.write(OK)
            await writer.drain()
        writer.close()

    server, url = await raw_server(on_conn)
    async with server:
        for _ in range(3):
            resp = await pool.post(url, "/x", b"{}", {})
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.05)  # the node's FIN arrives
        assert len(seen) == 3


async def test_a_fin_not_yet_seen_by_the_loop_is_caught_before_writing(pool: UpstreamPool) -> None:
    """The node's FIN sits unread in the socket when the next request is sent (the loop was busy): the
    idle connection is found stale by a poll of the socket, and the request goes out on a new one only."""
    closed = threading.Event()
    requests: list[tuple[int, bytes]] = []

    def serve(conn: socket.socket, index: int) -> None:
        while request := read_request_blocking(conn):
            requests.append((index, request))
            conn.sendall(OK)
            if index == 0:
                conn.close()
                closed.set()
                return

    with ThreadedNode(serve) as node:
        resp = await pool.post(node.url, "/x", b"{}", {})
        assert await resp.read() == b"ok"
        # Both waits block the loop on purpose: the FIN reaches the kernel while asyncio does not look.
        assert closed.wait(5)
        time.sleep(0.05)  # noqa: ASYNC251
        resp = await pool.post(node.url, "/y", b"{}", {})
        assert await resp.read() == b"ok"
        assert [index for index, _ in requests] == [0, 1], "the second request went out once, on a new connection"


async def test_bytes_not_yet_seen_by_the_loop_are_never_an_answer(pool: UpstreamPool) -> None:
    """Stray bytes the node sent after an answer sit unread when the next request is written: that
    connection is not used, so they cannot be taken for the next request's answer."""
    sent = threading.Event()
    requests: list[int] = []

    def serve(conn: socket.socket, index: int) -> None:
        while read_request_blocking(conn):
            requests.append(index)
            conn.sendall(OK)
            if index == 0 and not sent.is_set():
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY")
                sent.set()
        conn.close()

    with ThreadedNode(serve) as node:
        resp = await pool.post(node.url, "/x", b"{}", {})
        assert await resp.read() == b"ok"
        assert sent.wait(5)  # blocking on purpose: the stray bytes arrive while asyncio does not look
        time.sleep(0.05)  # noqa: ASYNC251
        resp = await pool.post(node.url, "/y", b"{}", {})
        assert await resp.read() == b"ok"
        assert requests == [0, 1]


async def test_a_reused_connection_reset_before_reading_is_sent_again_once(pool: UpstreamPool) -> None:
    """A reset on a reused connection before any answer byte means the node never read the request
    (its socket was gone): sent once more, on a new connection."""
    connections = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if await read_request(reader):
            writer.write(OK)
            await writer.drain()
        await reader.read(1)  # the next request starts to arrive: drop it unread
        rst_close(writer)

    server, url = await raw_server(on_conn)
    async with server:
        for _ in range(3):
            resp = await pool.post(url, "/x", b"{}", {})
            assert await resp.read() == b"ok"
        assert connections == 3, "each request after the first was sent again, once, on a new connection"


async def test_a_retry_storm_is_bounded_to_one_resend(pool: UpstreamPool) -> None:
    """Every reused connection resets, and so does every new one: one request reaches the node at most
    twice, however many idle connections the pool holds."""
    requests = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        if await reader.read(1):
            requests += 1
        rst_close(writer)

    server, url = await raw_server(on_conn)
    async with server:
        assert await pool.warm(url, 20) == 20
        with pytest.raises(aiohttp.ClientConnectionError):
            await pool.post(url, "/x", b"{}", {})
        assert requests == 2, f"one POST reached the node {requests} times"


async def test_a_reused_connection_closed_after_the_request_is_not_sent_again(pool: UpstreamPool) -> None:
    """A clean close after the node read the request: it may be working on it, so no resend."""
    requests = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        if await read_request(reader):
            requests += 1
            writer.write(OK)
            await writer.drain()
        if await read_request(reader):
            requests += 1
        writer.close()

    server, url = await raw_server(on_conn)
    async with server:
        resp = await pool.post(url, "/x", b"{}", {})
        assert await resp.read() == b"ok"
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await pool.post(url, "/x", b"{}", {})
        assert requests == 2, "the second request reached the node once"


async def test_an_oversized_head_fails_and_drops_the_connection(pool: UpstreamPool) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB of one header value, unless cortex hangs up first
                writer.write(b"a" * 65536)
                await writer.drain()

    server, url = await raw_server(on_conn)
    async with server:
        with pytest.raises(aiohttp.ClientPayloadError, match="head is over"):
            await pool.post(url, "/x", b"{}", {})
        assert pool.idle_count(url) == 0


async def test_switching_protocols_is_an_error_not_an_answer(pool: UpstreamPool) -> None:
    server, url = await raw_server(
        answer_then_close(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxx")
    )
    async with server:
        with pytest.raises(aiohttp.ClientPayloadError, match="101"):
            await pool.post(url, "/x", b"{}", {})


async def test_read_caps_the_body(serve: Any, pool: UpstreamPool) -> None:
    blob = b"x" * 300_000

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no length to refuse up front
        await response.prepare(request)
        await response.write(blob)
        await response.write_eof()
        return response

    async def announced(request: web.Request) -> web.Response:
        return web.Response(body=blob)

    server = await serve(lambda r: big(r) if r.path == "/chunked" else announced(r))
    for path in ("/chunked", "/length"):
        resp = await pool.post(server.url, path, b"", {})
        with pytest.raises(aiohttp.ClientPayloadError, match="limit"):
            await resp.read(limit=100_000)
    resp = await pool.post(server.url, "/length", b"", {})
    assert await resp.read(limit=300_000) == blob


async def test_a_read_to_close_body_is_flagged(serve: Any, pool: UpstreamPool) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    server = await serve(ok)
    resp = await pool.post(server.url, "/x", b"", {})
    assert not resp.until_close
    await resp.read()
    raw, url = await raw_server(answer_then_close(b'HTTP/1.1 200 OK\r\n\r\n{"cut'))
    async with raw:
        resp = await pool.post(url, "/x", b"{}", {})
        assert resp.until_close
        assert await resp.read() == b'{"cut'


async def test_errors_never_name_the_endpoint(pool: UpstreamPool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(aiohttp.ClientConnectionError) as exc:
        await pool.post(f"http://127.0.0.1:{port}", "/x", b"{}", {})
    assert "127.0.0.1" not in str(exc.value)
    assert str(port) not in str(exc.value)


async def test_a_header_outside_latin1_is_refused(pool: UpstreamPool) -> None:
    with pytest.raises(ValueError, match="Latin-1"):
        await pool.post("http://127.0.0.1:9", "/x", b"", {"x-request-id": "\u20ac"})


async def test_a_node_that_closes_mid_answer_fails_the_read(pool: UpstreamPool) -> None:
    server, url = await raw_server(answer_then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"))
    async with server:
        resp = await pool.post(url, "/x", b"{}", {})
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_a_node_that_closes_before_answering_is_a_disconnect(pool: UpstreamPool) -> None:
    server, url = await raw_server(answer_then_close(b""))
    async with server:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await pool.post(url, "/x", b"{}", {})


async def test_garbage_is_a_payload_error(pool: UpstreamPool) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await reader.read()

    server, url = await raw_server(on_conn)
    async with server:
        with pytest.raises(aiohttp.ClientPayloadError, match="malformed"):
            await pool.post(url, "/x", b"{}", {})


async def test_unasked_bytes_on_an_idle_connection_drop_it(pool: UpstreamPool) -> None:
    connections = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while await read_request(reader):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # unasked
            await writer.drain()

    server, url = await raw_server(on_conn)
    async with server:
        resp = await pool.post(url, "/x", b"{}", {})
        assert await resp.read() == b"ok"
        await asyncio.sleep(0.05)
        assert pool.idle_count(url) == 0, "a connection that spoke unasked is not reused"
        resp = await pool.post(url, "/x", b"{}", {})
        assert resp.status == 200
        assert await resp.read() == b"ok"
        assert connections == 2


async def test_refused_connection_is_a_client_connection_error(pool: UpstreamPool) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(aiohttp.ClientConnectionError, match="cannot connect"):
        await pool.post(f"http://127.0.0.1:{port}", "/x", b"{}", {})


async def test_close_ends_a_pending_read(serve: Any, pool: UpstreamPool) -> None:
    done = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await done.wait()
        return response

    server = await serve(silent)
    resp = await pool.post(server.url, "/x", b"", {})
    reader = asyncio.ensure_future(resp.content.readany())
    await asyncio.sleep(0.05)
    assert not reader.done()
    resp.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(reader, 2)
    assert pool.idle_count(server.url) == 0
    done.set()


async def test_cancelling_before_the_answer_does_not_reuse_the_connection(serve: Any, pool: UpstreamPool) -> None:
    calls = 0

    async def slow_then_fast(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.5)
            return web.Response(text="late")
        return web.Response(text="second")

    server = await serve(slow_then_fast)
    ok = await pool.post(server.url, "/warm", b"", {})
    await ok.read()
    calls = 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await pool.post(server.url, "/x", b"", {})
    resp = await pool.post(server.url, "/x", b"", {})
    assert await resp.read() == b"second", "the late answer must never be read as the next one's"


async def test_a_slow_reader_pauses_the_socket(serve: Any, pool: UpstreamPool) -> None:
    blob = bytes(range(256)) * (8 * 1024)  # 2 MiB

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(0, len(blob), 64 * 1024):
            await response.write(blob[i : i + 64 * 1024])
        await response.write_eof()
        return response

    server = await serve(big)
    resp = await pool.post(server.url, "/big", b"", {})
    for _ in range(50):
        await asyncio.sleep(0.01)
        if resp._buffered > HIGH_WATER:
            break
    assert resp._buffered > HIGH_WATER
    assert resp._conn is not None
    assert resp._conn.transport is not None
    assert not resp._conn.transport.is_reading(), "reading must pause above the high-water mark"
    assert await resp.read() == blob


async def test_warm_opens_idle_connections_that_requests_then_use(serve: Any, pool: UpstreamPool) -> None:
    async def ok(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)  # all in flight at once
        return web.Response(text="ok")

    server = await serve(ok)
    assert await pool.warm(server.url, 5) == 5
    assert pool.idle_count(server.url) == 5
    assert await pool.warm(server.url, 5) == 0, "already warm"

    async def one() -> bytes:
        resp = await pool.post(server.url, "/x", b"", {})
        return await resp.read()

    assert await asyncio.gather(*(one() for _ in range(5))) == [b"ok"] * 5
    assert len(set(server.peers)) == 5
    assert pool.idle_count(server.url) == 5


async def test_https_endpoint_verifies_the_node_certificate(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, pool: UpstreamPool
) -> None:
    """An ``https://`` node: TLS with the system's trust store (here a test CA through ``SSL_CERT_FILE``)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=f"secure={request.secure}")

    app = web.Application()
    app.router.add_post("/v1/x", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        # untrusted CA: refused
        with pytest.raises(aiohttp.ClientConnectionError, match="cannot connect"):
            await pool.post(f"https://127.0.0.1:{port}", "/v1/x", b"{}", {})
        # trusted (the way an operator adds a CA: SSL_CERT_FILE, as for aiohttp and curl)
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
        fresh = UpstreamPool(connect_timeout_s=2.0)
        try:
            resp = await fresh.post(f"https://127.0.0.1:{port}", "/v1/x", b"{}", {})
            assert resp.status == 200
            assert await resp.read() == b"secure=True"
        finally:
            fresh.close()
    finally:
        await runner.cleanup()


def slow_until(release: asyncio.Event) -> Handler:
    """A handler that answers "ok" at once, except on ``/slow``: only once ``release`` is set."""

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/slow":
            await release.wait()
        return web.Response(text="ok")

    return handler


async def test_timeout_bounds_the_wait_for_the_answer_head(serve: Any, pool: UpstreamPool) -> None:
    release = asyncio.Event()
    server = await serve(slow_until(release))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await pool.post(server.url, "/slow", b"", {}, timeout_s=0.2)
    assert 0.15 <= loop.time() - started < 1.5
    assert pool.idle_count(server.url) == 0, "a connection with an answer still owed is dropped"
    release.set()
    resp = await pool.post(server.url, "/fast", b"", {}, timeout_s=2.0)
    assert await resp.read() == b"ok"
    # answered in time: the timer is gone and cannot fire on the connection's next request
    await asyncio.sleep(0.01)
    assert pool.idle_count(server.url) == 1


async def test_a_reused_connection_times_each_request_by_its_own_deadline(serve: Any, pool: UpstreamPool) -> None:
    """On a reused connection a request is neither failed by an earlier request's deadline passing nor let
    off when its own deadline is sooner than the earlier one's."""
    release = asyncio.Event()
    server = await serve(slow_until(release))
    loop = asyncio.get_running_loop()
    try:
        for first_s, second_s in ((0.4, 0.5), (5.0, 0.3)):
            resp = await pool.post(server.url, "/fast", b"", {}, timeout_s=first_s)
            assert await resp.read() == b"ok"
            if first_s < second_s:
                await asyncio.sleep(first_s * 0.6)  # the first deadline passes while the second request waits
            started = loop.time()
            with pytest.raises(TimeoutError):
                await pool.post(server.url, "/slow", b"", {}, timeout_s=second_s)
            waited = loop.time() - started
            assert second_s - 0.02 <= waited < second_s + 1.0, (first_s, second_s, waited)
        assert len(set(server.peers[0:2])) == 1, "the second request went on the first one's connection"
        assert len(set(server.peers[2:4])) == 1
    finally:
        release.set()


async def test_a_poke_interrupts_a_silent_read_without_losing_bytes() -> None:
    from typing import cast

    from cortex.engine.upstream import Headers, UpstreamResponse, _Conn

    resp = UpstreamResponse(cast(_Conn, None), 200, Headers())
    pending = asyncio.ensure_future(resp.next_or_poke())
    await asyncio.sleep(0)
    assert not pending.done()
    resp.poke()
    assert await pending is None  # the silence, reported
    resp._feed(b"data: 1\n\n")
    resp.poke()  # a poke racing with bytes: the bytes win, the poke is dropped
    assert await resp.next_or_poke() == b"data: 1\n\n"
    later = asyncio.ensure_future(resp.next_or_poke())
    await asyncio.sleep(0)
    assert not later.done()
    resp._finish()
    assert await later == b""


ODD_HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Trail: a b  \t\r\nx-empty:\r\nX-Twice: 1\r\n"
    b'x-twice: 2\r\nContent-Length: 7\r\n\r\n{"a":1}',
    b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\nConnection: close\r\n\r\nno",
    b"HTTP/1.1 201 \r\nContent-Length: 0\r\n\r\n",
]


@pytest.mark.parametrize("answer", ODD_HEADS, ids=["headers", "close", "empty"])
async def test_an_answer_read_at_once_equals_the_same_answer_read_in_pieces(answer: bytes, pool: UpstreamPool) -> None:
    """A node's answer read at once or in pieces of 5 bytes: the status, headers (lower-case names, last
    repeat wins, trailing blanks stripped, which llhttp only does for a head that came whole), body and
    keep-alive must come out the same."""

    def node(pieces: bool) -> OnConn:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await read_request(reader):
                for i in range(0, len(answer), 5 if pieces else len(answer)):
                    writer.write(answer[i : i + (5 if pieces else len(answer))])
                    await writer.drain()
                    if pieces:
                        await asyncio.sleep(0.002)
            writer.close()

        return on_conn

    seen = []
    for pieces in (False, True):
        server, url = await raw_server(node(pieces))
        async with server:
            resp = await pool.post(url, "/x", b"{}", {})
            body = await resp.read()
            await asyncio.sleep(0.02)
            seen.append((resp.status, dict(resp.headers), body, pool.idle_count(url)))
    assert seen[0] == seen[1]
    status, headers, body, idle = seen[0]
    assert status == int(answer[9:12])
    assert body == answer.partition(b"\r\n\r\n")[2]
    assert idle == (0 if b"Connection: close" in answer else 1)
    if status == 200:
        assert (headers["x-trail"], headers["x-empty"], headers["x-twice"]) == ("a b", "", "2")
