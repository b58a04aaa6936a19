"""OpenAI chunks → Anthropic stream events: translation.md §8 cases 17-31, checked strictly.

Every emitted event is validated with the SDK's own types (extra fields rejected too) and the
§1.4 grammar; every final message is rebuilt with the SDK's accumulator
(``anthropic.lib.streaming._messages.accumulate_event``) and, for the end-to-end cases, read by
the real SDK stream helper through an in-process ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anthropic
import httpx2 as httpx
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.proxy.anthropic import (
    DONE,
    AnthropicError,
    Event,
    SSEDecoder,
    StreamTranslator,
    encode_event,
    encode_sse,
    message_from_events,
    parse_data,
)

EVENT: pydantic.TypeAdapter[RawMessageStreamEvent] = pydantic.TypeAdapter(RawMessageStreamEvent)

# --- strict validation helpers (also used by the property tests) -----------------------------------


def assert_no_extras(value: Any) -> None:
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{type(value).__name__} has unknown fields {value.model_extra}"
        for name in type(value).model_fields:
            assert_no_extras(getattr(value, name))
    elif isinstance(value, list):
        for item in value:
            assert_no_extras(item)


def validate_event(event: Event) -> RawMessageStreamEvent | None:
    """Validate one event strictly; ``None`` for ping and error, which the union does not cover."""
    if event["type"] == "ping":
        assert event == {"type": "ping"}
        return None
    if event["type"] == "error":
        anthropic.types.ErrorResponse.model_validate(event, strict=True)
        return None
    parsed = EVENT.validate_python(event, strict=True)
    assert_no_extras(parsed)
    return parsed


def check_grammar(events: Sequence[Event]) -> None:
    """The §1.4 ordering rules, for the strictest client."""
    assert events, "no events"
    errored = events[-1]["type"] == "error"
    assert all(e["type"] != "error" for e in events[:-1]), "events after an error"
    if not errored:
        assert events[0]["type"] == "message_start"
        assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    open_index: int | None = None
    next_index = 0
    tool_json: dict[int, str] = {}
    for pos, event in enumerate(events):
        validate_event(event)
        kind = event["type"]
        if kind == "message_start":
            assert pos == 0
            usage = event["message"]["usage"]
            assert usage["input_tokens"] > 0, "message_start usage is all zeros"
        elif kind == "content_block_start":
            assert open_index is None, "two blocks open at once"
            assert event["index"] == next_index, "block indexes not contiguous"
            open_index = next_index
            next_index += 1
            block = event["content_block"]
            if block["type"] == "tool_use":
                assert block["input"] == {}
                tool_json[open_index] = ""
            elif block["type"] == "thinking":
                assert block == {"type": "thinking", "thinking": "", "signature": ""}
        elif kind == "content_block_delta":
            assert event["index"] == open_index, "delta for a block that is not open"
            if event["delta"]["type"] == "input_json_delta":
                tool_json[event["index"]] += event["delta"]["partial_json"]
            elif event["delta"]["type"] == "text_delta":
                assert event["delta"]["text"]
        elif kind == "content_block_stop":
            assert event["index"] == open_index
            open_index = None
        elif kind == "message_delta":
            assert open_index is None
            assert event["delta"]["stop_reason"] is not None
            assert isinstance(event["usage"]["output_tokens"], int)
            assert isinstance(event["usage"]["input_tokens"], int)
            assert events[pos + 1]["type"] == "message_stop"
    for text in tool_json.values():
        assert isinstance(json.loads(text), dict), "partial_json does not join to one object"


def sdk_message(events: Sequence[Event]) -> anthropic.types.Message:
    """Rebuild the final message with the SDK's own accumulator."""
    snapshot: Any = None
    buffers: dict[int, bytes] = {}
    for event in events:
        parsed = validate_event(event)
        if parsed is not None:
            snapshot = accumulate_event(event=parsed, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    message = anthropic.types.Message.model_validate(snapshot.model_dump(exclude={"parsed_output"}))
    assert_no_extras(message)
    # cortex's own fold (for non-streaming clients served from a stream) must agree with the SDK.
    folded = anthropic.types.Message.model_validate(message_from_events(events), strict=True)
    assert_no_extras(folded)
    assert folded.model_dump() == message.model_dump()
    return message


def blocks(message: anthropic.types.Message) -> list[dict[str, Any]]:
    return [b.model_dump(exclude_none=True) for b in message.content]


# --- upstream chunk builders ----------------------------------------------------------------------


def chunk(
    delta: Mapping[str, Any] | None = None, finish: str | None = None, usage: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A mistral.rs-style chunk: role in every delta, usage null until the finish chunk."""
    return {
        "id": "7",
        "object": "chat.completion.chunk",
        "created": 1760000000,
        "model": "org/model",
        "system_fingerprint": "local",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", **(delta or {})}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage,
    }


def text(s: str) -> dict[str, Any]:
    return chunk({"content": s})


def tool(index: int, *, call_id: str | None = None, name: str | None = None, args: str | None = None) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {}}
    if call_id is not None:
        fragment.update(id=call_id, type="function")
    if name is not None:
        fragment["function"]["name"] = name
    if args is not None:
        fragment["function"]["arguments"] = args
    return fragment


USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129, "avg_tok_per_sec": 3.0}
Item = Mapping[str, Any] | str  # a chunk, or "DONE" / "EOF" / "PING"


def run(items: Sequence[Item], **kwargs: Any) -> tuple[list[Event], StreamTranslator]:
    translator = StreamTranslator(model="claude-test", input_tokens_estimate=42, **kwargs)
    events: list[Event] = []
    for item in items:
        if item == "DONE":
            events += translator.finish(saw_done=True)
        elif item == "EOF":
            events += translator.finish()
        elif item == "PING":
            events += translator.ping()
        else:
            assert not isinstance(item, str)
            events += translator.feed(item)
    check_grammar(events)
    return events, translator


def shape(events: Sequence[Event]) -> list[str]:
    """A compact picture of the stream: ``cbs(0,text)``, ``td``, ``cbstop(0)``..."""
    out = []
    for e in events:
        kind = e["type"]
        if kind == "content_block_start":
            out.append(f"cbs({e['index']},{e['content_block']['type']})")
        elif kind == "content_block_delta":
            out.append({"text_delta": "td", "input_json_delta": "ij", "thinking_delta": "th"}[e["delta"]["type"]])
        elif kind == "content_block_stop":
            out.append(f"cbstop({e['index']})")
        elif kind == "message_delta":
            out.append(f"message_delta({e['delta']['stop_reason']})")
        else:
            out.append(kind)
    return out


# --- §8 cases 17-31 -------------------------------------------------------------------------------

ARGS = '{"file_path": "/x", "limit": 3}'


def c17(events: list[Event], m: anthropic.types.Message) -> None:
    assert shape(events) == [
        "message_start",
        "ping",
        "cbs(0,text)",
        "td",
        "td",
        "cbstop(0)",
        "message_delta(end_turn)",
        "message_stop",
    ]
    assert blocks(m) == [{"type": "text", "text": "Hello"}]
    assert (m.usage.input_tokens, m.usage.output_tokens) == (120, 9)


def c18(events: list[Event], m: anthropic.types.Message) -> None:
    assert shape(events)[2:9] == [
        "cbs(0,text)",
        "td",
        "cbstop(0)",
        "cbs(1,tool_use)",
        "ij",
        "cbstop(1)",
        "message_delta(tool_use)",
    ]
    partial = "".join(
        e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1
    )
    assert json.loads(partial) == json.loads(ARGS)
    assert blocks(m)[1] == {"type": "tool_use", "id": "call_1", "name": "Read", "input": json.loads(ARGS)}


def c19(events: list[Event], m: anthropic.types.Message) -> None:
    assert blocks(m) == [
        {"type": "text", "text": "Reading."},
        {"type": "tool_use", "id": "A1b2C3d4E", "name": "Read", "input": {"file_path": "/x", "limit": 3}},
    ]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["usage"] == {"input_tokens": 120, "output_tokens": 9}
    assert m.stop_reason == "tool_use"


def c20(events: list[Event], m: anthropic.types.Message) -> None:
    assert shape(events)[2:] == [
        "cbs(0,tool_use)",
        "ij",
        "cbstop(0)",
        "cbs(1,tool_use)",
        "ij",
        "cbstop(1)",
        "message_delta(tool_use)",
        "message_stop",
    ]
    assert [b["input"] for b in blocks(m)] == [{"a": 1}, {"b": [2, 3]}]
    assert [b["name"] for b in blocks(m)] == ["First", "Second"]


def c21(events: list[Event], m: anthropic.types.Message) -> None:
    assert [(b["id"], b["input"]) for b in blocks(m)] == [("id_one", {"n": 1}), ("id_two", {"n": 2})]


def c22(events: list[Event], m: anthropic.types.Message) -> None:
    assert shape(events)[2] == "cbs(0,tool_use)"
    assert [b["type"] for b in blocks(m)] == ["tool_use"]


def c24_on(events: list[Event], m: anthropic.types.Message) -> None:
    assert shape(events)[2:8] == ["cbs(0,thinking)", "th", "th", "cbstop(0)", "cbs(1,text)", "td"]
    assert blocks(m) == [
        {"type": "thinking", "thinking": "Let me think", "signature": ""},
        {"type": "text", "text": "Answer"},
    ]


def c24_off(events: list[Event], m: anthropic.types.Message) -> None:
    assert blocks(m) == [{"type": "text", "text": "Answer"}]


def c28(events: list[Event], m: anthropic.types.Message) -> None:
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["usage"]["input_tokens"] == 42  # the estimate, as in message_start
    assert delta["usage"]["output_tokens"] >= 1
    assert m.usage.input_tokens == 42


def c29(events: list[Event], m: anthropic.types.Message) -> None:
    c17(events, m)


def c31(events: list[Event], m: anthropic.types.Message) -> None:
    assert shape(events).count("ping") >= 3
    assert blocks(m) == [{"type": "text", "text": "late"}]


REASONING: list[Item] = [
    chunk({"reasoning_content": "Let me "}),
    chunk({"reasoning_content": "think"}),
    text("Answer"),
    chunk(finish="stop", usage=USAGE),
    "DONE",
]

STREAM_CASES: list[tuple[str, list[Item], dict[str, Any], Callable[[list[Event], anthropic.types.Message], None]]] = [
    ("c17-text", [chunk(), text(""), text("Hel"), text("lo"), chunk(finish="stop", usage=USAGE), "DONE"], {}, c17),
    (
        "c17-text-openai-usage-chunk",
        [chunk(), text("Hel"), text("lo"), chunk(finish="stop"), {"choices": [], "usage": USAGE}, "DONE"],
        {},
        c17,
    ),
    (
        "c18-fragmented-tool",
        [
            text("Let me read."),
            chunk({"tool_calls": [tool(0, call_id="call_1", name="Read", args="")]}),
            chunk({"tool_calls": [tool(0, args=ARGS[:7])]}),
            chunk({"tool_calls": [tool(0, args=ARGS[7:20])]}),
            chunk({"tool_calls": [tool(0, args=ARGS[20:])]}),
            chunk(finish="tool_calls"),
            {"choices": [], "usage": USAGE},
            "DONE",
        ],
        {},
        c18,
    ),
    (
        "c19-mistralrs-whole-call-in-final-chunk",
        [
            text("Reading."),
            chunk(
                {"tool_calls": [tool(0, call_id="A1b2C3d4E", name="Read", args=ARGS)]}, finish="tool_calls", usage=USAGE
            ),
            "DONE",
        ],
        {},
        c19,
    ),
    (
        "c20-parallel-interleaved",
        [
            chunk({"tool_calls": [tool(0, call_id="c0", name="First", args='{"a"')]}),
            chunk({"tool_calls": [tool(1, call_id="c1", name="Second", args='{"b":[2,')]}),
            chunk({"tool_calls": [tool(0, args=":1}")]}),
            chunk({"tool_calls": [tool(1, args="3]}")]}),
            chunk(finish="tool_calls", usage=USAGE),
            "DONE",
        ],
        {},
        c20,
    ),
    (
        "c21-reused-index",
        [
            chunk({"tool_calls": [tool(0, call_id="id_one", name="T", args='{"n":1}')]}),
            chunk({"tool_calls": [tool(0, call_id="id_two", name="T", args='{"n":2}')]}),
            chunk(finish="tool_calls", usage=USAGE),
            "DONE",
        ],
        {},
        c21,
    ),
    (
        "c22-starts-with-tool",
        [
            chunk({"tool_calls": [tool(0, call_id="x", name="T", args="{}")]}),
            chunk(finish="tool_calls", usage=USAGE),
            "DONE",
        ],
        {},
        c22,
    ),
    (
        "c23-whitespace-before-tool",
        [
            text("\n\n"),
            chunk({"tool_calls": [tool(0, call_id="x", name="T", args="{}")]}),
            chunk(finish="tool_calls", usage=USAGE),
            "DONE",
        ],
        {},
        c22,
    ),
    ("c24-reasoning-thinking-on", REASONING, {"thinking": True}, c24_on),
    ("c24-reasoning-thinking-off", REASONING, {"thinking": False}, c24_off),
    ("c28-no-usage-anywhere", [text("x"), chunk(finish="stop"), "DONE"], {}, c28),
    (
        "c31-pings-while-silent",
        ["PING", "PING", text("late"), "PING", chunk(finish="stop", usage=USAGE), "DONE"],
        {},
        c31,
    ),
]


@pytest.mark.parametrize(("items", "kwargs", "check"), [c[1:] for c in STREAM_CASES], ids=[c[0] for c in STREAM_CASES])
def test_conformance_stream(
    items: list[Item], kwargs: dict[str, Any], check: Callable[[list[Event], anthropic.types.Message], None]
) -> None:
    events, translator = run(items, **kwargs)
    assert translator.done
    check(events, sdk_message(events))


def test_c25_error_chunk_after_text() -> None:
    error = {"error": {"message": "engine failed", "type": "server_error", "param": None, "code": None}}
    events, translator = run([text("partial"), error, "DONE"])
    assert events[-1] == {"type": "error", "error": {"type": "api_error", "message": "engine failed"}}
    assert "message_stop" not in shape(events)
    assert "message_delta" not in shape(events)
    assert translator.done
    assert translator.feed(text("more")) == []
    assert translator.ping() == []


def test_message_from_events_raises_the_stream_error() -> None:
    events, _ = run([text("x"), {"error": {"message": "Prompt sequence length is greater than 99"}}])
    with pytest.raises(AnthropicError) as info:
        message_from_events(events)
    assert (info.value.status, info.value.type) == (400, "invalid_request_error")
    assert info.value.message.endswith("> 99 maximum")
    events, _ = run([text("x"), "EOF"])
    with pytest.raises(AnthropicError) as info:
        message_from_events(events)
    assert (info.value.status, info.value.type) == (500, "api_error")


def test_c26_eof_without_finish_or_done() -> None:
    events, _ = run([text("partial"), "EOF"])
    assert shape(events)[-1] == "error"
    assert events[-1]["error"] == {"type": "api_error", "message": "upstream stream ended unexpectedly"}
    # With a clean [DONE] but no finish_reason the spec reads end_turn.
    events, _ = run([text("partial"), "DONE"])
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


def test_c29_upstream_noise_is_ignored() -> None:
    raw = (
        b": keep-alive\n\n"
        + b"data:"
        + json.dumps(chunk()).encode()
        + b"\n\n"
        + b"data: "
        + json.dumps(text("Hel")).encode()
        + b"\r\n\r\n"
        + b':\n\nevent:agentic_tool_call_progress\ndata:{"tool":"x"}\n\n'
        + b"data:"
        + json.dumps(text("lo")).encode()
        + b"\n\n"
        + b"data:\n\n"
        + b"data:"
        + json.dumps(chunk(finish="stop")).encode()
        + b"\n\n"
        + b'data:{"choices":[],"usage":'
        + json.dumps(USAGE).encode()
        + b"}\n\ndata:[DONE]\n\n"
    )
    decoder = SSEDecoder()
    items: list[Item] = []
    for i in range(0, len(raw), 7):  # arbitrary network fragmentation
        for name, data in decoder.feed(raw[i : i + 7]):
            parsed = parse_data(name, data)
            if parsed is not None:
                items.append("DONE" if parsed == DONE else parsed)
    assert decoder.close() == []
    events, _ = run(items)
    c17(events, sdk_message(events))


def test_c30_stop_sequence_closes_the_stream() -> None:
    translator = StreamTranslator(model="m", stop_sequences=["END"])
    events = translator.feed(text("abcE")) + translator.feed(text("NDxyz"))
    check_grammar(events)
    assert translator.done
    assert translator.stop_sequence == "END"
    assert translator.feed(text("more")) == []
    assert translator.finish(saw_done=True) == []
    m = sdk_message(events)
    assert blocks(m) == [{"type": "text", "text": "abc"}]
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", "END")


def test_c30_stop_sequence_split_over_many_chunks_never_leaks() -> None:
    events, translator = run([text(c) for c in "xx<<STOP>>yy"], stop_sequences=["<<STOP>>", "zz"])
    assert translator.done
    emitted = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert emitted == "xx"


def test_cumulative_argument_resends_and_odd_arguments() -> None:
    events, _ = run(
        [
            chunk({"tool_calls": [tool(0, call_id="a", name="T", args='{"k":')]}),
            chunk({"tool_calls": [tool(0, args='{"k": "v"}')]}),  # an upstream resending the whole text
            chunk({"tool_calls": [tool(1, call_id="b", name="U", args='"{\\"d\\":1}"')]}),  # double-encoded
            chunk({"tool_calls": [{"index": 2, "id": "c", "function": {"name": "V", "arguments": {"obj": True}}}]}),
            chunk({"tool_calls": [tool(3, name="W", args="not json")]}),  # no id: one is generated
            chunk(finish="stop", usage=USAGE),
        ]
    )
    m = sdk_message(events)
    assert [b["input"] for b in blocks(m)] == [{"k": "v"}, {"d": 1}, {"obj": True}, {}]
    assert blocks(m)[3]["id"].startswith("toolu_")
    assert m.stop_reason == "tool_use"  # stop with tool blocks reads tool_use


def test_nested_same_key_is_not_mistaken_for_a_resend() -> None:
    events, _ = run(
        [
            chunk({"tool_calls": [tool(0, call_id="a", name="T", args='{"a":')]}),
            chunk({"tool_calls": [tool(0, args='{"a":1}}')]}),
            chunk(finish="tool_calls", usage=USAGE),
        ]
    )
    assert blocks(sdk_message(events))[0]["input"] == {"a": {"a": 1}}


def test_length_with_partial_call_and_aliases() -> None:
    events, _ = run(
        [
            chunk(
                {"tool_calls": [tool(0, call_id="a", name="my_tool_1234abcd", args='{"a": [1, 2')]},
                finish="length",
                usage=USAGE,
            )
        ],
        tool_aliases={"my_tool_1234abcd": "my.tool"},
    )
    m = sdk_message(events)
    assert m.stop_reason == "max_tokens"
    assert blocks(m)[0]["name"] == "my.tool"
    assert blocks(m)[0]["input"] == {}


def test_content_filter_cached_usage_and_interleaved_text_around_reasoning() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 70}}
    events, _ = run(
        [
            text("a"),
            chunk({"reasoning": "r1"}),
            text("  "),
            chunk({"reasoning": "r2"}),
            text("b"),
            chunk(finish="content_filter", usage=usage),
        ]
    )
    m = sdk_message(events)
    assert blocks(m) == [
        {"type": "text", "text": "a"},
        {"type": "thinking", "thinking": "r1r2", "signature": ""},
        {"type": "text", "text": "b"},
    ]
    assert m.stop_reason == "refusal"
    assert (m.usage.input_tokens, m.usage.cache_read_input_tokens) == (30, 70)


def test_empty_stream_and_error_before_start() -> None:
    events, _ = run([chunk(finish="stop", usage=USAGE)])
    assert shape(events) == ["message_start", "ping", "message_delta(end_turn)", "message_stop"]
    translator = StreamTranslator(model="m")
    assert translator.feed({"error": {"message": "Prompt sequence length is greater than 10"}})[0]["type"] == "error"
    assert not translator.started
    assert StreamTranslator(model="m").error("gone", "overloaded_error") == [
        {"type": "error", "error": {"type": "overloaded_error", "message": "gone"}}
    ]


def test_message_start_carries_estimate_and_choice_zero_only() -> None:
    translator = StreamTranslator(model="claude-x", input_tokens_estimate=0, message_id="msg_1")
    first = translator.ping()
    assert first[0]["message"]["usage"] == {"input_tokens": 1, "output_tokens": 0}
    assert first[0]["message"]["model"] == "claude-x"
    assert first[0]["message"]["id"] == "msg_1"
    other = {"choices": [{"index": 1, "delta": {"content": "ignored"}, "finish_reason": None}]}
    assert translator.feed(other) == []


# --- SSE encoding, and the real SDK reading our bytes ----------------------------------------------


def test_encode_sse() -> None:
    assert encode_sse("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert encode_event({"type": "content_block_delta", "delta": {"text": "é"}}) == (
        'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"é"}}\n\n'.encode()
    )


def test_sse_decoder_line_ends_and_eof() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: a\r") == []
    assert decoder.feed(b"\ndata: 1\rdata:2\r\n\r\nid: 5\nretry: 9\ndata: x") == [("a", "1\n2")]
    assert decoder.close() == [(None, "x")]
    assert parse_data("message", " [DONE] ") == DONE
    assert parse_data(None, "[1]") is None
    assert parse_data(None, "{bad") is None


def sdk_stream(events: Sequence[Event]) -> tuple[anthropic.types.Message, list[str]]:
    body = b"".join(encode_event(e) for e in events)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    client = anthropic.Anthropic(
        api_key="k", base_url="http://cortex.test", http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )
    params: dict[str, Any] = {"model": "claude-test", "max_tokens": 64, "messages": [{"role": "user", "content": "q"}]}
    raw = [e.type for e in client.messages.create(stream=True, **params)]
    with client.messages.stream(**params) as stream:
        return stream.get_final_message(), raw


@pytest.mark.parametrize(
    "case", ["c17-text", "c18-fragmented-tool", "c19-mistralrs-whole-call-in-final-chunk", "c24-reasoning-thinking-on"]
)
def test_sdk_helper_reads_the_stream(case: str) -> None:
    items, kwargs, _ = next(c[1:] for c in STREAM_CASES if c[0] == case)
    events, _ = run(items, **kwargs)
    final, raw = sdk_stream(events)
    assert blocks(final) == blocks(sdk_message(events))
    assert final.stop_reason == sdk_message(events).stop_reason
    assert raw == [e["type"] for e in events if e["type"] != "ping"]  # the SDK swallows pings
    if case == "c17-text":
        assert final.content[0].type == "text"
        assert final.content[0].text == "Hello"


def test_sdk_raises_on_error_event() -> None:
    events, _ = run([text("partial"), {"error": {"message": "boom", "type": "server_error"}}])
    with pytest.raises(anthropic.APIStatusError):
        sdk_stream(events)


# --- properties: any upstream style, any re-splitting, the same final message ----------------------


PIECE_TEXT = st.text(st.characters(codec="utf-8", max_codepoint=0x1F600) | st.sampled_from(' \n\t{}":,'), max_size=12)
KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
TOOL_ARGS = st.dictionaries(KEYS, JSON, max_size=4)
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(draw: Callable[[st.SearchStrategy[set[int]]], set[int]], s: str) -> list[str]:
    """Cut ``s`` at arbitrary points (possibly none)."""
    if len(s) < 2:
        return [s]
    cuts = sorted(draw(st.sets(st.integers(1, len(s) - 1), max_size=len(s) - 1)))
    return [s[a:b] for a, b in zip([0, *cuts], [*cuts, len(s)], strict=True)]


def interleave(draw: st.DrawFn, queues: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge per-call fragment lists, keeping each call's order and starting calls in order."""
    queues = [list(q) for q in queues]
    out: list[dict[str, Any]] = []
    started = 0
    while any(queues):
        choices = [i for i in range(started) if queues[i]]
        if started < len(queues):
            choices.append(started)
        i = draw(st.sampled_from(choices))
        if i == started:
            started += 1
        out.append(queues[i].pop(0))
    return out


@st.composite
def upstream(draw: st.DrawFn) -> dict[str, Any]:
    """An upstream response script, its chunks, and the final message it must produce."""
    segments = draw(st.lists(st.tuples(st.sampled_from(["text", "thinking"]), PIECE_TEXT), max_size=5))
    calls = [(f"call_{i}", f"tool_{i}", args) for i, args in enumerate(draw(st.lists(TOOL_ARGS, max_size=3)))]
    style = draw(st.sampled_from(["whole", "fragmented", "reused", "cumulative"]))
    finish = draw(st.sampled_from(["stop", "tool_calls", "length", "content_filter"]))
    usage_mode = draw(st.sampled_from(["finish", "separate", "none"]))
    thinking = draw(st.booleans())

    chunks: list[dict[str, Any]] = []
    for kind, s in segments:
        field = "content" if kind == "text" else "reasoning_content"
        chunks += [chunk({field: piece}) for piece in split(draw, s)]
    final_delta: dict[str, Any] = {}
    if style == "whole":
        final_delta["tool_calls"] = [
            tool(i, call_id=c, name=n, args=json.dumps(a)) for i, (c, n, a) in enumerate(calls)
        ]
    else:
        queues = []
        for i, (call_id, name, args) in enumerate(calls):
            index = 0 if style == "reused" else i
            pieces = split(draw, json.dumps(args))
            if style == "cumulative":
                pieces = ["".join(pieces[: k + 1]) for k in range(len(pieces))]
            elif draw(st.booleans()):
                pieces = ["", *pieces]  # OpenAI's first fragment carries empty arguments
            first = tool(index, call_id=call_id, name=name, args=pieces[0])
            queues.append([first, *(tool(index, args=p) for p in pieces[1:])])
        fragments = [f for q in queues for f in q] if style == "reused" else interleave(draw, queues)
        while fragments:
            take = draw(st.integers(1, min(2, len(fragments)))) if style != "reused" else 1
            chunks.append(chunk({"tool_calls": fragments[:take]}))
            fragments = fragments[take:]
    usage = {"prompt_tokens": 77, "completion_tokens": 11, "total_tokens": 88}
    chunks.append(chunk(final_delta, finish=finish, usage=usage if usage_mode == "finish" else None))
    if usage_mode == "separate":
        chunks.append({"id": "7", "object": "chat.completion.chunk", "choices": [], "usage": usage})

    # The expected message, computed from the script alone.
    runs: list[list[str]] = []
    for kind, s in segments:
        if not s or (kind == "thinking" and not thinking):
            continue
        if runs and runs[-1][0] == kind:
            runs[-1][1] += s
        else:
            runs.append([kind, s])
    merged: list[list[str]] = []
    for kind, s in runs:
        if kind == "text" and s.isspace():
            continue  # whitespace-only text never makes a block
        if merged and merged[-1][0] == kind:
            merged[-1][1] += s
        else:
            merged.append([kind, s])
    expected: list[dict[str, Any]] = [
        {"type": "text", "text": s} if kind == "text" else {"type": "thinking", "thinking": s, "signature": ""}
        for kind, s in merged
    ]
    expected += [{"type": "tool_use", "id": c, "name": n, "input": a} for c, n, a in calls]
    reason = (
        "max_tokens"
        if finish == "length"
        else "tool_use"
        if calls
        else "refusal"
        if finish == "content_filter"
        else "end_turn"
    )
    return {
        "chunks": chunks,
        "thinking": thinking,
        "expected": expected,
        "reason": reason,
        "usage": usage_mode != "none",
    }


@PROPERTY_SETTINGS
@given(upstream())
def test_property_any_upstream_shape_gives_the_same_message(script: dict[str, Any]) -> None:
    events, translator = run([*script["chunks"], "DONE"], thinking=script["thinking"])
    assert translator.done
    message = sdk_message(events)
    assert blocks(message) == script["expected"]
    assert message.stop_reason == script["reason"]
    if script["usage"]:
        assert (message.usage.input_tokens, message.usage.output_tokens) == (77, 11)


def first_stop(full: str, stops: list[str]) -> tuple[int, str] | None:
    """Oracle: scan prefixes; the first sequence to complete wins, the longer one on a tie."""
    for end in range(1, len(full) + 1):
        for seq in sorted(stops, key=len, reverse=True):
            if full[:end].endswith(seq):
                return end - len(seq), seq
    return None


@PROPERTY_SETTINGS
@given(
    st.data(),
    st.text("abEND \n", max_size=30),
    st.lists(st.text("abEND", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_property_stop_sequences_across_any_chunking(data: st.DataObject, full: str, stops: list[str]) -> None:
    pieces = split(data.draw, full)
    translator = StreamTranslator(model="m", stop_sequences=stops)
    events: list[Event] = []
    for piece in pieces:
        events += translator.feed(text(piece))
    events += translator.feed(chunk(finish="stop")) + translator.finish(saw_done=True)
    check_grammar(events)
    message = sdk_message(events)
    hit = first_stop(full, stops)
    visible = full if hit is None else full[: hit[0]]
    assert blocks(message) == ([{"type": "text", "text": visible}] if visible and not visible.isspace() else [])
    assert message.stop_sequence == (None if hit is None else hit[1])
    assert message.stop_reason == ("end_turn" if hit is None else "stop_sequence")


@PROPERTY_SETTINGS
@given(
    st.data(),
    st.lists(st.tuples(st.sampled_from([None, "message", "other"]), st.text(max_size=20)), max_size=5),
    st.booleans(),
    st.booleans(),
)
def test_property_sse_decoder_survives_any_fragmentation(
    data: st.DataObject, sent: list[tuple[str | None, str]], crlf: bool, spaced: bool
) -> None:
    """Any byte fragmentation decodes the same; ``data:`` with (OpenAI) or without (mistral.rs) a space."""
    newline = "\r\n" if crlf else "\n"
    wire = ":keep-alive" + newline + newline
    expected = []
    for name, payload in sent:
        lines = payload.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        wire += (
            (f"event:{name}{newline}" if name else "")
            + "".join(f"data:{' ' if spaced or line[:1] == ' ' else ''}{line}{newline}" for line in lines)
            + newline
        )
        expected.append((name, "\n".join(lines)))
    raw = wire.encode()
    decoder = SSEDecoder()
    got: list[tuple[str | None, str]] = []
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=8)))
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        got += decoder.feed(raw[a:b])
    got += decoder.close()
    assert got == expected


EXTRA_TEXT_CASES: list[tuple[list[Item], dict[str, Any], int | None]] = [
    # (items, translator arguments, how many chunks the shortcut takes)
    ([text("a"), text("b"), chunk({"content": "c"}, usage=USAGE), chunk(finish="stop"), "DONE"], {}, 1),
    (
        [text("a"), {**text("b"), "choices": [{"index": 1, "delta": {"content": "x"}}, {"delta": {"content": "y"}}]}],
        {},
        0,
    ),
    (
        [
            text("a"),
            chunk({"content": "b", "reasoning_content": "hm"}),
            text("c"),
            chunk({"content": "d", "tool_calls": []}),
        ],
        {},
        2,
    ),
    ([text("a"), text(""), text(" "), chunk({"content": 3}), {"error": {"message": "boom"}}, text("z")], {}, 1),
    ([text('é🙂"\\\n'), text("x"), chunk({"content": "x"}, finish="length"), text("after")], {}, 1),
    ([text("a"), text("b"), text("c")], {"stop_sequences": ["zz"]}, 0),
    ([text("a"), text("b"), text("c")], {"thinking": False}, 2),
]


SHORTCUT_CASES: list[tuple[list[Item], dict[str, Any], int | None]] = [(c[1], c[2], None) for c in STREAM_CASES]


@pytest.mark.parametrize(("items", "kwargs", "taken"), SHORTCUT_CASES + EXTRA_TEXT_CASES)
def test_the_text_delta_shortcut_writes_what_feed_and_encode_write(
    items: list[Item], kwargs: dict[str, Any], taken: int | None
) -> None:
    """``StreamTranslator.text_delta`` (the gateway's path for the usual chunk) against ``feed`` then
    ``encode_event``: the same bytes, chunk by chunk, and the same closing events (its output count)."""

    def translate(shortcut: bool) -> tuple[list[bytes], int]:
        translator = StreamTranslator(model="m", input_tokens_estimate=42, message_id="msg_1", **kwargs)
        out: list[bytes] = []
        took = 0
        for item in items:
            if item == "DONE":
                out.append(b"".join(encode_event(e) for e in translator.finish(saw_done=True)))
            elif item == "EOF":
                out.append(b"".join(encode_event(e) for e in translator.finish()))
            elif item == "PING":
                out.append(b"".join(encode_event(e) for e in translator.ping()))
            else:
                assert not isinstance(item, str)
                encoded = translator.text_delta(item) if shortcut else None
                took += encoded is not None
                out.append(encoded if encoded is not None else b"".join(encode_event(e) for e in translator.feed(item)))
        out.append(b"".join(encode_event(e) for e in translator.finish(saw_done=True)))
        return out, took

    plain, _ = translate(False)
    short, took = translate(True)
    assert short == plain
    if taken is not None:
        assert took == taken
