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
from .response import to_anthropic_message
from .sse import DONE, SSEDecoder, encode_event, encode_sse, parse_data
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
    "model_info",
    "models_list",
    "not_supported",
    "overloaded",
    "parse_data",
    "to_anthropic_message",
    "to_openai",
    "unreachable",
    "upstream_chunk_error",
    "upstream_timeout",
]
