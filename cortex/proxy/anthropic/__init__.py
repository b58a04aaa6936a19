"""The Anthropic Messages API on top of OpenAI-speaking backends: the pure translation layer.

Everything here is synchronous and free of I/O, so the gateway's handlers stay thin and every
rule is unit-tested without sockets. The pieces, in request order:

- :func:`to_openai` turns a Messages request into a Chat Completions body plus the context the
  response side needs (:class:`OpenAIRequest`), or raises :class:`AnthropicError` 400.
- :func:`to_anthropic_message` translates a non-streaming answer; :class:`StreamTranslator`
  translates a chunk stream into events, which :func:`encode_event` writes as SSE
  (:class:`SSEDecoder` and :func:`parse_data` read the upstream's stream).
- :func:`classify_upstream_error` / :func:`upstream_chunk_error` map node failures onto the
  Anthropic envelope (:func:`envelope`).
- :func:`count_tokens` and :func:`models_list` answer the two side endpoints.

Wiring a streaming ``POST /v1/messages`` (the gateway owns sockets, timers and headers)::

    req = to_openai(body, upstream_model=node_model, max_output_tokens=limit)  # AnthropicError -> HTTP
    for warning in req.warnings: log.warning(warning)
    tr = StreamTranslator(model=body["model"], stop_sequences=req.stop_sequences,
                          input_tokens_estimate=req.input_tokens_estimate, thinking=req.thinking,
                          tool_aliases=req.tool_aliases)
    # upstream answered >= 400: classify_upstream_error(status, raw) -> HTTP error, no stream
    for name, data in decoder.feed(raw_bytes):           # SSEDecoder; decoder.close() at EOF
        item = parse_data(name, data)
        if item is None: continue
        if item == DONE: events = tr.finish(saw_done=True)
        elif not tr.started and (err := upstream_chunk_error(item)): answer err as HTTP; stop
        else: events = tr.feed(item)
        write(b"".join(encode_event(e) for e in events)); if tr.done: close upstream; stop
    # on EOF: tr.finish(); every ~10 s of upstream silence: tr.ping() (also sends message_start)

A non-streaming client can be served the same way (``stream_upstream=True``) with
:func:`message_from_events` over the events, or from a plain upstream answer with
:func:`to_anthropic_message`.
"""

from .count_tokens import count_tokens, estimate_input_tokens
from .errors import (
    AnthropicError,
    classify_upstream_error,
    envelope,
    not_supported,
    overloaded,
    unreachable,
    upstream_chunk_error,
    upstream_timeout,
)
from .models import model_info, models_list
from .request import OpenAIRequest, to_openai
from .response import message_from_events, to_anthropic_message
from .sse import DONE, SSEDecoder, encode_event, encode_sse, parse_data, parse_data_bytes
from .stream import Event, StreamTranslator

__all__ = [
    "DONE",
    "AnthropicError",
    "Event",
    "OpenAIRequest",
    "SSEDecoder",
    "StreamTranslator",
    "classify_upstream_error",
    "count_tokens",
    "encode_event",
    "encode_sse",
    "envelope",
    "estimate_input_tokens",
    "message_from_events",
    "model_info",
    "models_list",
    "not_supported",
    "overloaded",
    "parse_data",
    "parse_data_bytes",
    "to_anthropic_message",
    "to_openai",
    "unreachable",
    "upstream_chunk_error",
    "upstream_timeout",
]
