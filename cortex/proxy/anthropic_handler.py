"""The Anthropic dialect on the wire: ``/v1/messages``, ``/v1/messages/count_tokens``, the models list.

The translation itself is pure and lives in :mod:`cortex.proxy.anthropic`; this module does the I/O around
it with the same machinery as the OpenAI handlers (lease, send, failover, waiting for loads), so the two
dialects cannot drift. What is Anthropic-specific here: the envelope and statuses of errors (a full queue is
529 ``overloaded_error``, an unreachable node 502 ``api_error``), ``message_start`` and ``ping`` events while
a model loads, a ``ping`` whenever the node is silent for :data:`PING_S`, and an ``error`` event (and nothing
after it) when the node fails mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import orjson
from aiohttp import web

from cortex.engine.upstream import UpstreamResponse
from cortex.errors import BadRequest, CortexError, PayloadTooLarge, Unauthorized, UnknownModel
from cortex.proxy.anthropic import (
    DONE,
    AnthropicError,
    OpenAIRequest,
    SSEDecoder,
    StreamTranslator,
    classify_upstream_error,
    count_tokens,
    encode_event,
    envelope,
    models_list,
    parse_data,
    parse_data_bytes,
    to_anthropic_message,
    to_openai,
    upstream_chunk_error,
)
from cortex.proxy.anthropic.errors import error_from_type
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
    shorten,
    unreachable,
)
from cortex.proxy.fast import FastRequest, FastStream, Handler, WholeAnswer, open_stream
from cortex.proxy.forward import Call, IdleWatch, NodeReplyError, read_body, send, upstream_headers

if TYPE_CHECKING:
    from cortex.engine.engine import Engine
    from cortex.engine.lifecycle import Lease

__all__ = ["PING_S", "add_anthropic_routes", "anthropic_error_response", "anthropic_models"]

log = logging.getLogger(__name__)

PING_S = 10.0
"""A stream hears a ``ping`` at least this often while the node is silent."""
TRANSLATE_INLINE_MAX = 1024 * 1024
"""Request bodies at least this large are translated in a worker thread, off the loop."""
_COUNT_ANSWER_MAX = 64 * 1024
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_COUNT_TOKENS_TIMEOUT_S = 5.0


def anthropic_error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the Anthropic envelope ``{"type": "error", "error": {"type", "message"}}``."""
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def _from_cortex(exc: CortexError) -> AnthropicError:
    """Map cortex's own errors onto Anthropic's types and statuses (§1.5)."""
    retry = str(int(exc.retry_after)) if exc.retry_after is not None else None
    if isinstance(exc, Unauthorized):
        return AnthropicError(401, "authentication_error", exc.message, should_retry=False)
    if isinstance(exc, PayloadTooLarge):
        return AnthropicError(413, "request_too_large", exc.message, should_retry=False)
    if isinstance(exc, UnknownModel):
        return AnthropicError(404, "not_found_error", exc.message, should_retry=False)
    if isinstance(exc, BadRequest):
        return AnthropicError(400, "invalid_request_error", exc.message, should_retry=False)
    if exc.status == 408:  # the client's body stalled
        return AnthropicError(408, "invalid_request_error", exc.message, should_retry=False)
    if exc.status == 503 and not exc.retryable:  # e.g. a model too large for every node: never overloaded
        return AnthropicError(503, "api_error", exc.message, should_retry=False)
    if exc.status == 503:
        return AnthropicError(529, "overloaded_error", exc.message, should_retry=True, retry_after=retry)
    if exc.status == 504:
        return AnthropicError(504, "timeout_error", exc.message, should_retry=True)
    return AnthropicError(502, "api_error", exc.message, should_retry=True)


def _from_node(exc: NodeReplyError, estimate: int) -> AnthropicError:
    info = exc.info
    return classify_upstream_error(info.node_status, {"message": info.message}, prompt_tokens_estimate=estimate)


def _respond(err: AnthropicError, extra: dict[str, str] | None = None) -> web.Response:
    headers = err.headers()
    if extra:
        headers.update(extra)
    return web.Response(
        status=err.status, body=orjson.dumps(envelope(err)), content_type="application/json", headers=headers
    )


def _error_event(err: AnthropicError) -> bytes:
    return b"event: error\ndata: " + orjson.dumps(envelope(err)) + b"\n\n"


def anthropic_models(engine: Engine, query: Any = None) -> dict[str, Any]:
    """The served models in the Anthropic list shape (paged like the real API)."""
    query = query or {}
    limit = query.get("limit")
    return models_list(
        engine.served_models(),
        after_id=query.get("after_id"),
        before_id=query.get("before_id"),
        limit=int(limit) if limit and str(limit).isdigit() else None,
    )


def _model_of(engine: Engine, data: dict[str, Any]) -> tuple[str, str]:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("model: field required (a non-empty string)")
    model = engine.resolve(name)
    if (down := unreachable(engine, name, model)) is not None:
        raise down
    if model is None:
        served = ", ".join(engine.served_models()) or "none"
        raise UnknownModel(f"model: {shorten(name)} is not served by this gateway; available models: {served}")
    return name, model


async def handle_messages(request: web.Request, engine: Engine, keys: list[bytes]) -> web.StreamResponse | WholeAnswer:
    """Serve ``POST /v1/messages`` (streaming or not), and count it."""
    call = Call(api="anthropic", started=time.monotonic())
    return await counted(engine, call, _messages(request, engine, call, keys))


async def _messages(
    request: web.Request, engine: Engine, call: Call, keys: list[bytes]
) -> web.StreamResponse | WholeAnswer:
    estimate = 1
    try:
        check_api_key(request, keys)
        gateway = engine.settings.gateway
        raw, data = await read_json(request, gateway.max_body_mb, gateway.header_timeout_s)
        name, call.model = _model_of(engine, data)
        facts = engine.settings.model_facts(call.model)
        translate = functools.partial(
            to_openai, data, upstream_model=call.model, max_output_tokens=facts.max_output_tokens if facts else None
        )
        # A large body takes a while to translate (about 10 ms per MB of many small messages): in a thread,
        # the loop keeps serving other clients between the translation's slices of the GIL.
        translated = translate() if len(raw) < TRANSLATE_INLINE_MAX else await asyncio.to_thread(translate)
        estimate = translated.input_tokens_estimate
        for warning in translated.warnings:
            log.info("anthropic request for %s: %s", name, warning)
        call.stream = translated.stream
        body = orjson.dumps(translated.body)
        headers = upstream_headers(request.headers.get("x-request-id"))
        if translated.stream:
            return await _stream(request, engine, call, name, translated, body, headers)
        return await _unary(engine, call, name, translated, body, headers)
    except AnthropicError as exc:
        call.status = exc.status
        return _respond(exc)
    except CortexError as exc:
        mapped = _from_cortex(exc)
        call.status = mapped.status
        return _respond(mapped, cortex_headers(call) if call.node else None)
    except NodeReplyError as exc:
        mapped = _from_node(exc, estimate)
        call.status = mapped.status
        return _respond(mapped, cortex_headers(call))
    except (ClientGone, ConnectionResetError):
        raise  # the client is gone: counted() records it, there is no one to answer
    except Exception:
        # A bug, not the client's fault: the lease was released by its owner (send, read_body, _translate);
        # the client still gets an answer in its dialect, and the traceback goes to the log once.
        log.exception("internal error serving %s %s", request.method, request.path)
        call.status = 500
        return anthropic_error_response(500, "api_error", "internal error in cortex (see the gateway's log)")


async def _unary(
    engine: Engine, call: Call, name: str, req: OpenAIRequest, body: bytes, headers: dict[str, str]
) -> WholeAnswer:
    lease, resp = await send(engine, call, "/v1/chat/completions", body, headers)
    raw = await read_body(engine, call, lease, resp)
    call.first_byte = time.monotonic()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AnthropicError(502, "api_error", f"{call.node} answered something that is not JSON") from None
    if not isinstance(parsed, dict):
        raise AnthropicError(502, "api_error", f"{call.node} answered an unexpected body")
    usage = parsed.get("usage")
    call.usage = usage if isinstance(usage, dict) else None
    message = to_anthropic_message(
        parsed,
        model=name,
        stop_sequences=req.stop_sequences,
        thinking=req.thinking,
        tool_aliases=req.tool_aliases,
        input_tokens_estimate=req.input_tokens_estimate,
    )
    call.status = 200
    return WholeAnswer(200, orjson.dumps(message), cortex_lines(call, resp.headers.get("x-request-id")))


def _load_notice(tr: StreamTranslator) -> Callable[[str, str, float], bytes]:
    """While a model loads: ``message_start`` once (Anthropic streams must open with it), then pings."""

    def notice(_model: str, _node: str, _elapsed: float) -> bytes:
        opening = b"".join(encode_event(e) for e in tr.start()) if not tr.started else b""
        return opening + _PING

    return notice


async def _stream(
    request: web.Request,
    engine: Engine,
    call: Call,
    name: str,
    req: OpenAIRequest,
    body: bytes,
    headers: dict[str, str],
) -> web.StreamResponse:
    tr = StreamTranslator(
        model=name,
        stop_sequences=req.stop_sequences,
        input_tokens_estimate=req.input_tokens_estimate,
        thinking=req.thinking,
        tool_aliases=req.tool_aliases,
    )
    try:
        lease, response = await acquire_streaming(engine, call, request, _load_notice(tr))
    except WaitFailed as exc:
        err = _from_cortex(exc.error)
        call.status = err.status
        await exc.response.write(_error_event(err))
        return exc.response
    call.queue_s = lease.queue_s

    async def send_with_pings() -> tuple[Lease, UpstreamResponse]:
        """:func:`send`, with pings while the node has not answered yet.

        A node that takes longer than :data:`PING_S` to send its headers (a long prefill) does not leave
        the client in silence: the stream opens (``message_start``) and hears a ``ping`` every
        :data:`PING_S` until the node's headers arrive.
        """
        nonlocal response
        task = asyncio.ensure_future(send(engine, call, "/v1/chat/completions", body, headers, lease))
        try:
            while not (await asyncio.wait({task}, timeout=PING_S))[0]:
                if response is None:
                    response = await _open(request, call, None)
                await response.write(b"".join(encode_event(e) for e in tr.start()) + _PING)
        except BaseException as exc:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                got_lease, got_resp = await task
                got_resp.close()
                got_lease.release()
            lease.release()  # idempotent; send() does not release its lease when cancelled
            if isinstance(exc, ConnectionResetError) and response is not None:
                call.status = 499
                raise ClientGone(response) from None
            raise
        return task.result()

    try:
        lease, resp = await send_with_pings()
    except (CortexError, NodeReplyError) as exc:
        if response is None:
            raise
        err = _from_node(exc, req.input_tokens_estimate) if isinstance(exc, NodeReplyError) else _from_cortex(exc)
        call.status = err.status
        await response.write(_error_event(err))
        return response
    try:
        if isinstance(request, FastRequest):
            return await _translate_spliced(request, engine, call, tr, lease, resp, response, req.input_tokens_estimate)
        return await _translate(request, engine, call, tr, lease, resp, response, req.input_tokens_estimate)
    finally:
        resp.release()


async def _translate(
    request: web.Request,
    engine: Engine,
    call: Call,
    tr: StreamTranslator,
    lease: Lease,
    resp: UpstreamResponse,
    response: web.StreamResponse | None,
    estimate: int,
) -> web.StreamResponse:
    """Read the node's SSE, translate chunk by chunk, ping through silences."""
    decoder = SSEDecoder()
    idle = engine.settings.gateway.stream_idle_timeout_s
    silent_since = time.monotonic()
    failed: str | None = None
    saw_done = False
    call.status = 200
    # One timer per silence, not an ``asyncio.timeout`` per read (that cost ~3 µs a chunk): the watch pokes
    # the pending read once the node has been silent for a ping interval (or the rest of the idle timeout).
    watch = IdleWatch(min(PING_S, idle), resp.poke)
    try:
        while not tr.done and not saw_done:
            t0 = time.monotonic()
            try:
                raw = await resp.next_or_poke()
            except aiohttp.ClientError as exc:
                failed = f"{call.node} broke the stream: {exc or type(exc).__name__}"
                break
            now = time.monotonic()
            call.upstream_s += now - t0
            if raw is None:  # poked: a silence
                if now - silent_since >= idle:
                    failed = f"{call.node} sent nothing for {idle:g} s"
                    break
                if response is None:
                    response = await _open(request, call, resp)
                await response.write(b"".join(encode_event(e) for e in tr.start()) + _PING)
                watch = IdleWatch(min(PING_S, max(0.01, idle - (time.monotonic() - silent_since))), resp.poke)
                continue
            watch.last = now
            if watch.fired:  # it poked while bytes were arriving: the bytes won, watch the next silence
                watch = IdleWatch(min(PING_S, idle), resp.poke)
            if not raw:
                break
            silent_since = now
            out, saw_done, early = _piece(decoder, tr, call, raw, estimate, opened=response is not None)
            if early is not None:
                raise _EarlyError(early)
            if out:
                if response is None:
                    response = await _open(request, call, resp)
                if call.first_byte is None:
                    call.first_byte = time.monotonic()
                await response.write(b"".join(out))
        response = await _conclude(request, call, tr, resp, response, failed, saw_done)
    except _EarlyError as early:
        lease.release(failed=failed)
        lease = None  # type: ignore[assignment]
        call.status = early.error.status
        return _respond(early.error, cortex_headers(call))
    except ConnectionResetError:
        call.status = 499
        resp.close()
        if response is None:
            raise
        raise ClientGone(response) from None
    except asyncio.CancelledError:
        call.status = 499
        resp.close()
        raise
    finally:
        watch.cancel()
        if lease is not None:
            lease.release(failed=failed)
    return response


def _piece(
    decoder: SSEDecoder, tr: StreamTranslator, call: Call, raw: bytes, estimate: int, *, opened: bool
) -> tuple[list[bytes], bool, AnthropicError | None]:
    """Decode and translate one piece of the node's stream.

    Returns:
        The encoded Anthropic events, whether the node's ``[DONE]`` came, and the error to answer with
        instead of a stream (an error as the node's first event, while nothing was sent: ``opened`` False).
    """
    one = decoder.one_data(raw)  # the usual read, one chunk: taken from bytes, no line search
    if one is not None:
        encoded = tr.text_delta_bytes(one)  # the usual chunk, recognised without parsing it
        if encoded is not None:
            return [encoded], False, None
    out: list[bytes] = []
    chunks = (parse_data(name, data) for name, data in decoder.feed(raw)) if one is None else (parse_data_bytes(one),)
    for chunk in chunks:
        if chunk is DONE:
            return out, True, None
        if not isinstance(chunk, dict):
            continue
        if not opened and not tr.started and (err := upstream_chunk_error(chunk, prompt_tokens_estimate=estimate)):
            return out, False, err
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            call.usage = usage
        encoded = tr.text_delta(chunk)  # the usual chunk, straight to bytes
        if encoded is not None:
            out.append(encoded)
            continue
        events = tr.feed(chunk)
        out.extend(encode_event(e) for e in events)
        if events and events[-1]["type"] == "error":
            call.status = error_from_type(events[-1]["error"]["type"], "").status
        if tr.done:
            break
    return out, False, None


async def _conclude(
    request: web.Request,
    call: Call,
    tr: StreamTranslator,
    resp: UpstreamResponse,
    response: web.StreamResponse | None,
    failed: str | None,
    saw_done: bool,
) -> web.StreamResponse:
    """End a translated stream: its closing events, or the error that ends it.

    Raises:
        _EarlyError: nothing reached the client yet (answered as a plain HTTP error instead).
    """
    if response is None and not tr.started and not saw_done:
        # Nothing reached the client yet: a plain HTTP error (which the SDKs retry) beats a stream
        # that is one lone ``error`` event without the ``message_start`` the grammar requires.
        message = failed or f"{call.node} ended the stream before sending anything"
        raise _EarlyError(AnthropicError(502, "api_error", message, should_retry=True))
    tail = tr.error(failed) if failed else tr.finish(saw_done=saw_done)
    if response is None:
        response = await _open(request, call, resp)
    if tail:
        await response.write(b"".join(encode_event(e) for e in tail))
    if failed or (tail and tail[-1].get("type") == "error"):
        call.status = 502
    return response


class _Splice:
    """The fast front's Anthropic stream, translated inside the node's read callback.

    The same steps as :func:`_translate`'s loop, with no task wake-up per chunk
    (``UpstreamResponse.splice``): each upstream chunk is decoded, translated and written to the client's
    transport as it is parsed; silences get their pings from the idle timer's callback. :attr:`ended`
    resolves when the translation is done (the node's ``[DONE]``, an early error, a silence past the
    idle timeout, or the client gone); the coroutine then concludes as the loop does.
    """

    def __init__(
        self,
        request: FastRequest,
        call: Call,
        tr: StreamTranslator,
        resp: UpstreamResponse,
        response: web.StreamResponse | None,
        estimate: int,
        idle: float,
    ) -> None:
        self.request = request
        self.call = call
        self.tr = tr
        self.resp = resp
        self.response = cast("FastStream | None", response)
        self.estimate = estimate
        self.idle = idle
        self.decoder = SSEDecoder()
        self.failed: str | None = None
        self.saw_done = False
        self.early: AnthropicError | None = None
        self.gone = False
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.silent_since = time.monotonic()
        self.watch = IdleWatch(min(PING_S, idle), self.silence)

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def sink(self, raw: bytes) -> None:
        """One piece of the node's stream (called by the upstream connection as it is parsed)."""
        if self.ended.done():
            return
        call, tr = self.call, self.tr
        now = time.monotonic()
        self.watch.last = now
        self.silent_since = now
        out, self.saw_done, self.early = _piece(
            self.decoder, tr, call, raw, self.estimate, opened=self.response is not None
        )
        if self.early is not None:
            self.end()
            return
        if out:
            if call.first_byte is None:
                call.first_byte = time.monotonic()
            self.send(b"".join(out))
        if tr.done or self.saw_done:
            self.end()

    def send(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            if self.response is None:
                self.response = FastStream(self.request, 200, SSE_HEADERS)
                self.response.headers.update(cortex_headers(self.call, self.resp.headers.get("x-request-id")))
                self.response.open()
            self.response.send(data)
        except ConnectionResetError:
            self.gone = True
            self.resp.close()
            self.end()
            return
        if self.response.full:
            self.resp.hold()
            self.response.when_drained(self.resp.unhold)

    def silence(self) -> None:
        """The idle timer's callback: a ping, or the end when the node has been silent too long."""
        if self.ended.done():
            return
        silent = time.monotonic() - self.silent_since
        if silent >= self.idle:
            self.failed = f"{self.call.node} sent nothing for {self.idle:g} s"
            self.end()
            return
        self.send(b"".join(encode_event(e) for e in self.tr.start()) + _PING)
        self.watch = IdleWatch(min(PING_S, max(0.01, self.idle - silent)), self.silence)


async def _translate_spliced(
    request: FastRequest,
    engine: Engine,
    call: Call,
    tr: StreamTranslator,
    lease: Lease,
    resp: UpstreamResponse,
    response: web.StreamResponse | None,
    estimate: int,
) -> web.StreamResponse:
    """:func:`_translate` for the fast front (see :class:`_Splice`)."""
    call.status = 200
    job = _Splice(request, call, tr, resp, response, estimate, engine.settings.gateway.stream_idle_timeout_s)
    t0 = time.monotonic()
    resp.splice(job.sink)
    reading: asyncio.Future[Any] = asyncio.ensure_future(resp.content.readany())  # b"" at the end: all went to the sink
    ended: asyncio.Future[Any] = job.ended
    failed: str | None = None
    try:
        try:
            await asyncio.wait({reading, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            job.watch.cancel()
            call.upstream_s += time.monotonic() - t0
        if not job.ended.done():  # the node's stream ended (or broke) before the translation did
            try:
                reading.result()
            except aiohttp.ClientError as exc:
                job.failed = job.failed or f"{call.node} broke the stream: {exc or type(exc).__name__}"
        else:
            reading.cancel()
        failed = job.failed
        if job.gone:
            raise ConnectionResetError("the client closed the connection")
        if job.early is not None:
            raise _EarlyError(job.early)
        return await _conclude(cast(web.Request, request), call, tr, resp, job.response, failed, job.saw_done)
    except _EarlyError as early:
        lease.release(failed=failed)
        call.status = early.error.status
        return _respond(early.error, cortex_headers(call))
    except ConnectionResetError:
        call.status = 499
        resp.close()
        if job.response is None:
            raise
        raise ClientGone(job.response) from None
    except asyncio.CancelledError:
        call.status = 499
        resp.close()
        raise
    finally:
        if not reading.done():
            reading.cancel()
        lease.release(failed=failed)


class _EarlyError(Exception):
    """The node's first event was an error: answer with an HTTP error instead of a stream."""

    def __init__(self, error: AnthropicError) -> None:
        super().__init__(error.message)
        self.error = error


async def _open(request: web.Request, call: Call, resp: UpstreamResponse | None) -> web.StreamResponse:
    response = open_stream(request, 200, SSE_HEADERS)
    response.headers.update(cortex_headers(call, resp.headers.get("x-request-id") if resp is not None else None))
    await response.prepare(request)
    return response


async def handle_count_tokens(request: web.Request, engine: Engine, keys: list[bytes]) -> web.StreamResponse:
    """``POST /v1/messages/count_tokens``: the node's own count when it offers one, else cortex's estimate."""
    try:
        check_api_key(request, keys)
        gateway = engine.settings.gateway
        _, data = await read_json(request, gateway.max_body_mb, gateway.header_timeout_s)
        _, model = _model_of(engine, data)
    except CortexError as exc:
        return _respond(_from_cortex(exc))
    node = engine.lifecycle.route(model)
    if node is not None:
        upstream = dict(data, model=model)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with asyncio.timeout(_COUNT_TOKENS_TIMEOUT_S):
                async with engine.session.post(
                    node.client.endpoint + "/v1/messages/count_tokens",
                    data=orjson.dumps(upstream),
                    headers=upstream_headers(None),
                ) as resp:
                    if resp.status == 200 and (resp.content_length or 0) <= _COUNT_ANSWER_MAX:
                        answer = orjson.loads(await _read_small(resp.content, _COUNT_ANSWER_MAX))
                        counted = answer.get("input_tokens") if isinstance(answer, dict) else None
                        if isinstance(counted, int) and (counted > 0 or not data.get("messages")):
                            return web.json_response({"input_tokens": counted})
    try:
        return web.json_response(count_tokens(data))
    except AnthropicError as err:
        return _respond(err)


async def _read_small(content: aiohttp.StreamReader, limit: int) -> bytes:
    """At most ``limit`` bytes of a node's answer (a longer one is cut, and then fails to parse)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit and (data := await content.readany()):
        parts.append(data)
        size += len(data)
    return b"".join(parts)


def add_anthropic_routes(app: web.Application, engine: Engine, keys: list[bytes]) -> Handler:
    """Register the Anthropic routes (query strings such as ``?beta=true`` are ignored by routing).

    Returns:
        The ``/v1/messages`` handler, which the fast front serves too.
    """

    async def messages(request: web.Request) -> web.StreamResponse:
        answer = await handle_messages(request, engine, keys)
        return answer.to_response() if isinstance(answer, WholeAnswer) else answer

    async def tokens(request: web.Request) -> web.StreamResponse:
        return await handle_count_tokens(request, engine, keys)

    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", tokens)
    # the fast front calls the handler itself (no wrapper's frame) and writes a WholeAnswer as it is
    return functools.partial(handle_messages, engine=engine, keys=keys)
