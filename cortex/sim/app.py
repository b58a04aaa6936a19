"""The aiohttp application of a simulated node: routes, and the one middleware every request crosses.

mistral.rs does several things to every request before and after its handler (axum layers): it enforces
the body limit, echoes or mints ``x-request-id``, and records the ``http_*`` metrics with a ``model`` label
taken from the body. The simulator adds its own per-request concerns: recording the request for tests and
firing injected failures. Doing all of that in one middleware means the body is read and decoded exactly
once, which keeps the per-request CPU of a benchmarked node low.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDictProxy

from cortex.sim import frames
from cortex.sim.admin import AdminHandlers
from cortex.sim.bodies import BODY_KEY, BodyRejected, ParsedBody
from cortex.sim.inference import InferenceHandlers
from cortex.sim.media import MediaHandlers, models_with_kinds
from cortex.sim.metrics import EXCLUDED_PATHS
from cortex.sim.models import SimError
from cortex.sim.responses import ResponsesHandlers
from cortex.sim.script import InjectedFailure

if TYPE_CHECKING:
    from cortex.sim.node import SimNode

_INFERENCE_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/images/generations",
        "/v1/audio/speech",
    }
)
_LIFECYCLE_ROUTES = frozenset({"/v1/models/unload", "/v1/models/reload", "/v1/models/status"})
_TOO_LARGE = "request body too large"
_WRONG_TYPE = "Expected request with `Content-Type: application/json`"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the node received it."""

    method: str
    """HTTP method."""
    path: str
    """Request path, without the query string."""
    json: Any
    """The decoded JSON body; None when there was no body or it was not JSON."""
    headers: CIMultiDictProxy[str]
    """The request headers (case-insensitive)."""
    at: float
    """``time.monotonic()`` when the request arrived."""


def create_app(node: SimNode) -> web.Application:
    """Build the node's application.

    Args:
        node: The node the handlers serve.

    Returns:
        The application, ready for an ``AppRunner``.
    """
    app = web.Application(client_max_size=node.max_body_bytes, middlewares=[_middleware(node)])
    app.on_response_prepare.append(_stamp_request_id)
    admin = AdminHandlers(node)
    inference = InferenceHandlers(node)
    app.router.add_get("/", admin.health)
    app.router.add_get("/health", admin.health)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/v1/models", models_with_kinds(node, admin.list_models))
    app.router.add_post("/v1/models/unload", admin.unload)
    app.router.add_post("/v1/models/reload", admin.reload)
    app.router.add_post("/v1/models/status", admin.status)
    app.router.add_get("/v1/system/info", admin.system_info)
    app.router.add_post("/v1/chat/completions", inference.chat)
    app.router.add_post("/v1/completions", inference.completions)
    app.router.add_post("/v1/embeddings", inference.embeddings)
    responses = ResponsesHandlers(node)  # a new app is a new process: stored responses do not survive it
    app.on_cleanup.append(responses.close)
    app.router.add_post("/v1/responses", responses.create)
    app.router.add_get("/v1/responses/{response_id}", responses.retrieve)
    app.router.add_delete("/v1/responses/{response_id}", responses.delete)
    app.router.add_post("/v1/responses/{response_id}/cancel", responses.cancel)
    media = MediaHandlers(node)
    app.router.add_post("/v1/images/generations", media.images)
    app.router.add_post("/v1/audio/speech", media.speech)
    return app


def new_request_id() -> str:
    """``req_`` and a random version-4 UUID in simple form (cheaper than ``uuid.uuid4().hex``)."""
    h = os.urandom(16).hex()
    return f"req_{h[:12]}4{h[13:16]}{'89ab'[int(h[16], 16) & 3]}{h[17:]}"


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Echo ``x-request-id``, or mint ``req_<32 hex>``, on every response."""
    response.headers["x-request-id"] = request.headers.get("x-request-id") or new_request_id()


async def _read_body(request: web.Request, limit: int) -> ParsedBody:
    """Read and decode a POST body once; 413 raises, 415/400 are kept for the handler to raise."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyRejected(413, _TOO_LARGE)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyRejected(413, _TOO_LARGE) from None
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        return ParsedBody(None, BodyRejected(415, _WRONG_TYPE))
    try:
        return ParsedBody(json.loads(raw), None)
    except ValueError as exc:
        return ParsedBody(None, BodyRejected(400, f"Failed to parse the request body as JSON: {exc}"))


def _model_label(node: SimNode, route: str, body: ParsedBody | None) -> str:
    """The ``model`` label of mistral.rs's HTTP metrics."""
    if route not in _INFERENCE_ROUTES and route not in _LIFECYCLE_ROUTES:
        return "none"
    value = body.value if body is not None else None
    if not isinstance(value, dict):
        return "unknown"
    if route in _LIFECYCLE_ROUTES:
        mid = value.get("model_id")
        return mid if isinstance(mid, str) else "unknown"
    requested = value.get("model")
    if requested is None or requested == "default":
        return node.models.default_id or "unknown"
    return requested if isinstance(requested, str) and node.models.is_known(requested) else "unknown"


def _failure_response(failure: InjectedFailure) -> web.Response:
    if failure.body is None:
        return web.Response(status=failure.status)
    if isinstance(failure.body, str):
        return web.Response(status=failure.status, text=failure.body)
    return web.Response(status=failure.status, text=frames.dumps(failure.body), content_type="application/json")


def _middleware(node: SimNode) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not node.awake.is_set():
            await node.awake.wait()  # a hung node: the connection is accepted, nothing answers
        arrived = time.monotonic()
        path = request.path
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "<unmatched>"
        body: ParsedBody | None = None
        early: web.StreamResponse | None = None
        if request.method == "POST":
            try:
                body = await _read_body(request, node.max_body_bytes)
                request[BODY_KEY] = body
            except BodyRejected as exc:
                early = web.Response(status=exc.status, text=exc.text)
        if node.record_requests:
            value = body.value if body is not None else None
            node.requests.append(RecordedRequest(request.method, path, value, request.headers, arrived))
        failure = node.script.take_failure(path)
        if failure is not None:
            early = _failure_response(failure)
        if path in EXCLUDED_PATHS:
            return early or await _dispatch(request, handler)
        model = _model_label(node, route, body)
        flight = node.metrics.request_started(
            request.method, route, model, None if body is None else request.content_length or 0
        )
        status = 500
        try:
            resp = early or await _dispatch(request, handler)
            status = resp.status
            return resp
        finally:
            flight.dec()
            node.metrics.request_finished(request.method, route, model, status, time.monotonic() - arrived)

    return middleware


async def _dispatch(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the handler, turning the simulator's exceptions into mistral.rs-shaped error responses."""
    try:
        return await handler(request)
    except BodyRejected as exc:
        return web.Response(status=exc.status, text=exc.text)
    except SimError as exc:
        return web.Response(
            status=exc.status,
            text=frames.dumps(frames.message_body(exc.message)),
            content_type="application/json",
        )
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        return web.Response(status=exc.status)  # axum: empty body
