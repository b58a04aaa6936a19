"""Sending one request to a node: lease, POST, failover before the first byte, timeouts.

Both dialects use :func:`send`; what differs between them (parsing the client's body, shaping errors and
streams) lives in their handler modules. Headers sent upstream are built from scratch, not filtered from the
client's: a node needs only the content type and the request id, and building them guarantees that no
credential, cookie or hop-by-hop header ever leaves cortex.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from cortex.engine.lifecycle import Lease
from cortex.engine.metrics import RequestOutcome
from cortex.engine.upstream import UpstreamResponse
from cortex.errors import CortexError, UpstreamError
from cortex.proxy.errors import NodeErrorInfo, read_node_error
from cortex.proxy.faults import NODE_NOT_READY

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = [
    "ERROR_BODY_MAX",
    "ERROR_BODY_S",
    "Call",
    "IdleWatch",
    "NodeReplyError",
    "UsageTail",
    "clean_request_id",
    "object_at",
    "read_body",
    "read_error_body",
    "send",
    "upstream_headers",
]

ERROR_BODY_MAX = 64 * 1024
"""Bytes of a node's error answer read at most (the message clients see is cut to fit)."""
ERROR_BODY_S = 10.0
"""Seconds a node's error answer may take to arrive in full (``stream_idle_timeout_s`` when shorter)."""
REQUEST_ID_MAX = 128
"""Longest client ``x-request-id`` passed on; a longer or non-printable one is replaced."""


class NodeReplyError(Exception):
    """The node answered with an error status (already classified)."""

    def __init__(self, info: NodeErrorInfo, node: str, request_id: str | None = None) -> None:
        super().__init__(info.message)
        self.info = info
        self.node = node
        self.request_id = request_id
        """The node's ``x-request-id`` (passed back to the client with the error)."""


@dataclass(slots=True)
class Call:
    """What one client request has done so far; becomes a metrics outcome at the end."""

    api: str
    started: float
    model: str = "unknown"
    stream: bool = False
    node: str = ""
    status: int = 0
    first_byte: float | None = None
    queue_s: float = 0.0
    upstream_s: float = 0.0
    usage: dict[str, Any] | None = None

    def outcome(self) -> RequestOutcome:
        """The metrics record of this call, ended now."""
        return RequestOutcome(
            api=self.api,
            model=self.model,
            node=self.node,
            status=self.status,
            stream=self.stream,
            started=self.started,
            ended=time.monotonic(),
            first_byte=self.first_byte,
            queue_s=self.queue_s,
            upstream_s=self.upstream_s,
            usage=self.usage,
        )


_ID_PREFIX = os.urandom(10).hex()
_ID_COUNTER = itertools.count()


def clean_request_id(value: str | None) -> str:
    """``value`` when it is a usable request id (printable ASCII, at most :data:`REQUEST_ID_MAX` long).

    Otherwise a fresh id in mistral.rs's own shape (``req_<32 hex>``): for a missing one, and for an
    unusable one (``€``, a raw byte, a control character, 10 kB), which is replaced rather than refused
    since the id is for tracing and a client should not fail over it.
    """
    if value and len(value) <= REQUEST_ID_MAX and value.isascii() and value.isprintable():
        return value
    # 32 hex digits as mistral.rs makes them: a random prefix per process and a counter (no syscall per id).
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


def upstream_headers(request_id: str | None) -> dict[str, str]:
    """The only headers a node receives.

    ``Accept-Encoding: identity`` replaces aiohttp's default ``gzip, deflate``: the session does not
    decompress (bytes pass through untouched) and the node's ``Content-Encoding`` is not passed on, so a
    compressed answer would reach the client as unreadable bytes. Every request carries an ``x-request-id``
    (the client's, through :func:`clean_request_id`, or a fresh one): mistral.rs echoes it, and the pool
    refuses an answer that carries another request's id (a node out of step).
    """
    return {
        "Content-Type": "application/json",
        "Accept-Encoding": "identity",
        "x-request-id": clean_request_id(request_id),
    }


async def read_error_body(resp: UpstreamResponse, within_s: float) -> bytes:
    """Up to :data:`ERROR_BODY_MAX` bytes of a node's error answer, read within ``within_s``; never raises.

    A node that fails is not trusted to fail well: its error body may be endless, cut short or sent a byte
    a second. What arrived in time is the message; the connection is dropped unless the answer was read
    to its end (then it is already back in the pool).
    """
    parts: list[bytes] = []
    size = 0
    timer = asyncio.get_running_loop().call_later(within_s, resp.close)
    try:
        while size < ERROR_BODY_MAX:
            data = await resp.readany()
            if not data:
                break
            parts.append(data)
            size += len(data)
    except aiohttp.ClientError:
        pass  # cut short, or closed by the timer: keep what came
    finally:
        timer.cancel()
        resp.close()
    data = b"".join(parts)
    return data[:ERROR_BODY_MAX] if size > ERROR_BODY_MAX else data


async def send(
    engine: Engine, call: Call, path: str, body: bytes, headers: dict[str, str], lease: Lease | None = None
) -> tuple[Lease, UpstreamResponse]:
    """POST ``body`` to a node serving ``call.model`` and return once its headers arrived.

    A connect error, a first-byte timeout or a 5xx that is not the client's fault is retried on another
    node where the model is loaded (never a new load: failover must not wait). The returned lease must be
    released and the response released or read by the caller.

    Raises:
        CortexError: queue or placement errors from the engine; UpstreamError when no node answered.
        NodeReplyError: the node answered an error status (4xx, or a 5xx with no other node to try).
    """
    if lease is None:
        lease = engine.lifecycle.lease_now(call.model)  # at once where the model is loaded (no coroutine frames)
        if lease is None:
            lease = await engine.acquire(call.model)  # else wait in its queue (a load, a drain, a restart)
    # From here to the return, this function owns the lease: whatever is raised (a node's error, a
    # cancelled client, a bug), the claim ends here, so in-flight counts cannot leak.
    try:
        call.queue_s = lease.queue_s
        upstream = engine.upstream
        timeout_s = engine.settings.gateway.first_byte_timeout_s
        error_s = min(ERROR_BODY_S, engine.settings.gateway.stream_idle_timeout_s)
        tried: list[str] = []
        requeued = 0
        while True:
            node = lease.node
            call.node = node.name
            t0 = time.monotonic()
            failure: str
            try:
                resp = await upstream.post(node.client.endpoint, path, body, headers, timeout_s=timeout_s)
            except TimeoutError:
                failure = f"no first byte from {node.name} within {timeout_s:g} s"
                info: NodeErrorInfo | None = None
            except aiohttp.ClientError as exc:
                failure = f"{node.name} unreachable: {exc or type(exc).__name__}"
                info = None
            else:
                call.upstream_s += time.monotonic() - t0
                if resp.status < 400:
                    return lease, resp
                data = await read_error_body(resp, error_s)
                info = read_node_error(resp.status, data)
                request_id = resp.headers.get("x-request-id")
                if info.status < 500:
                    lease.release()
                    raise NodeReplyError(info, node.name, request_id)
                if requeued < 2 and NODE_NOT_READY.search(info.message):
                    # The node lazily loads a model cortex believed loaded there (a restart it did not see): not
                    # the node's failure and not the client's. Take the node's word and wait in the queue.
                    requeued += 1
                    lease.release()
                    await engine.lifecycle.not_ready(node, call.model)
                    lease = await engine.acquire(call.model)
                    call.queue_s += lease.queue_s
                    continue
                failure = info.message
            call.upstream_s += time.monotonic() - t0 if info is None else 0.0
            lease.release(failed=failure)
            tried.append(node.name)
            other = engine.lifecycle.route(call.model, tuple(tried))
            if other is None:
                if info is not None:
                    raise NodeReplyError(info, node.name, request_id)
                raise UpstreamError(failure)
            lease = Lease(engine.fleet, other, call.model, lease.queue_s)
    except BaseException:
        lease.release()  # idempotent: a no-op when a branch above already released it
        raise


async def read_body(engine: Engine, call: Call, lease: Lease, resp: UpstreamResponse) -> bytes:
    """Read a whole (non-streaming) answer; the response and the lease are released either way.

    Raises:
        UpstreamError: the node went silent for ``stream_idle_timeout_s``, broke the connection, sent more
            than ``max_response_mb``, or closed a read-to-close answer before its JSON was complete.
    """
    settings = engine.settings.gateway
    limit = int(settings.max_response_mb * 1024 * 1024)
    whole = resp.read_nowait()
    if whole is not None and len(whole) <= limit and (not resp.until_close or _is_json(whole)):
        resp.release()  # the usual case: the answer came whole with its head, no timer needed
        lease.release()
        return whole
    idle = settings.stream_idle_timeout_s
    watch = IdleWatch(idle, resp.close)
    failed: str | None = None
    t0 = time.monotonic()
    try:
        data = await resp.read(limit) if whole is None else whole
        if len(data) > limit:
            resp.close()
            raise aiohttp.ClientPayloadError(f"answer is over the {limit} byte limit")
        if resp.until_close and not _is_json(data):
            # No length, no chunks: the end of the connection ended the body, and a node dying mid-answer
            # looks just the same. Incomplete JSON is that case, not an answer.
            failed = f"{call.node} closed the connection before its answer was complete"
            raise UpstreamError(failed)
        return data
    except aiohttp.ClientError as exc:
        failed = (
            f"{call.node} sent nothing for {idle:g} s"
            if watch.fired
            else f"{call.node}: reading the answer failed: {exc or type(exc).__name__}"
        )
        raise UpstreamError(failed) from None
    finally:
        watch.cancel()
        call.upstream_s += time.monotonic() - t0
        resp.release()
        lease.release(failed=failed)


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


class IdleWatch:
    """A stream's idle timeout with one timer per stream, not one per chunk.

    Arming ``asyncio.timeout`` around every read schedules and cancels a timer per chunk, which was the
    whole per-chunk gap to a minimal proxy. Here the reader only stores the time of its last chunk in
    :attr:`last` (``time.monotonic``, the loop's clock); the timer re-arms itself for the remaining time and
    calls ``on_idle`` (closing the upstream response, which ends the pending read) once the stream has
    really been silent for ``idle_s``.
    """

    __slots__ = ("_handle", "_idle", "_loop", "_on_idle", "fired", "last")

    def __init__(self, idle_s: float, on_idle: Callable[[], object]) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = idle_s
        self._on_idle = on_idle
        self.fired = False
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + idle_s, self._check)

    def _check(self) -> None:
        due = self.last + self._idle
        if self._loop.time() >= due:
            self.fired = True
            self._on_idle()
        else:
            self._handle = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        """Stop watching (the stream ended)."""
        self._handle.cancel()


def object_at(blob: bytes, start: int) -> dict[str, Any] | None:
    """The JSON object that begins at ``blob[start]`` (a ``{``), parsed alone, or None.

    Usage objects are flat or nest an object or two (OpenAI's ``*_tokens_details``), so the object ends at one
    of the next few ``}``: each is tried in turn, which never parses the event around it.
    """
    close = blob.find(b"}", start)
    for _ in range(16):
        if close < 0:
            return None
        try:
            found = orjson.loads(blob[start : close + 1])
        except orjson.JSONDecodeError:
            close = blob.find(b"}", close + 1)
            continue
        return found if isinstance(found, dict) else None
    return None


class UsageTail:
    """The last bytes of a stream, so the usage can be found once at the end instead of per chunk.

    mistral.rs puts the nine-field usage on the finish chunk, just before ``[DONE]`` (OpenAI backends asked
    for ``include_usage`` put it on a last ``choices: []`` chunk); it is the stream's last ``"usage"`` key.
    :meth:`usage` finds that key with ``rfind`` and parses only the object after it, never the event
    around it, so the cost does not grow with the stream or with a huge final tool-call chunk, and the
    event's start need not be in the tail. At least :attr:`LIMIT` bytes are kept (a single larger chunk is
    kept whole), so a usage object split over two reads is always complete in the tail.
    """

    __slots__ = ("_chunks", "_found", "_size")
    LIMIT = 65536
    _WS = b" \t\r\n"

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._found: tuple[dict[str, Any] | None] | None = None

    def add(self, chunk: bytes) -> None:
        self._found = None
        self._chunks.append(chunk)
        self._size += len(chunk)
        while len(self._chunks) > 1 and self._size - len(self._chunks[0]) >= self.LIMIT:
            self._size -= len(self._chunks.popleft())

    def usage(self) -> dict[str, Any] | None:
        """The object of the stream's last ``"usage"`` key, or None (absent, ``null`` or unreadable).

        Found once per state of the tail: asking again before the next :meth:`add` costs nothing (the
        ``include_usage`` path asks when it writes the usage chunk, and again for the metrics).
        """
        if self._found is None:
            self._found = (self._scan(),)
        return self._found[0]

    def _scan(self) -> dict[str, Any] | None:
        blob = self._chunks[-1] if len(self._chunks) == 1 else b"".join(self._chunks)
        idx = blob.rfind(b'"usage"')
        if idx < 0:
            return None
        n = len(blob)
        i = idx + 7
        while i < n and blob[i] in self._WS:
            i += 1
        if i >= n or blob[i] != 0x3A:  # ':'
            return None
        i += 1
        while i < n and blob[i] in self._WS:
            i += 1
        if i >= n or blob[i] != 0x7B:  # '{'
            return None
        return object_at(blob, i)

    def identity(self) -> dict[str, Any]:
        """``id``, ``created`` and ``model`` of the stream's last chunk that has them (for a chunk cortex adds)."""
        blob = b"".join(self._chunks)
        out: dict[str, Any] = {}
        for key, pattern in _IDENTITY:
            found = None
            for found in pattern.finditer(blob):  # noqa: B007 - the last match is the one wanted
                pass
            if found is not None:
                raw = found.group(1)
                out[key] = int(raw) if key == "created" else raw.decode("utf-8", "replace")
        return out


_IDENTITY = (
    ("id", re.compile(rb'"id":\s*"([^"]*)"')),
    ("created", re.compile(rb'"created":\s*(\d+)')),
    ("model", re.compile(rb'"model":\s*"([^"]*)"')),
)


def error_message(exc: CortexError | NodeReplyError) -> str:
    """The message of either error kind."""
    return exc.info.message if isinstance(exc, NodeReplyError) else exc.message
