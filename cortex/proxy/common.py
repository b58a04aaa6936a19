"""Request-side helpers both dialects share: body reading, API keys, model names, waiting for a load.

Each raises cortex's own errors (:mod:`cortex.errors`); the dialect's handler turns them into its envelope,
so a rule (say, the 413 for large bodies) is written once and holds for OpenAI and Anthropic clients alike.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from cortex.engine.lifecycle import Lease
from cortex.engine.state import NodeStatus
from cortex.errors import BadRequest, CortexError, NoNodeAvailable, PayloadTooLarge, Unauthorized, UnknownModel
from cortex.proxy.fast import WholeAnswer, header_dict, open_stream
from cortex.proxy.forward import Call, clean_request_id

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = [
    "SSE_HEADERS",
    "BodyTimeout",
    "ClientGone",
    "WaitFailed",
    "acquire_streaming",
    "check_api_key",
    "cortex_headers",
    "counted",
    "header_safe",
    "read_capped",
    "read_json",
    "resolve_model",
    "shorten",
]

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LOAD_NOTICE_S = 5.0
"""A waiting stream hears from cortex at least this often while its model loads."""


class BodyTimeout(CortexError):
    """The client stopped sending its request body for ``gateway.header_timeout_s``."""

    status = 408
    kind = "invalid_request_error"


def presented_key(request: web.Request) -> str | None:
    """The API key a client sent (``Authorization: Bearer`` or ``x-api-key``)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def secret_bytes(text: str) -> bytes:
    """A header value as the bytes that came on the wire, for a constant-time compare.

    aiohttp decodes header bytes as UTF-8 with ``surrogateescape``; a plain ``encode()`` of a value with
    a byte that is not UTF-8 raises (a 500 and a traceback). Encoding back the same way cannot fail, and a
    key with such bytes simply does not match.
    """
    return text.encode("utf-8", "surrogateescape")


def check_api_key(request: web.Request, keys: list[bytes]) -> None:
    """Raise :class:`Unauthorized` unless the request carries one of ``keys`` (no keys = open)."""
    if not keys:
        return
    key = presented_key(request)
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`")
    given = secret_bytes(key)
    ok = False
    for expected in keys:
        ok |= hmac.compare_digest(given, expected)
    if not ok:
        raise Unauthorized("invalid API key")


async def read_capped(request: web.Request, limit: int, idle_s: float, what: str) -> bytes:
    """The request body, at most ``limit`` bytes, with no silence longer than ``idle_s`` while it comes.

    An announced ``Content-Length`` over the limit is refused before a byte is read. One timeout for the
    whole read, pushed back as each piece arrives (not one per piece), bounds a client that trickles.

    Raises:
        PayloadTooLarge: over ``limit`` (``what`` names the limit in the message).
        BodyTimeout: the client went silent for ``idle_s``.
        BadRequest: the body could not be read (a broken chunked encoding, a bad compression).
    """
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is larger than {what}")
    content = request.content
    parts: list[bytes] = []
    size = 0
    try:
        if content.is_eof():  # the usual case: the whole body came with the head, so no timer at all
            data = content.read_nowait()
            if len(data) > limit:
                raise PayloadTooLarge(f"request body is larger than {what}")
            return data
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(idle_s) as deadline:
            while data := await content.readany():
                size += len(data)
                if size > limit:
                    raise PayloadTooLarge(f"request body is larger than {what}")
                parts.append(data)
                deadline.reschedule(loop.time() + idle_s)
    except TimeoutError:
        raise BodyTimeout(f"the request body stalled: nothing arrived for {idle_s:g} s") from None
    except web.HTTPException as exc:  # aiohttp's own rejection of the payload
        raise BadRequest(f"the request body could not be read: {exc.reason}") from None
    except (RequestPayloadError, aiohttp.ClientPayloadError, HttpProcessingError) as exc:
        raise BadRequest(f"the request body could not be read: {exc}") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_json(request: web.Request, max_body_mb: float, idle_s: float = 10.0) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON object.

    Raises:
        PayloadTooLarge: over ``max_body_mb``.
        BodyTimeout: the client went silent for ``idle_s`` while sending it.
        BadRequest: not JSON, or not a JSON object.
    """
    raw = await read_capped(request, int(max_body_mb * 1024 * 1024), idle_s, f"the {max_body_mb:g} MB limit")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return raw, data


def resolve_model(engine: Engine, data: dict[str, Any]) -> tuple[str, str]:
    """(the name the client asked for, the canonical id) for a request body.

    A missing model (or ``default``) means the config's first pinned model.

    Raises:
        BadRequest: ``model`` is not a string, or absent with no pinned model to default to.
        UnknownModel: no node serves it and no alias matches.
    """
    name = data.get("model")
    if name is None or name == "default":
        default = engine.default_model()
        if default is None:
            raise BadRequest("`model` is required (no pinned model to default to)", param="model")
        if (down := unreachable(engine, default, default)) is not None:
            raise down
        return default, default
    if not isinstance(name, str) or not name:
        raise BadRequest("`model` must be a non-empty string", param="model")
    model = engine.resolve(name)
    if (down := unreachable(engine, name, model)) is not None:
        raise down
    if model is None:
        served = ", ".join(engine.served_models()) or "none"
        raise UnknownModel(f"model {shorten(name)!r} is not served by this gateway; available models: {served}")
    return name, model


def unreachable(engine: Engine, name: str, model: str | None) -> NoNodeAvailable | None:
    """The retryable 503 for a model no answering node lists while nodes that might serve it are down.

    Nodes list their models only once they answer a poll, so with nodes down (or not polled yet) a model
    the config names (a pin, a ``[[models]]`` entry or alias) is not unknown, only out of reach for now;
    nor is any model when no node at all is up. A 404 would tell a client to give up on it. The hot path
    pays one dict lookup: a model some node lists returns at once.

    Args:
        engine: the engine.
        name: the name the client asked for.
        model: what it resolved to (None when nothing matched).
    """
    fleet = engine.fleet
    if model is not None and model in fleet.nodes_by_model():
        return None
    down = [n for n in fleet.nodes.values() if n.status in (NodeStatus.DOWN, NodeStatus.UNKNOWN)]
    if not down:
        return None
    settings = engine.settings
    pinned_on = {
        n for n in fleet.nodes if fleet.is_pinned(n, name) or (model is not None and fleet.is_pinned(n, model))
    }
    configured = model is not None or bool(pinned_on) or settings.model_facts(name) is not None
    if not configured and len(down) < len(fleet.nodes):
        return None
    named = [n for n in down if n.name in pinned_on] or down
    where = ", ".join(f"{n.name} ({n.status.value})" for n in named)  # never its endpoint or error: clients see this
    return NoNodeAvailable(f"model {shorten(name)!r} cannot be served now: no node that serves it is up; {where}")


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters for an error message (a 100 kB model name is not echoed back)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def header_safe(value: str) -> str:
    """``value`` when it can go in a response header as is, else with every unsafe character escaped.

    Model ids come from the nodes: one with a line break or a non-ASCII character would make aiohttp
    refuse the whole response (a 500). Two C-speed checks for the usual case.
    """
    if value.isascii() and value.isprintable():
        return value
    return "".join(c if " " <= c <= "~" else f"%{ord(c):02X}" if ord(c) < 256 else f"%u{ord(c):04X}" for c in value)


def cortex_lines(call: Call, upstream_request_id: str | None = None) -> str:
    r"""The response headers that tell the client where its request went, as ``Name: value\r\n`` lines.

    Every value is safe to send as it is (:func:`header_safe`). The node's ``x-request-id`` is passed back
    only when it is a usable id (:func:`clean_request_id` rules).
    """
    lines = (
        f"x-cortex-node: {header_safe(call.node)}\r\nx-cortex-model: {header_safe(call.model)}\r\n"
        f"x-cortex-queue-ms: {int(call.queue_s * 1000)}\r\n"
    )
    if upstream_request_id and clean_request_id(upstream_request_id) == upstream_request_id:
        lines += f"x-request-id: {upstream_request_id}\r\n"
    return lines


def cortex_headers(call: Call, upstream_request_id: str | None = None) -> dict[str, str]:
    """:func:`cortex_lines` as a dict (for a ``web.Response``)."""
    return header_dict(cortex_lines(call, upstream_request_id))


async def acquire_streaming(
    engine: Engine,
    call: Call,
    request: web.Request,
    notice: Callable[[str, str, float], bytes],
) -> tuple[Lease, web.StreamResponse | None]:
    """Lease a node for a streaming request, keeping the client's connection alive during a load.

    When the model is loaded somewhere the lease comes at once. Otherwise, after a second of waiting,
    the stream's headers go out (200, event stream) and ``notice(model, node, elapsed)`` is written at least
    every :data:`LOAD_NOTICE_S` seconds until the model is ready, so clients do not time out on a cold load.

    Returns:
        The lease, and the already prepared response when notices were sent (else None).

    Raises:
        CortexError: from the engine, before anything was sent.
        WaitFailed: from the engine, after notices were sent (the stream must be finished by the caller).
    """
    lease = engine.lifecycle.lease_now(call.model)
    if lease is not None:
        return lease, None
    response: web.StreamResponse | None = None
    last_notice = 0.0

    async def keep_alive(waited: float) -> None:
        # called about once a second while waiting; a notice every 3.5 s keeps well within LOAD_NOTICE_S
        nonlocal response, last_notice
        now = time.monotonic()
        if waited < 1.0 or (response is not None and now - last_notice < LOAD_NOTICE_S - 1.5):
            return
        loading = engine.fleet.loading.get(call.model)
        where = loading[0] if loading else ""  # "": nothing loads it; it waits for a node (drained, restarting)
        if response is None:
            response = open_stream(request, 200, SSE_HEADERS)
            response.headers["x-cortex-model"] = header_safe(call.model)
            if loading:  # the headers leave before the load ends: name the node it is loading on
                response.headers["x-cortex-node"] = header_safe(loading[0])
            await response.prepare(request)
        try:
            await response.write(notice(call.model, where, waited))
        except ConnectionResetError:
            raise ClientGone(response) from None
        last_notice = now

    try:
        lease = await engine.acquire(call.model, on_wait=keep_alive)
    except CortexError as exc:
        if response is not None:
            raise WaitFailed(exc, response) from None
        raise
    if response is not None and response.headers.get("x-cortex-node") != lease.node.name:
        # it landed elsewhere than the headers said (or they could not say): tell the client in a comment
        try:
            await response.write(b": x-cortex-node: " + header_safe(lease.node.name).encode() + b"\n\n")
        except ConnectionResetError:
            lease.release()
            raise ClientGone(response) from None
    return lease, response


_Answer = TypeVar("_Answer", web.StreamResponse, web.StreamResponse | WholeAnswer)


async def counted(engine: Engine, call: Call, handling: Coroutine[Any, Any, _Answer]) -> _Answer:
    """Await a handler's work; count the call once answered; let a client's hang-up pass quietly."""
    try:
        return await handling
    except ClientGone as gone:
        call.status = 499
        return gone.response
    except ConnectionResetError:
        # The client hung up while cortex was answering; aiohttp drops this response quietly.
        call.status = 499
        return web.Response(status=499)
    except asyncio.CancelledError:
        call.status = 499  # the client hung up and aiohttp cancelled the handler (handler_cancellation)
        raise
    finally:
        engine.record_soon(call.outcome())


class ClientGone(Exception):
    """The client hung up mid-response; the handler returns ``response`` (already prepared) and moves on."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


class WaitFailed(Exception):
    """Waiting for a model failed after the stream's headers went out; finish it in the dialect's way."""

    def __init__(self, error: CortexError, response: web.StreamResponse) -> None:
        super().__init__(error.message)
        self.error = error
        self.response = response
