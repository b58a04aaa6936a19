"""Request-side behaviour seen end to end: system prompts, thinking, stop sequences, tolerated extras,
the models list and count_tokens."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import pytest

from cortex.sim import SimModel
from tests.anthropic.conftest import Gateway, GatewayFactory
from tests.anthropic.helpers import (
    ALIAS,
    HI,
    raw_stream,
    sdk_stream_helper,
    sdk_stream_raw,
    sdk_unary,
    validate_message,
    validate_model_info,
)

ANTHROPIC_ONLY = ("system", "stop_sequences", "thinking", "metadata", "context_management", "cache_control")


def assert_no_anthropic_keys(upstream: dict[str, Any]) -> None:
    for key in ANTHROPIC_ONLY:
        assert key not in upstream, (key, upstream)
    assert "cache_control" not in json.dumps(upstream)


@pytest.mark.parametrize("stream", [False, True])
async def test_system_string(gw: Gateway, stream: bool) -> None:
    gw.sim.set_reply("ok")
    kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 10, "messages": HI, "system": "You are terse."}
    if stream:
        await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
    else:
        await asyncio.wait_for(sdk_unary(gw.client, **kwargs), 10)
    upstream = gw.last_upstream()
    assert upstream["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    assert_no_anthropic_keys(upstream)


async def test_system_blocks_with_cache_control(gw: Gateway) -> None:
    gw.sim.set_reply("ok")
    system: list[dict[str, Any]] = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=abc"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    await asyncio.wait_for(sdk_stream_helper(gw.client, model=ALIAS, max_tokens=10, messages=HI, system=system), 10)
    upstream = gw.last_upstream()
    system_messages = [m for m in upstream["messages"] if m["role"] == "system"]
    assert len(system_messages) == 1
    assert upstream["messages"][0]["role"] == "system"
    content = upstream["messages"][0]["content"]
    assert content == "You are Claude Code.\nBe brief."  # the per-session billing block is dropped
    assert_no_anthropic_keys(upstream)


@pytest.mark.parametrize("stream", [False, True])
async def test_role_system_messages_are_hoisted(gw: Gateway, stream: bool) -> None:
    """Claude Code sends ``role: "system"`` mid-array and last; the SDK types forbid it, so post raw JSON."""
    gw.sim.set_reply("fine")
    body: dict[str, Any] = {
        "model": ALIAS,
        "max_tokens": 10,
        "system": [{"type": "text", "text": "Top."}],
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "system", "content": "Middle."},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
            {"role": "system", "content": [{"type": "text", "text": "Last."}]},
        ],
        "stream": stream,
    }
    if stream:
        out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, body), 10)
        assert out.message is not None
        assert out.message["content"][0]["text"] == "fine"
    else:
        status, reply, _ = await gw.fleet.post("/v1/messages", body)
        assert status == 200, reply
        assert validate_message(reply).content[0].type == "text"
    messages = gw.last_upstream()["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"], messages
    assert messages[0]["content"] == "Top.\nMiddle.\nLast."
    assert messages[1:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]


@pytest.mark.parametrize("mode", ["unary", "raw", "helper"])
async def test_thinking_enabled(gw: Gateway, mode: str) -> None:
    gw.sim.set_reply("The answer is 4.")
    kwargs: dict[str, Any] = {
        "model": ALIAS,
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": "2+2?"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    if mode == "raw":
        out = await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
        assert out.message is not None
        blocks = out.message["content"]
    else:
        runner = sdk_unary if mode == "unary" else sdk_stream_helper
        message = await asyncio.wait_for(runner(gw.client, **kwargs), 10)
        blocks = [b.model_dump(mode="json") for b in message.content]
    assert [b["type"] for b in blocks] == ["thinking", "text"], blocks
    assert blocks[0]["thinking"] == "Let me think about this."
    assert isinstance(blocks[0]["signature"], str)
    assert blocks[1]["text"] == "The answer is 4."
    upstream = gw.last_upstream()
    assert upstream["enable_thinking"] is True
    assert upstream["reasoning_effort"] == "low"  # budget < 4096
    assert "thinking" not in upstream


async def test_thinking_disabled_sends_no_reasoning(gw: Gateway) -> None:
    gw.sim.set_reply("4")
    message = await asyncio.wait_for(
        sdk_unary(gw.client, model=ALIAS, max_tokens=10, messages=HI, thinking={"type": "disabled"}), 10
    )
    assert [b.type for b in message.content] == ["text"]
    assert gw.last_upstream()["enable_thinking"] is False


@pytest.mark.parametrize("mode", ["unary", "raw", "helper", "sse"])
async def test_stop_sequences(gw: Gateway, mode: str) -> None:
    gw.sim.set_reply("alpha beta END gamma delta")
    kwargs: dict[str, Any] = {"model": ALIAS, "max_tokens": 50, "messages": HI, "stop_sequences": ["ZZZ", "END"]}
    if mode in ("raw", "sse"):
        if mode == "raw":
            out = await asyncio.wait_for(sdk_stream_raw(gw.client, **kwargs), 10)
        else:
            out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, {**kwargs, "stream": True}), 10)
        assert out.message is not None
        message = validate_message(out.message)
    else:
        runner = sdk_unary if mode == "unary" else sdk_stream_helper
        message = await asyncio.wait_for(runner(gw.client, **kwargs), 10)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "END"
    text = "".join(b.text for b in message.content if b.type == "text")
    assert text.rstrip() == "alpha beta"
    assert "END" not in text
    assert "gamma" not in text
    assert "stop" not in gw.last_upstream()  # matched by cortex, not by the node


async def test_query_strings_betas_unknown_fields_and_versions_are_ignored(gw: Gateway) -> None:
    gw.sim.set_reply("ok")
    extra_body = {
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        "service_tier": "auto",
        "speed": "fast",
        "some_future_field": {"x": 1},
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
        "cache_control": {"type": "ephemeral"},
    }
    headers = {
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,made-up-2099-01-01",
        "anthropic-version": "1999-12-31",
        "x-app": "cli",
        "X-Claude-Code-Session-Id": "abc",
        "anthropic-dangerous-direct-browser-access": "true",
    }
    message = await asyncio.wait_for(
        sdk_unary(
            gw.client,
            model=ALIAS,
            max_tokens=10,
            messages=HI,
            extra_query={"beta": "true"},
            extra_headers=headers,
            extra_body=extra_body,
        ),
        10,
    )
    assert message.content[0].type == "text"
    upstream_request = [r for r in gw.sim.requests if r.path == "/v1/chat/completions"][-1]
    assert "anthropic-beta" not in upstream_request.headers
    assert "anthropic-version" not in upstream_request.headers
    assert "x-api-key" not in upstream_request.headers
    assert "Authorization" not in upstream_request.headers
    for key in extra_body:
        assert key not in upstream_request.json
    # streaming with a query string, and no anthropic-version header at all
    body = {"model": ALIAS, "max_tokens": 10, "messages": HI, "stream": True, **extra_body}
    async with gw.fleet.http.post(gw.url + "/v1/messages?beta=true&x=1", json=body) as resp:
        assert resp.status == 200
        await resp.read()
    status, reply, _ = await gw.fleet.post("/v1/messages?beta=true", {**body, "stream": False})
    assert status == 200, reply
    validate_message(reply)


async def test_models_list_in_the_anthropic_shape(gw: Gateway) -> None:
    served = gw.fleet.engine.served_models()
    async with gw.fleet.http.get(gw.url + "/v1/models", headers={"anthropic-version": "2023-06-01"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert set(body) >= {"data", "has_more", "first_id", "last_id"}
    assert body["has_more"] is False
    for entry in body["data"]:
        info = validate_model_info(entry)
        assert info.type == "model"
        assert info.created_at is not None
    assert [e["id"] for e in body["data"]] == served
    listed = [m.id async for m in gw.client.models.list(limit=1)]
    assert listed == served
    # the OpenAI shape for a client without anthropic-version
    async with gw.fleet.http.get(gw.url + "/v1/models") as resp:
        assert (await resp.json())["object"] == "list"


async def test_models_list_pages(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(extra_models=[SimModel("m2", 1000), SimModel("m3", 1000, loaded=False)])
    served = gw.fleet.engine.served_models()
    assert len(served) == 3
    pages = []
    page = await gw.client.models.list(limit=1)
    pages.append([m.id for m in page.data])
    while page.has_next_page():
        page = await page.get_next_page()
        pages.append([m.id for m in page.data])
    assert pages == [[m] for m in served]
    assert [m.id async for m in gw.client.models.list(limit=2)] == served


async def test_count_tokens(gw: Gateway) -> None:
    small = await asyncio.wait_for(gw.client.messages.count_tokens(model=ALIAS, messages=HI), 10)
    assert small.input_tokens > 0
    big = await asyncio.wait_for(
        gw.client.messages.count_tokens(
            model=ALIAS,
            system="You are a helpful assistant. " * 20,
            messages=[{"role": "user", "content": "word " * 400}],
            tools=[{"name": "t", "input_schema": {"type": "object", "properties": {}}}],
        ),
        10,
    )
    assert big.input_tokens > small.input_tokens > 0
    status, reply, _ = await gw.fleet.post("/v1/messages/count_tokens?beta=true", {"model": ALIAS, "messages": HI})
    assert status == 200
    assert reply["input_tokens"] > 0
    with pytest.raises(anthropic.NotFoundError):
        await gw.client.messages.count_tokens(model="gpt-nothing", messages=HI)
    assert gw.upstream() == []  # counting costs no generation
