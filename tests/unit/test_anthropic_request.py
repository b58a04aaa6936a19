"""Anthropic request → OpenAI request: translation.md §8 cases 1-12, plus validation and repairs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from cortex.proxy.anthropic import AnthropicError, OpenAIRequest, to_openai

OPENAI_KEYS = {
    "model",
    "messages",
    "max_tokens",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "enable_thinking",
    "reasoning_effort",
    "response_format",
}
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "reasoning_content"}
PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def body(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-opus-5-5", "max_tokens": 1024, "messages": messages, **extra}


def translate(b: dict[str, Any], **kwargs: Any) -> OpenAIRequest:
    result = to_openai(b, upstream_model="org/model", **kwargs)
    assert set(result.body) <= OPENAI_KEYS
    for msg in result.body["messages"]:
        assert set(msg) <= MESSAGE_KEYS, msg
    assert "cache_control" not in json.dumps(result.body)
    return result


def roles(r: OpenAIRequest) -> list[str]:
    return [m["role"] for m in r.body["messages"]]


# --- §8 cases 1-12 -----------------------------------------------------------------------------


def case_01(r: OpenAIRequest) -> None:
    assert r.body["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}]
    assert r.body["model"] == "org/model"
    assert not r.stream


def case_02(r: OpenAIRequest) -> None:
    assert r.body["messages"][0] == {"role": "system", "content": "one\ntwo\nthree"}


def case_03(r: OpenAIRequest) -> None:
    assert roles(r) == ["system", "user", "assistant", "user"]
    assert r.body["messages"][0]["content"] == "S\nmid-array system"


def case_04_text(r: OpenAIRequest) -> None:
    assert r.body["messages"] == [{"role": "user", "content": "a\nb"}]


def case_04_image(r: OpenAIRequest) -> None:
    (msg,) = r.body["messages"]
    assert msg["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
    ]


def case_05(r: OpenAIRequest) -> None:
    msg = r.body["messages"][1]
    assert msg["content"] == "calling"
    assert msg["tool_calls"] == [
        {"id": "toolu_A", "type": "function", "function": {"name": "Read", "arguments": '{"path":"/x"}'}},
        {"id": "toolu_B", "type": "function", "function": {"name": "Bash", "arguments": '{"cmd":"ls -l","n":1}'}},
    ]


def case_06(r: OpenAIRequest) -> None:
    assert roles(r) == ["user", "assistant", "tool", "tool", "user"]
    assert [m.get("tool_call_id") for m in r.body["messages"][2:4]] == ["A", "B"]
    assert [m["content"] for m in r.body["messages"][2:]] == ["result A", "result B", "thanks"]


def case_07(r: OpenAIRequest) -> None:
    assert roles(r) == ["user", "assistant", "tool", "user"]
    assert r.body["messages"][2] == {"role": "tool", "tool_call_id": "A", "content": "[tool error] it broke"}
    assert r.body["messages"][3]["content"] == [
        {"type": "text", "text": "(images returned by tool A)"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]


def case_08(r: OpenAIRequest) -> None:
    assistant = r.body["messages"][1]
    assert assistant == {"role": "assistant", "content": "answer", "reasoning_content": "hmm"}


def case_09(r: OpenAIRequest) -> None:
    tools = r.body["tools"]
    assert [t["function"]["name"] for t in tools] == ["Read", "ToolSearch"]
    assert all(set(t) == {"type", "function"} and t["type"] == "function" for t in tools)
    assert tools[0]["function"] == {
        "name": "Read",
        "description": "read a file",
        "parameters": {"type": "object", "properties": {"p": {"type": "string"}}, "additionalProperties": False},
    }
    assert "$schema" not in json.dumps(tools)
    assert any("web_search" in w for w in r.warnings)


def case_12(r: OpenAIRequest) -> None:
    call_id = r.body["messages"][1]["tool_calls"][0]["id"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call_id)
    assert r.body["messages"][2]["tool_call_id"] == call_id
    assert r.body["messages"][1]["tool_calls"][1]["id"] == "abcDEF123"  # conforming ids are kept


CALLS_AB = {
    "role": "assistant",
    "content": [
        {"type": "tool_use", "id": "A", "name": "Read", "input": {}},
        {"type": "tool_use", "id": "B", "name": "Read", "input": {}},
    ],
}

CASES: list[tuple[str, dict[str, Any], dict[str, Any], Callable[[OpenAIRequest], None]]] = [
    (
        "c01-system-string",
        body([{"role": "user", "content": "hello"}], system="S", metadata={"user_id": "{}"}, service_tier="x"),
        {},
        case_01,
    ),
    (
        "c02-system-blocks-cache-control",
        body(
            [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}],
            system=[
                {"type": "text", "text": "one"},
                {"type": "text", "text": "two", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "three", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
            ],
            cache_control={"type": "ephemeral"},
        ),
        {},
        case_02,
    ),
    (
        "c03-system-role-mid-array",
        body(
            [
                {"role": "user", "content": "u1"},
                {"role": "system", "content": [{"type": "text", "text": "mid-array system"}]},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ],
            system="S",
        ),
        {},
        case_03,
    ),
    (
        "c04-user-text-blocks",
        body([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
        {},
        case_04_text,
    ),
    (
        "c04-user-image",
        body(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image", "source": PNG},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    ],
                }
            ]
        ),
        {},
        case_04_image,
    ),
    (
        "c05-assistant-text-and-tool-uses",
        body(
            [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "toolu_A", "name": "Read", "input": {"path": "/x"}},
                        {"type": "tool_use", "id": "toolu_B", "name": "Bash", "input": {"cmd": "ls -l", "n": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_A", "content": "x"},
                        {"type": "tool_result", "tool_use_id": "toolu_B", "content": "y"},
                    ],
                },
            ]
        ),
        {},
        case_05,
    ),
    (
        "c06-tool-results-reordered",
        body(
            [
                {"role": "user", "content": "go"},
                CALLS_AB,
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "B", "content": [{"type": "text", "text": "result B"}]},
                        {"type": "tool_result", "tool_use_id": "A", "content": "result A"},
                        {"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}},
                    ],
                },
            ]
        ),
        {},
        case_06,
    ),
    (
        "c07-tool-error-with-image",
        body(
            [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "A", "name": "Shot", "input": {}}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "A",
                            "is_error": True,
                            "content": [{"type": "text", "text": "it broke"}, {"type": "image", "source": PNG}],
                        }
                    ],
                },
            ]
        ),
        {},
        case_07,
    ),
    (
        "c08-thinking-in-history",
        body(
            [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "answer"},
                    ],
                },
                {"role": "user", "content": "more"},
            ]
        ),
        {},
        case_08,
    ),
    (
        "c09-tools-cleaned-server-tool-dropped",
        body(
            [{"role": "user", "content": "q"}],
            tools=[
                {
                    "name": "Read",
                    "description": "read a file",
                    "input_schema": {
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "type": "object",
                        "properties": {"p": {"type": "string"}},
                        "additionalProperties": False,
                    },
                    "cache_control": {"type": "ephemeral"},
                    "strict": True,
                },
                {"name": "ToolSearch", "input_schema": {"type": "object"}, "defer_loading": True, "type": "custom"},
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
            ],
        ),
        {},
        case_09,
    ),
    (
        "c12-mistral-tool-ids",
        body(
            [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_01XYZ-long-id", "name": "Read", "input": {}},
                        {"type": "tool_use", "id": "abcDEF123", "name": "Read", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_01XYZ-long-id", "content": "r"},
                        {"type": "tool_result", "tool_use_id": "abcDEF123", "content": "r2"},
                    ],
                },
            ]
        ),
        {"mistral_tool_ids": True},
        case_12,
    ),
]


@pytest.mark.parametrize(("b", "kwargs", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conformance_request(b: dict[str, Any], kwargs: dict[str, Any], check: Callable[[OpenAIRequest], None]) -> None:
    check(translate(b, **kwargs))


TOOLS = [{"name": "Read", "input_schema": {"type": "object"}}, {"name": "Bash", "input_schema": {"type": "object"}}]


@pytest.mark.parametrize(
    ("choice", "tools", "expected"),
    [
        ({"type": "any"}, TOOLS, {"tool_choice": "required"}),
        ({"type": "tool", "name": "Bash"}, TOOLS, {"tool_choice": {"type": "function", "function": {"name": "Bash"}}}),
        ({"type": "none"}, TOOLS, {"tool_choice": "none"}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            TOOLS,
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
        ({"type": "any"}, [], {}),
        ({"type": "auto"}, [{"type": "bash_20250124", "name": "bash"}], {}),
    ],
    ids=["c10-any", "c10-tool", "c10-none", "c10-auto-no-parallel", "c10-no-tools", "c10-only-server-tools"],
)
def test_conformance_tool_choice(choice: dict[str, Any], tools: list[Any], expected: dict[str, Any]) -> None:
    r = translate(body([{"role": "user", "content": "q"}], tools=tools, tool_choice=choice))
    got = {k: r.body[k] for k in ("tool_choice", "parallel_tool_calls") if k in r.body}
    assert got == expected
    assert ("tools" in r.body) == bool(expected)


def test_conformance_c11_clamp_thinking_top_k() -> None:
    b = body(
        [{"role": "user", "content": "q"}],
        max_tokens=128000,
        thinking={"type": "enabled", "budget_tokens": 2048},
        top_k=40,
        temperature=0.3,
        top_p=0.9,
    )
    r = translate(b, max_output_tokens=8192)
    assert r.body["max_tokens"] == 8192
    assert r.body["enable_thinking"] is True
    assert r.body["reasoning_effort"] == "low"
    assert (r.body["top_k"], r.body["temperature"], r.body["top_p"]) == (40, 0.3, 0.9)
    assert r.thinking
    strict = translate(b, max_output_tokens=8192, dialect="openai")
    assert "top_k" not in strict.body
    assert "enable_thinking" not in strict.body
    assert translate(b, max_output_tokens=None).body["max_tokens"] == 128000


# --- thinking and output_config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("thinking", "config", "dialect", "expected", "emit"),
    [
        (None, None, "mistralrs", {}, False),
        ({"type": "disabled"}, {"effort": "high"}, "mistralrs", {"enable_thinking": False}, False),
        (
            {"type": "enabled", "budget_tokens": 8000},
            None,
            "mistralrs",
            {"enable_thinking": True, "reasoning_effort": "medium"},
            True,
        ),
        (
            {"type": "enabled", "budget_tokens": 20000},
            None,
            "mistralrs",
            {"enable_thinking": True, "reasoning_effort": "high"},
            True,
        ),
        (
            {"type": "adaptive", "display": "omitted"},
            {"effort": "medium"},
            "mistralrs",
            {"enable_thinking": True, "reasoning_effort": "medium"},
            False,
        ),
        (
            {"type": "adaptive"},
            {"effort": "max"},
            "mistralrs",
            {"enable_thinking": True, "reasoning_effort": "xhigh"},
            True,
        ),
        ({"type": "adaptive"}, {"effort": "xhigh"}, "openai", {"reasoning_effort": "high"}, True),
        (None, {"effort": "low"}, "mistralrs", {"reasoning_effort": "low"}, False),
    ],
    ids=[
        "absent",
        "disabled",
        "budget-medium",
        "budget-high",
        "claude-code-omitted",
        "max-mistralrs",
        "xhigh-openai",
        "effort-only",
    ],
)
def test_thinking_mapping(
    thinking: dict[str, Any] | None, config: dict[str, Any] | None, dialect: Any, expected: dict[str, Any], emit: bool
) -> None:
    extra: dict[str, Any] = {}
    if thinking is not None:
        extra["thinking"] = thinking
    if config is not None:
        extra["output_config"] = config
    r = translate(body([{"role": "user", "content": "q"}], **extra), dialect=dialect)
    got = {k: r.body[k] for k in ("enable_thinking", "reasoning_effort") if k in r.body}
    assert got == expected
    assert r.thinking is emit


def test_output_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = translate(
        body([{"role": "user", "content": "q"}], output_config={"format": {"type": "json_schema", "schema": schema}})
    )
    assert r.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


# --- conversation repairs --------------------------------------------------------------------------


def test_missing_result_gets_synthetic_and_orphan_becomes_text() -> None:
    r = translate(
        body(
            [
                {"role": "user", "content": "go"},
                CALLS_AB,
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "A", "content": "ra"},
                        {"type": "tool_result", "tool_use_id": "Z", "content": "rz"},
                    ],
                },
            ]
        )
    )
    assert roles(r) == ["user", "assistant", "tool", "tool", "user"]
    assert r.body["messages"][3] == {"role": "tool", "tool_call_id": "B", "content": "(no result)"}
    assert r.body["messages"][4]["content"] == "Tool result Z: rz"


def test_calls_followed_by_plain_user_and_trailing_calls_get_results() -> None:
    r = translate(
        body([{"role": "user", "content": "go"}, CALLS_AB, {"role": "user", "content": "never mind"}, CALLS_AB])
    )
    assert roles(r) == ["user", "assistant", "tool", "tool", "user", "assistant", "tool", "tool"]
    assert {m["content"] for m in r.body["messages"] if m["role"] == "tool"} == {"(no result)"}


def test_consecutive_roles_merge() -> None:
    r = translate(
        body(
            [
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "image", "source": PNG}]},
                {"role": "assistant", "content": "x"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "A", "name": "Read", "input": {}}]},
                {"role": "assistant", "content": "y"},
            ]
        )
    )
    assert roles(r) == ["user", "assistant", "tool"]
    assert [p["type"] for p in r.body["messages"][0]["content"]] == ["text", "text", "image_url"]
    assistant = r.body["messages"][1]
    assert assistant["content"] == "x\ny"
    assert [c["id"] for c in assistant["tool_calls"]] == ["A"]


def test_assistant_content_null_only_with_tool_calls() -> None:
    r = translate(
        body(
            [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "A", "name": "Read", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "A"}]},
                {"role": "assistant", "content": []},
            ]
        )
    )
    assert r.body["messages"][1]["content"] is None
    assert r.body["messages"][2] == {"role": "tool", "tool_call_id": "A", "content": ""}
    assert r.body["messages"][3] == {"role": "assistant", "content": ""}  # trailing prefill kept


def test_text_document_and_billing_header() -> None:
    doc = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "DOC"}, "title": "T"}
    b = body(
        [{"role": "user", "content": [doc, {"type": "text", "text": "summarise"}]}],
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=1"}, {"type": "text", "text": "S"}],
    )
    r = translate(b)
    assert r.body["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "T\nDOC\nsummarise"}]
    kept = translate(b, drop_billing_header=False)
    assert kept.body["messages"][0]["content"].startswith("x-anthropic-billing-header:")


def test_tool_names_outside_openai_pattern_are_aliased_consistently() -> None:
    name = "mcp.server/do thing"
    r = translate(
        body(
            [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "A", "name": name, "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "A", "content": "ok"}]},
            ],
            tools=[{"name": name, "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": name},
        )
    )
    alias = r.body["tools"][0]["function"]["name"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", alias)
    assert r.body["messages"][1]["tool_calls"][0]["function"]["name"] == alias
    assert r.body["tool_choice"]["function"]["name"] == alias
    assert r.tool_aliases == {alias: name}


def test_stream_stop_sequences_and_unknown_fields() -> None:
    r = translate(
        body(
            [{"role": "user", "content": "q"}],
            stream=True,
            stop_sequences=["END", ""],
            context_management={"edits": []},
            container="c",
            speed="fast",
            inference_geo="us",
            some_future_field={"x": 1},
        )
    )
    assert r.stream
    assert r.body["stream"] is True
    assert r.body["stream_options"] == {"include_usage": True}
    assert "stop" not in r.body  # cortex matches stop sequences itself
    assert r.stop_sequences == ("END",)
    assert r.input_tokens_estimate > 0
    assert "stream" not in translate(body([{"role": "user", "content": "q"}], stream=True), stream_upstream=False).body
    assert translate(body([{"role": "user", "content": "q"}]), stream_upstream=True).body["stream"] is True


def test_output_shares_tool_schemas_without_mutating_input() -> None:
    schema = {"type": "object", "properties": {}}
    b = body([{"role": "user", "content": "q"}], tools=[{"name": "T", "input_schema": schema}])
    snapshot = json.dumps(b, sort_keys=True)
    r = translate(b)
    assert r.body["tools"][0]["function"]["parameters"] is schema
    assert json.dumps(b, sort_keys=True) == snapshot


# --- validation ------------------------------------------------------------------------------------

BAD: list[tuple[str, Any, str]] = [
    ("not-an-object", [1, 2], "JSON object"),
    ("no-model", {"max_tokens": 5, "messages": [{"role": "user", "content": "q"}]}, "model"),
    ("no-max-tokens", {"model": "m", "messages": [{"role": "user", "content": "q"}]}, "max_tokens"),
    ("max-tokens-zero", body([{"role": "user", "content": "q"}], max_tokens=0), "max_tokens"),
    ("max-tokens-string", body([{"role": "user", "content": "q"}], max_tokens="9"), "max_tokens"),
    ("max-tokens-bool", body([{"role": "user", "content": "q"}], max_tokens=True), "max_tokens"),
    ("no-messages", body([]), "messages"),
    ("bad-role", body([{"role": "robot", "content": "q"}]), "role"),
    ("bad-content", body([{"role": "user", "content": 5}]), "content"),
    (
        "pdf",
        body(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "x"}}
                    ],
                }
            ]
        ),
        "PDF",
    ),
    (
        "image-file",
        body([{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]),
        "file",
    ),
    (
        "image-bmp",
        body([{"role": "user", "content": [{"type": "image", "source": {**PNG, "media_type": "image/bmp"}}]}]),
        "image/bmp",
    ),
    ("safeguards", body([{"role": "user", "content": "q"}], safeguards={"x": 1}), "safeguards"),
    ("stop-not-list", body([{"role": "user", "content": "q"}], stop_sequences="END"), "stop_sequences"),
    ("temperature-string", body([{"role": "user", "content": "q"}], temperature="hot"), "temperature"),
    ("tool-without-name", body([{"role": "user", "content": "q"}], tools=[{"input_schema": {}}]), "tools.0.name"),
    (
        "tool-choice-no-name",
        body([{"role": "user", "content": "q"}], tools=TOOLS, tool_choice={"type": "tool"}),
        "tool_choice",
    ),
    ("thinking-bogus", body([{"role": "user", "content": "q"}], thinking={"type": "sometimes"}), "thinking"),
    (
        "tool-use-input-string",
        body([{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "n", "input": "{}"}]}]),
        "input",
    ),
    (
        "tool-result-no-id",
        body([{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
        "tool_use_id",
    ),
]


@pytest.mark.parametrize(("b", "needle"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_invalid_requests_raise_400(b: Any, needle: str) -> None:
    with pytest.raises(AnthropicError) as info:
        to_openai(b, upstream_model="m")
    err = info.value
    assert (err.status, err.type) == (400, "invalid_request_error")
    assert needle in err.message
    assert err.headers() == {"x-should-retry": "false"}
