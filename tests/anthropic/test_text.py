"""Plain text answers through the gateway: non-stream, raw stream and the SDK's stream helper."""

from __future__ import annotations

import asyncio

import pytest

from tests.anthropic.conftest import MAX_OUTPUT, Gateway
from tests.anthropic.helpers import ALIAS, HI, raw_stream, sdk_stream_helper, sdk_stream_raw, sdk_unary

REPLY = "Hello there, friendly proxy."


async def test_non_stream_text_echoes_the_alias_and_clamps_max_tokens(gw: Gateway) -> None:
    gw.sim.set_reply(REPLY)
    message = await asyncio.wait_for(sdk_unary(gw.client, model=ALIAS, max_tokens=128000, messages=HI), 10)
    assert message.model == ALIAS
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text"
    assert message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.id.startswith("msg_")
    upstream = gw.last_upstream()
    assert upstream["model"] == "m1"
    assert upstream["max_tokens"] == MAX_OUTPUT  # clamped, not rejected
    assert "stream" not in upstream or upstream["stream"] is False


async def test_raw_stream_text(gw: Gateway) -> None:
    gw.sim.set_reply(REPLY)
    out = await asyncio.wait_for(sdk_stream_raw(gw.client, model=ALIAS, max_tokens=100000, messages=HI), 10)
    assert out.message is not None
    assert out.message["model"] == ALIAS
    assert [b["type"] for b in out.message["content"]] == ["text"]
    assert out.message["content"][0]["text"] == REPLY
    assert out.message["stop_reason"] == "end_turn"
    assert out.names[0] == "message_start"
    assert out.names[-1] == "message_stop"
    upstream = gw.last_upstream()
    assert upstream["stream"] is True
    assert upstream["max_tokens"] == MAX_OUTPUT


async def test_stream_helper_text(gw: Gateway) -> None:
    gw.sim.set_reply(REPLY)
    message = await asyncio.wait_for(sdk_stream_helper(gw.client, model=ALIAS, max_tokens=4096, messages=HI), 10)
    assert message.model == ALIAS
    assert message.content[0].type == "text"
    assert message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


async def test_raw_sse_wire_format(gw: Gateway) -> None:
    """Read the bytes with aiohttp: ``event:`` lines, SSE headers, a ping early, the whole grammar."""
    gw.sim.set_reply(REPLY)
    body = {"model": "claude-opus-4-1", "max_tokens": 50, "messages": HI, "stream": True}
    out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, body), 10)
    assert out.message is not None
    assert out.message["model"] == "claude-opus-4-1"
    assert out.message["content"][0]["text"] == REPLY
    assert out.headers["Cache-Control"] == "no-cache"
    assert "Content-Encoding" not in out.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_length_limit_is_max_tokens(gw: Gateway, stream: bool) -> None:
    gw.sim.set_reply("one two three four five six seven eight")
    kwargs = {"model": ALIAS, "max_tokens": 3, "messages": HI}
    if stream:
        out = await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
        assert out.message is not None
        assert out.message["stop_reason"] == "max_tokens"
        assert out.message["content"][0]["text"] == "one two three"
    else:
        message = await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
        assert message.stop_reason == "max_tokens"
    assert gw.last_upstream()["max_tokens"] == 3


async def test_usage_reaches_the_client_and_the_metrics(gw: Gateway) -> None:
    gw.sim.set_reply(REPLY)
    message = await asyncio.wait_for(sdk_unary(gw.client, model=ALIAS, max_tokens=20, messages=HI), 10)
    await gw.fleet.wait_for(lambda: bool(gw.fleet.engine.snapshot().requests), what="a request record")
    record = gw.fleet.engine.snapshot().requests[0]
    assert record.api == "anthropic"
    assert record.model == "m1"
    assert record.node == "a"
    assert record.status == 200
    assert not record.stream
    assert record.completion_tokens == message.usage.output_tokens > 0
    assert record.prompt_tokens == message.usage.input_tokens > 0

    out = await asyncio.wait_for(sdk_stream_raw(gw.client, model=ALIAS, max_tokens=20, messages=HI), 10)
    assert out.message is not None
    await gw.fleet.wait_for(lambda: len(gw.fleet.engine.snapshot().requests) >= 2, what="a second record")
    record = gw.fleet.engine.snapshot().requests[0]
    assert record.api == "anthropic"
    assert record.stream
    assert record.status == 200
    assert record.completion_tokens == out.message["usage"]["output_tokens"]
    assert record.prompt_tokens == out.message["usage"]["input_tokens"]
