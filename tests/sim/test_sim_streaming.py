"""Chat and completions wire format of the simulated node: SSE framing, usage, ids, tools, faults."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam

from cortex.sim import SimNode
from tests.sim.conftest import ALPHA, BETA, NodeFactory
from tests.sim.sse import USAGE_FIELDS, USER_HI, chunks, data_frames, frames, post, stream_text

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
SDK_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]},
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object"}},
}


async def test_chat_stream_framing_role_usage_and_done(http: aiohttp.ClientSession, node: SimNode) -> None:
    raw = await stream_text(http, node, "/v1/chat/completions", {"messages": USER_HI, "max_tokens": 4})
    payloads = data_frames(raw)  # asserts "data:" with no space
    assert payloads[-1] == "[DONE]"
    assert ": " not in payloads[0]
    assert ", " not in payloads[0]
    parsed = chunks(raw)
    assert len(parsed) == 4
    for chunk in parsed:
        assert list(chunk) == ["id", "choices", "created", "model", "system_fingerprint", "object", "usage"]
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["system_fingerprint"] == "local"
        assert chunk["model"] == ALPHA
        assert chunk["id"] == "0"
        assert chunk["choices"][0]["delta"]["role"] == "assistant"
    *body, last = parsed
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in body)
    assert last["choices"][0]["finish_reason"] == "length"
    assert list(last["usage"]) == USAGE_FIELDS
    assert last["usage"]["completion_tokens"] == 4
    assert "".join(c["choices"][0]["delta"]["content"] for c in parsed) == "The quick brown fox"


async def test_natural_stop_sends_empty_finish_delta(http: aiohttp.ClientSession, node: SimNode) -> None:
    parsed = chunks(await stream_text(http, node, "/v1/chat/completions", {"messages": USER_HI}))
    assert len(parsed) == 17  # 16 tokens, then the end-of-sequence step
    assert parsed[-1]["choices"][0]["delta"]["content"] == ""
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


async def test_usage_times_are_ms_quantized_and_rates_follow(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(tok_s=100)
    status, body = await post(http, node, "/v1/chat/completions", {"messages": USER_HI, "max_tokens": 5})
    assert status == 200
    usage = body["usage"]
    assert list(usage) == USAGE_FIELDS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] == 1 + 5
    assert 0.045 <= usage["total_completion_time_sec"] <= 0.2
    for key in ("total_time_sec", "total_prompt_time_sec", "total_completion_time_sec"):
        assert usage[key] * 1000 == pytest.approx(round(usage[key] * 1000))
    assert usage["total_prompt_time_sec"] == 0.0
    assert usage["avg_prompt_tok_per_sec"] == 0.0
    assert usage["avg_compl_tok_per_sec"] == pytest.approx(5 / usage["total_completion_time_sec"], rel=1e-4)


async def test_zero_time_rates_are_zero(http: aiohttp.ClientSession, node: SimNode) -> None:
    _, body = await post(http, node, "/v1/chat/completions", {"messages": USER_HI})
    assert body["usage"]["avg_tok_per_sec"] == 0.0
    assert body["usage"]["total_time_sec"] == 0.0


async def test_ids_are_per_model_integer_strings(http: aiohttp.ClientSession, node: SimNode) -> None:
    ids = [(await post(http, node, "/v1/chat/completions", {"messages": USER_HI}))[1]["id"] for _ in range(2)]
    ids.append((await post(http, node, "/v1/completions", {"prompt": "x", "model": ALPHA}))[1]["id"])
    ids.append((await post(http, node, "/v1/completions", {"prompt": "x", "model": BETA}))[1]["id"])
    assert ids == ["0", "1", "2", "0"]


async def test_non_streaming_chat_shape_and_default_model(http: aiohttp.ClientSession, node: SimNode) -> None:
    status, body = await post(http, node, "/v1/chat/completions", {"model": "default", "messages": "hello"})
    assert status == 200
    assert list(body) == ["id", "choices", "created", "model", "system_fingerprint", "object", "usage"]
    assert body["model"] == ALPHA
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "content": body["choices"][0]["message"]["content"],
        "role": "assistant",
        "tool_calls": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["logprobs"] is None


async def test_completions_stream_has_no_usage_field(http: aiohttp.ClientSession, node: SimNode) -> None:
    raw = await stream_text(http, node, "/v1/completions", {"prompt": "Once", "max_tokens": 3})
    assert data_frames(raw)[-1] == "[DONE]"
    parsed = chunks(raw)
    assert all("usage" not in c and c["object"] == "text_completion" for c in parsed)
    assert list(parsed[0]["choices"][0]) == ["text", "index", "logprobs", "finish_reason"]
    assert [c["choices"][0]["finish_reason"] for c in parsed] == [None, None, "length"]
    _, body = await post(http, node, "/v1/completions", {"prompt": "Once", "max_tokens": 3})
    assert body["choices"][0]["text"] == "The quick brown"
    assert list(body["usage"]) == USAGE_FIELDS


async def test_keepalive_comment_when_idle(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(tok_s=5, keepalive_s=0.05)
    raw = await stream_text(http, node, "/v1/chat/completions", {"messages": USER_HI, "max_tokens": 1})
    assert raw.startswith(":\n\n")
    assert frames(raw).count(":") >= 2
    assert data_frames(raw)[-1] == "[DONE]"


async def test_stop_strings_and_scripted_reply(http: aiohttp.ClientSession, node: SimNode) -> None:
    node.set_reply("Hello there END and more")
    body = {"messages": USER_HI, "stop": ["END"]}
    _, reply = await post(http, node, "/v1/chat/completions", body)
    assert reply["choices"][0]["message"]["content"] == "Hello there "
    assert reply["choices"][0]["finish_reason"] == "stop"
    parsed = chunks(await stream_text(http, node, "/v1/chat/completions", body))
    assert "".join(c["choices"][0]["delta"]["content"] for c in parsed) == "Hello there "
    node.set_reply(None)
    _, reply = await post(http, node, "/v1/chat/completions", {"messages": USER_HI, "max_tokens": 2})
    assert reply["choices"][0]["message"]["content"] == "The quick"


async def test_reasoning_deltas_come_before_content(http: aiohttp.ClientSession, node: SimNode) -> None:
    body = {"messages": USER_HI, "max_tokens": 8, "enable_thinking": True}
    parsed = chunks(await stream_text(http, node, "/v1/chat/completions", body))
    deltas = [c["choices"][0]["delta"] for c in parsed]
    assert deltas[0]["content"] is None
    assert deltas[0]["reasoning_content"] == "Let"
    kinds = ["r" if "reasoning_content" in d else "c" for d in deltas]
    assert kinds == sorted(kinds, reverse=True)
    assert "c" in kinds
    _, reply = await post(http, node, "/v1/chat/completions", body)
    assert reply["choices"][0]["message"]["reasoning_content"] == "Let me think about this."


async def test_mistralrs_tool_call_arrives_whole_in_finish_chunk(http: aiohttp.ClientSession, node: SimNode) -> None:
    body = {"messages": [{"role": "user", "content": "use a tool"}], "tools": [WEATHER_TOOL]}
    parsed = chunks(await stream_text(http, node, "/v1/chat/completions", body))
    assert len(parsed) == 1
    (call,) = parsed[0]["choices"][0]["delta"]["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["index"] == 0
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"sim","days":1}'}
    assert parsed[0]["choices"][0]["finish_reason"] == "tool_calls"
    assert list(parsed[0]["usage"]) == USAGE_FIELDS


async def test_openai_style_tool_call_is_fragmented(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(tool_style="openai")
    body = {"messages": USER_HI, "tools": [WEATHER_TOOL], "tool_choice": "required"}
    parsed = chunks(await stream_text(http, node, "/v1/chat/completions", body))
    first, *fragments, finish = parsed
    (head,) = first["choices"][0]["delta"]["tool_calls"]
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert head["id"].startswith("call_")
    assert len(fragments) >= 2
    pieces = []
    for chunk in fragments:
        (part,) = chunk["choices"][0]["delta"]["tool_calls"]
        assert part.keys() == {"index", "function"}
        assert chunk["usage"] is None
        pieces.append(part["function"]["arguments"])
    assert json.loads("".join(pieces)) == {"city": "sim", "days": 1}
    assert finish["choices"][0]["finish_reason"] == "tool_calls"
    assert finish["usage"] is not None


@pytest.mark.parametrize(
    ("tool_choice", "text", "expected"),
    [
        ("required", "hi", "get_weather"),
        ({"type": "function", "function": {"name": "get_time"}}, "hi", "get_time"),
        (None, "please call a tool", "get_weather"),
        ("auto", "hi", None),
        ("none", "call a tool", None),
    ],
    ids=["required", "named", "tool-word", "auto-plain", "none"],
)
async def test_default_tool_trigger(
    http: aiohttp.ClientSession, node: SimNode, tool_choice: object, text: str, expected: str | None
) -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    _, reply = await post(http, node, "/v1/chat/completions", body)
    choice = reply["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert (calls[0]["function"]["name"] if calls else None) == expected
    assert choice["finish_reason"] == ("tool_calls" if expected else "stop")


async def test_scripted_tool_call_answers_next_request_with_tools(http: aiohttp.ClientSession, node: SimNode) -> None:
    node.script_tool_call("lookup", '{"q":"x"}')
    await post(http, node, "/v1/chat/completions", {"messages": USER_HI})  # no tools: not consumed
    _, reply = await post(http, node, "/v1/chat/completions", {"messages": USER_HI, "tools": [TIME_TOOL]})
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "lookup",
        "arguments": '{"q":"x"}',
    }
    _, reply = await post(http, node, "/v1/chat/completions", {"messages": USER_HI, "tools": [TIME_TOOL]})
    assert reply["choices"][0]["message"]["tool_calls"] is None


async def test_drop_stream_after_ends_without_done(http: aiohttp.ClientSession, node: SimNode) -> None:
    node.drop_stream_after(2)
    raw = await stream_text(http, node, "/v1/chat/completions", {"messages": USER_HI})
    assert len(chunks(raw)) == 2
    assert "[DONE]" not in raw
    raw = await stream_text(http, node, "/v1/chat/completions", {"messages": USER_HI})
    assert data_frames(raw)[-1] == "[DONE]"  # one-shot


async def test_drop_stream_abort_cuts_the_connection(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(tok_s=200)
    node.drop_stream_after(1, abort=True)
    async with http.post(node.url + "/v1/chat/completions", json={"messages": USER_HI, "stream": True}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_scripted_mid_stream_error_frame_then_done(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(tok_s=500)
    node.error_stream_after(1, "boom")
    payloads = data_frames(await stream_text(http, node, "/v1/chat/completions", {"messages": USER_HI}))
    assert len(payloads) == 3
    assert json.loads(payloads[1]) == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    assert payloads[2] == "[DONE]"


async def test_first_byte_delay_holds_headers_and_counts_as_prefill(http: aiohttp.ClientSession, node: SimNode) -> None:
    node.set_first_byte_delay(0.2)
    started = time.monotonic()
    async with http.post(node.url + "/v1/chat/completions", json={"messages": USER_HI, "stream": True}) as resp:
        assert time.monotonic() - started >= 0.19
        raw = await resp.text()
    assert chunks(raw)[-1]["usage"]["total_prompt_time_sec"] == pytest.approx(0.2, abs=0.002)


async def test_prompt_longer_than_context(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(max_seq_len=10)
    message = "Prompt sequence length is greater than 10, perhaps consider using `truncate_sequence`?"
    long_prompt = [{"role": "user", "content": "x" * 100}]
    assert await post(http, node, "/v1/chat/completions", {"messages": long_prompt}) == (
        422,
        {"message": message},
    )
    payloads = data_frames(await stream_text(http, node, "/v1/chat/completions", {"messages": long_prompt}))
    assert json.loads(payloads[0])["error"]["message"] == message
    assert payloads[1:] == ["[DONE]"]
    body = {"messages": long_prompt, "truncate_sequence": True}
    status, reply = await post(http, node, "/v1/chat/completions", body)
    assert status == 200
    assert reply["usage"]["prompt_tokens"] == 10


async def test_openai_sdk_reads_streams_and_tool_calls(make_node: NodeFactory) -> None:
    node = await make_node()
    client = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        text = ""
        finish = None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        assert (text, finish) == ("The quick brown", "length")
        reply = await client.chat.completions.create(
            model=ALPHA,
            messages=[{"role": "user", "content": "hi"}],
            tools=[SDK_TOOL],
            tool_choice="required",
        )
        calls = reply.choices[0].message.tool_calls
        assert calls is not None
        assert calls[0].type == "function"
        assert calls[0].function.name == "get_weather"
        with pytest.raises(openai.InternalServerError, match="is not available"):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
