"""OpenAI ``chat.completion`` → Anthropic ``message`` (translation.md §3.3).

The SDKs do not validate response bodies: a tool ``input`` sent as a string or a missing
``usage`` parses silently and breaks the caller later. So the output here is always the strict
shape: blocks in the order thinking, text, tool_use; ``input`` always an object; ``stop_reason``
never null; usage always present (estimated when the node sent none). The stop-sequence,
argument and stop-reason rules are shared with the stream translator (``_common``), so a client
that retries a failed stream without streaming gets the same message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._common import (
    anthropic_usage,
    find_stop,
    new_id,
    normalize_arguments,
    stop_reason,
    tokens_for_bytes,
    utf8_len,
)
from .errors import error_from_type

__all__ = ["message_from_events", "to_anthropic_message"]


def to_anthropic_message(
    openai_response: Mapping[str, Any],
    *,
    model: str,
    stop_sequences: Sequence[str] = (),
    thinking: bool = True,
    tool_aliases: Mapping[str, str] | None = None,
    input_tokens_estimate: int = 1,
    message_id: str | None = None,
) -> dict[str, Any]:
    """Translate a non-streaming OpenAI response.

    Args:
        openai_response: The node's ``chat.completion`` body.
        model: The model name the client asked for (echoed as ``model``).
        stop_sequences: The client's stop sequences; the text is cut at the first one to
            complete and the message reports ``stop_sequence`` (tool calls are then dropped,
            as generation logically ended there).
        thinking: Whether to return reasoning as a ``thinking`` block.
        tool_aliases: Upstream tool name → client tool name (``OpenAIRequest.tool_aliases``).
        input_tokens_estimate: Used for ``input_tokens`` when the node sent no usage.
        message_id: The ``id`` to use; a random ``msg_…`` by default.

    Returns:
        A dict that validates as ``anthropic.types.Message``.
    """
    choices = openai_response.get("choices") or []
    choice: Mapping[str, Any] = choices[0] if choices and isinstance(choices[0], Mapping) else {}
    message: Mapping[str, Any] = choice.get("message") or {}
    finish = choice.get("finish_reason")
    content: list[dict[str, Any]] = []
    out_bytes = 0

    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if thinking and isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        out_bytes += utf8_len(reasoning)

    text = message.get("content")
    text = text if isinstance(text, str) else ""
    matched: str | None = None
    if stop_sequences:
        hit = find_stop(text, stop_sequences)
        if hit is not None:
            text, matched = text[: hit[0]], hit[1]
    if text.strip():  # never an empty or whitespace-only text block
        content.append({"type": "text", "text": text})
        out_bytes += utf8_len(text)

    aliases = tool_aliases or {}
    tool_blocks = 0
    for call in (message.get("tool_calls") or []) if matched is None else []:
        if not isinstance(call, Mapping):
            continue
        function = call.get("function") or {}
        name = function.get("name") or ""
        call_id = call.get("id") or new_id("toolu_")
        raw = function.get("arguments")
        content.append(
            {
                "type": "tool_use",
                "id": call_id,
                "name": aliases.get(name, name),
                "input": normalize_arguments(raw, where=f"{name}/{call_id}"),
            }
        )
        tool_blocks += 1
        out_bytes += utf8_len(raw) if isinstance(raw, str) else 2

    usage = anthropic_usage(
        openai_response.get("usage"),
        input_estimate=max(1, input_tokens_estimate),
        output_estimate=max(1, tokens_for_bytes(out_bytes)),
    )
    return {
        "id": message_id or new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(finish, tool_blocks=tool_blocks > 0, stop_sequence=matched),
        "stop_sequence": matched,
        "usage": usage,
    }


def message_from_events(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Fold the events of a :class:`~cortex.proxy.anthropic.stream.StreamTranslator` into one message.

    This serves a non-streaming client from an upstream stream (``to_openai(...,
    stream_upstream=True)``), which lets cortex stop the node at a stop sequence and gives the
    client exactly the message a streaming client would have assembled.

    Args:
        events: Every event the translator produced, up to ``message_stop`` or ``error``.

    Returns:
        A dict that validates as ``anthropic.types.Message``.

    Raises:
        AnthropicError: When the stream ended with an ``error`` event (status from its type).
    """
    message: dict[str, Any] = {}
    content: list[dict[str, Any]] = []
    partial: dict[int, list[str]] = {}
    for event in events:
        kind = event["type"]
        if kind == "content_block_delta":
            block, delta = content[event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial.setdefault(event["index"], []).append(delta["partial_json"])
        elif kind == "content_block_start":
            content.append(dict(event["content_block"]))
        elif kind == "message_start":
            message = {**event["message"], "content": content, "usage": dict(event["message"]["usage"])}
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"].update(event["usage"])
        elif kind == "error":
            raise error_from_type(event["error"]["type"], event["error"]["message"])
    for index, parts in partial.items():
        content[index]["input"] = json.loads("".join(parts))
    return message
