"""OpenAI response → Anthropic message: translation.md §8 cases 13-16, stop sequences, usage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anthropic
import pydantic
import pytest

from cortex.proxy.anthropic import to_anthropic_message


def assert_no_extras(value: Any) -> None:
    """The SDK models allow extra fields; a strict check also rejects any field they do not know."""
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{type(value).__name__} has unknown fields {value.model_extra}"
        for name in type(value).model_fields:
            assert_no_extras(getattr(value, name))
    elif isinstance(value, list):
        for item in value:
            assert_no_extras(item)


def strict_message(message: dict[str, Any]) -> anthropic.types.Message:
    parsed = anthropic.types.Message.model_validate(message, strict=True)
    assert_no_extras(parsed)
    assert parsed.stop_reason is not None
    assert parsed.id.startswith("msg_")
    return parsed


def completion(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str = "stop",
    usage: dict[str, Any] | None = None,
    reasoning: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": tool_calls}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    out: dict[str, Any] = {
        "id": "7",
        "object": "chat.completion",
        "created": 1760000000,
        "model": "org/model",
        "system_fingerprint": "local",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def call(arguments: str, name: str = "Read", call_id: str = "call_1") -> dict[str, Any]:
    return {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


USAGE = {
    "prompt_tokens": 100,
    "completion_tokens": 5,
    "total_tokens": 105,
    "prompt_tokens_details": {"cached_tokens": 60},
    "avg_tok_per_sec": 1.5,
    "total_time_sec": 0.2,
}


def case_13(m: anthropic.types.Message) -> None:
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].type == "text"
    assert m.content[0].text == "Hi"
    assert m.stop_reason == "end_turn"
    assert m.stop_sequence is None
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens, m.usage.output_tokens) == (40, 60, 5)
    assert m.model == "claude-opus-5-5"


def tool_inputs(m: anthropic.types.Message) -> list[dict[str, object]]:
    return [b.input for b in m.content if b.type == "tool_use"]


def case_14(m: anthropic.types.Message) -> None:
    assert tool_inputs(m) == [{}, {"a": 1}]
    assert m.stop_reason == "tool_use"
    assert [b.id for b in m.content if b.type == "tool_use"] == ["call_1", "call_2"]


def reason(expected: str, blocks: list[str]) -> Callable[[anthropic.types.Message], None]:
    def check(m: anthropic.types.Message) -> None:
        assert m.stop_reason == expected
        assert [b.type for b in m.content] == blocks

    return check


def case_16(m: anthropic.types.Message) -> None:
    assert tool_inputs(m) == [{"a": 1}, {}, {"b": [1]}, {"c": 2}, {}]


CASES: list[tuple[str, dict[str, Any], Callable[[anthropic.types.Message], None]]] = [
    ("c13-text-usage-cached", completion("Hi", usage=USAGE), case_13),
    (
        "c14-empty-and-object-arguments",
        completion(None, tool_calls=[call(""), call('{"a":1}', call_id="call_2")], finish="tool_calls"),
        case_14,
    ),
    (
        "c15-stop-with-tool-calls",
        completion("x", tool_calls=[call("{}")], finish="stop"),
        reason("tool_use", ["text", "tool_use"]),
    ),
    (
        "c15-length-with-tool-call",
        completion(None, tool_calls=[call('{"a":')], finish="length"),
        reason("max_tokens", ["tool_use"]),
    ),
    ("c15-content-filter", completion("no", finish="content_filter"), reason("refusal", ["text"])),
    ("c15-canceled", completion("part", finish="canceled"), reason("end_turn", ["text"])),
    ("c15-tool-calls-without-calls", completion("x", finish="tool_calls"), reason("end_turn", ["text"])),
    (
        "c16-double-encoded-and-garbage",
        completion(
            None,
            tool_calls=[
                call('"{\\"a\\":1}"'),
                call("not json"),
                call('```json\n{"b":[1]}\n```'),
                call('{"c":2}{"d":3}'),
                call("[1,2]"),
            ],
            finish="tool_calls",
        ),
        case_16,
    ),
]


@pytest.mark.parametrize(("response", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conformance_response(response: dict[str, Any], check: Callable[[anthropic.types.Message], None]) -> None:
    check(strict_message(to_anthropic_message(response, model="claude-opus-5-5")))


def test_c16_unparseable_arguments_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cortex.proxy.anthropic"):
        to_anthropic_message(completion(None, tool_calls=[call("not json")]), model="m")
    assert any("not valid JSON" in r.getMessage() for r in caplog.records)


def test_thinking_block_first_and_only_when_enabled() -> None:
    response = completion("answer", reasoning="because", usage=USAGE)
    m = strict_message(to_anthropic_message(response, model="m", thinking=True))
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].type == "thinking"
    assert m.content[0].signature == ""
    m = strict_message(to_anthropic_message(response, model="m", thinking=False))
    assert [b.type for b in m.content] == ["text"]


@pytest.mark.parametrize(
    ("text", "stops", "expected_text", "expected_seq"),
    [
        ("abcENDxyz", ["END"], "abc", "END"),
        ("abcENDxyz", ["zz"], "abcENDxyz", None),
        ("xABCD", ["ABCD", "BC"], "xA", "BC"),  # the first sequence to complete wins
        ("ENDabc", ["END"], None, "END"),  # nothing before the match: no empty text block
    ],
    ids=["match", "no-match", "first-to-complete", "match-at-start"],
)
def test_stop_sequences(text: str, stops: list[str], expected_text: str | None, expected_seq: str | None) -> None:
    response = completion(text, tool_calls=[call("{}")] if expected_seq else None)
    m = strict_message(to_anthropic_message(response, model="m", stop_sequences=stops))
    texts = [b.text for b in m.content if b.type == "text"]
    assert texts == ([expected_text] if expected_text else [])
    assert m.stop_sequence == expected_seq
    assert m.stop_reason == ("stop_sequence" if expected_seq else "end_turn")
    if expected_seq:
        assert not tool_inputs(m)  # generation ended at the stop sequence


def test_missing_usage_is_estimated_and_whitespace_text_dropped() -> None:
    response = completion("\n\n", tool_calls=[call('{"q":"x"}', name="my_tool_ab12cd34")])
    del response["choices"][0]["logprobs"]
    m = strict_message(
        to_anthropic_message(
            response, model="m", input_tokens_estimate=321, tool_aliases={"my_tool_ab12cd34": "my.tool"}
        )
    )
    assert [b.type for b in m.content] == ["tool_use"]
    assert m.content[0].type == "tool_use"
    assert m.content[0].name == "my.tool"
    assert m.usage.input_tokens == 321
    assert m.usage.output_tokens >= 1
    assert m.usage.cache_read_input_tokens is None


def test_missing_tool_id_is_generated_and_empty_choices_are_valid() -> None:
    response = completion(None, tool_calls=[{"type": "function", "function": {"name": "T", "arguments": "{}"}}])
    m = strict_message(to_anthropic_message(response, model="m", message_id="msg_fixed"))
    assert m.id == "msg_fixed"
    assert m.content[0].type == "tool_use"
    assert m.content[0].id.startswith("toolu_")
    empty = strict_message(to_anthropic_message({"choices": []}, model="m"))
    assert empty.content == []
    assert empty.stop_reason == "end_turn"
