"""The simulated node's Responses, images and speech routes, against the mistral.rs behaviour they copy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from cortex.sim import SimModel, SimNode


@pytest.fixture
async def node() -> AsyncIterator[SimNode]:
    sim = SimNode([SimModel("m", 1000), SimModel("dia", 500)], name="n", tok_s=0, load_s=0.01, kinds={"dia": "speech"})
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


async def call(method: str, url: str, body: object = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, url, json=body) as resp:
        text = await resp.text()
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, text


async def test_unknown_previous_id_silently_drops_the_history(node: SimNode) -> None:
    status, first = await call("POST", node.url + "/v1/responses", {"model": "m", "input": "a long first question"})
    assert status == 200
    follow = {"model": "m", "input": "next", "max_output_tokens": 2}
    _, known = await call("POST", node.url + "/v1/responses", {**follow, "previous_response_id": first["id"]})
    _, unknown = await call("POST", node.url + "/v1/responses", {**follow, "previous_response_id": "resp_elsewhere"})
    assert unknown["status"] == "completed"  # no error: the history is just missing
    assert known["usage"]["input_tokens"] > unknown["usage"]["input_tokens"]


async def test_a_restart_forgets_every_response(node: SimNode) -> None:
    _, made = await call("POST", node.url + "/v1/responses", {"model": "m", "input": "hi"})
    assert (await call("GET", f"{node.url}/v1/responses/{made['id']}"))[0] == 200
    await node.restart()
    status, body = await call("GET", f"{node.url}/v1/responses/{made['id']}")
    assert status == 404
    assert body == {"message": f"Response with ID '{made['id']}' not found"}


async def test_request_errors_are_mistralrs_shaped(node: SimNode) -> None:
    status, text = await call("POST", node.url + "/v1/responses", {"model": "m"})
    assert status == 422
    assert "missing field `input`" in text
    status, body = await call("POST", node.url + "/v1/responses", {"model": "m", "input": "x", "max_output_tokens": 0})
    assert (status, body) == (500, {"message": "max_output_tokens must be at least 1."})
    status, body = await call("POST", node.url + "/v1/responses", {"model": "zzz", "input": "x"})
    assert status == 500
    assert body["message"].startswith("Requested model 'zzz' is not available.")
    status, body = await call("POST", node.url + "/v1/responses/resp_x/cancel")
    assert (status, body) == (404, {"message": "Response with ID 'resp_x' not found or cannot be cancelled"})


async def test_stream_wire_format(node: SimNode) -> None:
    body = {"model": "m", "input": "hi", "stream": True, "max_output_tokens": 2, "store": False}
    async with aiohttp.ClientSession() as http, http.post(node.url + "/v1/responses", json=body) as resp:
        text = await resp.text()
    frames = text.split("\n\n")
    assert frames[0].startswith('event:response.created\ndata:{"type":"response.created","sequence_number":0')
    assert [f.split("\n")[0] for f in frames if f.startswith("event:")][-1] == "event:response.completed"
    assert text.endswith("data:[DONE]\n\n")
    assert '"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}' in text


async def test_speech_wants_wav_or_pcm_and_a_speech_model(node: SimNode) -> None:
    status, body = await call(
        "POST", node.url + "/v1/audio/speech", {"model": "dia", "input": "hi", "response_format": "mp3"}
    )
    assert (status, body) == (422, {"message": "Only support wav/pcm response format."})
    status, body = await call(
        "POST", node.url + "/v1/audio/speech", {"model": "m", "input": "hi", "response_format": "wav"}
    )
    assert status == 500
    assert "not a speech model" in body["message"]
    status, _ = await call(
        "POST", node.url + "/v1/images/generations", {"model": "m", "prompt": "x", "response_format": "b64_json"}
    )
    assert status == 422  # the Rust enum is spelled B64Json
