"""Request-side helpers both dialects share: body reading, API keys, model names, waiting for a load.

Each raises cortex's own errors (:mod:`cortex.errors`); the dialect's handler turns them into its envelope,
so a rule (say, the 413 for large bodies) is written once and holds for OpenAI and Anthropic clients alike.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from cortex.engine.lifecycle import Lease
from cortex.engine.state import NodeStatus
from cortex.errors import BadRequest, CortexError, NoNodeAvailable, PayloadTooLarge, Unauthorized, UnknownModel
from cortex.proxy.forward import Call

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = [
    "SSE_HEADERS",
    "ClientGone",
    "WaitFailed",
    "acquire_streaming",
    "check_api_key",
    "cortex_headers",
    "counted",
    "read_json",
    "resolve_model",
]

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LOAD_NOTICE_S = 5.0
"""A waiting stream hears from cortex at least this often while its model loads."""


def presented_key(request: web.Request) -> str | None:
    """The API key a client sent (``Authorization: Bearer`` or ``x-api-key``)."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def check_api_key(request: web.Request, keys: list[bytes]) -> None:
    """Raise :class:`Unauthorized` unless the request carries one of ``keys`` (no keys = open)."""
    if not keys:
        return
    key = presented_key(request)
    if not key:
        raise Unauthorized("missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`")
    given = key.encode()
    ok = False
    for expected in keys:
        ok |= hmac.compare_digest(given, expected)
    if not ok:
        raise Unauthorized("invalid API key")


async def read_json(request: web.Request, max_body_mb: float) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON object.

    Raises:
        PayloadTooLarge: over ``max_body_mb``.
        BadRequest: not JSON, or not a JSON object.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the {max_body_mb:g} MB limit") from None
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
        raise UnknownModel(f"model {name!r} is not served by this gateway; available models: {served}")
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
    return NoNodeAvailable(f"model {name!r} cannot be served now: no node that serves it is up; {where}")


def cortex_headers(call: Call, upstream_request_id: str | None = None) -> dict[str, str]:
    """The response headers that tell the client where its request went."""
    headers = {
        "x-cortex-node": call.node,
        "x-cortex-model": call.model,
        "x-cortex-queue-ms": str(int(call.queue_s * 1000)),
    }
    if upstream_request_id:
        headers["x-request-id"] = upstream_request_id
    return headers


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
    node = engine.lifecycle.route(call.model)
    if node is not None:
        return Lease(engine.fleet, node, call.model, 0.0), None
    response: web.StreamResponse | None = None
    last_notice = 0.0

    async def keep_alive(waited: float) -> None:
        # called about once a second while waiting; a notice every 3.5 s keeps well within LOAD_NOTICE_S
        nonlocal response, last_notice
        now = time.monotonic()
        if waited < 1.0 or (response is not None and now - last_notice < LOAD_NOTICE_S - 1.5):
            return
        if response is None:
            response = web.StreamResponse(status=200, headers=SSE_HEADERS)
            response.headers["x-cortex-model"] = call.model
            await response.prepare(request)
        loading = engine.fleet.loading.get(call.model)
        where = loading[0] if loading else ""  # "": nothing loads it; it waits for a node (drained, restarting)
        try:
            await response.write(notice(call.model, where, waited))
        except ConnectionResetError:
            raise ClientGone(response) from None
        last_notice = now

    try:
        return await engine.acquire(call.model, on_wait=keep_alive), response
    except CortexError as exc:
        if response is not None:
            raise WaitFailed(exc, response) from None
        raise


async def counted(engine: Engine, call: Call, handling: Coroutine[Any, Any, web.StreamResponse]) -> web.StreamResponse:
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
