"""The OpenAI dialect: chat completions, completions, embeddings and the merged model list.

The hot path is a pass-through: the client's bytes go to the node unchanged unless cortex must rewrite
them (an alias or a missing model becomes the real id, a ``developer`` role becomes ``system``), and the
node's stream is forwarded chunk by chunk as it arrives, never parsed. The usage for metrics is found once
at the end in the stream's tail (:class:`~cortex.proxy.forward.UsageTail`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from cortex.engine.upstream import UpstreamResponse
from cortex.errors import BadRequest, CortexError, UpstreamError
from cortex.proxy.common import (
    SSE_HEADERS,
    ClientGone,
    WaitFailed,
    acquire_streaming,
    check_api_key,
    cortex_headers,
    cortex_lines,
    counted,
    read_json,
    resolve_model,
)
from cortex.proxy.errors import openai_error, openai_error_for
from cortex.proxy.fast import FastStream, WholeAnswer, open_stream
from cortex.proxy.forward import Call, IdleWatch, NodeReplyError, UsageTail, read_body, send, upstream_headers

if TYPE_CHECKING:
    from cortex.engine.engine import Engine
    from cortex.engine.lifecycle import Lease

__all__ = ["handle_openai", "models_payload", "validate_openai"]

log = logging.getLogger(__name__)

_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "top_k", "top_logprobs")
_NUM_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "stream": ((bool,), "a boolean"),
    "stop": ((str, list), "a string or an array of strings"),
    "stream_options": ((dict,), "an object"),
    **{key: ((int,), "an integer") for key in _INT_FIELDS},
    **{key: ((int, float), "a number") for key in _NUM_FIELDS},
}
"""The typed top-level fields: (accepted types, how the error names them)."""


def _check_type(data: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> None:
    value = data.get(key)
    if value is None:
        return
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise BadRequest(f"`{key}` must be {what}, not {type(value).__name__}", param=key)


def validate_openai(path: str, data: dict[str, Any]) -> None:
    """Reject wrong field types with a 400 before any node sees them.

    Raises:
        BadRequest: naming the field.
    """
    for key, value in data.items():  # the fields the request has (a few), not every typed field
        spec = _FIELD_TYPES.get(key)
        if spec is not None and value is not None:
            _check_type(data, key, *spec)
    for key in ("max_tokens", "max_completion_tokens", "n"):
        value = data.get(key)
        if isinstance(value, int) and value < 1:
            raise BadRequest(f"`{key}` must be at least 1", param=key)
    if path == "/v1/chat/completions":
        messages = data.get("messages")
        if messages is None:
            raise BadRequest("`messages` is required", param="messages")
        if not isinstance(messages, (list, str)) or not messages:
            raise BadRequest("`messages` must be a non-empty array", param="messages")
        if isinstance(messages, list):
            for i, msg in enumerate(messages):
                if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                    raise BadRequest(f"`messages[{i}]` must be an object with a string `role`", param="messages")
        _check_type(data, "tools", (list,), "an array")
    elif path == "/v1/completions":
        prompt = data.get("prompt")
        if prompt is None:
            raise BadRequest("`prompt` is required", param="prompt")
        _check_type(data, "prompt", (str, list), "a string or an array")
    elif path == "/v1/embeddings":
        value = data.get("input")
        if value is None or value == "" or value == []:
            raise BadRequest("`input` is required and must not be empty", param="input")
        _check_type(data, "input", (str, list), "a string or an array")


def _rewrite(data: dict[str, Any], name: str, model: str, max_output_tokens: int | None = None) -> bool:
    """Adjust the body for the node in place; True when it changed.

    An ask for more output tokens than the model's ``[[models]].max_output_tokens`` is clamped to it.
    """
    changed = False
    if data.get("model") != model:
        data["model"] = model
        changed = True
    if max_output_tokens is not None:
        for key in ("max_tokens", "max_completion_tokens"):
            value = data.get(key)
            if isinstance(value, int) and value > max_output_tokens:
                data[key] = max_output_tokens
                changed = True
    messages = data.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if msg.get("role") == "developer":
                msg["role"] = "system"
                changed = True
    return changed


def _include_usage(data: dict[str, Any]) -> bool:
    opts = data.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def models_payload(engine: Engine) -> dict[str, Any]:
    """The merged catalogue in the OpenAI list shape, with cortex's per-model facts."""
    snap = engine.snapshot()
    created = int(snap.started_at)
    data = [
        {
            "id": m.id,
            "object": "model",
            "created": created,
            "owned_by": "cortex",
            "cortex": {
                "nodes": list(m.nodes),
                "listed_on": list(m.listed_on),
                "state": m.state,
                "pinned": m.pinned,
                "aliases": list(m.aliases),
            },
        }
        for m in snap.models
    ]
    for m, entry in zip(snap.models, data, strict=True):  # what the nodes say a model is, when they say it
        kind = engine.kinds.of(m.id)
        if kind is not None:
            entry["kind"] = kind
    return {"object": "list", "data": data}


async def handle_openai(
    request: web.Request, engine: Engine, path: str, keys: list[bytes]
) -> web.StreamResponse | WholeAnswer:
    """Serve one OpenAI-dialect inference request, and count it."""
    call = Call(api="openai", started=time.monotonic())
    return await counted(engine, call, _openai(request, engine, call, path, keys))


async def _openai(
    request: web.Request, engine: Engine, call: Call, path: str, keys: list[bytes]
) -> web.StreamResponse | WholeAnswer:
    try:
        check_api_key(request, keys)
        gateway = engine.settings.gateway
        raw, data = await read_json(request, gateway.max_body_mb, gateway.header_timeout_s)
        validate_openai(path, data)
        name, call.model = resolve_model(engine, data)
        facts = engine.settings.model_facts(call.model)
        if _rewrite(data, name, call.model, facts.max_output_tokens if facts else None):
            raw = orjson.dumps(data)
        call.stream = data.get("stream") is True and path != "/v1/embeddings"
        headers = upstream_headers(request.headers.get("x-request-id"))
        if call.stream:
            return await _stream(request, engine, call, path, raw, headers, _include_usage(data))
        return await _unary(engine, call, path, raw, headers)
    except CortexError as exc:
        call.status = exc.status
        return openai_error_for(exc, cortex_headers(call) if call.node else None)
    except NodeReplyError as exc:
        call.status = exc.info.status
        headers = cortex_headers(call, exc.request_id)
        return openai_error(exc.info.status, exc.info.message, exc.info.kind, headers=headers)
    except (ClientGone, ConnectionResetError):
        raise  # the client is gone: counted() records it, there is no one to answer
    except Exception:
        # A bug, not the client's fault: the lease was released by its owner (send, read_body, _pipe);
        # the client still gets an answer in its dialect, and the traceback goes to the log once.
        log.exception("internal error serving %s %s", request.method, request.path)
        call.status = 500
        return openai_error(500, "internal error in cortex (see the gateway's log)", "server_error")


async def _unary(engine: Engine, call: Call, path: str, raw: bytes, headers: dict[str, str]) -> WholeAnswer:
    lease, resp = await send(engine, call, path, raw, headers)
    body = await read_body(engine, call, lease, resp)
    call.first_byte = time.monotonic()
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"{call.node} answered something that is not JSON") from None
    call.status = resp.status
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    call.usage = usage if isinstance(usage, dict) else None
    return WholeAnswer(resp.status, body, cortex_lines(call, resp.headers.get("x-request-id")))


def _openai_notice(model: str, node: str, elapsed: float) -> bytes:
    if not node:  # no load runs: it waits for a node that serves it to take requests again (a drain, a restart)
        return f": waiting for {model} ({int(elapsed)} s)\n\n".encode()
    return f": loading {model} on {node} ({int(elapsed)} s)\n\n".encode()


def _error_event(message: str, kind: str = "server_error") -> bytes:
    payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return b"data: " + orjson.dumps(payload) + b"\n\ndata: [DONE]\n\n"


async def _stream(
    request: web.Request,
    engine: Engine,
    call: Call,
    path: str,
    raw: bytes,
    headers: dict[str, str],
    include_usage: bool,
) -> web.StreamResponse:
    try:
        lease, response = await acquire_streaming(engine, call, request, _openai_notice)
    except WaitFailed as exc:
        call.status = exc.error.status
        await exc.response.write(_error_event(exc.error.message))
        return exc.response
    call.queue_s = lease.queue_s
    try:
        lease, resp = await send(engine, call, path, raw, headers, lease)
    except (CortexError, NodeReplyError) as exc:
        if response is None:
            raise
        info = exc.info if isinstance(exc, NodeReplyError) else None
        call.status = info.status if info else exc.status  # type: ignore[union-attr]
        await response.write(_error_event(info.message if info else str(exc)))
        return response
    return await _pipe(request, engine, call, lease, resp, response, include_usage)


async def _pipe(
    request: web.Request,
    engine: Engine,
    call: Call,
    lease: Lease,
    resp: UpstreamResponse,
    response: web.StreamResponse | None,
    include_usage: bool,
) -> web.StreamResponse:
    """Forward the node's stream chunk by chunk; find the usage in the tail at the end.

    Owns ``lease`` and ``resp`` from its first line: both are released whatever happens, the opening of
    the client's stream included (a client gone by then is a reset there).
    """
    tail = UsageTail()
    idle = engine.settings.gateway.stream_idle_timeout_s
    failed: str | None = None
    watch = IdleWatch(idle, resp.close)
    opened = response is not None
    if response is None:
        response = open_stream(request, resp.status, SSE_HEADERS)
        response.headers.update(cortex_headers(call, resp.headers.get("x-request-id")))
    try:
        if not opened:
            await response.prepare(request)
        call.status = resp.status
        if isinstance(response, FastStream):
            failed = await _splice(call, resp, response, tail, include_usage, watch, idle)
        else:
            failed = await _relay(call, resp, response, tail, include_usage, watch, idle)
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
        call.usage = tail.usage()
    return response


def _with_usage(chunk: bytes, tail: UsageTail) -> bytes:
    """Insert OpenAI's usage-only chunk (``choices: []``) before ``[DONE]``, as ``include_usage`` asks."""
    idx = chunk.find(b"data:[DONE]")
    if idx < 0:
        idx = chunk.find(b"data: [DONE]")
    usage = tail.usage()
    if idx < 0 or usage is None:
        return chunk
    # Every chunk carries id, created and model: the openai SDK's stream helper skips chunks without them.
    extra = {**tail.identity(), "object": "chat.completion.chunk", "choices": [], "usage": usage}
    return chunk[:idx] + b"data: " + orjson.dumps(extra) + b"\n\n" + chunk[idx:]


async def _relay(
    call: Call,
    resp: UpstreamResponse,
    response: web.StreamResponse,
    tail: UsageTail,
    include_usage: bool,
    watch: IdleWatch,
    idle: float,
) -> str | None:
    """Read the node's stream chunk by chunk and write each to the client (aiohttp's front); the failure."""
    content = resp.content
    while True:
        t0 = time.monotonic()
        try:
            chunk = await content.readany()
        except aiohttp.ClientError as exc:
            return await _broken(call, response, watch, idle, exc)
        now = time.monotonic()
        watch.last = now
        call.upstream_s += now - t0
        if not chunk:
            return await _broken(call, response, watch, idle, None) if watch.fired else None
        if call.first_byte is None:
            call.first_byte = now
        tail.add(chunk)
        await response.write(_with_usage(chunk, tail) if include_usage and b"[DONE]" in chunk else chunk)


async def _splice(
    call: Call,
    resp: UpstreamResponse,
    response: FastStream,
    tail: UsageTail,
    include_usage: bool,
    watch: IdleWatch,
    idle: float,
) -> str | None:
    """The fast front's stream: each chunk goes to the client inside the node's read callback; the failure.

    No task wakes per chunk (``UpstreamResponse.splice``); this coroutine only waits for the end. When the
    client's transport is full, reading from the node pauses until it drains.

    Raises:
        ConnectionResetError: the client went away.
    """
    gone = False

    def sink(chunk: bytes) -> None:
        nonlocal gone
        now = time.monotonic()
        watch.last = now
        if call.first_byte is None:
            call.first_byte = now
        tail.add(chunk)
        if gone:
            return
        try:
            response.send(_with_usage(chunk, tail) if include_usage and b"[DONE]" in chunk else chunk)
        except ConnectionResetError:
            gone = True
            resp.close()
            return
        if response.full:
            resp.hold()
            response.when_drained(resp.unhold)

    t0 = time.monotonic()
    resp.splice(sink)
    try:
        rest = await resp.content.readany()  # b"" at the end: every byte went through the sink
    except aiohttp.ClientError as exc:
        if gone:
            raise ConnectionResetError("the client closed the connection") from None
        return await _broken(call, response, watch, idle, exc)
    finally:
        call.upstream_s += time.monotonic() - t0
    if gone:
        raise ConnectionResetError("the client closed the connection")
    if rest:
        sink(rest)
    return await _broken(call, response, watch, idle, None) if watch.fired else None


async def _broken(
    call: Call, response: web.StreamResponse, watch: IdleWatch, idle: float, exc: aiohttp.ClientError | None
) -> str:
    """End a stream the node broke (or that went silent): an error event to the client; the failure."""
    if watch.fired:
        failed = f"{call.node} sent nothing for {idle:g} s"
        call.status = 504
    else:
        failed = f"{call.node} broke the stream: {exc or type(exc).__name__}"
        call.status = 502
    with contextlib.suppress(ConnectionResetError):  # the node's failure counts, whether or not the client hears it
        await response.write(_error_event(failed))
    return failed
