"""The HTTP/1.1 client that carries client requests to nodes: one pool of keep-alive connections per node.

Why not aiohttp's client here (it still does every other call to a node): building and sending one
request through ``ClientSession.post`` costs about 0.2 ms of Python, and the bytes only leave in a task
scheduled after it. When a load finishes and 100 queued requests are released at once, that put the last
of them on the wire 25 to 40 ms after ``loaded``. Here a request is one pre-formatted ``transport.write`` on an
idle connection, done before the first ``await``, and responses are parsed by llhttp (``httptools``, the
parser uvicorn uses). ``bench/cold_load.py`` measures the release on the wire.

What it does, and no more: ``POST`` with a full body; ``Content-Length``, chunked and read-to-close
answers; keep-alive reuse (an idle connection is dropped after :data:`IDLE_S`, when the node closes it, or
when it has anything to read before a request was sent on it); back-pressure (a slow reader pauses the
socket); TLS for ``https://`` endpoints; a path prefix in the endpoint. Errors are aiohttp's exception
types, so callers handle one family.

A node is not trusted to behave. A request is sent again at most once, on a fresh connection, and only
when the node is known not to have read it: a *reused* connection reset (RST) before any byte of an
answer, which the kernel sends when the node's socket was already closed or dropped unread bytes. A
connection that ends cleanly after the request went out is an error, never a retry: the node may be
working on it. An answer head over :data:`MAX_HEAD`, a ``101 Switching Protocols`` and bytes nobody asked
for are errors that drop the connection. Stray bytes that arrive while a connection is idle are caught
before it is reused; stray bytes that arrive after the next request went out look like its answer on the
wire, so a request's ``x-request-id`` must come back in its answer once the node has shown it echoes
ids (mistral.rs does), or the answer is refused. :meth:`UpstreamResponse.read` takes a size cap; and a body
delimited by the end of the connection is flagged (:attr:`UpstreamResponse.until_close`), since a node
that died mid-answer looks the same on the wire as one that finished. Error messages never name the
endpoint: they reach clients, and the caller names the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import aiohttp
import httptools

from cortex.engine.deadline import Deadline

__all__ = ["IDLE_S", "UpstreamPool", "UpstreamResponse"]

IDLE_S = 15.0
"""An idle connection older than this is closed rather than reused (aiohttp's default keep-alive)."""
HIGH_WATER = 256 * 1024
"""Buffered answer bytes at which reading from the node pauses until the reader catches up."""
MAX_IDLE = 512
"""Idle connections kept per node at most."""
MAX_HEAD = 64 * 1024
"""Largest answer head (status line and headers) read from a node; a larger one fails the request."""


class Headers(dict[str, str]):
    """Response headers with lower-case names (a repeated header keeps its last value)."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        value = super().get(key)  # the proxy asks in lower case: one lookup
        if value is None and not key.islower():
            value = super().get(key.lower())
        return default if value is None else value

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class UpstreamResponse:
    """One node answer: status and headers once they arrived, then the body as it comes.

    The same surface as the parts of ``aiohttp.ClientResponse`` the proxy uses: ``status``, ``headers``,
    ``content.iter_any()`` / ``content.readany()``, ``read()``, ``release()``, ``close()``.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_eof",
        "_error",
        "_poked",
        "_sink",
        "_waiter",
        "headers",
        "status",
        "until_close",
    )

    def __init__(self, conn: _Conn, status: int, headers: Headers, until_close: bool = False) -> None:
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self.until_close = until_close
        """The body has neither a length nor chunks: its end is the end of the connection, so a node that
        dies mid-answer is indistinguishable from one that finished (the caller checks what it got)."""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._poked = False
        self._sink: Callable[[bytes], None] | None = None

    @property
    def content(self) -> UpstreamResponse:
        return self

    def splice(self, sink: Callable[[bytes], None]) -> None:
        """Hand every later piece of the body to ``sink`` as it is parsed, instead of queueing it.

        A pass-through stream then costs no task wake-up per chunk: the node's bytes reach the client's
        transport inside the same read callback. What was queued before goes to ``sink`` at once. A read
        (:meth:`readany`) still returns b"" at the end of the body or raises when it broke, so the caller
        awaits the end as before. ``sink`` must not raise; it calls :meth:`hold` when its writer is full.
        """
        self._sink = sink
        while self._chunks:
            data = self._chunks.popleft()
            self._buffered -= len(data)
            sink(data)

    def hold(self) -> None:
        """Stop reading from the node until :meth:`unhold` (the spliced client is not keeping up)."""
        if self._conn is not None:
            self._conn.pause()

    def unhold(self) -> None:
        """Read from the node again."""
        if self._conn is not None:
            self._conn.resume()

    # -- fed by the connection ------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()

    def _finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self._eof = True
        elif self._error is None and not self._eof:
            self._error = error
        self._conn = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the proxy ----------------------------------------------------------------------------

    async def readany(self) -> bytes:
        """The next bytes of the body (b"" at its end)."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._conn is not None and self._buffered <= HIGH_WATER // 4:
            self._conn.resume()
        return data

    def poke(self) -> None:
        """Interrupt a pending :meth:`next_or_poke` (a timer's way to act on a silence without a timeout per read)."""
        self._poked = True
        self._wake()

    async def next_or_poke(self) -> bytes | None:
        """Like :meth:`readany`, but None when :meth:`poke` interrupted the wait (no bytes are lost)."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            if self._poked:
                self._poked = False
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._poked = False
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._conn is not None and self._buffered <= HIGH_WATER // 4:
            self._conn.resume()
        return data

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one or more received pieces at a time."""
        while True:
            if self._chunks:
                data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
                self._chunks.clear()
                self._buffered = 0
                if self._conn is not None:
                    self._conn.resume()
                yield data
                continue
            data = await self.readany()
            if not data:
                return
            yield data

    def read_nowait(self) -> bytes | None:
        """The whole body when all of it has arrived already, else None (nothing is taken then)."""
        if not self._eof or self._error is not None:
            return None
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; over ``limit`` bytes, the connection is dropped and the read fails.

        Raises:
            aiohttp.ClientPayloadError: the body is larger than ``limit`` (announced or received).
            aiohttp.ClientConnectionError: the connection broke.
        """
        if limit is not None:
            length = self.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                self.close()
                raise aiohttp.ClientPayloadError(f"answer of {length} bytes is over the {limit} byte limit")
        parts = []
        size = 0
        while data := await self.readany():
            size += len(data)
            if limit is not None and size > limit:
                self.close()
                raise aiohttp.ClientPayloadError(f"answer is over the {limit} byte limit")
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Drop the answer: an unfinished one closes its connection, which cannot be reused.

        A pending read then raises ``ClientConnectionError``. A finished answer's connection is already
        back in the pool.
        """
        if self._conn is not None:
            self._conn.abort()

    release = close
    """Done with the answer (aiohttp's name; the same as :meth:`close`)."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a node and the parser of its answers."""

    def __init__(self, host: _Host, loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.got_bytes = False
        self.head_bytes = 0
        self.request_id: str | None = None
        self.out_of_step = False
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self._headers = Headers()
        self._paused = False
        self._poller: select.poll | None = None
        self._until_close = False
        self.deadline = Deadline(loop, self.expire)
        """When the head of the answer in flight must have come (see :func:`_exchange`)."""

    # -- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of asyncio's
        sock = transport.get_extra_info("socket")
        if sock is not None:  # for stale(): this socket, registered once for the connection's life
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if self.head is None:  # nothing was asked on this connection: not an answer cortex can use
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(aiohttp.ClientPayloadError("the node answered 101 Switching Protocols"))
            self.abort()
            return
        except httptools.HttpParserError as exc:
            if self.out_of_step:
                error = aiohttp.ClientPayloadError("the answer carries another request's x-request-id (out of step)")
            else:
                error = aiohttp.ClientPayloadError(f"malformed answer: {exc}")
            self._fail(error)
            self.abort()
            return
        if self.response is None and self.head is not None:  # still reading the answer's head
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._fail(aiohttp.ClientPayloadError(f"answer head is over {MAX_HEAD // 1024} KiB"))
                self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline.cancel()
        if self.closed:  # aborted by cortex: everything pending has failed already
            return
        self.closed = True
        self.host.forget(self)
        if self.response is not None and self._until_close and exc is None:
            self.response._finish()  # a body delimited by the end of the connection
            self.response = None
            return
        if self.head is not None and not self.head.done():
            # A reset before any answer byte on a reused connection: the node's socket was closed or dropped
            # the request unread. A clean close may come after the node read it: not retried.
            unread = self.reused and not self.got_bytes and isinstance(exc, ConnectionResetError | BrokenPipeError)
            self.head.set_exception(_Dead() if unread else aiohttp.ServerDisconnectedError())
        self._fail(aiohttp.ClientPayloadError("Response payload is not completed"))

    # -- httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head is None:  # an answer nobody asked for (after the last one, in the same packet)
            raise _Unasked

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp keeps a value's trailing blanks when the head comes in pieces (not when it comes whole)
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1").rstrip(" \t")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers = Headers()
            return
        headers, self._headers = self._headers, Headers()
        if self.request_id is not None:
            echoed = headers.get("x-request-id")
            if echoed == self.request_id:
                self.host.echoes_ids = True
            elif echoed is not None or self.host.echoes_ids:
                self.out_of_step = True  # an answer to another request, sent late: never hand it on
                raise _Unasked
        self._until_close = (
            "content-length" not in headers and "chunked" not in (headers.get("transfer-encoding") or "").lower()
        )
        response = self.response = UpstreamResponse(self, status, headers, self._until_close)
        if self.head is not None and not self.head.done():
            self.head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        response, self.response = self.response, None
        if response is None:
            return  # the end of an interim answer
        keep = self.parser.should_keep_alive()
        self.head = None
        if self._paused:
            self.resume()
        response._finish()
        if keep and not self.closed:
            self.host.put_back(self)
        else:
            self.abort()

    # -- used by the pool and the response ------------------------------------------------------------

    def send(self, data: bytes, request_id: str | None) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.head = asyncio.get_running_loop().create_future()
        self.got_bytes = False
        self.head_bytes = 0
        self.request_id = request_id
        self.transport.write(data)
        return self.head

    def stale(self) -> bool:
        """Whether this idle connection has something to read: the node closed it or spoke unasked.

        asyncio learns of either on its next poll; a request written before that would be lost or, worse,
        answered with those bytes. One ``poll`` with no wait (about a microsecond) asks the kernel now.
        """
        transport = self.transport
        if transport is None or self._poller is None or transport.is_closing():
            return True
        try:
            return bool(self._poller.poll(0))
        except (OSError, ValueError):
            return True

    def expire(self) -> None:
        """The caller's deadline passed before the answer's head: fail the wait, drop the connection."""
        if self.head is not None and not self.head.done():
            self.head.set_exception(TimeoutError())
            self.abort()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close the connection at once; an unfinished answer fails with ``ClientConnectionError``."""
        self.deadline.cancel()
        if not self.closed:
            self.closed = True
            self.host.forget(self)
            self._fail(aiohttp.ClientConnectionError("Connection closed"))
            if self.transport is not None:
                self.transport.abort()

    def _fail(self, error: BaseException) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        response, self.response = self.response, None
        if response is not None:
            response._finish(error)


async def _exchange(conn: _Conn, data: bytes, request_id: str | None, deadline: float | None) -> UpstreamResponse:
    """Send one request on ``conn`` and wait for the answer's head (until ``deadline``, loop time)."""
    head = conn.send(data, request_id)
    if deadline is not None:
        conn.deadline.set(deadline)  # the connection's one timer, moved: not one armed and cancelled per request
    try:
        return await head
    except asyncio.CancelledError:
        conn.abort()  # an answer may still come: this connection cannot carry another request
        raise
    finally:
        conn.deadline.clear()


class _Unasked(Exception):
    """The node sent an answer with no request outstanding: the connection is out of step."""


class _Dead(Exception):
    """A reused connection was reset before the node read the request: send it again on a new one."""


class _Host:
    """One node endpoint: where to connect, the request line prefix, and its idle connections."""

    def __init__(self, endpoint: str, connect_timeout_s: float) -> None:
        parts = urlsplit(endpoint)
        self.hostname = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.connect_timeout_s = connect_timeout_s
        self.idle: deque[_Conn] = deque()
        self.open: set[_Conn] = set()
        self.echoes_ids = False
        """The node has echoed a request's ``x-request-id``: from then on, every answer must."""
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.tls else None

    def head(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """The request's bytes.

        Raises:
            ValueError: a header with a line break or a character outside Latin-1.
        """
        lines = [f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\nContent-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ValueError(f"header {name!r} has a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        try:
            return "".join(lines).encode("latin-1") + body
        except UnicodeEncodeError:
            raise ValueError("a request header has a character outside Latin-1") from None

    def take(self) -> _Conn | None:
        """An idle connection fit for reuse, or None (stale ones are dropped: nothing was sent on them)."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the least likely to have been closed
            if conn.closed or now - conn.idle_since > IDLE_S or conn.stale():
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    async def connect(self, within_s: float | None = None) -> _Conn:
        """A new connection, within ``connect_timeout_s`` (or ``within_s`` when that is sooner).

        Raises:
            TimeoutError: ``within_s`` passed first.
            aiohttp.ClientConnectionError: refused, unresolvable, or ``connect_timeout_s`` passed.
        """
        loop = asyncio.get_running_loop()
        limit = self.connect_timeout_s if within_s is None else max(0.0, min(within_s, self.connect_timeout_s))
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, loop),
                    self.hostname,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.hostname if self.tls else None,
                )
        except TimeoutError:
            if limit < self.connect_timeout_s:
                raise  # the caller's own deadline
            raise aiohttp.ClientConnectionError(f"connecting timed out after {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            # errno's text, not the exception's: asyncio puts the address in it ("Connect call failed (...)").
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise aiohttp.ClientConnectionError(f"cannot connect: {reason}") from None
        self.open.add(conn)
        return conn

    def put_back(self, conn: _Conn) -> None:
        if len(self.idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: _Conn) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close(self) -> None:
        for conn in list(self.open):
            conn.abort()
        self.idle.clear()


class UpstreamPool:
    """Keep-alive connections to every node, for the requests cortex forwards."""

    def __init__(self, *, connect_timeout_s: float = 10.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._hosts: dict[str, _Host] = {}

    def _host(self, endpoint: str) -> _Host:
        host = self._hosts.get(endpoint)
        if host is None:
            host = self._hosts[endpoint] = _Host(endpoint, self.connect_timeout_s)
        return host

    async def post(
        self, endpoint: str, path: str, body: bytes, headers: Mapping[str, str], *, timeout_s: float | None = None
    ) -> UpstreamResponse:
        """Send ``body`` to ``endpoint + path``; return once the answer's status and headers arrived.

        ``timeout_s`` bounds the whole exchange up to the headers (connecting included). It is one timer
        on the loop, not an ``asyncio.timeout`` block, which costs several times more per request. An
        ``x-request-id`` in ``headers`` must come back in the answer once the node has echoed one.

        Raises:
            TimeoutError: no answer's headers within ``timeout_s``.
            aiohttp.ClientConnectionError: the node could not be reached or closed the connection.
            aiohttp.ClientPayloadError: the answer was not valid HTTP.
            ValueError: a header with a line break or a character outside Latin-1.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        host = self._host(endpoint)
        data = host.head(path, body, headers)
        request_id = headers.get("x-request-id")
        conn = host.take()
        if conn is not None:
            # On an idle connection the request leaves now, before the first await.
            try:
                return await _exchange(conn, data, request_id, deadline)
            except _Dead:
                pass  # reset unread: once more, on a new connection (never another idle one)
        conn = await host.connect(None if deadline is None else deadline - loop.time())
        try:
            return await _exchange(conn, data, request_id, deadline)
        except _Dead:  # cannot happen on a fresh connection; keep the type out of callers anyway
            raise aiohttp.ServerDisconnectedError() from None

    async def warm(self, endpoint: str, count: int) -> int:
        """Open connections until ``count`` are idle (for requests about to be released); how many opened."""
        host = self._host(endpoint)
        now = time.monotonic()
        fresh = sum(1 for c in host.idle if not c.closed and now - c.idle_since < IDLE_S / 2)
        want = min(count, MAX_IDLE) - fresh
        if want <= 0:
            return 0
        results = await asyncio.gather(*(host.connect() for _ in range(want)), return_exceptions=True)
        opened = 0
        for conn in results:
            if isinstance(conn, _Conn):
                host.put_back(conn)
                opened += 1
        return opened

    def idle_count(self, endpoint: str) -> int:
        host = self._hosts.get(endpoint)
        return 0 if host is None else sum(1 for c in host.idle if not c.closed)

    def close(self) -> None:
        """Close every connection (the engine's shutdown)."""
        for host in self._hosts.values():
            host.close()
        self._hosts.clear()
