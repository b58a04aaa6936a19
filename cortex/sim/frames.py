"""Byte-exact mistral.rs wire shapes: SSE frames, chunk objects, usage and error bodies.

The simulator exists to reproduce mistral.rs's quirks (``data:`` with no space, ``role`` in every delta,
``usage: null`` until the finish chunk, struct key order), so the shapes live in one place where they can be
compared against the spec. Content chunks are the hot path of every benchmark, so :class:`ChunkEncoder`
pre-encodes everything around the token text once per request and each token costs one small
``json.dumps`` of the piece.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from cortex.sim.textgen import ToolCall

DONE = b"data:[DONE]\n\n"
"""The stream terminator."""

KEEPALIVE = b":\n\n"
"""axum's SSE keep-alive: a bare comment line."""


def dumps(obj: object) -> str:
    """Compact JSON with non-ASCII kept as is, like serde_json."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(obj: object) -> bytes:
    """One SSE data frame, ``data:<compact json>`` and a blank line (axum writes no space after the colon)."""
    return b"data:" + dumps(obj).encode() + b"\n\n"


@lru_cache(maxsize=8192)
def _json_string(piece: str) -> bytes:
    """A token piece as a JSON string literal; cached, since generated text repeats a small vocabulary."""
    return json.dumps(piece, ensure_ascii=False).encode()


def _f32(value: float) -> float:
    """Round like an f32 printed by serde (about 7 significant digits)."""
    return float(f"{value:.7g}")


def usage(prompt_tokens: int, completion_tokens: int, prompt_s: float, completion_s: float) -> dict[str, Any]:
    """The nine-field mistral.rs usage, with times quantized to whole milliseconds.

    Args:
        prompt_tokens: Prompt tokens.
        completion_tokens: Generated tokens.
        prompt_s: Prefill time in seconds.
        completion_s: Decode time in seconds.

    Returns:
        The usage object, keys in the struct's order; a rate is 0.0 when its time is 0.
    """
    prompt_ms = max(0, int(prompt_s * 1000))
    completion_ms = max(0, int(completion_s * 1000))
    total_ms = prompt_ms + completion_ms
    total = prompt_tokens + completion_tokens

    def rate(tokens: int, ms: int) -> float:
        return _f32(tokens * 1000 / ms) if ms else 0.0

    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": total,
        "avg_tok_per_sec": rate(total, total_ms),
        "avg_prompt_tok_per_sec": rate(prompt_tokens, prompt_ms),
        "avg_compl_tok_per_sec": rate(completion_tokens, completion_ms),
        "total_time_sec": total_ms / 1000,
        "total_prompt_time_sec": prompt_ms / 1000,
        "total_completion_time_sec": completion_ms / 1000,
    }


def error_frame(message: str, kind: str = "server_error") -> bytes:
    """The mid-stream error frame mistral.rs sends before ``[DONE]``."""
    return sse({"error": {"message": message, "type": kind, "param": None, "code": None}})


def message_body(message: str) -> dict[str, str]:
    """The OpenAI-surface error body of mistral.rs: ``{"message": ...}``, no ``error`` wrapper."""
    return {"message": message}


def delta(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str | None = None,
) -> dict[str, Any]:
    """A chat delta in struct order: ``content``, ``role``, ``tool_calls``, then any ``reasoning_content``."""
    out: dict[str, Any] = {"content": content, "role": "assistant", "tool_calls": tool_calls}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


class ChunkEncoder:
    """Encodes the chunks of one chat or completions stream.

    Args:
        kind: ``"chat"`` or ``"completion"``.
        request_id: The per-model integer id, as a string.
        created: Unix seconds.
        model: The real model id.
    """

    def __init__(self, kind: str, request_id: str, created: int, model: str) -> None:
        self.kind = kind
        self.request_id = request_id
        self.created = created
        self.model = model
        head = b'data:{"id":' + dumps(request_id).encode() + b',"choices":[{'
        tail = (
            b',"created":'
            + str(created).encode()
            + b',"model":'
            + dumps(model).encode()
            + b',"system_fingerprint":"local","object":'
        )
        if kind == "chat":
            self._prefix = head + b'"finish_reason":null,"index":0,"delta":{"content":'
            self._suffix = (
                b',"role":"assistant","tool_calls":null},"logprobs":null}]'
                + tail
                + b'"chat.completion.chunk","usage":null}\n\n'
            )
        else:
            self._prefix = head + b'"text":'
            self._suffix = b',"index":0,"logprobs":null,"finish_reason":null}]' + tail + b'"text_completion"}\n\n'

    def content(self, piece: str) -> bytes:
        """A plain content (chat) or text (completions) chunk: the hot path."""
        return self._prefix + _json_string(piece) + self._suffix

    def chat_chunk(
        self,
        delta_obj: dict[str, Any],
        finish_reason: str | None = None,
        usage_obj: dict[str, Any] | None = None,
    ) -> bytes:
        """A general chat chunk (reasoning, tool call, finish)."""
        return sse(
            {
                "id": self.request_id,
                "choices": [{"finish_reason": finish_reason, "index": 0, "delta": delta_obj, "logprobs": None}],
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "local",
                "object": "chat.completion.chunk",
                "usage": usage_obj,
            }
        )

    def completion_finish(self, text: str, finish_reason: str) -> bytes:
        """The last completions chunk (completions chunks never carry usage)."""
        return sse(
            {
                "id": self.request_id,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
                "created": self.created,
                "model": self.model,
                "system_fingerprint": "local",
                "object": "text_completion",
            }
        )


def chat_response(
    request_id: str,
    created: int,
    model: str,
    *,
    content: str | None,
    finish_reason: str,
    usage_obj: dict[str, Any],
    reasoning: str | None = None,
    tool_call: ToolCall | None = None,
) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` object."""
    message = delta(content, tool_calls=[tool_call.as_json()] if tool_call else None, reasoning=reasoning)
    return {
        "id": request_id,
        "choices": [{"finish_reason": finish_reason, "index": 0, "message": message, "logprobs": None}],
        "created": created,
        "model": model,
        "system_fingerprint": "local",
        "object": "chat.completion",
        "usage": usage_obj,
    }


def completion_response(
    request_id: str, created: int, model: str, *, text: str, finish_reason: str, usage_obj: dict[str, Any]
) -> dict[str, Any]:
    """A non-streaming ``text_completion`` object."""
    return {
        "id": request_id,
        "choices": [{"finish_reason": finish_reason, "index": 0, "text": text, "logprobs": None}],
        "created": created,
        "model": model,
        "system_fingerprint": "local",
        "object": "text_completion",
        "usage": usage_obj,
    }
