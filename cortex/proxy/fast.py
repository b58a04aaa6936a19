"""The client connection: cortex's own HTTP/1.1 front for the hot routes, aiohttp's server for the rest.

aiohttp's server costs about 55 µs of CPU per request on its own (parser callbacks, a ``BaseRequest``,
the router, middlewares, a per-connection task loop) — more than a third of a whole proxied request. The
inference routes (``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``) make almost all
of the traffic and have the simplest shape, so :class:`ClientProtocol` serves them itself: one pass over
the request head (a compiled pattern, no per-header Python), a :class:`FastRequest` with just what the
handlers read, the handler run as a task, and a whole answer written as one buffer (a :class:`WholeAnswer`
from one format, or any other ``web.Response`` serialised), then the CPU handed to the client it woke when
nothing else is being answered (:meth:`ClientProtocol._hand_cpu`). Streams use :class:`FastStream`, a
``StreamResponse`` that writes to this protocol's transport, so the handlers are the same code for both
fronts.

Anything else — another route or method, HTTP/1.0, a chunked or ``Expect`` body, a body over
:data:`FAST_BODY_MAX`, a head with non-ASCII bytes, an obsolete line fold or anything unusual — hands
the connection, with the bytes already read, to aiohttp's protocol for good: the fast front never has to
be right about a case it does not know. The connection admission and the first head's deadline (the
slowloris guard) stay in front of both.

What the front keeps of aiohttp's server: a client that hangs up cancels its handler; a stalled body is
answered by the handler (``read_capped``'s idle timeout) in the client's dialect; idle keep-alive
connections close after ``gateway.keepalive_timeout_s``; a request that arrives while one is being answered
waits its turn (pipelining); a shutdown lets in-flight requests finish for up to ``gateway.drain_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time  # formatted once per second
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from cortex.engine.deadline import Deadline

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter

__all__ = [
    "FAST_BODY_MAX",
    "ClientProtocol",
    "Connections",
    "FastRequest",
    "FastStream",
    "Handler",
    "WholeAnswer",
    "header_dict",
    "open_stream",
]

log = logging.getLogger("cortex.proxy.app")

Handler = Callable[[web.Request], Awaitable["web.StreamResponse | WholeAnswer"]]

FAST_BODY_MAX = 256 * 1024
"""Largest body the fast front takes (it holds the whole body before the handler reads it); above, aiohttp."""
_HEAD_MAX = 16 * 1024
"""A head longer than this goes to aiohttp, which applies its own limits and answers 431 or 400."""
_PIPELINE_MAX = FAST_BODY_MAX + _HEAD_MAX
"""Bytes buffered while a request is answered before reading pauses (a client pipelining hard)."""

# One header line: an RFC 9110 token, a colon, and a visible-ASCII value (HTAB and SP inside), CRLF-ended.
# The value starts and ends with a visible character, so the blanks around it can only go one way and the
# match takes linear time (an ambiguous split made a 16 KiB line of blanks cost 0.13 s). A line starts
# after a line break (``^``): a block is well formed when every line break ends a match (see ``_parse``).
_LINE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?[ \t]*\r\n", re.M)

_BUSY_BODY = (
    b'{"error": {"message": "the gateway has too many open connections; retry shortly", '
    b'"type": "server_error", "param": null, "code": "too_many_connections"}}'
)
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)
LATE = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_SKIP = frozenset(("content-length", "transfer-encoding", "connection", "date", "server"))
_SERVER = SERVER_SOFTWARE.encode()
_REASONS = {int(code): code.phrase.encode() for code in HTTPStatus}
_WHOLE = (
    b"HTTP/1.1 %d %s\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n%s\r\n%s"
)
_yield_cpu: Callable[[], None] = getattr(os, "sched_yield", lambda: None)
"""Let another runnable process have this CPU now (see :meth:`ClientProtocol._hand_cpu`)."""


def header_pairs(block: str) -> list[tuple[str, str]] | None:
    """A header block's (name, value) pairs, each value without the blanks around it.

    None when any line is not a well-formed header: a bad name or character, a bare CR or LF, an obsolete
    line fold. Every line break must end a match of ``_LINE``, which only starts at a line's start.
    """
    pairs: list[tuple[str, str]] = _LINE.findall(block)
    if len(pairs) != block.count("\n") or (block and block[-1] != "\n"):  # a last line with no line break
        return None
    return pairs


class WholeAnswer:
    r"""A whole JSON answer and cortex's header lines, with no ``web.Response`` made for it.

    The fast front writes it as one formatted buffer (:meth:`encode`); aiohttp's server is handed the same
    answer as a ``web.Response`` (:meth:`to_response`). ``lines`` are ``Name: value\r\n`` lines whose
    values the maker has made safe (printable ASCII, see ``header_safe``), so nothing is checked again here.
    """

    __slots__ = ("body", "lines", "status")

    def __init__(self, status: int, body: bytes, lines: str) -> None:
        self.status = status
        self.body = body
        self.lines = lines

    def encode(self, keep_alive: bool) -> bytes:
        """The answer's bytes on the wire: head and body."""
        return _WHOLE % (
            self.status,
            _REASONS.get(self.status, b"Unknown"),
            self.lines.encode(),
            len(self.body),
            rfc822_formatted_time().encode(),
            _SERVER,
            b"" if keep_alive else b"Connection: close\r\n",
            self.body,
        )

    def to_response(self) -> web.Response:
        """The same answer for aiohttp's server."""
        headers = header_dict(self.lines)
        return web.Response(status=self.status, body=self.body, content_type="application/json", headers=headers)


def header_dict(lines: str) -> dict[str, str]:
    r"""``Name: value\r\n`` header lines as a dict."""
    return dict(line.split(": ", 1) for line in lines.split("\r\n") if line)


class Connections:
    """The client connections of one gateway: admission, deadlines, and the fast front's drain.

    Shared by its listening sockets (the API's and the metrics'), so ``gateway.max_connections`` counts
    them all.
    """

    def __init__(self, max_connections: int, header_timeout_s: float, keepalive_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.open = 0
        self.refused = 0
        """Connections refused in the current episode of being full (0 when not full)."""
        self.fast: set[ClientProtocol] = set()
        """Connections the fast front still serves (not handed to aiohttp)."""
        self.closing = False
        self.served = 0
        """Requests the fast front has taken (tests and benchmarks read it)."""
        self.answering = 0
        """Requests the fast front is answering now (streams included)."""

    def admit(self) -> bool:
        """Count one more connection, or refuse it (logging once when an episode of refusals starts)."""
        if self.open < self.max_connections and not self.closing:
            self.open += 1
            return True
        if self.refused == 0 and not self.closing:
            log.warning(
                "gateway: %d client connections open (gateway.max_connections): refusing new ones with 503",
                self.open,
            )
        self.refused += 1
        return False

    def release(self) -> None:
        """One connection fewer."""
        self.open -= 1
        if self.refused and self.open < self.max_connections * 0.9:
            if not self.closing:
                log.info("gateway: accepting connections again (%d refused while full)", self.refused)
            self.refused = 0

    async def drain(self, within_s: float) -> None:
        """Stop taking requests on the fast front; let those in flight finish for up to ``within_s``."""
        self.closing = True
        for conn in list(self.fast):
            conn.close_when_idle()
        deadline = time.monotonic() + within_s
        while self.fast and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.fast):
            conn.abort()


class _Body:
    """The request body as ``read_capped`` reads it (``is_eof``, ``read_nowait``, ``readany``)."""

    __slots__ = ("_data", "_done", "_waiter")

    def __init__(self, data: bytes, done: bool) -> None:
        self._data = data
        self._done = done
        self._waiter: asyncio.Future[None] | None = None

    def is_eof(self) -> bool:
        return self._done

    def read_nowait(self) -> bytes:
        data, self._data = self._data, b""
        return data

    async def readany(self) -> bytes:
        while not self._data:
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.read_nowait()

    def feed(self, data: bytes, done: bool) -> None:
        self._data += data
        self._done = done
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class FastRequest:
    """What the inference handlers read of a request (aiohttp's ``web.Request`` surface they use).

    ``_payload_writer`` and ``_prepare_hook`` are what aiohttp's ``StreamResponse.prepare`` asks of a
    request, so a handler's stream is written by aiohttp's own writer on :class:`ClientProtocol`.
    """

    __slots__ = (
        "_protocol",
        "_writer",
        "answered",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "path",
    )

    version = HttpVersion11

    def __init__(
        self,
        protocol: ClientProtocol,
        path: str,
        headers: CIMultiDictProxy[str],
        length: int,
        content: _Body,
        keep_alive: bool,
    ) -> None:
        self._protocol = protocol
        self._writer: StreamWriter | None = None
        self.method = "POST"
        self.path = path
        self.headers = headers
        self.content_length = length
        self.content = content
        self.keep_alive = keep_alive
        self.answered = False
        """Whether any byte of the answer went out (a failure after it can only close the connection)."""

    @property
    def _payload_writer(self) -> AbstractStreamWriter:
        self.answered = True
        if self._writer is None:
            self._writer = StreamWriter(self._protocol, self._protocol.loop)
        return self._writer

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        return None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._protocol.transport


def _head(status: int, reason: str, headers: CIMultiDict[str], keep_alive: bool, framing: bytes) -> list[bytes]:
    """A response head's lines (status, the handler's headers, ``framing``, Date, Server, Connection)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1"))]
    for name, value in headers.items():
        if name.lower() in _SKIP:
            continue
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"newline in the {name!r} response header")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"%sDate: %s\r\nServer: %s\r\n" % (framing, rfc822_formatted_time().encode(), _SERVER))
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return lines


def serialize(resp: web.Response, keep_alive: bool) -> bytes | None:
    """A whole ``web.Response`` as bytes, or None when it needs aiohttp's writer (a payload, compression)."""
    body = resp.body
    if not isinstance(body, bytes) or resp._compression or resp.cookies or resp.chunked:
        return None
    lines = _head(resp.status, resp.reason, resp.headers, keep_alive, b"Content-Length: %d\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


class FastStream(web.StreamResponse):
    """A chunked answer written straight to the fast front's transport (``open_stream`` makes one).

    aiohttp's ``StreamResponse.write`` goes through its ``StreamWriter`` (size accounting, a drain check,
    the chunk framing in Python, then the transport); this frames the chunk and writes it in one call, and
    waits only when the transport asked the protocol to pause.
    """

    def __init__(self, request: FastRequest, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(status=status, headers=headers)
        self._fast = request
        self._open = False
        self._ended = False

    @property
    def prepared(self) -> bool:
        return self._open

    @property
    def keep_alive(self) -> bool:
        return self._fast.keep_alive and self._keep_alive is not False

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self.open()
        return None

    def open(self) -> None:
        """Send the head now (``prepare`` without waiting; a no-op once sent)."""
        if not self._open:
            self._open = True
            self._fast.answered = True
            head = _head(self.status, self.reason, self.headers, self.keep_alive, b"Transfer-Encoding: chunked\r\n")
            self._transport().write(b"".join(head))

    def send(self, data: bytes) -> None:
        """Write one chunk now, without waiting for the transport's buffer to drain."""
        if data:
            self._transport().write(b"%x\r\n%s\r\n" % (len(data), data))

    @property
    def full(self) -> bool:
        """Whether the transport asked to stop writing (its buffer is over the high-water mark)."""
        return self._fast._protocol.writing_paused

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the transport takes writes again."""
        self._fast._protocol.on_resume = callback

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._open or self._ended:
            raise RuntimeError("write() outside an open stream")
        self.send(bytes(data))
        protocol = self._fast._protocol
        if protocol.writing_paused:
            await protocol._drain_helper()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._ended:
            return
        self._ended = True
        if self._open:
            self._transport().write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")

    def _transport(self) -> asyncio.Transport:
        transport = self._fast.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        return transport


def open_stream(request: web.Request, status: int, headers: Mapping[str, str]) -> web.StreamResponse:
    """The response object for a stream: a :class:`FastStream` on the fast front, else aiohttp's."""
    if isinstance(request, FastRequest):
        return FastStream(request, status, headers)
    return web.StreamResponse(status=status, headers=headers)


class ClientProtocol(BaseProtocol):
    """One client connection: the fast front for ``routes``, else aiohttp's protocol (see the module doc)."""

    __slots__ = (
        "_buf",
        "_carry",
        "_conns",
        "_factory",
        "_idle",
        "_inner",
        "_keepalive",
        "_pending",
        "_request",
        "_routes",
        "_task",
        "_timer",
        "loop",
        "on_resume",
    )

    def __init__(self, factory: web.Server, conns: Connections, routes: dict[bytes, Handler]) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(loop)
        self.loop = loop
        self._factory = factory
        self._conns = conns
        self._routes = routes
        self._inner: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        """The first head's deadline."""
        self._idle = Deadline(loop, self._idle_out)
        """The keep-alive deadline, set after each answer."""
        self._carry = b""
        self._buf = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._request: FastRequest | None = None
        self._pending = 0
        """Body bytes the request being read still lacks."""
        self._keepalive = True
        self.on_resume: Callable[[], None] | None = None
        """Called once when the transport, paused for a full buffer, takes writes again (a spliced stream)."""

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        if not self._conns.admit():
            tr.write(BUSY)
            tr.close()
            return
        super().connection_made(tr)
        self._timer = self.loop.call_later(self._conns.header_timeout_s, self._head_late)
        if self._routes and not self._conns.closing:
            self._conns.fast.add(self)
        else:
            self._hand_over()

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            if self._timer is not None or self._idle.pending:  # aiohttp's: the head's deadline until its end
                seen = self._carry + data
                if b"\n\n" in seen or b"\n\r\n" in seen:
                    self._cancel_timer()
                    self._idle.cancel()
                    self._carry = b""
                else:
                    self._carry = seen[-2:]
            inner.data_received(data)
            return
        if self.transport is None:
            return
        if self._pending:
            self._body_part(data)
            return
        self._buf += data
        if self._task is None:
            self._next()
        elif len(self._buf) > _PIPELINE_MAX and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is None and self._inner is None:
            return  # refused at admission
        self._cancel_timer()
        self._idle.cancel()
        self._conns.release()
        self._conns.fast.discard(self)
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.connection_lost(exc if isinstance(exc, Exception) else None)
            return
        super().connection_lost(exc)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # the client hung up: its handler stops and releases its lease
        request, self._request = self._request, None
        if request is not None:
            request.content.feed(b"", True)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
            return
        super().resume_writing()
        callback, self.on_resume = self.on_resume, None
        if callback is not None:
            callback()

    # -- the fast front ---------------------------------------------------------------------------

    def close_when_idle(self) -> None:
        """A shutdown: close now if no request is being answered, else after it."""
        self._keepalive = False
        if self._task is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """The drain time is over: drop the connection (its handler is cancelled)."""
        if self.transport is not None:
            self.transport.abort()

    def _next(self) -> None:
        """Parse the next request in the buffer, if its head is complete."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _HEAD_MAX or b"\n\n" in buf or b"\n\r\n" in buf:
                self._hand_over()  # oversized, or LF-only line ends: aiohttp's parser decides
            return
        head = bytes(buf[: end + 2])
        parsed = self._parse(head)
        if parsed is None:
            self._hand_over()
            return
        handler, path, headers, length, keep_alive = parsed
        self._cancel_timer()
        self._idle.clear()  # a whole head came in time
        start = end + 4
        body = bytes(buf[start : start + length])
        del buf[: start + len(body)]
        self._pending = length - len(body)
        content = _Body(body, self._pending == 0)
        request = FastRequest(self, path, headers, length, content, keep_alive and self._keepalive)
        self._request = request
        self._conns.served += 1
        self._task = self.loop.create_task(self._serve(handler, request))

    def _parse(self, head: bytes) -> tuple[Handler, str, CIMultiDictProxy[str], int, bool] | None:
        """The request's route and facts, or None for anything the fast front does not take."""
        if not head.isascii():
            return None
        line_end = head.find(b"\r\n")
        parts = head[:line_end].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            return None
        path = parts[1].partition(b"?")[0]  # a query string (Claude Code's ?beta=true) does not route
        handler = self._routes.get(path)
        if handler is None:
            return None
        pairs = header_pairs(head[line_end + 2 :].decode("ascii"))
        if pairs is None:
            return None
        headers = CIMultiDict(pairs)
        lengths = headers.getall("Content-Length", ())
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 12:
            return None
        length = int(lengths[0])
        if length > FAST_BODY_MAX:
            return None
        low = head.lower()  # every header line follows a line break (the request line's at least)
        if (
            b"\ntransfer-encoding:" in low
            or b"\nexpect:" in low
            or b"\nupgrade:" in low
            or b"\ncontent-encoding:" in low
        ):
            return None
        keep_alive = True
        connection = headers.get("Connection")
        if connection is not None:
            tokens = connection.lower()
            if "upgrade" in tokens:
                return None
            keep_alive = "close" not in tokens
        return handler, path.decode(), CIMultiDictProxy(headers), length, keep_alive

    def _body_part(self, data: bytes) -> None:
        request = self._request
        take = min(self._pending, len(data))
        self._pending -= take
        if request is not None:
            request.content.feed(data[:take], self._pending == 0)
        if take < len(data):
            self._buf += data[take:]
            if len(self._buf) > _PIPELINE_MAX and self.transport is not None:
                self.transport.pause_reading()

    async def _serve(self, handler: Handler, request: FastRequest) -> None:
        keep_alive = False
        self._conns.answering += 1  # here, not in _next: a task cancelled before it starts never runs finally
        try:
            resp = await handler(cast(web.Request, request))
            keep_alive = await self._finish(request, resp)
        except asyncio.CancelledError:
            return  # the client hung up
        except ConnectionError:
            pass  # the client went away mid-answer (aiohttp's writer raises a ConnectionError subclass)
        except Exception:
            log.exception("gateway: internal error answering %s", request.path)
            if not request.answered and self.transport is not None:
                self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        finally:
            self._task = None
            self._request = None
            self._conns.answering -= 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not keep_alive or self._pending or not self._keepalive:
            transport.close()  # an unread body (refused before it came) or a client that asked for it
            return
        if len(self._buf) <= _PIPELINE_MAX:
            transport.resume_reading()
        self._idle.set(self.loop.time() + self._conns.keepalive_timeout_s)
        if self._buf:
            self._next()

    async def _finish(self, request: FastRequest, resp: web.StreamResponse | WholeAnswer) -> bool:
        """Send what the handler returned; whether the connection may carry another request."""
        transport = self.transport
        if resp.status == 499 or transport is None:  # counted() for a client that hung up mid-answer
            return False
        keep_alive = request.keep_alive and self._keepalive
        if isinstance(resp, WholeAnswer):
            request.answered = True
            transport.write(resp.encode(keep_alive))
            self._hand_cpu()
            return keep_alive
        if not resp.prepared and type(resp) is web.Response:
            data = serialize(resp, keep_alive)
            if data is not None:
                request.answered = True
                transport.write(data)
                self._hand_cpu()
                return keep_alive
        if not keep_alive:
            resp.force_close()
        await resp.prepare(cast(web.Request, request))
        await resp.write_eof()
        return keep_alive and resp.keep_alive is not False

    def _hand_cpu(self) -> None:
        """After a whole answer that was the front's only work: let the woken client run before the rest.

        The write wakes the client, and on one machine Linux often puts a task woken by a socket write on the
        writer's CPU, expecting the writer to sleep soon. The client then waits for cortex to finish its turn
        of the loop: the connection's keep-alive bookkeeping and the request's metrics, log and console
        event. A ``sched_yield`` lets it have the CPU first; that work follows. When other requests are being
        answered the loop is busy anyway and this is skipped, so it costs nothing under load; with nothing
        else waiting for this CPU (a remote client) the call returns at once. ``bench/latency_ab.py``: the
        added latency at concurrency 1 went to 0.86-0.95x of what it was.
        """
        if self._conns.answering == 1:
            _yield_cpu()

    def _idle_out(self) -> None:
        # No complete request since the last answer (a partial head does not keep the connection).
        if self._task is None and self.transport is not None:
            self.transport.close()

    # -- aiohttp's protocol -----------------------------------------------------------------------

    def _hand_over(self) -> None:
        """Give the connection, with what was read so far, to aiohttp's protocol for good."""
        self._conns.fast.discard(self)
        transport = self.transport
        if transport is None:
            return
        inner = self._factory()
        self._inner = inner
        inner.connection_made(transport)
        data, self._buf = bytes(self._buf), bytearray()
        if data:
            self.data_received(data)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            log.debug("gateway: closed a connection that sent no complete request head within the limit")
            with contextlib.suppress(RuntimeError):
                transport.write(LATE)
            transport.close()
