"""Keep-alive ``ping`` events while the node is silent: before its first byte (a long prefill), between
tokens, and while cortex waits for a cold model load. ``PING_S`` is patched down so this takes seconds."""

from __future__ import annotations

import asyncio

import pytest

import cortex.proxy.anthropic_handler as handler
from cortex.sim import SimModel
from tests.anthropic.conftest import Gateway, GatewayFactory
from tests.anthropic.helpers import ALIAS, HI, check_grammar, parse_sse, raw_stream, sdk_stream_helper

BODY = {"model": ALIAS, "max_tokens": 20, "messages": HI, "stream": True}


@pytest.fixture
def fast_pings(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(handler, "PING_S", 0.3)
    return 0.3


async def test_ping_while_the_node_has_not_answered(gw: Gateway, fast_pings: float) -> None:
    """A 1 s prefill with no byte at all (headers included): the client still hears pings meanwhile."""
    gw.sim.set_reply("late but fine")
    gw.sim.set_first_byte_delay(1.0)
    out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, BODY), 10)
    assert out.pings >= 2, out.names
    assert out.names[0] == "message_start"
    assert out.message is not None
    assert out.message["content"][0]["text"] == "late but fine"
    assert out.message["stop_reason"] == "end_turn"


async def test_ping_between_tokens(make_gateway: GatewayFactory, fast_pings: float) -> None:
    gw = await make_gateway(tok_s=2.0)
    gw.sim.set_reply("slow words")
    out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, BODY), 10)
    assert out.pings >= 2, out.names
    assert out.message is not None
    assert out.message["content"][0]["text"] == "slow words"


async def test_pings_are_invisible_to_the_sdk(gw: Gateway, fast_pings: float) -> None:
    gw.sim.set_reply("still valid")
    gw.sim.set_first_byte_delay(1.0)
    message = await asyncio.wait_for(sdk_stream_helper(gw.client, model=ALIAS, max_tokens=20, messages=HI), 10)
    assert message.content[0].type == "text"
    assert message.content[0].text == "still valid"


async def test_pings_during_a_cold_model_load(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(extra_models=[SimModel("cold", 1000, loaded=False)], load_s=1.5)
    gw.sim.set_reply("warmed up")
    out = await asyncio.wait_for(raw_stream(gw.fleet.http, gw.url, {**BODY, "model": "cold"}), 10)
    assert out.names[0] == "message_start"
    first_block = out.names.index("content_block_start")
    assert "ping" in out.names[1:first_block], out.names
    assert out.message is not None
    assert out.message["model"] == "cold"
    assert out.message["content"][0]["text"] == "warmed up"
    assert [r.json["model"] for r in gw.fleet.inference_requests("a")] == ["cold"]


async def test_node_failing_after_pings_ends_the_stream_with_an_error(
    make_gateway: GatewayFactory, fast_pings: float
) -> None:
    """The node dies while cortex already holds the stream open with pings: an ``error`` event, nothing after."""
    gw = await make_gateway(poll={"interval_s": 30.0})
    gw.sim.set_first_byte_delay(3.0)

    async def kill_node() -> None:
        await asyncio.sleep(1.0)
        await gw.sim.stop()

    killer = asyncio.ensure_future(kill_node())
    async with gw.fleet.http.post(gw.url + "/v1/messages", json=BODY) as resp:
        assert resp.status == 200
        raw = await asyncio.wait_for(resp.read(), 10)
    await killer
    out = check_grammar(parse_sse(raw))
    assert out.names[0] == "message_start"
    assert out.pings >= 2
    assert out.names[-1] == "error"
    assert "message_stop" not in out.names
    assert out.error is not None
    assert out.error["type"] == "api_error"
    await gw.fleet.wait_for(lambda: bool(gw.fleet.engine.snapshot().requests), what="a request record")
    assert gw.fleet.engine.snapshot().requests[0].status == 502
    node = gw.fleet.engine.fleet.nodes["a"]
    assert node.in_flight == 0  # the lease was released
