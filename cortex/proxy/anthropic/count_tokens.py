"""Input-token estimates for ``count_tokens`` and for usage the backend has not reported yet.

cortex cannot tokenize for every model a fleet serves, and an exact count costs a prefill on a
node, so it estimates (translation.md §3.6): ``ceil(utf8_bytes / 3.5)`` over the text a request
carries, roughly its JSON size, which overestimates a little for English and code. Claude Code
uses these numbers to decide when to compact, so erring high is the safe side. Two things are
not text and would swamp a byte count: images count a flat :data:`IMAGE_TOKENS` each (the
ceiling of Anthropic's ``width*height/750`` formula, as the size is unknown without decoding),
and base64 documents count their decoded size. The estimate is never 0: the real API never
reports an empty prompt, and ``message_start`` must not carry all-zero usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._common import tokens_for_bytes, utf8_len
from .errors import AnthropicError

__all__ = ["IMAGE_TOKENS", "count_tokens", "estimate_input_tokens"]

IMAGE_TOKENS = 1600
"""Tokens counted per image, whatever its size."""

_PARTS = ("system", "messages", "tools", "tool_choice")


def _measure(root: Any) -> tuple[int, int]:
    """Return (approximate JSON bytes, number of images) of ``root``, skipping binary payloads."""
    size = 0
    images = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, str):
            size += utf8_len(obj) + 2
        elif isinstance(obj, Mapping):
            kind = obj.get("type")
            if kind == "image":
                images += 1
                continue
            source = obj.get("source")
            if kind == "document" and isinstance(source, Mapping) and source.get("type") == "base64":
                data = source.get("data")
                size += len(data) * 3 // 4 if isinstance(data, str) else 0
                continue
            for key, value in obj.items():
                if key != "cache_control":
                    size += len(key) + 3
                    stack.append(value)
        elif isinstance(obj, list | tuple):
            size += len(obj) + 1
            stack.extend(obj)
        elif obj is None or isinstance(obj, bool):
            size += 4
        else:
            size += len(str(obj))
    return size, images


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """Estimate the input tokens of an Anthropic Messages request.

    Args:
        body: The request body (``system``, ``messages``, ``tools``, ``tool_choice`` are read;
            other fields are ignored).

    Returns:
        The estimate, at least 1.
    """
    size = 0
    images = 0
    for key in _PARTS:
        value = body.get(key)
        if value is not None:
            part_size, part_images = _measure(value)
            size += part_size
            images += part_images
    return max(1, tokens_for_bytes(size) + images * IMAGE_TOKENS)


def count_tokens(body: Any) -> dict[str, int]:
    """Answer ``POST /v1/messages/count_tokens`` with the estimate.

    Args:
        body: The parsed request body (the messages body without ``max_tokens``/``stream``).

    Returns:
        ``{"input_tokens": N}`` with ``N > 0``.

    Raises:
        AnthropicError: 400 when the body is not an object or ``messages`` is not an array.
    """
    if not isinstance(body, Mapping):
        raise AnthropicError(400, "invalid_request_error", "request body must be a JSON object")
    if not isinstance(body.get("messages"), list):
        raise AnthropicError(400, "invalid_request_error", "messages: Field required (an array of messages)")
    return {"input_tokens": estimate_input_tokens(body)}
