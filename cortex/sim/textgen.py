"""Deterministic "model output" for the simulated node: tokens, prompt counts, tool calls and embeddings.

Everything here is a pure function of the request, so that a test can predict a reply exactly and a benchmark
pays almost nothing per token. The shape of a reply is computed up front as a :class:`Plan` (which tokens,
which finish reason); the streaming code then only paces and encodes it. Token counting is a crude
``ceil(chars / 4)``: the point is that it is stable and monotone, not that it matches any tokenizer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls"]

WORDS: tuple[str, ...] = (
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while",
    "a", "small", "simulated", "model", "streams", "tokens", "to", "its", "patient", "proxy.",
)  # fmt: skip
"""The cycling vocabulary: token ``i`` is ``WORDS[i % len(WORDS)]``, space-prefixed after the first."""

REASONING: tuple[str, ...] = ("Let", " me", " think", " about", " this.")
"""Reasoning tokens emitted before the answer when a request sets ``enable_thinking: true``."""

DEFAULT_MAX_TOKENS = 16
"""Tokens generated (then a natural ``stop``) when the request gives no ``max_tokens``."""

EMBEDDING_DIM = 8
"""Length of every embedding vector."""

_TOOL_WORD = re.compile(r"\btool\b", re.IGNORECASE)
_REPLY_PIECES = re.compile(r"\s*\S+|\s+")


def count_tokens(text: str) -> int:
    """Count the tokens of a prompt text, deterministically: ``ceil(len / 4)``, at least 1."""
    return max(1, (len(text) + 3) // 4)


def cycling_piece(index: int) -> str:
    """The ``index``-th token of the default generated text."""
    word = WORDS[index % len(WORDS)]
    return word if index == 0 else " " + word


def reply_pieces(text: str) -> list[str]:
    """Split a scripted reply into tokens: one word with its leading whitespace per token."""
    return _REPLY_PIECES.findall(text)


def message_text(content: object) -> str:
    """The text of a chat message ``content``: a string, or the ``text`` of its text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def chat_prompt_text(messages: str | list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """The text a chat prompt is counted from: every message's text plus the tools' JSON."""
    parts = [messages] if isinstance(messages, str) else [message_text(m.get("content")) for m in messages]
    text = "".join(parts)
    if tools:
        text += json.dumps(tools, separators=(",", ":"))
    return text


@dataclass(frozen=True)
class ToolCall:
    """One tool call the simulated model makes."""

    id: str
    """The call id, ``call_<32 hex>``."""
    name: str
    """The function name."""
    arguments: str
    """The full JSON arguments string."""

    def as_json(self, index: int = 0) -> dict[str, Any]:
        """The call in mistral.rs wire form (``index``, ``id``, ``type``, ``function``)."""
        return {
            "index": index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_tool_call(name: str, arguments: str) -> ToolCall:
    """Make a tool call with a fresh ``call_<hex>`` id."""
    return ToolCall(id="call_" + uuid.uuid4().hex, name=name, arguments=arguments)


def _sample(schema: object) -> object:
    """A deterministic value that satisfies a (simple) JSON schema."""
    if not isinstance(schema, dict):
        return "sim"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    samples: dict[object, object] = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "null": None}
    if kind == "object":
        return _object_sample(schema)
    return samples.get(kind, "sim")


def _object_sample(schema: dict[str, Any]) -> dict[str, object]:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    return {str(name): _sample(sub) for name, sub in props.items()}


def tool_arguments(tool: dict[str, Any]) -> str:
    """Deterministic compact JSON arguments for an OpenAI ``tools`` entry, from its parameter schema."""
    function = tool.get("function")
    params = function.get("parameters") if isinstance(function, dict) else None
    args = _object_sample(params) if isinstance(params, dict) else {}
    return json.dumps(args, separators=(",", ":"), ensure_ascii=False)


def _tool_name(tool: object) -> str | None:
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        name = tool["function"].get("name")
        return name if isinstance(name, str) else None
    return None


def choose_tool(
    tools: list[dict[str, Any]] | None, tool_choice: object, messages: str | list[dict[str, Any]]
) -> ToolCall | None:
    """Decide whether the default model answers with a tool call, and which.

    It calls a tool when the request carries ``tools`` and ``tool_choice`` is ``"required"`` or names a
    function, or when ``tool_choice`` is absent/``"auto"`` and the last user message contains the word "tool".

    Returns:
        The call (named tool, else the first tool), or None for a plain text answer.
    """
    if not tools or tool_choice == "none":
        return None
    wanted: str | None = None
    if isinstance(tool_choice, dict):
        wanted = _tool_name(tool_choice)
    elif tool_choice != "required" and not _TOOL_WORD.search(_last_user_text(messages)):
        return None
    tool = next((t for t in tools if wanted is None or _tool_name(t) == wanted), tools[0])
    name = wanted or _tool_name(tool) or "tool"
    return new_tool_call(name, tool_arguments(tool))


def _last_user_text(messages: str | list[dict[str, Any]]) -> str:
    if isinstance(messages, str):
        return messages
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


@dataclass(frozen=True)
class Plan:
    """What one generation will produce, decided before any token is sent."""

    reasoning: list[str] = field(default_factory=list)
    """Reasoning tokens, emitted first."""
    content: list[str] = field(default_factory=list)
    """Content tokens."""
    finish_reason: FinishReason = "stop"
    """Why generation ends."""
    tool_call: ToolCall | None = None
    """The tool call, when the answer is one (then ``content`` is empty)."""
    tool_tokens: int = 0
    """Tokens the tool call costs (its name and arguments, counted like a prompt)."""

    @property
    def completion_tokens(self) -> int:
        """Tokens generated in all: reasoning, content and tool call."""
        return len(self.reasoning) + len(self.content) + self.tool_tokens

    @property
    def text(self) -> str:
        """The content as one string."""
        return "".join(self.content)


def plan_generation(
    *,
    max_tokens: int | None,
    reply: str | None = None,
    stop: Sequence[str] = (),
    thinking: bool = False,
    tool_call: ToolCall | None = None,
) -> Plan:
    """Plan a generation.

    Args:
        max_tokens: The request's limit (None: 16 cycling tokens then ``stop``, or the whole scripted reply).
        reply: A scripted reply text replacing the cycling words.
        stop: Stop strings; the text is cut before the first one found and finishes with ``stop``.
        thinking: Whether to emit reasoning tokens first (they count against ``max_tokens``).
        tool_call: Answer with this call instead of text (``max_tokens`` does not cut it).

    Returns:
        The plan.
    """
    reasoning = list(REASONING) if thinking else []
    if max_tokens is not None and len(reasoning) >= max_tokens:
        return Plan(reasoning=reasoning[:max_tokens], finish_reason="length")
    if tool_call is not None:
        tokens = count_tokens(tool_call.name + tool_call.arguments)
        return Plan(reasoning=reasoning, finish_reason="tool_calls", tool_call=tool_call, tool_tokens=tokens)
    budget = None if max_tokens is None else max_tokens - len(reasoning)
    finish: FinishReason = "stop"
    if reply is not None:
        pieces = reply_pieces(reply)
        if budget is not None and len(pieces) > budget:
            pieces, finish = pieces[:budget], "length"
    else:
        count = DEFAULT_MAX_TOKENS if budget is None else budget
        pieces = [cycling_piece(i) for i in range(count)]
        finish = "stop" if budget is None else "length"
    cut = _apply_stop(pieces, stop)
    if cut is not None:
        pieces, finish = cut, "stop"
    return Plan(reasoning=reasoning, content=pieces, finish_reason=finish)


def _apply_stop(pieces: list[str], stop: Sequence[str]) -> list[str] | None:
    """Cut the pieces before the earliest stop string, or None when no stop string occurs."""
    text = "".join(pieces)
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not hits:
        return None
    limit = min(hits)
    kept: list[str] = []
    length = 0
    for piece in pieces:
        if length + len(piece) >= limit:
            kept.append(piece[: limit - length])
            break
        kept.append(piece)
        length += len(piece)
    return kept


def embedding_vector(item: str | Sequence[int]) -> list[float]:
    """A deterministic unit vector of :data:`EMBEDDING_DIM` floats for one embeddings input."""
    key = item.encode() if isinstance(item, str) else b"\x00" + struct.pack(f"<{len(item)}q", *item)
    digest = hashlib.blake2b(key, digest_size=4 * EMBEDDING_DIM).digest()
    raw = [(v / 0x7FFFFFFF) - 1.0 for v in struct.unpack(f"<{EMBEDDING_DIM}I", digest)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def embedding_base64(vector: Sequence[float]) -> str:
    """The ``encoding_format: "base64"`` form of a vector: little-endian float32 bytes, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
