"""Rules shared by the non-streaming and the streaming response translation.

Both directions of a response (one JSON body, or a chunk stream) must agree on the same
decisions: how tool arguments become an object, which ``stop_reason`` a finish maps to, where a
stop sequence cuts the text and how OpenAI usage becomes Anthropic usage. Keeping them here
means a client that falls back from streaming to non-streaming (Claude Code does) sees the same
message both ways.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger("cortex.proxy.anthropic")

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_DECODER = json.JSONDecoder()

CHARS_PER_TOKEN = 3.5
"""The estimate's ratio of UTF-8 bytes to tokens (translation.md §3.6); it errs on the high side."""


def new_id(prefix: str) -> str:
    """Return ``prefix`` + 24 random base62 characters (``msg_…``, ``toolu_…``)."""
    return prefix + "".join(random.choices(_BASE62, k=24))


def utf8_len(text: str) -> int:
    """Return the UTF-8 length of ``text`` without encoding it when it is ASCII (O(1) check)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def tokens_for_bytes(n: int) -> int:
    """Return the token estimate for ``n`` bytes of text."""
    return math.ceil(n / CHARS_PER_TOKEN)


def dumps(obj: Any) -> str:
    """Serialise compactly, keeping non-ASCII as is (smaller, and what the model wrote)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def normalize_arguments(raw: Any, *, where: str = "") -> dict[str, Any]:
    """Turn an OpenAI ``function.arguments`` value into the JSON object a ``tool_use.input`` must be.

    Weak tool-callers and cut-off generations produce arguments the Anthropic side cannot use
    (translation.md §3.4 step 7, §6.9): an empty string becomes ``{}``; a JSON string holding an
    object (double encoding) is unwrapped; Markdown code fences are stripped; data after one
    complete object is cut; anything still not an object becomes ``{}``. Lossy repairs are
    logged as warnings.

    Args:
        raw: The arguments: normally a string, sometimes already an object, or ``None``.
        where: Context for the log line (the tool name and id).

    Returns:
        A JSON object (a new dict, or ``raw`` itself when it already was a mapping).
    """
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    if not isinstance(raw, str):
        logger.warning("tool arguments %s are not a string or object; using {}", where)
        return {}
    text = raw.strip()
    if not text:
        return {}
    for _ in range(2):  # the second round unwraps a double-encoded string
        fence = _FENCE.match(text)
        if fence:
            text = fence.group(1).strip()
        try:
            value, end = _DECODER.raw_decode(text)
        except ValueError:
            logger.warning("tool arguments %s are not valid JSON; using {}: %.200s", where, raw)
            return {}
        if end != len(text) and text[end:].strip():
            logger.warning("tool arguments %s carry data after the JSON value; cut: %.200s", where, text[end:])
        if isinstance(value, dict):
            return value
        if not isinstance(value, str):
            break
        text = value.strip()
    logger.warning("tool arguments %s are not a JSON object; using {}: %.200s", where, raw)
    return {}


def stop_reason(finish_reason: str | None, *, tool_blocks: bool, stop_sequence: str | None) -> str:
    """Map an OpenAI ``finish_reason`` to an Anthropic ``stop_reason`` (translation.md §3.5).

    ``tool_use`` wins whenever a tool_use block was emitted, except after ``length`` (a cut-off
    call must read ``max_tokens``); ``tool_calls`` without any tool block reads ``end_turn``,
    because a client told ``tool_use`` waits for a tool that does not exist.
    """
    if stop_sequence is not None:
        return "stop_sequence"
    if finish_reason == "length":
        return "max_tokens"
    if tool_blocks:
        return "tool_use"
    if finish_reason == "content_filter":
        return "refusal"
    return "end_turn"


def find_stop(text: str, stop_sequences: Sequence[str]) -> tuple[int, str] | None:
    """Find where generation should have stopped: the match that *completes* first.

    A real model stops at the first token that completes a stop sequence, so the match with the
    smallest end wins; on a tie, the longer one (the earlier start).

    Returns:
        ``(start index, the sequence)``, or ``None`` without a match.
    """
    best: tuple[int, int, str] | None = None
    for seq in stop_sequences:
        idx = text.find(seq) if seq else -1
        if idx < 0:
            continue
        end = idx + len(seq)
        if best is None or end < best[0] or (end == best[0] and idx < best[1]):
            best = (end, idx, seq)
    return None if best is None else (best[1], best[2])


def anthropic_usage(usage: Mapping[str, Any] | None, *, input_estimate: int, output_estimate: int) -> dict[str, int]:
    """Convert OpenAI usage to Anthropic usage (translation.md §3.6), estimating what is missing.

    ``input_tokens`` excludes cached prompt tokens, which go to ``cache_read_input_tokens``
    (omitted when zero); mistral.rs's timing fields are dropped.
    """
    prompt = completion = None
    cached = 0
    if usage:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details")
        if isinstance(details, Mapping) and isinstance(details.get("cached_tokens"), int):
            cached = details["cached_tokens"]
    out: dict[str, int] = {
        "input_tokens": max(prompt - cached, 0) if isinstance(prompt, int) else input_estimate,
        "output_tokens": completion if isinstance(completion, int) else output_estimate,
    }
    if cached > 0 and isinstance(prompt, int):
        out["cache_read_input_tokens"] = cached
    return out
