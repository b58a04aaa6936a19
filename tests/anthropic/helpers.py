"""Strict checks for the Anthropic dialect: every event and message validated, the stream grammar asserted.

The SDKs do not validate what they receive (translation.md §7): a missing ``usage`` or a tool ``input``
sent as a string parses silently and breaks later. So every event a test sees goes through
``TypeAdapter(RawMessageStreamEvent)`` (or the ping/error shapes), every message through
``Message.model_validate``, and :func:`check_grammar` enforces the ordering rules of §1.4.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import pydantic
from anthropic.types import ErrorResponse, Message, MessageParam, ModelInfo, RawMessageStreamEvent

EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
ALIAS = "claude-sonnet-5-5"
"""The name clients ask for; ``[[models]].aliases`` maps it onto the simulator's model."""
HI: list[MessageParam] = [{"role": "user", "content": "hi"}]
WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "cache_control": {"type": "ephemeral"},
}


def validate_event(data: dict[str, Any]) -> None:
    """Validate one event's JSON with the SDK's strict types (ping and error have their own shapes)."""
    kind = data.get("type")
    if kind == "ping":
        assert data == {"type": "ping"}, data
    elif kind == "error":
        ErrorResponse.model_validate(data, strict=True)
    else:
        EVENT.validate_python(data, strict=True)


def validate_message(data: dict[str, Any]) -> Message:
    """Validate a whole message with the SDK's strict model and return it."""
    message = Message.model_validate(data, strict=True)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.stop_reason is not None
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    for block in message.content:
        if block.type == "tool_use":
            assert isinstance(block.input, dict), block
        if block.type == "text":
            assert block.text.strip(), "empty or whitespace-only text block"
    return message


def validate_error_body(body: Any, status: int, kind: str) -> str:
    """Check an HTTP error body is the Anthropic envelope with ``kind``; return its message."""
    assert isinstance(body, dict), body
    ErrorResponse.model_validate(body, strict=True)
    assert body["type"] == "error", body
    assert body["error"]["type"] == kind, (status, body)
    message = body["error"]["message"]
    assert isinstance(message, str)
    assert message
    return message


@dataclass
class Stream:
    """A stream as the client saw it, checked against the grammar of translation.md §1.4."""

    events: list[dict[str, Any]]
    message: dict[str, Any] | None = None
    """The assembled message (None when the stream ended with ``error``)."""
    error: dict[str, Any] | None = None
    """The ``error`` event's ``error`` object, when the stream ended with one."""
    pings: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [e["type"] for e in self.events]


def check_grammar(events: Sequence[dict[str, Any]], *, pings_expected: bool = True) -> Stream:
    """Assert the stream grammar over decoded events and assemble the message.

    ``message_start`` first with usage; block indexes contiguous from 0; one block open at a time, deltas
    only inside their block and of its kind; ``message_delta`` once, after every block closed, with a
    stop_reason and ``usage.output_tokens``; ``message_stop`` last; nothing after ``error``. Every event is
    validated with the SDK's types on the way.
    """
    assert events, "empty stream"
    for event in events:
        validate_event(event)
    out = Stream(events=list(events))
    out.pings = sum(1 for e in events if e["type"] == "ping")
    if not pings_expected:
        assert out.pings == 0
    body = [e for e in events if e["type"] != "ping"]
    first = body[0]
    assert events[0]["type"] in ("message_start", "error"), events[0]
    if first["type"] == "error":
        assert len(body) == 1
        assert events[-1]["type"] == "error"
        out.error = first["error"]
        return out
    assert first["type"] == "message_start", first
    start = first["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert isinstance(start["usage"]["input_tokens"], int)
    assert start["usage"]["input_tokens"] > 0
    assert isinstance(start["usage"]["output_tokens"], int)
    message: dict[str, Any] = {**start, "content": [], "usage": dict(start["usage"])}
    blocks: list[dict[str, Any]] = message["content"]
    partial: dict[int, list[str]] = {}
    open_index: int | None = None
    delta_seen = False
    stopped = False
    for position, event in enumerate(body[1:], start=1):
        kind = event["type"]
        assert not stopped, f"event after message_stop: {event}"
        if kind == "error":
            assert position == len(body) - 1, f"events after error: {body[position + 1 :]}"
            assert events[-1]["type"] == "error", "a ping after the error event"
            out.error = event["error"]
            return out
        assert not delta_seen or kind == "message_stop", f"{kind} after message_delta"
        if kind == "content_block_start":
            assert open_index is None, f"block {event['index']} opened while {open_index} is open"
            assert event["index"] == len(blocks), f"index {event['index']}, expected {len(blocks)}"
            block = dict(event["content_block"])
            if block["type"] == "tool_use":
                assert block["input"] == {}, block
                assert block["id"], block
                assert block["name"], block
            blocks.append(block)
            open_index = event["index"]
        elif kind == "content_block_delta":
            assert event["index"] == open_index, f"delta for {event['index']} while {open_index} is open"
            block, delta = blocks[event["index"]], event["delta"]
            expected = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}
            if delta["type"] == "signature_delta":
                assert block["type"] == "thinking"
                block["signature"] = delta["signature"]
            else:
                assert delta["type"] == expected[block["type"]], (block, delta)
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "input_json_delta":
                partial.setdefault(event["index"], []).append(delta["partial_json"])
        elif kind == "content_block_stop":
            assert event["index"] == open_index, f"stop for {event['index']} while {open_index} is open"
            open_index = None
        elif kind == "message_delta":
            assert open_index is None, "message_delta with a block open"
            delta_seen = True
            assert event["delta"]["stop_reason"] is not None
            assert isinstance(event["usage"]["output_tokens"], int)
            message.update(event["delta"])
            message["usage"].update({k: v for k, v in event["usage"].items() if v is not None})
        elif kind == "message_stop":
            assert delta_seen, "message_stop without message_delta"
            stopped = True
        else:
            raise AssertionError(f"unexpected event {event}")
    assert stopped, f"stream did not end with message_stop: {[e['type'] for e in body]}"
    assert body[-1]["type"] == "message_stop"
    for index, parts in partial.items():
        value = json.loads("".join(parts))
        assert isinstance(value, dict), f"tool input of block {index} is not an object: {value!r}"
        blocks[index]["input"] = value
    validate_message(message)
    out.message = message
    return out


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Decode an Anthropic SSE body, asserting ``event:`` lines that match each ``data``'s type."""
    events: list[dict[str, Any]] = []
    text = raw.decode().replace("\r\n", "\n")
    for frame in text.split("\n\n"):
        if not frame.strip():
            continue
        name: str | None = None
        data: list[str] = []
        for line in frame.split("\n"):
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
        if not data:
            continue
        payload = json.loads("\n".join(data))
        assert name is not None, f"data without an event: line: {frame!r}"
        assert payload["type"] == name, (name, payload)
        events.append(payload)
    return events


async def raw_stream(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Stream:
    """POST a streaming request with aiohttp (so pings are visible) and check what came back."""
    async with http.post(url + "/v1/messages", json=body, headers=headers or {}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
        heads = dict(resp.headers)
    out = check_grammar(parse_sse(raw))
    out.headers = heads
    return out


async def sdk_stream_raw(client: anthropic.AsyncAnthropic, **kwargs: Any) -> Stream:
    """``messages.create(stream=True)`` through the SDK, every event validated (the SDK hides pings)."""
    events: list[dict[str, Any]] = []
    stream = await client.messages.create(stream=True, **kwargs)
    async with stream:
        async for event in stream:
            events.append(event.model_dump(mode="json", exclude_unset=True))
    return check_grammar(events, pings_expected=False)


async def sdk_stream_helper(client: anthropic.AsyncAnthropic, **kwargs: Any) -> Message:
    """``messages.stream(...).get_final_message()``, validated strictly."""
    async with client.messages.stream(**kwargs) as stream:
        async for event in stream:
            assert event.type not in ("ping", "error")
        final = await stream.get_final_message()
    return validate_message(final.model_dump(mode="json", exclude_unset=True))


async def sdk_unary(client: anthropic.AsyncAnthropic, **kwargs: Any) -> Message:
    """A non-streaming ``messages.create``, validated strictly."""
    message = await client.messages.create(**kwargs)
    return validate_message(message.model_dump(mode="json", exclude_unset=True))


def validate_model_info(data: dict[str, Any]) -> ModelInfo:
    return ModelInfo.model_validate(data)
