"""Every error reaches an OpenAI client in the OpenAI envelope, with the status the contract names (§3)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from cortex.config import ModelSettings
from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec

HI: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
ENVELOPE = {"message", "type", "param", "code"}


def assert_envelope(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == ENVELOPE, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    return error


async def one_node(fleet: FleetFactory, **gateway: Any) -> Fleet:
    return await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("m2", 1000)], sim={"max_seq_len": 64}),
        gateway=gateway or None,
    )


async def test_unknown_model_is_404_listing_the_served_models(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    for path, body in (
        ("/v1/chat/completions", {"model": "ghost", "messages": HI}),
        ("/v1/completions", {"model": "ghost", "prompt": "x"}),
        ("/v1/embeddings", {"model": "ghost", "input": "x"}),
    ):
        status, reply, _ = await f.post(path, body)
        assert status == 404, (path, reply)
        error = assert_envelope(reply)
        assert "ghost" in error["message"]
        assert "m1" in error["message"]
        assert "m2" in error["message"]
        assert error["param"] == "model"
        assert error["type"] == "invalid_request_error"
    assert f.inference_requests("a") == []


async def test_malformed_json_is_400(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    for raw in (b"{not json", b"", b"[1, 2]", b'"just a string"'):
        async with f.http.post(
            f.url + "/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400, raw
            error = assert_envelope(await resp.json())
            assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": "ten"}, "max_tokens"),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 2.5}, "max_tokens"),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "stop": 3}, "stop"),
        ("/v1/chat/completions", {"model": "m1", "messages": 42}, "messages"),
        ("/v1/chat/completions", {"model": "m1", "messages": [{"content": "no role"}]}, "messages"),
        ("/v1/chat/completions", {"model": "m1"}, "messages"),
        ("/v1/chat/completions", {"model": 7, "messages": HI}, "model"),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "m1", "prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", {"model": "m1"}, "prompt"),
        ("/v1/embeddings", {"model": "m1", "input": 3.5}, "input"),
        ("/v1/embeddings", {"model": "m1", "input": ""}, "input"),
    ],
    ids=[
        "max_tokens-str",
        "max_tokens-float",
        "stream-str",
        "temperature-str",
        "max_tokens-bool",
        "stop-int",
        "messages-int",
        "messages-no-role",
        "messages-missing",
        "model-int",
        "max_tokens-zero",
        "prompt-object",
        "prompt-missing",
        "input-float",
        "input-empty",
    ],
)
async def test_wrong_field_types_are_400(fleet: FleetFactory, path: str, body: dict[str, Any], param: str) -> None:
    f = await one_node(fleet)
    status, reply, _ = await f.post(path, body)
    assert status == 400, reply
    error = assert_envelope(reply)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert f.inference_requests("a", path) == []  # rejected before any node saw it


async def test_body_over_max_body_mb_is_413(fleet: FleetFactory, caplog: pytest.LogCaptureFixture) -> None:
    f = await one_node(fleet, max_body_mb=0.001)
    caplog.set_level(logging.DEBUG)
    big = {"model": "m1", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, reply, _ = await f.post("/v1/chat/completions", big)
    assert status == 413, reply
    assert "0.001" in assert_envelope(reply)["message"]
    status, reply, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 1})
    assert status == 200, reply  # a small body still passes
    assert len(f.inference_requests("a")) == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


async def test_node_unreachable_is_502_then_503(fleet: FleetFactory, caplog: pytest.LogCaptureFixture) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), poll={"interval_s": 0.1, "down_after": 2})
    caplog.set_level(logging.DEBUG)
    await f.sim("a").stop()
    status, reply, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI})
    assert status in (502, 503), reply
    assert_envelope(reply)
    await f.wait_for(lambda: f.engine.snapshot().node("a").status.value == "down", what="a marked down")  # type: ignore[union-attr]
    status, reply, headers = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI})
    assert status == 503, reply
    assert "down" in assert_envelope(reply)["message"]
    assert int(headers["Retry-After"]) > 0
    assert not [r for r in caplog.records if r.exc_info], caplog.text  # a down node is a warning, not a crash


async def test_node_message_error_is_rewrapped(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    # A real node error: the prompt is longer than the node's context (mistral.rs: 422 {"message"}).
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 200)}]
    status, reply, headers = await f.post("/v1/chat/completions", {"model": "m1", "messages": long_prompt})
    assert status == 400, reply
    error = assert_envelope(reply)
    assert error["message"].startswith("Prompt sequence length is greater than 64")
    assert error["type"] == "invalid_request_error"
    assert headers["x-cortex-node"] == "a"
    assert len(f.inference_requests("a")) == 1


async def test_node_500_for_a_client_mistake_becomes_400(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    message = "unknown variant `extreme`, expected one of `off`, `none`, `low`, `medium`, `high`, `xhigh`"
    f.sim("a").fail_next("/v1/chat/completions", 500, {"message": message})
    status, reply, _ = await f.post(
        "/v1/chat/completions", {"model": "m1", "messages": HI, "reasoning_effort": "extreme"}
    )
    assert status == 400, reply
    error = assert_envelope(reply)
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"


async def test_node_500_for_a_node_failure_stays_5xx(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    message = "CUDA error: an illegal memory access was encountered"
    f.sim("a").fail_next("/v1/chat/completions", 500, {"message": message})
    status, reply, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI})
    assert 500 <= status < 600, reply
    error = assert_envelope(reply)
    assert error["type"] == "server_error"
    assert "illegal memory access" in error["message"]


async def test_model_too_large_for_every_node_fails_fast_naming_the_size(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("huge", 4000, loaded=False)], vram_mb=4096),
        NodeSpec("b", [SimModel("huge", 4000, loaded=False)], vram_mb=6144),
        models=[ModelSettings(id="huge", vram_mb=20000)],
        gateway={"queue_timeout_s": 30},
    )
    for stream in (False, True):
        status, reply, headers = await asyncio.wait_for(
            f.post("/v1/chat/completions", {"model": "huge", "messages": HI, "stream": stream}), 5
        )
        assert status == 503, reply
        message = assert_envelope(reply)["message"]
        assert "20000 MiB" in message
        assert "largest is b" in message
        assert "Retry-After" not in headers
        assert headers["x-should-retry"] == "false"
    for name in ("a", "b"):
        assert [r for r in f.sim(name).requests if r.path == "/v1/models/reload"] == []


async def test_model_no_node_can_load_is_503_with_retry_after(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("huge", 3000, loaded=False)], vram_mb=4096, pinned=("m1",)),
        models=[ModelSettings(id="huge", vram_mb=3000)],
        gateway={"queue_timeout_s": 0.4},
    )
    for stream in (False, True):
        started = time.monotonic()
        status, reply, headers = await f.post(
            "/v1/chat/completions", {"model": "huge", "messages": HI, "stream": stream}
        )
        assert status == 503, reply
        assert_envelope(reply)
        assert int(headers["Retry-After"]) > 0
        assert time.monotonic() - started < 3.0
    assert [r for r in f.sim("a").requests if r.path == "/v1/models/reload"] == []


async def test_failed_load_is_503_with_retry_after(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000), SimModel("bad", 1000, loaded=False)]))
    f.sim("a").set_load_failure("bad", "weights corrupt")
    status, reply, headers = await f.post("/v1/chat/completions", {"model": "bad", "messages": HI})
    assert status == 503, reply
    assert "weights corrupt" in assert_envelope(reply)["message"]
    assert int(headers["Retry-After"]) > 0


async def test_unknown_route_is_404_in_the_envelope(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    status, reply, _ = await f.post("/v1/nothing-here", {})
    assert status == 404
    assert_envelope(reply)


async def test_bad_requests_log_no_traceback(fleet: FleetFactory, caplog: pytest.LogCaptureFixture) -> None:
    f = await one_node(fleet)
    caplog.set_level(logging.DEBUG)
    f.sim("a").fail_next("/v1/chat/completions", 500, {"message": "unknown variant `x`"})
    bad: list[tuple[str, Any]] = [
        ("/v1/chat/completions", {"model": "ghost", "messages": HI}),
        ("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": "x"}),
        ("/v1/chat/completions", {"model": "m1", "messages": HI}),
        ("/v1/chat/completions", {"model": "m1", "messages": [{"role": "user", "content": "w " * 200}]}),
        ("/v1/embeddings", {"model": "m1", "input": []}),
    ]
    for path, body in bad:
        status, _, _ = await f.post(path, body)
        assert 400 <= status < 500
    async with f.http.post(f.url + "/v1/chat/completions", data=b"{", headers={"Content-Type": "application/json"}):
        pass
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_queue_full_is_503_with_retry_after(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("cold", 1000, loaded=False)], load_s=0.6),
        gateway={"max_queue": 1},
    )
    first = asyncio.ensure_future(f.post("/v1/chat/completions", {"model": "cold", "messages": HI, "max_tokens": 1}))
    await f.wait_for(lambda: f.engine.snapshot().model("cold").queued == 1, what="one request queued")  # type: ignore[union-attr]
    status, reply, headers = await f.post("/v1/chat/completions", {"model": "cold", "messages": HI})
    assert status == 503, reply
    assert "wait" in assert_envelope(reply)["message"]
    assert int(headers["Retry-After"]) > 0
    status, reply, _ = await asyncio.wait_for(first, 5)
    assert status == 200, reply


async def test_no_model_and_nothing_pinned_is_400(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    status, reply, _ = await f.post("/v1/chat/completions", {"messages": HI})
    assert status == 400, reply
    assert assert_envelope(reply)["param"] == "model"


async def test_node_error_passes_back_the_request_id(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 200)}]
    status, _, headers = await f.post(
        "/v1/chat/completions", {"model": "m1", "messages": long_prompt}, headers={"x-request-id": "trace-err"}
    )
    assert status == 400
    assert headers.get("x-request-id") == "trace-err"
    assert headers["x-cortex-node"] == "a"


async def test_wrong_method_is_405_and_unknown_route_404(fleet: FleetFactory) -> None:
    f = await one_node(fleet)
    async with f.http.get(f.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert assert_envelope(await resp.json())["code"] == "method_not_allowed"
    async with f.http.get(f.url + "/v1/nothing-here") as resp:
        assert resp.status == 404
        assert assert_envelope(await resp.json())["code"] == "not_found"
