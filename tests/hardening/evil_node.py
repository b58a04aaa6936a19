"""A malicious mistral.rs node: a raw asyncio socket server that misbehaves on purpose.

It speaks just enough of mistral.rs for cortex to poll it and route to it (``/health``, ``/v1/models`` with
one loaded model, the lifecycle routes) and answers every inference request with the bytes its current
:data:`Behaviour` writes: truncated or endless error bodies, a 4 MB header, a 101, JSON cut by a FIN,
stray bytes after an answer, broken framing, resets. Raw sockets, not the simulator: the simulator is an
honest aiohttp app, and aiohttp would refuse to send most of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["BEHAVIOURS", "Behaviour", "EvilNode", "Request", "chat_answer"]

MODEL = "m"


@dataclass
class Request:
    """One request as the node received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Behaviour = Callable[["EvilNode", Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
"""Answers one inference request; returns whether the connection stays open for the next request."""


def chat_answer(text: str = "hi") -> bytes:
    """A well-formed non-streaming chat completion body."""
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


def _answer(status: str, body: bytes, extra: str = "", content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class EvilNode:
    """The node; set :attr:`behaviour` before sending requests (``ok`` by default)."""

    behaviour: Behaviour = field(default_factory=lambda: BEHAVIOURS["ok"])
    inference: list[Request] = field(default_factory=list)
    """Every inference request received, in order."""
    connections: int = 0
    """Connections accepted so far."""
    open_inference: int = 0
    """Connections open right now that carried an inference request (cortex must close those it gave up on)."""
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0, limit=1 << 20)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        counted = False
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                if request.method == "POST" and request.path.startswith("/v1/") and not counted:
                    counted = True
                    self.open_inference += 1
                if not await self._answer(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if counted:
                self.open_inference -= 1
            self._tasks.discard(task)
            writer.transport.abort()

    async def _answer(self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if request.method == "GET" and request.path in ("/", "/health"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK")
        elif request.method == "GET" and request.path == "/v1/models":
            listing = {
                "object": "list",
                "data": [
                    {"id": "default", "object": "model", "created": 1, "owned_by": "local"},
                    {"id": MODEL, "object": "model", "created": 1, "owned_by": "local", "status": "loaded"},
                ],
            }
            writer.write(_answer("200 OK", json.dumps(listing).encode()))
        elif request.method == "POST" and request.path.startswith("/v1/models/"):
            writer.write(_answer("200 OK", json.dumps({"model_id": MODEL, "status": "loaded"}).encode()))
        elif request.method == "POST" and request.path.startswith("/v1/"):
            self.inference.append(request)
            return await self.behaviour(self, request, reader, writer)
        else:
            writer.write(_answer("404 Not Found", b'{"message": "not found"}'))
        await writer.drain()
        return True


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, path, headers, body)


# -- behaviours --------------------------------------------------------------------------------------------


async def ok(node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """An honest answer (streams too: one delta, the usage, ``[DONE]``)."""
    if b'"stream":true' in request.body.replace(b" ", b""):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
            {
                **chunk,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            },
        ]
        body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        writer.write(_answer("200 OK", body, echo(request), content_type="text/event-stream"))
    else:
        writer.write(_answer("200 OK", chat_answer(), echo(request)))
    await writer.drain()
    return True


def echo(request: Request) -> str:
    """The ``x-request-id`` header line mistral.rs sends back: the request's own id."""
    return f"x-request-id: {request.headers.get('x-request-id', 'req_0')}\r\n"


def _fixed(raw: bytes, keep: bool = False) -> Behaviour:
    async def send(
        node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return send


async def error_truncated(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A 500 that announces 1000 bytes of error body and closes after 20."""
    writer.write(b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 1000\r\n\r\n{"message": "model f')
    await writer.drain()
    return False


async def error_trickle(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A 500 whose body comes one byte every 50 ms, for ever (cortex must stop waiting and hang up)."""
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000\r\n\r\n")
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


async def error_endless(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A 503 with a chunked body that never ends (cortex must read a bounded part and hang up)."""
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"10000\r\n" + b"e" * 0x10000 + b"\r\n"
    while True:
        writer.write(piece)
        await writer.drain()


async def huge_head(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A 200 whose head carries a 4 MB header (cortex must give up long before its end)."""
    writer.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
    for _ in range(64):
        writer.write(b"p" * 65536)
        await writer.drain()
    writer.write(b"\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    return False


async def huge_body(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A 200 with a chunked body of 64 MB (over any test's ``max_response_mb``)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    for _ in range(1024):
        writer.write(piece)
        await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return False


async def cut_json(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A 200 without length or chunks (read to close) whose JSON is cut by the FIN."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    writer.write(chat_answer()[:40])
    await writer.drain()
    return False


async def late_bytes(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """An honest answer, then, a moment later, the same answer again (a duplicate nobody asked for)."""
    writer.write(_answer("200 OK", chat_answer("first"), echo(request)))
    await writer.drain()
    await asyncio.sleep(0.02)
    writer.write(_answer("200 OK", chat_answer("LATE"), echo(request)))
    await writer.drain()
    return True


async def reset_unread(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """A reset instead of an answer."""
    _reset(writer)
    return False


async def silent(node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Never answers (cortex's first-byte timeout must end the wait, and the connection)."""
    await reader.read()  # until cortex hangs up
    return False


async def stall_body(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """The head of a 200 and a few bytes, then silence (cortex's idle timeout must end the read)."""
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"id":')
    await writer.drain()
    await reader.read()  # until cortex hangs up
    return False


BEHAVIOURS: dict[str, Behaviour] = {
    "ok": ok,
    "error_truncated": error_truncated,
    "error_trickle": error_trickle,
    "error_endless": error_endless,
    "error_4xx_huge": _fixed(
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3000000\r\n\r\n" + b'{"message": "' + b"b" * 2999985 + b'"}'
    ),
    "huge_head": huge_head,
    "huge_body": huge_body,
    "upgrade_101": _fixed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n\x00\x00"),
    "cut_json": cut_json,
    "late_bytes": late_bytes,
    "reset_unread": reset_unread,
    "silent": silent,
    "stall_body": stall_body,
    "not_json_200": _fixed(_answer("200 OK", b"<html>hello</html>"), keep=True),
    "foreign_request_id": _fixed(_answer("200 OK", chat_answer("STOLEN"), "x-request-id: req_someone-else\r\n")),
    "no_request_id": _fixed(_answer("200 OK", chat_answer()), keep=True),
    "framing_cl_te": _fixed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "framing_bad_chunk": _fixed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    "framing_obs_fold": _fixed(b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\n{}"),
    "framing_nul": _fixed(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}"),
    "framing_bare_cr": _fixed(b"HTTP/1.1 200 OK\rX-A: a\r\nContent-Length: 2\r\n\r\n{}"),
    "framing_bad_status": _fixed(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\n{}"),
    "framing_negative_length": _fixed(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n{}"),
}
"""Every behaviour by name; the suite runs each through both dialects."""
