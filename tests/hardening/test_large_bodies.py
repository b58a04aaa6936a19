"""Large Anthropic bodies: merges stay linear (joined once, at the end) and give what joining at every merge
gave; a body over the inline limit is translated off the loop and still served."""

from __future__ import annotations

import json
from typing import Any

from cortex.proxy.anthropic import to_openai
from cortex.proxy.anthropic_handler import TRANSLATE_INLINE_MAX
from cortex.sim import SimModel, SimNode
from tests.hardening.conftest import GatewayFactory

IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


def convert(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = to_openai(
        {"model": "m", "max_tokens": 4, "messages": messages}, upstream_model="m"
    ).body["messages"]
    return out


def test_consecutive_user_turns_merge_into_one_string() -> None:
    out = convert([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]}])
    assert out == [{"role": "user", "content": "a\nb"}]


def test_text_then_an_image_keeps_the_text_joined_before_the_parts() -> None:
    out = convert(
        [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "user", "content": [IMAGE, {"type": "text", "text": "c"}]},
            {"role": "user", "content": "d"},
        ]
    )
    assert len(out) == 1
    parts = out[0]["content"]
    assert parts[0] == {"type": "text", "text": "a\nb"}
    assert parts[1]["type"] == "image_url"
    assert parts[2:] == [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]


def test_consecutive_assistant_turns_merge_texts_and_calls() -> None:
    call = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    out = convert(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [call]},
            {"role": "assistant", "content": "one"},
            {"role": "assistant", "content": "two"},
        ]
    )
    assert out[1]["role"] == "assistant"
    assert out[1]["content"] == "one\ntwo"
    assert [c["id"] for c in out[1]["tool_calls"]] == ["t1"]
    assert out[2] == {"role": "tool", "tool_call_id": "t1", "content": "(no result)"}


def test_an_assistant_turn_with_only_calls_has_null_content() -> None:
    call = {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    out = convert([{"role": "user", "content": "q"}, {"role": "assistant", "content": [call]}])
    assert out[1]["content"] is None


def test_ten_thousand_orphan_results_become_one_user_message() -> None:
    messages = [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "x"}]}
        for i in range(10_000)
    ]
    out = convert(messages)
    assert len(out) == 1
    assert out[0]["content"].count("Tool result t") == 10_000


async def test_a_large_body_is_served(gateway: GatewayFactory) -> None:
    sim = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01, max_seq_len=10_000_000)
    await sim.start()
    try:
        await serve_large(sim, gateway)
    finally:
        await sim.stop()


async def serve_large(sim: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim.url, max_body_mb=8.0)
    messages = [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "y " * 200}]}
        for i in range(4000)
    ]
    body = json.dumps({"model": "m", "max_tokens": 4, "messages": messages}).encode()
    assert len(body) > TRANSLATE_INLINE_MAX
    async with gw.http.post(gw.url + "/v1/messages", data=body) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["type"] == "message"
    await gw.settled()
