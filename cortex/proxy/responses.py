"""The OpenAI Responses API (``/v1/responses``) with response affinity, and the image and speech routes.

Creating a response is routed by ``model`` like a chat completion, through the same machinery (lease, load
on demand, queue, keep-alive comments while a stream waits for a load, metrics, request log), and its
bytes pass through unchanged. What differs is memory: a node keeps the responses it made (and the history
a follow-up continues) to itself, so cortex notes each new response id's node (from the JSON answer, or
from the stream's ``response.created`` event) in the engine's :class:`~cortex.engine.affinity.AffinityStore`,
and sends a request naming ``previous_response_id``, and ``GET``/``DELETE``/``cancel`` of an id, to that
node only. A node that cannot serve gives a 503 naming it, never a silent reroute that would lose the
conversation; an id cortex does not know gives OpenAI's 404.

Streams are scanned, not parsed: the id in the head, the first ``*.delta`` event (time to first token and
decode speed are measured from it, since ``response.created`` goes out before any token), and the usage of
``response.completed`` at the end. Images (JSON) and speech (binary audio) answers are copied chunk by chunk
with the node's content type, never held whole.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from cortex.engine.affinity import Holder, HolderUnavailable, ResponseNotFound, acquire_on, holder_node, server_epoch
from cortex.engine.upstream import UpstreamResponse
from cortex.errors import BadRequest, CortexError
from cortex.proxy.common import (
    LOAD_NOTICE_S,
    SSE_HEADERS,
    ClientGone,
    WaitFailed,
    acquire_streaming,
    check_api_key,
    cortex_headers,
    counted,
    read_json,
    resolve_model,
)
from cortex.proxy.errors import openai_error, openai_error_for, read_node_error
from cortex.proxy.forward import Call, IdleWatch, NodeReplyError, object_at, read_body, send, upstream_headers

if TYPE_CHECKING:
    from cortex.engine.engine import Engine
    from cortex.engine.lifecycle import Lease

__all__ = ["add_responses_routes"]

log = logging.getLogger(__name__)

RESPONSES = "/v1/responses"
IMAGES = "/v1/images/generations"
SPEECH = "/v1/audio/speech"

_ID_IN_HEAD = re.compile(rb'"response"\s*:\s*\{\s*"id"\s*:\s*"([^"\\]+)"')
_HEAD_LIMIT = 65536
"""Bytes of a stream's head searched for the response id (``response.created`` is the first event)."""
_TAIL_LIMIT = 8 * 1024 * 1024
"""Bytes kept from ``response.completed`` on, to read its usage (an event this large loses the usage)."""
_DELTA = b'.delta"'
_TERMINALS = (b'"response.completed"', b'"response.failed"', b'"response.incomplete"')
_DONE = b"[DONE]"
_EMBEDS_RESPONSE = b'"response":'
_CARRY = 32
"""Bytes of the previous chunk kept to find a marker split over two reads."""


# -- routes ---------------------------------------------------------------------------------------------


def add_responses_routes(app: web.Application, engine: Engine, keys: list[bytes]) -> None:
    """Register ``/v1/responses`` (create, get, delete, cancel), ``/v1/images/generations`` and ``/v1/audio/speech``."""

    async def create(request: web.Request) -> web.StreamResponse:
        call = Call(api="openai", started=time.monotonic())
        return await counted(engine, call, _create(request, engine, call, keys))

    async def retrieve(request: web.Request) -> web.StreamResponse:
        return await _to_holder(request, engine, keys, "GET", "")

    async def delete(request: web.Request) -> web.StreamResponse:
        return await _to_holder(request, engine, keys, "DELETE", "")

    async def cancel(request: web.Request) -> web.StreamResponse:
        return await _to_holder(request, engine, keys, "POST", "/cancel")

    def media(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            call = Call(api="openai", started=time.monotonic())
            return await counted(engine, call, _media(request, engine, call, path, keys))

        return handler

    app.router.add_post(RESPONSES, create)
    app.router.add_get(RESPONSES + "/{response_id}", retrieve)
    app.router.add_delete(RESPONSES + "/{response_id}", delete)
    app.router.add_post(RESPONSES + "/{response_id}/cancel", cancel)
    app.router.add_post(IMAGES, media(IMAGES))
    app.router.add_post(SPEECH, media(SPEECH))


def _not_found(response_id: str, message: str | None = None, param: str | None = None) -> web.Response:
    return openai_error(
        404,
        message or f"Response with id '{response_id}' not found.",
        param=param,
        code="response_not_found",
    )


def _internal_error(request: web.Request, call: Call) -> web.Response:
    """A bug, not the client's fault: an answer in the client's dialect, the traceback in the log once."""
    log.exception("internal error serving %s %s", request.method, request.path)
    call.status = 500
    return openai_error(500, "internal error in cortex (see the gateway's log)", "server_error")


def _error_for(exc: CortexError, call: Call, param: str | None = None) -> web.Response:
    """The OpenAI envelope for cortex's own errors, with the response-specific codes."""
    headers = cortex_headers(call) if call.node else None
    if isinstance(exc, ResponseNotFound):
        return openai_error(404, exc.message, exc.kind, param=param, code="response_not_found", headers=headers)
    if isinstance(exc, HolderUnavailable):
        extra = {**(headers or {}), "Retry-After": str(int(exc.retry_after or 5))}
        return openai_error(503, exc.message, exc.kind, param=param, code="node_unavailable", headers=extra)
    return openai_error_for(exc, headers)


# -- create ---------------------------------------------------------------------------------------------


def _check_type(data: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> None:
    value = data.get(key)
    if value is None:
        return
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadRequest(f"`{key}` must be {what}, not {type(value).__name__}", param=key)


def validate_responses(data: dict[str, Any]) -> None:
    """Reject a Responses body a node would refuse for its shape, with a 400 naming the field.

    Raises:
        BadRequest: naming the field.
    """
    if "input" not in data:
        raise BadRequest("`input` is required", param="input")
    value = data["input"]
    if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(i, dict) for i in value)):
        raise BadRequest("`input` must be a string or an array of input items", param="input")
    for key in ("stream", "store", "background"):
        _check_type(data, key, (bool,), "a boolean")
    for key in ("previous_response_id", "instructions"):
        _check_type(data, key, (str,), "a string")
    for key in ("max_output_tokens", "max_tokens", "max_completion_tokens", "top_logprobs"):
        _check_type(data, key, (int,), "an integer")
        value = data.get(key)
        if key != "top_logprobs" and isinstance(value, int) and value < 1:
            raise BadRequest(f"`{key}` must be at least 1", param=key)
    for key in ("temperature", "top_p"):
        _check_type(data, key, (int, float), "a number")
    _check_type(data, "tools", (list,), "an array")
    prev = data.get("previous_response_id")
    if prev == "":
        raise BadRequest("`previous_response_id` must not be empty", param="previous_response_id")


def _rewrite(data: dict[str, Any], model: str, max_output_tokens: int | None) -> bool:
    """Name the real model and clamp the output budget to ``[[models]].max_output_tokens``; True if changed."""
    changed = False
    if data.get("model") != model:
        data["model"] = model
        changed = True
    if max_output_tokens is not None:
        for key in ("max_output_tokens", "max_tokens", "max_completion_tokens"):
            value = data.get(key)
            if isinstance(value, int) and value > max_output_tokens:
                data[key] = max_output_tokens
                changed = True
    return changed


async def _create(request: web.Request, engine: Engine, call: Call, keys: list[bytes]) -> web.StreamResponse:
    holder: Holder | None = None
    prev: str | None = None
    try:
        check_api_key(request, keys)
        raw, data = await read_json(request, engine.settings.gateway.max_body_mb)
        validate_responses(data)
        _name, call.model = resolve_model(engine, data)
        facts = engine.settings.model_facts(call.model)
        if _rewrite(data, call.model, facts.max_output_tokens if facts else None):
            raw = orjson.dumps(data)
        prev = data.get("previous_response_id")
        if prev is not None:
            holder = engine.affinity.lookup(prev)
            if holder is None:
                raise ResponseNotFound(f"Previous response with id '{prev}' not found.")
            holder_node(engine, prev, holder)  # fail fast, before any byte or wait
        call.stream = data.get("stream") is True
        store = data.get("store") is not False
        headers = upstream_headers(request.headers.get("x-request-id"))
        if call.stream:
            return await _stream(request, engine, call, raw, headers, store, prev, holder)
        return await _unary(engine, call, raw, headers, store, prev, holder)
    except CortexError as exc:
        call.status = exc.status
        param = "previous_response_id" if isinstance(exc, ResponseNotFound | HolderUnavailable) else None
        return _error_for(exc, call, param)
    except NodeReplyError as exc:
        call.status = exc.info.status
        return openai_error(
            exc.info.status, exc.info.message, exc.info.kind, headers=cortex_headers(call, exc.request_id)
        )
    except (ClientGone, ConnectionResetError):
        raise  # the client is gone: counted() records it, there is no one to answer
    except Exception:
        return _internal_error(request, call)


async def _send_pinned(
    engine: Engine, call: Call, raw: bytes, headers: dict[str, str], lease: Lease, response_id: str
) -> UpstreamResponse:
    """POST to the leased node and nowhere else: unlike :func:`send`, no failover (it would lose the history).

    Raises:
        HolderUnavailable: the node could not be reached or gave no first byte in time.
        NodeReplyError: it answered an error status.
    """
    node = lease.node
    call.node = node.name
    call.queue_s = lease.queue_s
    timeout_s = engine.settings.gateway.first_byte_timeout_s
    t0 = time.monotonic()
    try:
        resp = await engine.upstream.post(node.client.endpoint, RESPONSES, raw, headers, timeout_s=timeout_s)
    except (TimeoutError, aiohttp.ClientError) as exc:
        failure = f"no first byte within {timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
        lease.release(failed=f"{node.name}: {failure or type(exc).__name__}")
        raise HolderUnavailable(
            f"node {node.name} holds response {response_id} and did not answer ({failure or type(exc).__name__}); "
            "the conversation lives only there, so it is not sent elsewhere"
        ) from None
    except asyncio.CancelledError:
        lease.release()
        raise
    call.upstream_s += time.monotonic() - t0
    if resp.status < 400:
        return resp
    body = await resp.read()
    resp.release()
    info = read_node_error(resp.status, body)
    lease.release(failed=info.message if info.status >= 500 else None)
    raise NodeReplyError(info, node.name, resp.headers.get("x-request-id"))


def _remember(engine: Engine, call: Call, response_id: str | None) -> None:
    node = engine.fleet.nodes.get(call.node)
    if response_id and node is not None:
        engine.affinity.remember(response_id, call.node, call.model, server_epoch(node))


async def _unary(
    engine: Engine,
    call: Call,
    raw: bytes,
    headers: dict[str, str],
    store: bool,
    prev: str | None,
    holder: Holder | None,
) -> web.Response:
    if prev is not None and holder is not None:
        lease = await acquire_on(engine, call.model, prev, holder)
        resp = await _send_pinned(engine, call, raw, headers, lease, prev)
    else:
        lease, resp = await send(engine, call, RESPONSES, raw, headers)
    body = await read_body(engine, call, lease, resp)
    call.first_byte = time.monotonic()
    call.status = resp.status
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        usage = parsed.get("usage")
        call.usage = usage if isinstance(usage, dict) else None
        response_id = parsed.get("id")
        if store and isinstance(response_id, str):
            _remember(engine, call, response_id)
    return web.Response(
        status=resp.status,
        body=body,
        content_type="application/json",
        headers=cortex_headers(call, resp.headers.get("x-request-id")),
    )


def _notice(model: str, node: str, elapsed: float) -> bytes:
    return f": loading {model} on {node} ({int(elapsed)} s)\n\n".encode()


def _error_event(message: str, code: str = "server_error") -> bytes:
    """OpenAI's stream ``error`` event, for a failure before the node said anything."""
    payload = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": 0}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


def _failed_event(response_id: str, model: str, message: str) -> bytes:
    """A closing ``response.failed`` for a stream the node broke after it began (clients expect a terminal)."""
    response = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "failed",
        "output": [],
        "error": {"code": "server_error", "message": message},
    }
    payload = {"type": "response.failed", "sequence_number": 0, "response": response}
    return b"event: response.failed\ndata: " + orjson.dumps(payload) + b"\n\n"


async def _acquire_pinned_streaming(
    engine: Engine, call: Call, request: web.Request, prev: str, holder: Holder
) -> tuple[Lease, web.StreamResponse | None]:
    """:func:`acquire_streaming` for a lease pinned to the response's node (notices while it loads there)."""
    response: web.StreamResponse | None = None
    last_notice = 0.0

    async def keep_alive(waited: float) -> None:
        # called about once a second; a notice every 3.5 s or so, as acquire_streaming sends them
        nonlocal response, last_notice
        now = time.monotonic()
        if response is not None and now - last_notice < LOAD_NOTICE_S - 1.5:
            return
        last_notice = now
        if response is None:
            response = web.StreamResponse(status=200, headers=SSE_HEADERS)
            response.headers["x-cortex-model"] = call.model
            response.headers["x-cortex-node"] = holder.node
            await response.prepare(request)
        try:
            await response.write(_notice(call.model, holder.node, waited))
        except ConnectionResetError:
            raise ClientGone(response) from None

    try:
        return await acquire_on(engine, call.model, prev, holder, keep_alive), response
    except CortexError as exc:
        if response is not None:
            raise WaitFailed(exc, response) from None
        raise


async def _stream(
    request: web.Request,
    engine: Engine,
    call: Call,
    raw: bytes,
    headers: dict[str, str],
    store: bool,
    prev: str | None,
    holder: Holder | None,
) -> web.StreamResponse:
    try:
        if prev is not None and holder is not None:
            lease, response = await _acquire_pinned_streaming(engine, call, request, prev, holder)
        else:
            lease, response = await acquire_streaming(engine, call, request, _notice)
    except WaitFailed as exc:
        call.status = exc.error.status
        await exc.response.write(_error_event(exc.error.message))
        return exc.response
    call.queue_s = lease.queue_s
    try:
        if prev is not None:
            resp = await _send_pinned(engine, call, raw, headers, lease, prev)
        else:
            lease, resp = await send(engine, call, RESPONSES, raw, headers, lease)
    except (CortexError, NodeReplyError) as exc:
        if response is None:
            raise
        call.status = exc.info.status if isinstance(exc, NodeReplyError) else exc.status
        await response.write(_error_event(exc.info.message if isinstance(exc, NodeReplyError) else exc.message))
        return response
    return await _pipe(request, engine, call, lease, resp, response, store)


class StreamScan:
    """What cortex needs from a Responses stream, found with byte searches as the chunks go by.

    The response id is read from the head (``response.created`` comes first), the first ``*.delta`` event
    marks the first token, and the bytes from ``response.completed`` on are kept to read its ``usage`` once,
    at the end. A marker split between two reads is found through a few bytes carried over.
    """

    __slots__ = ("_carry", "_head", "_tail", "_tail_size", "done", "first_token", "response_id", "terminal")

    def __init__(self) -> None:
        self._head: bytearray | None = bytearray()
        self._carry = b""
        self._tail: list[bytes] | None = None
        self._tail_size = 0
        self.response_id: str | None = None
        self.first_token: float | None = None
        self.terminal = False
        """A ``response.completed``, ``.failed`` or ``.incomplete`` event was seen."""
        self.done = False
        """``[DONE]`` was seen (mistral.rs ends every stream it finishes with it, errors included)."""

    def add(self, chunk: bytes, now: float) -> None:
        """Look at one chunk (``now``: when it arrived).

        A text delta costs a few ``in`` searches: the terminal events are looked for only in chunks that
        embed a response object (``"response":``), which deltas never do.
        """
        if self._head is not None:
            self._head += chunk
            found = _ID_IN_HEAD.search(self._head)
            if found is not None:
                self.response_id = found.group(1).decode("utf-8", "replace")
                self._head = None
            elif len(self._head) > _HEAD_LIMIT:
                self._head = None
        edge = self._carry + chunk[:_CARRY]
        if self.first_token is None and (_DELTA in chunk or _DELTA in edge):
            self.first_token = now
        if self._tail is not None:
            if self._tail_size < _TAIL_LIMIT:
                self._tail.append(chunk)
                self._tail_size += len(chunk)
        elif _EMBEDS_RESPONSE in chunk or _EMBEDS_RESPONSE in edge:
            if _TERMINALS[0] in chunk or _TERMINALS[0] in edge:
                self._tail = [self._carry, chunk]
                self._tail_size = len(chunk)
                self.terminal = True
            elif any(t in chunk or t in edge for t in _TERMINALS[1:]):
                self.terminal = True
        if not self.done and (_DONE in chunk or _DONE in edge):
            self.done = True
        self._carry = chunk[-_CARRY:]

    def usage(self) -> dict[str, Any] | None:
        """The ``usage`` object of ``response.completed``, or None."""
        if self._tail is None:
            return None
        blob = b"".join(self._tail)
        start = blob.find(_TERMINALS[0])
        idx = blob.find(b'"usage"', start) if start >= 0 else -1
        if idx < 0:
            return None
        i = blob.find(b"{", idx)
        if i < 0 or blob[idx + 7 : i].strip() != b":":
            return None
        return object_at(blob, i)


async def _pipe(
    request: web.Request,
    engine: Engine,
    call: Call,
    lease: Lease,
    resp: UpstreamResponse,
    response: web.StreamResponse | None,
    store: bool,
) -> web.StreamResponse:
    """Forward the node's events unchanged; note the id, the first token and the usage as they pass."""
    if response is None:
        response = web.StreamResponse(status=resp.status, headers=SSE_HEADERS)
        response.headers.update(cortex_headers(call, resp.headers.get("x-request-id")))
        await response.prepare(request)
    call.status = resp.status
    scan = StreamScan()
    idle = engine.settings.gateway.stream_idle_timeout_s
    content = resp.content
    failed: str | None = None
    watch = IdleWatch(idle, resp.close)
    remembered = False
    try:
        while True:
            t0 = time.monotonic()
            try:
                chunk = await content.readany()
            except aiohttp.ClientError as exc:
                failed = (
                    f"{call.node} sent nothing for {idle:g} s"
                    if watch.fired
                    else f"{call.node} broke the stream: {exc or type(exc).__name__}"
                )
                call.status = 504 if watch.fired else 502
                break
            now = time.monotonic()
            watch.last = now
            call.upstream_s += now - t0
            if not chunk:
                if watch.fired:
                    failed = f"{call.node} sent nothing for {idle:g} s"
                    call.status = 504
                break
            scan.add(chunk, now)
            if not remembered and scan.response_id is not None:
                remembered = True
                if store:
                    _remember(engine, call, scan.response_id)
            await response.write(chunk)
        if failed is not None or not (scan.terminal or scan.done):
            message = failed or f"{call.node} ended the stream before the response completed"
            if failed is None:
                call.status = 502
            if scan.response_id is not None:
                await response.write(_failed_event(scan.response_id, call.model, message))
            else:
                await response.write(_error_event(message))
    except ConnectionResetError:
        call.status = 499
        resp.close()
        raise ClientGone(response) from None
    except asyncio.CancelledError:
        call.status = 499
        resp.close()
        raise
    finally:
        watch.cancel()
        resp.release()
        lease.release(failed=failed)
        call.first_byte = scan.first_token
        call.usage = scan.usage()
    return response


# -- retrieve, delete, cancel ---------------------------------------------------------------------------


async def _to_holder(request: web.Request, engine: Engine, keys: list[bytes], method: str, suffix: str) -> web.Response:
    """Send ``GET``/``DELETE``/``cancel`` of a response id to the node that holds it."""
    response_id = request.match_info["response_id"]
    try:
        check_api_key(request, keys)
        holder = engine.affinity.lookup(response_id)
        if holder is None:
            return _not_found(response_id)
        node = holder_node(engine, response_id, holder, serving=False)
    except CortexError as exc:
        return _error_for(exc, Call(api="openai", started=0.0))
    call = Call(api="openai", started=time.monotonic(), model=holder.model, node=node.name)
    url = f"{node.client.endpoint}{RESPONSES}/{quote(response_id, safe='')}{suffix}"
    timeout = aiohttp.ClientTimeout(total=engine.settings.gateway.first_byte_timeout_s)
    try:
        async with engine.session.request(
            method, url, headers=upstream_headers(request.headers.get("x-request-id")), timeout=timeout
        ) as resp:
            body = await resp.read()
            status = resp.status
            request_id = resp.headers.get("x-request-id")
    except (TimeoutError, aiohttp.ClientError) as exc:
        error = HolderUnavailable(
            f"node {node.name} holds response {response_id} and did not answer: {exc or type(exc).__name__}"
        )
        return _error_for(error, call)
    headers = cortex_headers(call, request_id)
    if method == "DELETE" and status in (200, 404):
        engine.affinity.forget(response_id)
    if status >= 400:
        info = read_node_error(status, body)
        code = "response_not_found" if status == 404 else None
        return openai_error(info.status, info.message, info.kind, code=code, headers=headers)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


# -- images and speech ----------------------------------------------------------------------------------

_IMAGE_FORMATS = {"url": "Url", "b64_json": "B64Json"}
_MEDIA_KINDS = {IMAGES: "diffusion", SPEECH: "speech"}
_SIZE = re.compile(r"^(\d{2,5})x(\d{2,5})$")


def _media_body(path: str, data: dict[str, Any], model: str) -> bool:
    """Check the request and adapt OpenAI's spellings to mistral.rs's; True when the body changed.

    mistral.rs reads ``response_format`` of images as its Rust enum (``Url``, ``B64Json``) and wants
    ``height``/``width`` instead of OpenAI's ``size``: an OpenAI client's ``b64_json`` or ``1024x1024`` is
    rewritten rather than refused.

    Raises:
        BadRequest: naming the field.
    """
    field = "prompt" if path == IMAGES else "input"
    value = data.get(field)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"`{field}` is required and must be a non-empty string", param=field)
    changed = False
    if data.get("model") != model:
        data["model"] = model
        changed = True
    if path == IMAGES:
        fmt = data.get("response_format")
        if isinstance(fmt, str) and fmt in _IMAGE_FORMATS:
            data["response_format"] = _IMAGE_FORMATS[fmt]
            changed = True
        size = data.get("size")
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is not None and "width" not in data and "height" not in data:
            data["width"], data["height"] = int(match.group(1)), int(match.group(2))
            changed = True
    return changed


async def _media(request: web.Request, engine: Engine, call: Call, path: str, keys: list[bytes]) -> web.StreamResponse:
    try:
        check_api_key(request, keys)
        raw, data = await read_json(request, engine.settings.gateway.max_body_mb)
        _name, call.model = resolve_model(engine, data)
        kind, want = engine.kinds.of(call.model), _MEDIA_KINDS[path]
        if kind is not None and kind != want:  # known only when the nodes say it
            raise BadRequest(f"{call.model} is a {kind} model; {path} needs a {want} model", param="model")
        if _media_body(path, data, call.model):
            raw = orjson.dumps(data)
        headers = upstream_headers(request.headers.get("x-request-id"))
        lease, resp = await send(engine, call, path, raw, headers)
    except CortexError as exc:
        call.status = exc.status
        return openai_error_for(exc, cortex_headers(call) if call.node else None)
    except NodeReplyError as exc:
        call.status = exc.info.status
        return openai_error(
            exc.info.status, exc.info.message, exc.info.kind, headers=cortex_headers(call, exc.request_id)
        )
    except (ClientGone, ConnectionResetError):
        raise  # the client is gone: counted() records it, there is no one to answer
    except Exception:
        return _internal_error(request, call)
    return await _copy_body(request, engine, call, lease, resp)


async def _copy_body(
    request: web.Request, engine: Engine, call: Call, lease: Lease, resp: UpstreamResponse
) -> web.StreamResponse:
    """Copy a (JSON or binary) answer chunk by chunk, with the node's content type and length."""
    response = web.StreamResponse(status=resp.status)
    response.headers["Content-Type"] = resp.headers.get("content-type") or "application/octet-stream"
    response.headers.update(cortex_headers(call, resp.headers.get("x-request-id")))
    length = resp.headers.get("content-length")
    if length is not None and length.isdigit():
        response.content_length = int(length)
    call.status = resp.status
    idle = engine.settings.gateway.stream_idle_timeout_s
    watch = IdleWatch(idle, resp.close)
    failed: str | None = None
    try:
        await response.prepare(request)
        while True:
            t0 = time.monotonic()
            try:
                chunk = await resp.content.readany()
            except aiohttp.ClientError as exc:
                failed = f"{call.node} sent nothing for {idle:g} s" if watch.fired else f"{call.node}: {exc}"
                break
            now = time.monotonic()
            watch.last = now
            call.upstream_s += now - t0
            if not chunk:
                break
            if call.first_byte is None:
                call.first_byte = now
            await response.write(chunk)
        if failed is not None:
            # A binary body cannot carry an error: cut the connection so the client sees it incomplete.
            call.status = 504 if watch.fired else 502
            if request.transport is not None:
                request.transport.close()
    except ConnectionResetError:
        call.status = 499
        resp.close()
        raise ClientGone(response) from None
    except asyncio.CancelledError:
        call.status = 499
        resp.close()
        raise
    finally:
        watch.cancel()
        resp.release()
        lease.release(failed=failed)
    return response
