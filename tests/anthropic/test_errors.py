"""Errors reach Anthropic clients in the Anthropic envelope, with the statuses of translation.md §1.5, and
a stream that fails midway ends with an ``error`` event and nothing after it."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import anthropic
import pytest

from cortex.config import ModelSettings
from cortex.sim import SimModel
from tests.anthropic.conftest import Gateway, GatewayFactory
from tests.anthropic.helpers import (
    ALIAS,
    HI,
    check_grammar,
    parse_sse,
    sdk_stream_helper,
    sdk_stream_raw,
    sdk_unary,
    validate_error_body,
)

BODY: dict[str, Any] = {"model": ALIAS, "max_tokens": 20, "messages": HI}


async def post(gw: Gateway, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    return await asyncio.wait_for(gw.fleet.post("/v1/messages", body, headers=headers or {}), 10)


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_404_listing_the_served_models(gw: Gateway, stream: bool) -> None:
    status, body, headers = await post(gw, {**BODY, "model": "gpt-4o", "stream": stream})
    assert status == 404
    message = validate_error_body(body, 404, "not_found_error")
    assert "gpt-4o" in message
    assert "m1" in message
    assert headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.NotFoundError) as info:
        await sdk_unary(gw.client, model="mistral-large", max_tokens=5, messages=HI)
    assert "m1" in info.value.message
    assert gw.upstream() == []


async def test_malformed_bodies_are_400(gw: Gateway) -> None:
    for raw in (b"{not json", b"", b"[1, 2]"):
        async with gw.fleet.http.post(
            gw.url + "/v1/messages", data=raw, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400, raw
            validate_error_body(await resp.json(), 400, "invalid_request_error")
    for body in (
        {"model": ALIAS, "messages": HI},  # no max_tokens
        {**BODY, "max_tokens": "ten"},
        {**BODY, "messages": []},
        {**BODY, "thinking": {"type": "sometimes"}},
        {"max_tokens": 5, "messages": HI},  # no model
    ):
        status, reply, _ = await post(gw, body)
        assert status == 400, (body, reply)
        validate_error_body(reply, 400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError):
        await gw.client.messages.create(model=ALIAS, max_tokens=0, messages=HI)
    assert gw.upstream() == []


async def test_api_keys(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(gateway={"api_keys": ["sekrit"]})
    gw.sim.set_reply("ok")
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        status, body, resp_headers = await post(gw, BODY, headers)
        assert status == 401, headers
        validate_error_body(body, 401, "authentication_error")
        assert resp_headers["x-should-retry"] == "false"
    for headers in ({"x-api-key": "sekrit"}, {"Authorization": "Bearer sekrit"}):
        status, body, _ = await post(gw, {**BODY, "stream": False}, headers)
        assert status == 200, (headers, body)
    with pytest.raises(anthropic.AuthenticationError):
        await gw.client.messages.create(**BODY)  # api_key "k"
    good = gw.new_client(api_key="sekrit")
    try:
        assert (await sdk_unary(good, **BODY)).content[0].type == "text"
        assert (await sdk_stream_helper(good, **BODY)).content[0].type == "text"
        assert (await good.messages.count_tokens(model=ALIAS, messages=HI)).input_tokens > 0
        assert [m.id async for m in good.models.list()] == ["m1"]
    finally:
        await good.close()
    with pytest.raises(anthropic.AuthenticationError):
        await gw.client.messages.count_tokens(model=ALIAS, messages=HI)
    with pytest.raises(anthropic.AuthenticationError):
        await gw.client.models.list()
    assert len(gw.upstream()) == 4


@pytest.mark.parametrize("stream", [False, True])
async def test_node_client_fault_is_400_and_not_retried(gw: Gateway, stream: bool) -> None:
    gw.sim.fail_next("/v1/chat/completions", 500, {"message": "max_tokens must be at least 1"})
    status, body, headers = await post(gw, {**BODY, "stream": stream})
    assert status == 400
    assert validate_error_body(body, 400, "invalid_request_error") == "max_tokens must be at least 1"
    assert headers["x-should-retry"] == "false"
    # the SDK would retry a 500, but must not retry this: one attempt even with retries on
    gw.sim.fail_next("/v1/chat/completions", 500, {"message": "max_tokens must be at least 1"})
    before = len(gw.upstream())
    retrying = gw.new_client(max_retries=2)
    try:
        runner = sdk_stream_raw if stream else sdk_unary
        with pytest.raises(anthropic.BadRequestError):
            await runner(retrying, **BODY)
    finally:
        await retrying.close()
    assert len(gw.upstream()) == before + 1


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_too_long_is_400_in_claude_codes_wording(make_gateway: GatewayFactory, stream: bool) -> None:
    gw = await make_gateway(sim={"max_seq_len": 64})
    long = {**BODY, "messages": [{"role": "user", "content": "word " * 200}], "stream": stream}
    status, body, headers = await post(gw, long)
    assert status == 400, body
    message = validate_error_body(body, 400, "invalid_request_error")
    match = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", message)
    assert match, message
    assert int(match.group(2)) == 64
    assert int(match.group(1)) > 64
    assert headers["x-should-retry"] == "false"
    runner = sdk_stream_helper if stream else sdk_unary
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        await runner(gw.client, **{k: v for k, v in long.items() if k != "stream"})


async def unplaceable(make_gateway: GatewayFactory, **gateway: Any) -> Gateway:
    """A gateway whose model ``huge`` is listed but cannot be placed now (the pinned ``m1`` holds the room)."""
    return await make_gateway(
        extra_models=[SimModel("huge", 3000, loaded=False)],
        models=[ModelSettings(id="huge", vram_mb=3000, aliases=["claude-opus-*"])],
        vram_mb=4096,
        gateway=gateway,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_model_too_large_for_every_node_is_an_immediate_503(make_gateway: GatewayFactory, stream: bool) -> None:
    gw = await make_gateway(
        extra_models=[SimModel("giant", 4000, loaded=False)],
        models=[ModelSettings(id="giant", vram_mb=20000)],
        vram_mb=4096,
        gateway={"queue_timeout_s": 30},
    )
    status, body, headers = await asyncio.wait_for(post(gw, {**BODY, "model": "giant", "stream": stream}), 5)
    assert status == 503, body
    message = validate_error_body(body, 503, "api_error")
    assert "20000 MiB" in message
    assert headers["x-should-retry"] == "false"
    assert [r for r in gw.sim.requests if r.path == "/v1/models/reload"] == []


@pytest.mark.parametrize("stream", [False, True])
async def test_queue_timeout_is_529_overloaded(make_gateway: GatewayFactory, stream: bool) -> None:
    gw = await unplaceable(make_gateway, queue_timeout_s=0.4)
    status, body, headers = await post(gw, {**BODY, "model": "huge", "stream": stream})
    assert status == 529, body
    validate_error_body(body, 529, "overloaded_error")
    assert headers["x-should-retry"] == "true"
    assert int(headers["retry-after"]) > 0
    with pytest.raises(anthropic.OverloadedError):
        await sdk_unary(gw.client, **{**BODY, "model": "huge"})


async def test_queue_timeout_after_the_stream_opened_is_an_error_event(make_gateway: GatewayFactory) -> None:
    """Waiting over a second opens the stream (message_start, pings); the timeout then ends it with ``error``."""
    gw = await unplaceable(make_gateway, queue_timeout_s=1.6)
    async with gw.fleet.http.post(gw.url + "/v1/messages", json={**BODY, "model": "huge", "stream": True}) as resp:
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 10)
    out = check_grammar(parse_sse(raw))
    assert out.names[0] == "message_start"
    assert out.pings >= 1
    assert out.names[-1] == "error"
    assert "message_stop" not in out.names
    assert out.error is not None
    assert out.error["type"] == "overloaded_error"
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        await sdk_stream_raw(gw.client, **{**BODY, "model": "huge"})


async def test_queue_full_is_529_overloaded(make_gateway: GatewayFactory) -> None:
    gw = await unplaceable(make_gateway, queue_timeout_s=0.8, max_queue=1)
    first = asyncio.ensure_future(post(gw, {**BODY, "model": "huge"}))
    await gw.fleet.wait_for(lambda: gw.fleet.engine.fleet.queued.get("huge") == 1, what="one waiter")
    for stream in (False, True):
        status, body, headers = await post(gw, {**BODY, "model": "huge", "stream": stream})
        assert status == 529, body
        assert "already wait" in validate_error_body(body, 529, "overloaded_error")
        assert headers["x-should-retry"] == "true"
    status, body, _ = await first
    assert status == 529
    validate_error_body(body, 529, "overloaded_error")


@pytest.mark.parametrize("stream", [False, True])
async def test_node_unreachable_is_502_api_error(make_gateway: GatewayFactory, stream: bool) -> None:
    gw = await make_gateway(poll={"interval_s": 30.0})  # the node stays "up" in cortex's eyes
    await gw.sim.stop()
    status, body, headers = await post(gw, {**BODY, "stream": stream})
    assert status == 502, body
    validate_error_body(body, 502, "api_error")
    assert headers["x-should-retry"] == "true"
    with pytest.raises(anthropic.APIStatusError) as info:
        await sdk_unary(gw.client, **BODY)
    assert info.value.status_code == 502


@pytest.mark.parametrize(
    ("fault", "kind", "text"),
    [
        ("error", "api_error", "engine exploded"),
        ("end", "api_error", "ended unexpectedly"),
        ("abort", "api_error", ""),
    ],
)
async def test_mid_stream_failure_ends_with_an_error_event(
    make_gateway: GatewayFactory, fault: str, kind: str, text: str
) -> None:
    gw = await make_gateway(tok_s=100.0)  # paced, so the first chunks are read before the fault
    gw.sim.set_reply("one two three four five six seven eight nine ten")

    def arm() -> None:
        if fault == "error":
            gw.sim.error_stream_after(3, "engine exploded")
        else:
            gw.sim.drop_stream_after(3, abort=fault == "abort")

    arm()
    async with gw.fleet.http.post(gw.url + "/v1/messages", json={**BODY, "stream": True}) as resp:
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 10)
    out = check_grammar(parse_sse(raw))
    assert out.names[0] == "message_start"
    assert out.names[-1] == "error"
    assert "message_delta" not in out.names
    assert "message_stop" not in out.names
    assert out.error is not None
    assert out.error["type"] == kind
    assert text in out.error["message"]
    assert "content_block_delta" in out.names  # the text before the failure did arrive
    arm()
    with pytest.raises(anthropic.APIStatusError) as info:
        await asyncio.wait_for(sdk_stream_raw(gw.client, **BODY), 10)
    assert kind in str(info.value.body)
    arm()
    with pytest.raises(anthropic.APIStatusError):
        await asyncio.wait_for(sdk_stream_helper(gw.client, **BODY), 10)
    await gw.fleet.wait_for(lambda: len(gw.fleet.engine.snapshot().requests) >= 3, what="three records")
    assert [r.status >= 500 for r in gw.fleet.engine.snapshot().requests] == [True] * 3, (
        gw.fleet.engine.snapshot().requests
    )


async def test_error_as_the_first_upstream_event_is_an_http_error(gw: Gateway) -> None:
    gw.sim.error_stream_after(0, "engine exploded")
    status, body, _ = await post(gw, {**BODY, "stream": True})
    assert status == 500, body
    assert "engine exploded" in validate_error_body(body, 500, "api_error")


@pytest.mark.parametrize("abort", [False, True])
async def test_stream_failing_before_any_chunk_is_an_http_502(gw: Gateway, abort: bool) -> None:
    """The node sends its headers and then dies (or ends) with no chunk: nothing reached the client, so the
    answer is an HTTP error the SDK may retry, not a stream without ``message_start``."""
    gw.sim.drop_stream_after(0, abort=abort)
    status, body, headers = await post(gw, {**BODY, "stream": True})
    assert status == 502, body
    validate_error_body(body, 502, "api_error")
    assert headers["x-should-retry"] == "true"
    gw.sim.drop_stream_after(0, abort=abort)
    with pytest.raises(anthropic.APIStatusError) as info:
        await asyncio.wait_for(sdk_stream_raw(gw.client, **BODY), 10)
    assert info.value.status_code == 502
