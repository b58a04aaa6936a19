"""The strict checker itself must reject the stream shapes that break SDK helpers (translation.md §7)."""

from __future__ import annotations

import copy
from typing import Any

import pydantic
import pytest

from tests.anthropic.helpers import check_grammar, parse_sse

START: dict[str, Any] = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 0},
    },
}
TEXT: list[dict[str, Any]] = [
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
    {"type": "content_block_stop", "index": 0},
]
END: list[dict[str, Any]] = [
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 1},
    },
    {"type": "message_stop"},
]
GOOD: list[dict[str, Any]] = [START, {"type": "ping"}, *TEXT, *END]


def tool(index: int, partial: str, start_input: Any = None) -> list[dict[str, Any]]:
    block: dict[str, Any] = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    if start_input is not None:
        block["input"] = start_input
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": partial}},
        {"type": "content_block_stop", "index": index},
    ]


def test_a_canonical_stream_passes() -> None:
    out = check_grammar(GOOD)
    assert out.message is not None
    assert out.message["content"] == [{"type": "text", "text": "Hi"}]
    assert out.pings == 1
    with_tool = check_grammar([START, *TEXT, *tool(1, '{"a": 1}'), *END])
    assert with_tool.message is not None
    assert with_tool.message["content"][1]["input"] == {"a": 1}


def drop_usage(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = copy.deepcopy(events)
    del events[-2]["usage"]
    return events


BAD: dict[str, list[dict[str, Any]]] = {
    "no message_start": [*TEXT, *END],
    "ping first then text": [{"type": "ping"}, *TEXT, *END],
    "index gap": [START, *[dict(e, index=1) for e in TEXT], *END],
    "delta after stop": [START, *TEXT, TEXT[1], *END],
    "two open blocks": [START, TEXT[0], {**TEXT[0], "index": 1}, *END],
    "no message_stop": [START, *TEXT, END[0]],
    "no message_delta": [START, *TEXT, END[1]],
    "message_delta without usage": drop_usage([START, *TEXT, *END]),
    "event after error": [START, {"type": "error", "error": {"type": "api_error", "message": "x"}}, END[1]],
    "two json objects in one tool": [START, *tool(0, '{"a": 1}{"b": 2}'), *END],
    "tool input not an object": [START, *tool(0, "[1]"), *END],
    "tool start without input": [START, *[{k: v for k, v in e.items()} for e in tool(0, "{}")], *END],
}
BAD["tool start without input"][1]["content_block"] = {"type": "tool_use", "id": "t", "name": "f"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_broken_streams_are_rejected(case: str) -> None:
    with pytest.raises((AssertionError, pydantic.ValidationError, ValueError)):
        check_grammar(BAD[case])


def test_sse_needs_event_lines() -> None:
    assert parse_sse(b'event: ping\ndata: {"type":"ping"}\n\n: comment\n\n') == [{"type": "ping"}]
    with pytest.raises(AssertionError):
        parse_sse(b'data: {"type":"ping"}\n\n')
    with pytest.raises(AssertionError):
        parse_sse(b'event: message_stop\ndata: {"type":"ping"}\n\n')
