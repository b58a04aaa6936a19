"""``/v1/images/generations`` and ``/v1/audio/speech`` through cortex, and the model kinds in ``/v1/models``."""

from __future__ import annotations

import asyncio
import base64

import openai
import pytest

from cortex.sim import SimModel
from cortex.sim.media import png_bytes, speech_bytes
from tests.conftest import WAIT_S, Fleet, FleetFactory, NodeSpec

KINDS = {"flux": "diffusion", "dia": "speech"}


async def media_fleet(fleet: FleetFactory) -> Fleet:
    models = [SimModel("chat", 1000), SimModel("flux", 2000), SimModel("dia", 500)]
    f = await fleet(NodeSpec("a", models, sim={"kinds": KINDS}))
    await f.wait_for(lambda: f.engine.kinds.of("dia") is not None, what="the kinds read")
    return f


async def test_models_show_the_kind_the_node_says(fleet: FleetFactory) -> None:
    f = await media_fleet(fleet)
    async with f.http.get(f.url + "/v1/models") as resp:
        listing = await resp.json()
    kinds = {m["id"]: m.get("kind") for m in listing["data"]}
    assert kinds == {"chat": None, "flux": "diffusion", "dia": "speech"}


async def test_images_with_openai_spellings(fleet: FleetFactory) -> None:
    f = await media_fleet(fleet)
    async with f.openai() as client:
        raw = await client.images.with_raw_response.generate(
            model="flux", prompt="a red cat", response_format="b64_json", size="256x256"
        )
        image = raw.parse()
        by_url = await client.images.generate(model="flux", prompt="a red cat")
    assert raw.headers["x-cortex-node"] == "a"
    assert image.data is not None
    encoded = image.data[0].b64_json
    assert encoded is not None
    assert encoded.startswith("data:image/png;base64,")
    assert base64.b64decode(encoded.split(",", 1)[1]) == png_bytes("a red cat")
    assert by_url.data is not None
    assert (by_url.data[0].url or "").endswith(".png")
    sent = f.inference_requests("a", "/v1/images/generations")[0].json
    assert (sent["response_format"], sent["width"], sent["height"]) == ("B64Json", 256, 256)


async def test_speech_comes_through_whole_with_its_type(fleet: FleetFactory) -> None:
    f = await media_fleet(fleet)
    text = "hello from the simulated speech model"
    async with (
        f.openai() as client,
        client.audio.speech.with_streaming_response.create(
            model="dia", voice="alloy", input=text, response_format="wav"
        ) as resp,
    ):
        assert resp.headers["content-type"].startswith("audio/wav")
        assert resp.headers["x-cortex-model"] == "dia"
        audio = await resp.read()
    assert audio == speech_bytes(text, "wav")
    await f.wait_for(lambda: len(f.engine.metrics.recent()) >= 1, what="the request log")
    assert (f.engine.metrics.recent()[0].model, f.engine.metrics.recent()[0].status) == ("dia", 200)


async def test_speech_is_passed_on_before_the_node_finished(fleet: FleetFactory) -> None:
    f = await media_fleet(fleet)
    text = " ".join(["word"] * 40)
    expected = speech_bytes(text, "pcm")
    hold = asyncio.Event()
    f.sim("a").media_hold = hold  # the node sends half, then waits
    body = {"model": "dia", "input": text, "response_format": "pcm"}
    async with f.http.post(f.url + "/v1/audio/speech", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("audio/pcm")
        first = await asyncio.wait_for(resp.content.readexactly(len(expected) // 4), WAIT_S)
        assert not hold.is_set()
        hold.set()
        rest = await resp.read()
    assert first + rest == expected


async def test_media_errors_in_openai_envelope(fleet: FleetFactory) -> None:
    f = await media_fleet(fleet)
    async with f.openai() as client:
        with pytest.raises(openai.BadRequestError) as wrong_kind:
            await client.audio.speech.create(model="flux", voice="alloy", input="hi", response_format="wav")
        assert "diffusion" in wrong_kind.value.message
        with pytest.raises(openai.BadRequestError) as mp3:
            await client.audio.speech.create(model="dia", voice="alloy", input="hi", response_format="mp3")
        assert "wav/pcm" in mp3.value.message
    assert len(f.inference_requests("a", "/v1/audio/speech")) == 1  # the wrong kind never reached the node
    status, data, _ = await f.post("/v1/images/generations", {"model": "flux"})
    assert status == 400
    assert data["error"]["param"] == "prompt"
