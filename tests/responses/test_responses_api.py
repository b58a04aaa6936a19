"""``/v1/responses`` through cortex with the official ``openai`` SDK: create, stream, retrieve, delete, cancel."""

from __future__ import annotations

from typing import Any

import openai
import pydantic
import pytest
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
)

from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec

MODEL = "chat-model"

EXPECTED_TYPES: dict[str, type[pydantic.BaseModel]] = {
    "response.created": ResponseCreatedEvent,
    "response.in_progress": ResponseInProgressEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.completed": ResponseCompletedEvent,
}


def fill_known_gaps(value: Any) -> Any:
    """The event with the fields a real mistral.rs node leaves out filled in, and nothing else changed.

    mistral.rs's response object omits ``tools``, ``tool_choice`` and ``parallel_tool_calls`` unless the
    request set them; its text deltas and parts carry no ``item_id`` (deltas no ``logprobs``), its text parts no
    ``annotations``, its usage no ``*_tokens_details`` (see ``cortex/sim/responses.py``). OpenAI always
    sends them, and the SDK's types require them.
    """
    if isinstance(value, list):
        return [fill_known_gaps(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: fill_known_gaps(v) for k, v in value.items()}
    if out.get("object") == "response":
        out.setdefault("tools", [])
        out.setdefault("tool_choice", "auto")
        out.setdefault("parallel_tool_calls", True)
    if "content_index" in out:  # text deltas, content parts
        out.setdefault("item_id", "")
    if out.get("type") == "response.output_text.delta":
        out.setdefault("logprobs", [])
    if out.get("type") == "output_text":
        out.setdefault("annotations", [])
    if "input_tokens" in out and "output_tokens" in out:
        out.setdefault("input_tokens_details", {"cached_tokens": 0, "cache_write_tokens": 0})
        out.setdefault("output_tokens_details", {"reasoning_tokens": 0})
    return out


def strict_errors(event: Any) -> list[str]:
    """Validate an event's JSON strictly against its SDK type, known gaps filled; the errors left."""
    raw = event.model_dump(mode="json", exclude_unset=True)
    try:
        EXPECTED_TYPES[raw["type"]].model_validate(fill_known_gaps(raw))
    except pydantic.ValidationError as exc:
        return [f"{e['type']} at {e['loc']}" for e in exc.errors()]
    return []


async def one_node(fleet: FleetFactory, tok_s: float = 0.0) -> Fleet:
    return await fleet(NodeSpec("a", [SimModel(MODEL, 1000)], tok_s=tok_s))


async def test_create_retrieve_delete(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    async with f.openai() as client:
        raw = await client.responses.with_raw_response.create(model=MODEL, input="hello there", max_output_tokens=5)
        created = raw.parse()
        assert raw.headers["x-cortex-node"] == "a"
        assert isinstance(created, Response)
        assert created.id.startswith("resp_")
        assert created.status == "completed"
        assert created.output_text == "The quick brown fox jumps"
        assert created.usage is not None
        assert created.usage.output_tokens == 5

        fetched = await client.responses.retrieve(created.id)
        assert fetched.id == created.id
        assert fetched.output_text == created.output_text

        await client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.retrieve(created.id)
    assert gone.value.code == "response_not_found"
    assert f.engine.affinity.lookup(created.id) is None
    await f.wait_for(lambda: len(f.engine.metrics.recent()) >= 1, what="the request log")
    record = f.engine.metrics.recent()[-1]
    assert (record.model, record.node, record.status, record.completion_tokens) == (MODEL, "a", 200, 5)


async def test_stream_events_pass_through_and_validate(fleet: FleetFactory) -> None:
    f = await one_node(fleet, tok_s=200)
    f.sim("a").set_reply("cortex passes every event through")
    async with f.openai() as client:
        stream = await client.responses.create(model=MODEL, input="tell me", stream=True)
        events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    for event in events:
        assert isinstance(event, EXPECTED_TYPES[event.type]), event.type
        assert strict_errors(event) == [], event.type
    assert [e.sequence_number for e in events] == list(range(len(events)))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == completed.response.output_text == "cortex passes every event through"
    assert completed.response.usage is not None
    response_id = completed.response.id
    # the id came from response.created, and the usage from response.completed
    assert f.engine.affinity.lookup(response_id) is not None
    await f.wait_for(lambda: len(f.engine.metrics.recent()) >= 1, what="the request log")
    record = f.engine.metrics.recent()[0]
    assert record.stream
    assert record.completion_tokens == completed.response.usage.output_tokens
    assert record.prompt_tokens == completed.response.usage.input_tokens
    assert record.ttft_s is not None
    assert record.tok_s is not None


async def test_streamed_response_is_not_retrievable_but_continues(fleet: FleetFactory) -> None:
    """mistral.rs stores only the history of a streamed response: GET is the node's 404, a follow-up works."""
    f = await one_node(fleet)
    async with f.openai() as client:
        stream = await client.responses.create(model=MODEL, input="first question", stream=True)
        first = [e async for e in stream][-1]
        assert isinstance(first, ResponseCompletedEvent)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.retrieve(first.response.id)
        assert first.response.id in missing.value.message
        follow = await client.responses.create(
            model=MODEL, input="and then?", previous_response_id=first.response.id, max_output_tokens=3
        )
    assert first.response.usage is not None
    assert follow.usage is not None
    assert follow.usage.input_tokens > first.response.usage.input_tokens + first.response.usage.output_tokens - 1


async def test_unknown_ids_are_404_in_openai_envelope(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    async with f.openai() as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_nope")
        assert unknown.value.code == "response_not_found"
        assert isinstance(unknown.value.body, dict)
        assert unknown.value.body["param"] == "previous_response_id"
        assert "resp_nope" in unknown.value.message
        for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel):
            with pytest.raises(openai.NotFoundError) as by_id:
                await call("resp_nope")
            assert by_id.value.code == "response_not_found"
    assert f.inference_requests("a", "/v1/responses") == []


async def test_store_false_is_not_remembered(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    async with f.openai() as client:
        made = await client.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=2)
        assert f.engine.affinity.lookup(made.id) is None
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model=MODEL, input="again", previous_response_id=made.id)


async def test_bad_bodies_are_400(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    for body, param in (
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": 3}, "input"),
        ({"model": MODEL, "input": "x", "stream": "yes"}, "stream"),
        ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": MODEL, "input": "x", "previous_response_id": 7}, "previous_response_id"),
    ):
        status, data, _ = await f.post("/v1/responses", body)
        assert status == 400, body
        assert data["error"]["param"] == param
    status, data, _ = await f.post("/v1/responses", {"model": "nope", "input": "x"})
    assert status == 404
    assert data["error"]["code"] == "model_not_found"


async def test_background_cancel_goes_to_the_holder(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel(MODEL, 1000)], tok_s=5),
        NodeSpec("b", [SimModel(MODEL, 1000)], tok_s=5),
    )
    async with f.openai() as client:
        queued = await client.responses.create(model=MODEL, input="slow", background=True, max_output_tokens=20)
        assert queued.status == "queued"
        holder = f.engine.affinity.lookup(queued.id)
        assert holder is not None
        cancelled = await client.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        fetched = await client.responses.retrieve(queued.id)
        assert fetched.status == "cancelled"
    other = "b" if holder.node == "a" else "a"
    posts = [r for r in f.sim(holder.node).requests if r.path.endswith("/cancel")]
    assert len(posts) == 1
    assert not [r for r in f.sim(other).requests if r.path.startswith("/v1/responses")]


async def test_node_breaking_the_stream_ends_it_with_response_failed(fleet: FleetFactory) -> None:
    f = await one_node(fleet, tok_s=200)
    f.sim("a").drop_stream_after(3)
    async with f.openai() as client:
        stream = await client.responses.create(model=MODEL, input="hi", stream=True, max_output_tokens=8)
        events = [e async for e in stream]
    assert events[0].type == "response.created"
    last = events[-1]
    assert isinstance(last, ResponseFailedEvent)
    first = events[0]
    assert isinstance(first, ResponseCreatedEvent)
    assert last.response.id == first.response.id
    assert last.response.error is not None
    assert "before the response completed" in last.response.error.message
    await f.wait_for(lambda: len(f.engine.metrics.recent()) >= 1, what="the request log")
    assert f.engine.metrics.recent()[0].status == 502
