"""Tool use through the gateway, with mistral.rs-style (whole call in the finish chunk) and OpenAI-style
(fragmented arguments) nodes, streaming raw, through the SDK helper and non-streaming."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.anthropic.conftest import GatewayFactory
from tests.anthropic.helpers import (
    ALIAS,
    WEATHER_TOOL,
    Stream,
    raw_stream,
    sdk_stream_helper,
    sdk_stream_raw,
    sdk_unary,
)

ARGS = {"city": "Paris", "days": 3, "note": 'a "quoted" {brace} ünïcode'}
ASK: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
STYLES = ["mistralrs", "openai"]
MODES = ["unary", "raw", "helper", "sse"]


def only_tool_block(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    tools = [b for b in blocks if b["type"] == "tool_use"]
    assert len(tools) == 1, blocks
    assert [b["type"] for b in blocks] == ["tool_use"], blocks  # no empty text block before it
    return tools[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("style", STYLES)
async def test_scripted_tool_call(make_gateway: GatewayFactory, style: str, mode: str) -> None:
    gw = await make_gateway(tool_style=style)
    gw.sim.script_tool_call("get_weather", json.dumps(ARGS))
    kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 1024, "messages": ASK, "tools": [WEATHER_TOOL]}
    if mode == "unary":
        message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
        blocks = [b.model_dump(mode="json") for b in message.content]
        stop_reason = message.stop_reason
    elif mode == "helper":
        message = await asyncio.wait_for(sdk_stream_helper(gw.client, **kwargs), 10)
        blocks = [b.model_dump(mode="json") for b in message.content]
        stop_reason = message.stop_reason
    else:
        out: Stream
        if mode == "raw":
            out = await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
        else:
            out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, {**kwargs, "stream": True}), 10)
        assert out.message is not None
        blocks = out.message["content"]
        stop_reason = out.message["stop_reason"]
        deltas = [e for e in out.events if e["type"] == "content_block_delta"]
        assert len(deltas) == 1  # the call is buffered and sent as one JSON object
    block = only_tool_block(blocks)
    assert block["name"] == "get_weather"
    assert block["input"] == ARGS
    assert block["id"].startswith("call_")  # the node's id is kept
    assert stop_reason == "tool_use"
    upstream = gw.last_upstream()
    (tool,) = upstream["tools"]
    assert tool["type"] == "function"
    assert tool["function"]["name"] == "get_weather"
    assert "$schema" not in tool["function"]["parameters"]
    assert "cache_control" not in json.dumps(upstream)
    assert "tool_choice" not in upstream


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("stream", [False, True])
async def test_sim_chosen_tool_call_has_an_object_input(make_gateway: GatewayFactory, style: str, stream: bool) -> None:
    """The sim picks the first tool (schema-derived arguments) when the last user message says "tool"."""
    gw = await make_gateway(tool_style=style)
    kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 100, "messages": ASK, "tools": [WEATHER_TOOL]}
    if stream:
        out = await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
        assert out.message is not None
        block = only_tool_block(out.message["content"])
        assert out.message["stop_reason"] == "tool_use"
    else:
        message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
        block = only_tool_block([b.model_dump(mode="json") for b in message.content])
        assert message.stop_reason == "tool_use"
    assert block["input"] == {"city": "sim", "days": 1}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("arguments", ["", "{}", '"{\\"city\\":\\"Rome\\"}"'])
async def test_odd_arguments_become_objects(make_gateway: GatewayFactory, style: str, arguments: str) -> None:
    gw = await make_gateway(tool_style=style)
    expected = {"city": "Rome"} if "Rome" in arguments else {}
    for stream in (False, True):
        gw.sim.script_tool_call("get_weather", arguments)
        kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 100, "messages": ASK, "tools": [WEATHER_TOOL]}
        if stream:
            message = await asyncio.wait_for(sdk_stream_helper(gw.client, **kwargs), 10)
        else:
            message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
        (block,) = message.content
        assert block.type == "tool_use", (stream, block)
        assert block.input == expected, (stream, block)


@pytest.mark.parametrize("style", STYLES)
async def test_tool_choice_is_mapped(make_gateway: GatewayFactory, style: str) -> None:
    gw = await make_gateway(tool_style=style)
    other = {"name": "noop", "input_schema": {"type": "object", "properties": {}}}
    kwargs: dict[str, Any] = {
        "model": ALIAS,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello"}],
        "tools": [other, WEATHER_TOOL],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    }
    message = await asyncio.wait_for(sdk_stream_helper(gw.client, **kwargs), 10)
    (block,) = message.content
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    upstream = gw.last_upstream()
    assert upstream["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert upstream["parallel_tool_calls"] is False
    kwargs["tool_choice"] = {"type": "any"}
    message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
    assert message.content[0].type == "tool_use"
    assert message.content[0].name == "noop"
    assert gw.last_upstream()["tool_choice"] == "required"
    kwargs["tool_choice"] = {"type": "none"}
    kwargs["messages"] = ASK
    gw.sim.set_reply("No tools today.")
    message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason == "end_turn"
    assert gw.last_upstream()["tool_choice"] == "none"


@pytest.mark.parametrize("style", STYLES)
async def test_multi_turn_with_tool_results(make_gateway: GatewayFactory, style: str) -> None:
    """Turn 1 asks, the model calls two tools; turn 2 sends the results (out of order) and gets text."""
    gw = await make_gateway(tool_style=style)
    first: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris and Rome?"}]
    gw.sim.script_tool_call("get_weather", '{"city":"Paris"}')
    turn1 = await asyncio.wait_for(
        sdk_stream_helper(gw.client, model=ALIAS, max_tokens=100, messages=first, tools=[WEATHER_TOOL]), 10
    )
    assert turn1.stop_reason == "tool_use"
    (call,) = turn1.content
    assert call.type == "tool_use"
    assert call.input == {"city": "Paris"}
    second_id = "toolu_01Rome"
    gw.sim.set_reply("Sunny in Paris, rain in Rome.")
    history: list[dict[str, Any]] = [
        *first,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": call.id, "name": "get_weather", "input": call.input},
                {"type": "tool_use", "id": second_id, "name": "get_weather", "input": {"city": "Rome"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": second_id, "content": [{"type": "text", "text": "rain"}]},
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": "sunny",
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "text", "text": "Summarize please."},
            ],
        },
    ]
    for stream in (True, False):
        kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 100, "messages": history, "tools": [WEATHER_TOOL]}
        if stream:
            out = await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
            assert out.message is not None
            texts = [b["text"] for b in out.message["content"] if b["type"] == "text"]
            assert out.message["stop_reason"] == "end_turn"
        else:
            message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
            texts = [b.text for b in message.content if b.type == "text"]
            assert message.stop_reason == "end_turn"
        assert texts == ["Sunny in Paris, rain in Rome."]
        upstream = gw.last_upstream()["messages"]
        roles = [m["role"] for m in upstream]
        assert roles == ["user", "assistant", "tool", "tool", "user"], upstream
        assistant = upstream[1]
        assert assistant["content"] == "Let me check."
        assert [c["id"] for c in assistant["tool_calls"]] == [call.id, second_id]
        assert json.loads(assistant["tool_calls"][1]["function"]["arguments"]) == {"city": "Rome"}
        # results follow the order of the calls, not the order the client sent them in
        assert [(m["tool_call_id"], m["content"]) for m in upstream[2:4]] == [(call.id, "sunny"), (second_id, "rain")]
        assert upstream[4] == {"role": "user", "content": "Summarize please."}
