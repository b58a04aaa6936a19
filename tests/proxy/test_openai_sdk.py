"""The official ``openai`` SDK as the client: what users will actually point at cortex."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from cortex.config import ModelSettings
from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec


async def sdk_fleet(fleet: FleetFactory, tok_s: float = 0.0) -> Fleet:
    return await fleet(
        NodeSpec("a", [SimModel("chat-model", 1000), SimModel("embed-model", 500)], tok_s=tok_s),
        models=[ModelSettings(id="chat-model", aliases=["gpt-4o*"])],
    )


async def test_non_streaming_chat(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet)
    async with f.openai() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
        completion = raw.parse()
    assert raw.headers["x-cortex-node"] == "a"
    assert raw.headers["x-cortex-model"] == "chat-model"
    assert completion.model == "chat-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


async def test_streaming_chat(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet, tok_s=200)
    async with f.openai() as client:
        stream = await client.chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "hello"}], max_tokens=6, stream=True
        )
        pieces: list[str] = []
        finish: list[str] = []
        async for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
    assert "".join(pieces).strip()
    assert finish == ["length"]


async def test_stream_helper_and_final_completion(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet, tok_s=200)
    f.sim("a").set_reply("cortex streams every token")
    async with (
        f.openai() as client,
        client.chat.completions.stream(
            model="chat-model", messages=[{"role": "user", "content": "hello"}], max_tokens=50
        ) as stream,
    ):
        deltas = [e.delta async for e in stream if e.type == "content.delta"]
        final = await stream.get_final_completion()
    assert "".join(deltas) == "cortex streams every token"
    assert final.choices[0].message.content == "cortex streams every token"
    assert final.choices[0].finish_reason == "stop"
    assert final.model == "chat-model"


async def test_include_usage_gives_a_usage_chunk(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet, tok_s=200)
    async with f.openai() as client:
        stream = await client.chat.completions.create(
            model="chat-model",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert all(c.choices for c in chunks[:-1])
    # The added chunk is a full chunk like the node's own: same id, created and model.
    assert (last.id, last.created, last.model) == (chunks[-2].id, chunks[-2].created, chunks[-2].model)
    assert last.id
    assert last.created > 0
    assert last.model == "chat-model"


async def test_completions(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet, tok_s=200)
    async with f.openai() as client:
        completion = await client.completions.create(model="chat-model", prompt="Once upon", max_tokens=3)
        assert completion.choices[0].text
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 3
        stream = await client.completions.create(model="chat-model", prompt="Once upon", max_tokens=3, stream=True)
        texts = [c.choices[0].text async for c in stream if c.choices]
    assert "".join(texts).strip()
    assert [r.path for r in f.sim("a").requests if r.path.startswith("/v1/completions")] == ["/v1/completions"] * 2


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"], ids=["sdk-default", "float", "base64"])
async def test_embeddings(fleet: FleetFactory, encoding_format: str | None) -> None:
    f = await sdk_fleet(fleet)
    async with f.openai() as client:
        if encoding_format is None:
            result = await client.embeddings.create(model="embed-model", input=["one", "two"])
        else:
            result = await client.embeddings.create(
                model="embed-model",
                input=["one", "two"],
                encoding_format=encoding_format,  # type: ignore[arg-type]
            )
    assert [d.index for d in result.data] == [0, 1]
    if encoding_format == "base64":
        assert isinstance(result.data[0].embedding, str)
    else:
        vector = result.data[0].embedding
        assert len(vector) >= 4
        assert all(isinstance(x, float) for x in vector)
    assert result.usage.prompt_tokens > 0


async def test_sdk_sees_typed_errors(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet)
    async with f.openai() as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])
        assert "chat-model" in missing.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="chat-model",
                messages=[{"role": "user", "content": "x"}],
                extra_body={"max_tokens": "many"},
            )
        assert bad.value.param == "max_tokens"


async def test_sdk_auth(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("chat-model", 1000)]), gateway={"api_keys": ["sk-good"]})
    async with f.openai(api_key="sk-bad") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with f.openai(api_key="sk-good") as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["chat-model"]
    assert models.data[0].owned_by == "cortex"


async def test_concurrent_streams_interleave(fleet: FleetFactory) -> None:
    f = await sdk_fleet(fleet, tok_s=40)
    async with f.openai() as client:

        async def one() -> float:
            started = time.monotonic()
            stream = await client.chat.completions.create(
                model="chat-model", messages=[{"role": "user", "content": "x"}], max_tokens=20, stream=True
            )
            async for _ in stream:
                pass
            return time.monotonic() - started

        durations = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(4))), 10)
    # Four 0.5 s streams at once: concurrent (about 0.5 s), not one after another (2 s).
    assert max(durations) < 1.5, durations
