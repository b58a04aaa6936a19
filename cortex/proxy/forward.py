"""Sending one request to a node: lease, POST, failover before the first byte, timeouts.

Both dialects use :func:`send`; what differs between them (parsing the client's body, shaping errors and
streams) lives in their handler modules. Headers sent upstream are built from scratch, not filtered from the
client's: a node needs only the content type and the request id, and building them guarantees that no
credential, cookie or hop-by-hop header ever leaves cortex.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from cortex.engine.lifecycle import Lease
from cortex.engine.metrics import RequestOutcome
from cortex.errors import CortexError, UpstreamError
from cortex.proxy.errors import NodeErrorInfo, read_node_error

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["Call", "NodeReplyError", "UsageTail", "send", "upstream_headers"]


class NodeReplyError(Exception):
    """The node answered with an error status (already classified)."""

    def __init__(self, info: NodeErrorInfo, node: str) -> None:
        super().__init__(info.message)
        self.info = info
        self.node = node


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


def upstream_headers(request_id: str | None) -> dict[str, str]:
    """The only headers a node receives."""
    headers = {"Content-Type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    return headers


async def send(
    engine: Engine, call: Call, path: str, body: bytes, headers: dict[str, str], lease: Lease | None = None
) -> tuple[Lease, aiohttp.ClientResponse]:
    """POST ``body`` to a node serving ``call.model`` and return once its headers arrived.

    A connect error, a first-byte timeout or a 5xx that is not the client's fault is retried on another
    node where the model is loaded (never a new load: failover must not wait). The returned lease must be
    released and the response released or read by the caller.

    Raises:
        CortexError: queue or placement errors from the engine; UpstreamError when no node answered.
        NodeReplyError: the node answered an error status (4xx, or a 5xx with no other node to try).
    """
    if lease is None:
        lease = await engine.acquire(call.model)
    call.queue_s = lease.queue_s
    session = engine.session
    timeout_s = engine.settings.gateway.first_byte_timeout_s
    tried: list[str] = []
    while True:
        node = lease.node
        call.node = node.name
        t0 = time.monotonic()
        failure: str
        try:
            async with asyncio.timeout(timeout_s):
                resp = await session.post(node.client.endpoint + path, data=body, headers=headers)
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
            data = await resp.read()
            resp.release()
            info = read_node_error(resp.status, data)
            if info.status < 500:
                lease.release()
                raise NodeReplyError(info, node.name)
            failure = info.message
        call.upstream_s += time.monotonic() - t0 if info is None else 0.0
        lease.release(failed=failure)
        tried.append(node.name)
        other = engine.lifecycle.route(call.model, tuple(tried))
        if other is None:
            if info is not None:
                raise NodeReplyError(info, node.name)
            raise UpstreamError(failure)
        lease = Lease(engine.fleet, other, call.model, lease.queue_s)


class UsageTail:
    """The last few KiB of a stream, so the usage can be found once at the end instead of per chunk.

    mistral.rs puts the nine-field usage on the finish chunk, just before ``[DONE]``; scanning the tail
    once costs one ``rfind`` and one JSON parse per request, where parsing every chunk would cost one per
    token.
    """

    __slots__ = ("_chunks", "_size")
    LIMIT = 65536

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size > self.LIMIT and len(self._chunks) > 1:
            self._size -= len(self._chunks.popleft())

    def usage(self) -> dict[str, Any] | None:
        """The usage object of the last event that has one, or None."""
        blob = b"".join(self._chunks)
        idx = blob.rfind(b'"usage":{')
        if idx < 0:
            return None
        start = blob.rfind(b"data:", 0, idx)
        end = blob.find(b"\n", idx)
        if start < 0:
            return None
        try:
            event = orjson.loads(blob[start + 5 : end if end >= 0 else None])
        except orjson.JSONDecodeError:
            return None
        usage = event.get("usage") if isinstance(event, dict) else None
        return usage if isinstance(usage, dict) else None


def error_message(exc: CortexError | NodeReplyError) -> str:
    """The message of either error kind."""
    return exc.info.message if isinstance(exc, NodeReplyError) else exc.message
