"""Failover: a request that fails before its first byte is retried on another node holding the model (§4)."""

from __future__ import annotations

from typing import Any

from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec

HI: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]


async def two_nodes(fleet: FleetFactory, interval_s: float = 0.1) -> Fleet:
    return await fleet(
        NodeSpec("a", [SimModel("m1", 1000)]),
        NodeSpec("b", [SimModel("m1", 1000)]),
        poll={"interval_s": interval_s, "down_after": 3},
    )


async def test_node_stopped_requests_still_succeed_on_the_other(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    await f.sim("a").stop()
    # Straight away (before any poll noticed) and then again once the node is marked down.
    for stream in (False, True, False, True):
        status, body, headers = await f.post(
            "/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 3, "stream": stream}
        )
        assert status == 200, body
        assert headers["x-cortex-node"] == "b"
    await f.wait_for(lambda: f.engine.snapshot().node("a").status.value == "down", what="a marked down")  # type: ignore[union-attr]
    for stream in (False, True):
        status, body, headers = await f.post(
            "/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 3, "stream": stream}
        )
        assert status == 200, body
        assert headers["x-cortex-node"] == "b"
    assert len(f.inference_requests("b")) == 6


async def test_5xx_before_the_first_byte_is_retried_on_another_node(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    for stream in (False, True):
        f.sim("a").fail_next("/v1/chat/completions", 500, {"message": "CUDA error: an illegal memory access"})
        status, body, headers = await f.post(
            "/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 3, "stream": stream}
        )
        assert status == 200, body
        assert headers["x-cortex-node"] == "b"
    assert len(f.inference_requests("a")) == 2
    assert len(f.inference_requests("b")) == 2
    # The failures count against a, but two are not enough to take it out of routing.
    assert f.engine.snapshot().node("a").status.value == "up"  # type: ignore[union-attr]


async def test_three_request_failures_mark_a_node_down(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet, interval_s=5.0)  # no poll will bring it back during the test
    f.sim("a").fail_next("/v1/chat/completions", 503, "overloaded", count=3)
    for _ in range(3):
        status, _, headers = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 1})
        assert status == 200
        assert headers["x-cortex-node"] == "b"
    assert f.engine.snapshot().node("a").status.value == "down"  # type: ignore[union-attr]
    status, _, headers = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 1})
    assert headers["x-cortex-node"] == "b"
    assert len(f.inference_requests("a")) == 3


async def test_a_client_fault_is_not_retried(fleet: FleetFactory) -> None:
    f = await two_nodes(fleet)
    f.sim("a").fail_next("/v1/chat/completions", 500, {"message": "`max_tokens` must be at least 1."})
    status, body, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 3})
    assert status == 400, body
    assert f.inference_requests("b") == []
