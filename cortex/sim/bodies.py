"""Typed request bodies, rejected the way axum's ``Json`` extractor rejects them.

mistral.rs answers body problems before any handler logic runs, with plain-text bodies: 415 for a wrong
Content-Type, 400 for malformed JSON, 422 ``Failed to deserialize the JSON body ...`` for a missing field
or a wrong type, 413 for an oversized body. A proxy has to pass those through or map them, so the simulator
reproduces the statuses and the message prefixes (the serde detail after the prefix is approximate).
Each route gets a small frozen dataclass so the handlers work with checked values, not raw dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

DESERIALIZE = "Failed to deserialize the JSON body into the target type: "


class BodyRejected(Exception):
    """The body failed extraction; the reply is plain text.

    Args:
        status: 400, 413, 415 or 422.
        text: The plain-text body.
    """

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class ParsedBody:
    """The outcome of reading a POST body once, shared by the recorder, the metrics and the handler."""

    value: Any
    """The decoded JSON (None when absent or malformed)."""
    error: BodyRejected | None
    """Why extraction failed before typing (415 or 400), if it did."""


BODY_KEY = web.RequestKey("cortex_sim_body", ParsedBody)
"""Where the middleware leaves the parsed body for the handler."""


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "floating point", str: "string", list: "sequence"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "map"
    return names.get(type(value), "value")


def _bad(field: str, value: object, expected: str) -> BodyRejected:
    return BodyRejected(422, f"{DESERIALIZE}{field}: invalid type: {_type_name(value)}, expected {expected}")


def _object(body: ParsedBody) -> dict[str, Any]:
    if body.error is not None:
        raise body.error
    if not isinstance(body.value, dict):
        raise BodyRejected(422, f"{DESERIALIZE}invalid type: {_type_name(body.value)}, expected a struct")
    return body.value


def _required(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise BodyRejected(422, f"{DESERIALIZE}missing field `{name}`")
    return obj[name]


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(name, value, "a string")
    return value


def _opt_bool(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, value, "a boolean")
    return bool(value)


def _opt_uint(obj: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(name, value, "usize")
        return value
    return None


def _stop(obj: dict[str, Any]) -> tuple[str, ...]:
    value = obj.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise _bad("stop", value, "a string or a sequence of strings")


@dataclass(frozen=True)
class ChatRequest:
    """A checked ``/v1/chat/completions`` body."""

    model: str | None
    messages: str | list[dict[str, Any]]
    max_tokens: int | None
    stream: bool
    stop: tuple[str, ...]
    tools: list[dict[str, Any]] | None
    tool_choice: object
    thinking: bool
    truncate_sequence: bool


def parse_chat(body: ParsedBody) -> ChatRequest:
    """Check a chat body.

    Raises:
        BodyRejected: As axum would.
    """
    obj = _object(body)
    messages = _required(obj, "messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                raise _bad("messages", message, "a message object")
            if not isinstance(message.get("role"), str):
                raise BodyRejected(422, f"{DESERIALIZE}messages: missing field `role`")
    elif not isinstance(messages, str):
        raise _bad("messages", messages, "a string or a sequence of messages")
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _bad("tools", tools, "a sequence of tools")
    tool_choice = obj.get("tool_choice")
    if tool_choice is not None and not isinstance(tool_choice, str | dict):
        raise _bad("tool_choice", tool_choice, "a string or a tool choice object")
    return ChatRequest(
        model=_opt_str(obj, "model"),
        messages=messages,
        max_tokens=_opt_uint(obj, "max_tokens", "max_completion_tokens"),
        stream=_opt_bool(obj, "stream"),
        stop=_stop(obj),
        tools=tools or None,
        tool_choice=tool_choice,
        thinking=_opt_bool(obj, "enable_thinking"),
        truncate_sequence=_opt_bool(obj, "truncate_sequence"),
    )


@dataclass(frozen=True)
class CompletionRequest:
    """A checked ``/v1/completions`` body."""

    model: str | None
    prompt: str
    max_tokens: int | None
    stream: bool
    stop: tuple[str, ...]
    truncate_sequence: bool


def parse_completion(body: ParsedBody) -> CompletionRequest:
    """Check a completions body (``prompt`` is a required string).

    Raises:
        BodyRejected: As axum would.
    """
    obj = _object(body)
    prompt = _required(obj, "prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt", prompt, "a string")
    return CompletionRequest(
        model=_opt_str(obj, "model"),
        prompt=prompt,
        max_tokens=_opt_uint(obj, "max_tokens"),
        stream=_opt_bool(obj, "stream"),
        stop=_stop(obj),
        truncate_sequence=_opt_bool(obj, "truncate_sequence"),
    )


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked ``/v1/embeddings`` body."""

    model: str | None
    items: list[str | list[int]]
    """The inputs, normalized: a string or a token-id list is one item."""
    base64: bool
    dimensions: int | None
    truncate_sequence: bool


def _is_ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def parse_embedding(body: ParsedBody) -> EmbeddingRequest:
    """Check an embeddings body (``input``: a string, strings, token ids, or lists of token ids).

    Raises:
        BodyRejected: As axum would.
    """
    obj = _object(body)
    value = _required(obj, "input")
    ok = (
        isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        or _is_ints(value)
        or (isinstance(value, list) and all(_is_ints(v) for v in value))
    )
    if not ok:
        raise _bad("input", value, "a string, strings, token ids or sequences of token ids")
    items: list[str | list[int]] = [value] if isinstance(value, str) or (value and _is_ints(value)) else list(value)
    fmt = obj.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise BodyRejected(422, f"{DESERIALIZE}encoding_format: unknown variant `{fmt}`, expected `float` or `base64`")
    return EmbeddingRequest(
        model=_opt_str(obj, "model"),
        items=items,
        base64=fmt == "base64",
        dimensions=_opt_uint(obj, "dimensions"),
        truncate_sequence=_opt_bool(obj, "truncate_sequence"),
    )


def parse_model_id(body: ParsedBody) -> str:
    """Check a lifecycle body, ``{"model_id": "<id>"}``.

    Raises:
        BodyRejected: As axum would (422 when ``model_id`` is missing).
    """
    obj = _object(body)
    model_id = _required(obj, "model_id")
    if not isinstance(model_id, str):
        raise _bad("model_id", model_id, "a string")
    return model_id
