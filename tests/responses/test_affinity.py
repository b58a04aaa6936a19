"""Response affinity: a conversation stays on the node that holds it, whatever the router would prefer."""

from __future__ import annotations

import openai
import pytest
from openai.types.responses import ResponseCompletedEvent

from cortex.engine import commands as cmd
from cortex.engine.state import NodeStatus, SlotState
from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec

MODEL = "chat-model"


async def two_nodes(fleet: FleetFactory, load_s: float = 0.05) -> Fleet:
    """Two nodes with the model loaded on both: plain routing would send everything to ``a`` (ties)."""
    return await fleet(
        NodeSpec("a", [SimModel(MODEL, 1000)], load_s=load_s),
        NodeSpec("b", [SimModel(MODEL, 1000)], load_s=load_s),
        poll={"down_after": 2},
    )


async def start_on(f: Fleet, client: openai.AsyncOpenAI, node: str) -> str:
    """Start a conversation on ``node`` (the other one drained meanwhile); returns the response id."""
    other = "b" if node == "a" else "a"
    assert (await f.engine.submit(cmd.DrainNode(other))).ok
    try:
        first = await client.responses.create(model=MODEL, input=f"start on {node}", max_output_tokens=3)
    finally:
        assert (await f.engine.submit(cmd.UndrainNode(other))).ok
    holder = f.engine.affinity.lookup(first.id)
    assert holder is not None
    assert holder.node == node
    return first.id


async def test_six_turn_chains_stay_on_their_nodes(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    async with f.openai() as client:
        last = {"a": await start_on(f, client, "a"), "b": await start_on(f, client, "b")}
        seen_input = {"a": 0, "b": 0}
        for turn in range(2, 7):
            for node in ("b", "a"):  # interleaved; "a" is always the router's first choice
                if turn % 2:
                    raw = await client.responses.with_raw_response.create(
                        model=MODEL, input=f"turn {turn}", previous_response_id=last[node], max_output_tokens=3
                    )
                    assert raw.headers["x-cortex-node"] == node
                    made = raw.parse()
                    response_id, usage = made.id, made.usage
                else:
                    stream = await client.responses.create(
                        model=MODEL, input=f"turn {turn}", previous_response_id=last[node], stream=True
                    )
                    done = [e async for e in stream][-1]
                    assert isinstance(done, ResponseCompletedEvent)
                    response_id, usage = done.response.id, done.response.usage
                assert usage is not None
                assert usage.input_tokens > seen_input[node]  # the node had the whole history
                seen_input[node] = usage.input_tokens
                holder = f.engine.affinity.lookup(response_id)
                assert holder is not None
                assert holder.node == node
                last[node] = response_id
    for node in ("a", "b"):
        sent = f.inference_requests(node, "/v1/responses")
        assert len(sent) == 6
        assert sent[0].json.get("previous_response_id") is None
        assert all(r.json["previous_response_id"] for r in sent[1:])


async def test_holder_down_is_503_naming_it(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    async with f.openai() as client:
        on_b = await start_on(f, client, "b")
        await f.sim("b").stop()
        await f.wait_for(lambda: f.engine.fleet.nodes["b"].status is NodeStatus.DOWN, what="b marked down")
        with pytest.raises(openai.InternalServerError) as down:
            await client.responses.create(model=MODEL, input="still there?", previous_response_id=on_b)
        assert down.value.status_code == 503
        assert down.value.code == "node_unavailable"
        assert "node b" in down.value.message
        assert down.value.response.headers["retry-after"]
        with pytest.raises(openai.InternalServerError) as get:
            await client.responses.retrieve(on_b)
        assert get.value.status_code == 503
        assert "node b" in get.value.message
    assert len(f.inference_requests("a", "/v1/responses")) == 0  # never rerouted to the node that lacks it


async def test_drained_holder_refuses_generation_but_answers_retrieval(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    async with f.openai() as client:
        on_a = await start_on(f, client, "a")
        assert (await f.engine.submit(cmd.DrainNode("a"))).ok
        with pytest.raises(openai.InternalServerError) as drained:
            await client.responses.create(model=MODEL, input="more", previous_response_id=on_a)
        assert "draining" in drained.value.message
        fetched = await client.responses.retrieve(on_a)
        assert fetched.id == on_a


async def test_model_unloaded_on_holder_is_loaded_there_not_elsewhere(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    async with f.openai() as client:
        on_b = await start_on(f, client, "b")
        assert (await f.engine.submit(cmd.UnloadModel(MODEL, node="b"))).ok
        assert f.engine.fleet.nodes["b"].slots[MODEL].state is SlotState.UNLOADED
        assert f.engine.fleet.nodes["a"].slots[MODEL].state is SlotState.LOADED
        raw = await client.responses.with_raw_response.create(
            model=MODEL, input="after the unload", previous_response_id=on_b, max_output_tokens=2
        )
        made = raw.parse()
    assert raw.headers["x-cortex-node"] == "b"
    assert f.engine.fleet.nodes["b"].slots[MODEL].state is SlotState.LOADED
    reloads = [r for r in f.sim("b").requests if r.path == "/v1/models/reload"]
    assert len(reloads) == 1
    holder = f.engine.affinity.lookup(made.id)
    assert holder is not None
    assert holder.node == "b"


async def test_streamed_follow_up_waits_for_the_pinned_load(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet, load_s=0.3)
    async with f.openai() as client:
        on_b = await start_on(f, client, "b")
        assert (await f.engine.submit(cmd.UnloadModel(MODEL, node="b"))).ok
        stream = await client.responses.create(
            model=MODEL, input="stream after unload", previous_response_id=on_b, stream=True
        )
        events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    assert len(f.inference_requests("b", "/v1/responses")) == 2
    assert len(f.inference_requests("a", "/v1/responses")) == 0


async def test_restarted_holder_has_forgotten_the_conversation(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    async with f.openai() as client:
        on_a = await start_on(f, client, "a")
        epoch = f.engine.fleet.nodes["a"].client.created
        assert epoch is not None
        await f.sim("a").restart()
        await f.wait_for(lambda: f.engine.fleet.nodes["a"].client.created != epoch, what="the restart seen")
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.create(model=MODEL, input="remember me?", previous_response_id=on_a)
        assert "restarted" in gone.value.message
    assert f.engine.affinity.lookup(on_a) is None
    assert len(f.inference_requests("a", "/v1/responses")) == 1


async def test_pinned_stream_hears_load_notices(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    async with f.openai() as client:
        on_b = await start_on(f, client, "b")
    assert (await f.engine.submit(cmd.UnloadModel(MODEL, node="b"))).ok
    f.sim("b").load_s = 1.2  # just over the first notice's second
    body = {"model": MODEL, "input": "later", "previous_response_id": on_b, "stream": True}
    async with f.http.post(f.url + "/v1/responses", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["x-cortex-node"] == "b"
        text = await resp.text()
    assert text.startswith(f": loading {MODEL} on b (1 s)\n\n")
    assert "event:response.completed" in text
    assert len(f.inference_requests("a", "/v1/responses")) == 0
