"""Anthropic error envelopes, and the mapping of upstream failures onto them.

Clients of the Anthropic API pick their exception class from the HTTP status and show
``error.message``; the SDKs retry 408/409/429/>=500 unless ``x-should-retry`` says
otherwise. mistral.rs, behind us, answers in its own dialect: ``{"message"}`` bodies with 422
for validation and 500 for *everything* raised while parsing a request (``max_tokens: 0``, an
unknown field value, an unknown model), plain-text axum rejections, and mid-stream
``{"error": {...}}`` chunks. This module turns all of those into the one
``{"type":"error","error":{"type","message"}}`` envelope (translation.md §1.5, §3.7), so a
node's client-fault 500 does not make the SDK retry a request that can never succeed, and a
context overflow reads ``prompt is too long: N tokens > M maximum``, the wording Claude Code
parses to trigger compaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from cortex.proxy.faults import CONTEXT_OVERFLOW, MODEL_UNAVAILABLE, is_client_fault

__all__ = [
    "AnthropicError",
    "classify_upstream_error",
    "envelope",
    "error_from_type",
    "error_message_of",
    "not_supported",
    "overloaded",
    "prompt_too_long",
    "unreachable",
    "upstream_chunk_error",
    "upstream_timeout",
]

_TYPE_BY_STATUS: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    501: "not_supported",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_MAX_PATTERNS = (
    re.compile(r"greater than (\d+)", re.IGNORECASE),
    re.compile(r"maximum context length is (\d+)", re.IGNORECASE),
    re.compile(r"> ?(\d+) maximum", re.IGNORECASE),
    re.compile(r"(?:max(?:imum)?|limit)\D{0,20}(\d+)", re.IGNORECASE),
)
_ACTUAL_PATTERN = re.compile(r"(?:requested|prompt (?:has|contains)|is too long: ?)\D{0,20}(\d+)", re.IGNORECASE)
_RELOADING = re.compile(r"is being reloaded|overloaded|queue is full|too many requests", re.IGNORECASE)


class AnthropicError(Exception):
    """An error to answer in the Anthropic envelope.

    Raised by the request translation for invalid bodies and returned by the classifiers for
    upstream failures; the gateway answers ``status`` with :func:`envelope` as the body and
    :meth:`headers` as extra headers (or, mid-stream, an ``error`` event carrying ``type``).

    Attributes:
        status: The HTTP status to answer.
        type: The Anthropic ``error.type`` (``invalid_request_error``, ``overloaded_error``...).
        message: The human-readable ``error.message``.
        should_retry: The value for ``x-should-retry``; ``None`` leaves the SDK's default policy.
        retry_after: A ``retry-after`` value to copy to the client, if the upstream sent one.
    """

    def __init__(
        self,
        status: int,
        type: str,  # noqa: A002 - mirrors the wire field name
        message: str,
        *,
        should_retry: bool | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(status, type, message)
        self.status = status
        self.type = type
        self.message = message
        self.should_retry = should_retry
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def __repr__(self) -> str:
        return f"AnthropicError(status={self.status}, type={self.type!r}, message={self.message!r})"

    def headers(self) -> dict[str, str]:
        """Return the extra response headers (``x-should-retry``, ``retry-after``) for this error."""
        out: dict[str, str] = {}
        if self.should_retry is not None:
            out["x-should-retry"] = "true" if self.should_retry else "false"
        if self.retry_after is not None:
            out["retry-after"] = self.retry_after
        return out


def error_from_type(error_type: str, message: str) -> AnthropicError:
    """Build the error for an ``error.type`` alone (an in-stream error event), with its usual status."""
    status = next((code for code, name in _TYPE_BY_STATUS.items() if name == error_type), 500)
    return AnthropicError(status, error_type, message)


def envelope(err: AnthropicError) -> dict[str, Any]:
    """Return the JSON body ``{"type":"error","error":{"type","message"}}`` for ``err``.

    The same dict is the ``data`` of an in-stream ``error`` event.
    """
    return {"type": "error", "error": {"type": err.type, "message": err.message}}


def error_message_of(body: bytes | str | Mapping[str, Any] | None) -> str:
    """Extract the message from an upstream error body.

    The order follows translation.md §3.7: ``{"error":{"message"}}``, ``{"error":"..."}``,
    ``{"message"}``, ``{"detail"}``, then the body as plain text.

    Args:
        body: The raw body, or an already-parsed JSON object.

    Returns:
        The message, or ``""`` when the body says nothing.
    """
    parsed: Any = body
    if isinstance(body, bytes | str):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        try:
            parsed = json.loads(text)
        except ValueError:
            return text.strip()
        if not isinstance(parsed, Mapping):
            return text.strip()
    if not isinstance(parsed, Mapping):
        return ""
    inner = parsed.get("error")
    if isinstance(inner, Mapping) and isinstance(inner.get("message"), str):
        return str(inner["message"])
    if isinstance(inner, str):
        return inner
    for key in ("message", "detail"):
        value = parsed.get(key)
        if isinstance(value, str):
            return value
        if value is not None:
            return json.dumps(value, ensure_ascii=False)
    return ""


def prompt_too_long(message: str, *, prompt_tokens_estimate: int | None = None) -> AnthropicError:
    """Build the 400 ``prompt is too long: N tokens > M maximum`` error from an overflow message.

    Claude Code parses exactly this wording to decide to compact the conversation, so ``N`` is
    always made larger than ``M``.

    Args:
        message: The upstream's context-overflow message, from which the limit is read.
        prompt_tokens_estimate: cortex's estimate of the prompt size, used when the message
            does not state it.
    """
    limit = next((int(m.group(1)) for p in _MAX_PATTERNS if (m := p.search(message))), None)
    actual_match = _ACTUAL_PATTERN.search(message)
    actual = int(actual_match.group(1)) if actual_match else (prompt_tokens_estimate or 0)
    if limit is None:
        limit = max(actual - 1, 1)
    actual = max(actual, limit + 1)
    return AnthropicError(
        400,
        "invalid_request_error",
        f"prompt is too long: {actual} tokens > {limit} maximum",
        should_retry=False,
    )


def classify_upstream_error(
    status: int,
    body: bytes | str | Mapping[str, Any] | None,
    *,
    prompt_tokens_estimate: int | None = None,
    retry_after: str | None = None,
) -> AnthropicError:
    """Map a failed upstream HTTP answer to the error cortex gives the Anthropic client.

    Args:
        status: The upstream HTTP status (>= 400).
        body: The upstream body, raw or parsed.
        prompt_tokens_estimate: The prompt-size estimate for a context-overflow message.
        retry_after: The upstream's ``retry-after`` header, copied on 429 and 503.

    Returns:
        The error; ``status``/``type`` follow translation.md §3.7, with mistral.rs's client-fault
        500s answered as 400 and a model reload in progress as 529.
    """
    message = error_message_of(body) or f"upstream returned HTTP {status}"
    if CONTEXT_OVERFLOW.search(message):
        return prompt_too_long(message, prompt_tokens_estimate=prompt_tokens_estimate)
    if status in (400, 415, 422):
        return AnthropicError(400, "invalid_request_error", message, should_retry=False)
    if status in (401, 403, 404, 413):
        return AnthropicError(status, _TYPE_BY_STATUS[status], message, should_retry=False)
    if status == 429:
        return AnthropicError(429, "rate_limit_error", message, should_retry=True, retry_after=retry_after)
    if status == 503 or _RELOADING.search(message):
        return AnthropicError(529, "overloaded_error", message, should_retry=True, retry_after=retry_after)
    if status == 502:
        return AnthropicError(502, "api_error", message, should_retry=True)
    if status == 504 or status == 408:
        return AnthropicError(504, "timeout_error", message, should_retry=True)
    if MODEL_UNAVAILABLE.search(message):
        return AnthropicError(404, "not_found_error", message, should_retry=False)
    if status == 500 and is_client_fault(message):
        return AnthropicError(400, "invalid_request_error", message, should_retry=False)
    if 400 <= status < 500:
        return AnthropicError(400, "invalid_request_error", message, should_retry=False)
    return AnthropicError(500, "api_error", message)


def upstream_chunk_error(
    chunk: Mapping[str, Any], *, prompt_tokens_estimate: int | None = None
) -> AnthropicError | None:
    """Classify an in-stream error chunk (``{"error": {...}}``), or return ``None`` for a normal chunk.

    The gateway calls this on the *first* upstream chunk, before it sends headers: when it is
    an error (mistral.rs reports "Prompt sequence length is greater than N" this way) the
    client gets an HTTP error instead of a stream (translation.md §3.4 step 1, §8 case 27).
    """
    if not chunk.get("error"):
        return None
    return classify_upstream_error(500, chunk, prompt_tokens_estimate=prompt_tokens_estimate)


def overloaded(
    message: str = "no capacity for this model right now", *, retry_after: str | None = None
) -> AnthropicError:
    """The 529 for cortex's own queue being full or a queued request timing out."""
    return AnthropicError(529, "overloaded_error", message, should_retry=True, retry_after=retry_after)


def unreachable(message: str = "upstream node unreachable") -> AnthropicError:
    """The 502 for a node that refused or reset the connection."""
    return AnthropicError(502, "api_error", message, should_retry=True)


def upstream_timeout(message: str = "upstream node timed out") -> AnthropicError:
    """The 504 for an upstream that did not answer in time."""
    return AnthropicError(504, "timeout_error", message, should_retry=True)


def not_supported(message: str = "this endpoint is not supported by the gateway") -> AnthropicError:
    """The 501 ``not_supported`` that tells Claude Code to fall back (for example to local token counting)."""
    return AnthropicError(501, "not_supported", message, should_retry=False)
