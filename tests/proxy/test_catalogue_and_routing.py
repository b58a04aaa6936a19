"""The merged catalogue, where requests go, and the headers that say so (product §3, §4 "Route")."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from cortex.config import ModelSettings
from cortex.sim import SimModel
from tests.conftest import Fleet, FleetFactory, NodeSpec

HI: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": HI, "max_tokens": 4, **extra}


async def three_nodes(fleet: FleetFactory) -> Fleet:
    """a: m1 m2 | b: m1, m3 (unloaded) | c: m2 (unloaded), m3 — every model on two nodes."""
    return await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("m2", 1000)], pinned=["m1"]),
        NodeSpec("b", [SimModel("m1", 1000), SimModel("m3", 1000, loaded=False)]),
        NodeSpec("c", [SimModel("m2", 1000, loaded=False), SimModel("m3", 1000)]),
        models=[ModelSettings(id="m1", aliases=["gpt-*"])],
    )


async def test_catalogue_merges_nodes_one_entry_per_model(fleet: FleetFactory) -> None:
    f = await three_nodes(fleet)
    async with f.http.get(f.url + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert sorted(ids) == ["m1", "m2", "m3"], ids  # one entry per id, the synthetic `default` dropped
    by_id = {m["id"]: m for m in body["data"]}
    for entry in body["data"]:
        assert entry["object"] == "model"
        assert entry["owned_by"] == "cortex"
        assert isinstance(entry["created"], int)
        assert set(entry["cortex"]) >= {"nodes", "state", "pinned"}
    assert sorted(by_id["m1"]["cortex"]["nodes"]) == ["a", "b"]
    assert by_id["m2"]["cortex"]["nodes"] == ["a"]
    assert by_id["m3"]["cortex"]["nodes"] == ["c"]
    assert {m: by_id[m]["cortex"]["state"] for m in by_id} == {"m1": "loaded", "m2": "loaded", "m3": "loaded"}
    assert {m: by_id[m]["cortex"]["pinned"] for m in by_id} == {"m1": True, "m2": False, "m3": False}


async def test_catalogue_reports_models_loaded_nowhere_as_unloaded(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000), SimModel("cold", 1000, loaded=False)]),
        NodeSpec("b", [SimModel("cold", 1000, loaded=False)]),
    )
    async with f.http.get(f.url + "/v1/models") as resp:
        body = await resp.json()
    cold = next(m for m in body["data"] if m["id"] == "cold")
    assert cold["cortex"]["state"] == "unloaded"
    assert cold["cortex"]["nodes"] == []
    assert cold["cortex"]["pinned"] is False


async def test_request_goes_to_a_node_holding_the_model_with_cortex_headers(fleet: FleetFactory) -> None:
    f = await three_nodes(fleet)
    status, body, headers = await f.post("/v1/chat/completions", chat("m3"))
    assert status == 200, body
    assert headers["x-cortex-node"] == "c"
    assert headers["x-cortex-model"] == "m3"
    assert headers["x-cortex-queue-ms"] == "0"
    assert body["model"] == "m3"
    assert len(f.inference_requests("c")) == 1
    assert f.inference_requests("a") == []
    assert f.inference_requests("b") == []
    assert f.inference_requests("c")[0].json["model"] == "m3"


async def test_alias_and_default_model_are_rewritten_to_the_real_id(fleet: FleetFactory) -> None:
    f = await three_nodes(fleet)
    status, body, headers = await f.post("/v1/chat/completions", chat("gpt-4o"))
    assert status == 200, body
    assert headers["x-cortex-model"] == "m1"
    status, body, headers = await f.post("/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert status == 200, body
    assert headers["x-cortex-model"] == "m1"  # absent model → the first pinned model
    sent = [r.json["model"] for name in ("a", "b") for r in f.inference_requests(name)]
    assert sent == ["m1", "m1"]


async def test_least_in_flight_node_first(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000)], tok_s=20),
        NodeSpec("b", [SimModel("m1", 1000)], tok_s=20),
    )
    # Idle fleet: the tie goes to the first node in config order.
    status, _, headers = await f.post("/v1/chat/completions", chat("m1", max_tokens=1))
    assert status == 200
    assert headers["x-cortex-node"] == "a"
    # With a stream in flight on a, the next request goes to b.
    async with f.http.post(f.url + "/v1/chat/completions", json=chat("m1", max_tokens=12, stream=True)) as slow:
        assert slow.headers["x-cortex-node"] == "a"
        await asyncio.wait_for(slow.content.readline(), 5)
        assert f.engine.snapshot().node("a").in_flight == 1  # type: ignore[union-attr]
        status, _, headers = await f.post("/v1/chat/completions", chat("m1", max_tokens=1))
        assert status == 200
        assert headers["x-cortex-node"] == "b"
        await asyncio.wait_for(slow.read(), 5)
    assert len(f.inference_requests("a")) == 2
    assert len(f.inference_requests("b")) == 1


async def test_cold_model_is_loaded_by_cortex_and_queue_time_reported(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000), SimModel("cold", 1000, loaded=False)], load_s=0.3))
    status, body, headers = await f.post("/v1/chat/completions", chat("cold"))
    assert status == 200, body
    assert headers["x-cortex-node"] == "a"
    assert int(headers["x-cortex-queue-ms"]) >= 250
    reloads = [r for r in f.sim("a").requests if r.path == "/v1/models/reload"]
    assert [r.json for r in reloads] == [{"model_id": "cold"}]  # cortex loaded it; not a lazy load


async def test_upstream_request_id_is_passed_back(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    status, _, headers = await f.post("/v1/chat/completions", chat("m1"), headers={"x-request-id": "trace-42"})
    assert status == 200
    assert headers["x-request-id"] == "trace-42"
    assert f.inference_requests("a")[0].headers["x-request-id"] == "trace-42"
    # Without one, the node mints `req_<32 hex>` and the client sees that id.
    status, _, headers = await f.post("/v1/chat/completions", chat("m1"))
    assert re.fullmatch(r"req_[0-9a-f]{32}", headers["x-request-id"]), headers.get("x-request-id")
    async with f.http.post(
        f.url + "/v1/chat/completions", json=chat("m1", stream=True), headers={"x-request-id": "trace-43"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "trace-43"
        await resp.read()


CLIENT_ONLY_HEADERS = {
    "Authorization": "Bearer sk-client-secret",
    "x-api-key": "client-key",
    "Cookie": "session=abc",
    "Proxy-Authorization": "Basic Zm9vOmJhcg==",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Upgrade": "h2c",
    "Connection": "keep-alive, x-hop-secret",
    "x-hop-secret": "1",
    "Forwarded": "for=10.0.0.1",
    "anthropic-version": "2023-06-01",
}


async def test_credentials_and_hop_by_hop_headers_never_reach_the_node(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    for stream in (False, True):
        async with f.http.post(
            f.url + "/v1/chat/completions", json=chat("m1", stream=stream), headers=CLIENT_ONLY_HEADERS
        ) as resp:
            assert resp.status == 200
            await resp.read()
    recorded = f.inference_requests("a")
    assert len(recorded) == 2
    for req in recorded:
        names = {k.lower() for k in req.headers}
        leaked = names & {k.lower() for k in CLIENT_ONLY_HEADERS if k != "Connection"}
        assert not leaked, leaked
        assert "x-hop-secret" not in req.headers.get("Connection", "")
        for value in req.headers.values():
            assert "secret" not in value
            assert "client-key" not in value
            assert "session=" not in value


async def test_health_and_ready(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), poll={"down_after": 1, "interval_s": 0.05})
    async with f.http.get(f.url + "/health") as resp:
        assert resp.status == 200
    async with f.http.get(f.url + "/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["nodes_up"] == ["a"]
    await f.sim("a").stop()
    await f.wait_for(lambda: f.engine.snapshot().node("a").status.value == "down", what="a down")  # type: ignore[union-attr]
    async with f.http.get(f.url + "/ready") as resp:
        assert resp.status == 503
    async with f.http.get(f.url + "/health") as resp:
        assert resp.status == 200  # the process is up even when no node is


async def test_api_keys(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), gateway={"api_keys": ["k-one", "k-two"]})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "k-one"}):
        status, body, _ = await f.post("/v1/chat/completions", chat("m1"), headers=headers)
        assert status == 401, (headers, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    async with f.http.get(f.url + "/v1/models") as resp:
        assert resp.status == 401
    for headers in ({"Authorization": "Bearer k-one"}, {"x-api-key": "k-two"}, {"authorization": "bearer k-two"}):
        status, body, _ = await f.post("/v1/chat/completions", chat("m1"), headers=headers)
        assert status == 200, (headers, body)
    async with f.http.get(f.url + "/v1/models", headers={"x-api-key": "k-one"}) as resp:
        assert resp.status == 200
    assert len(f.inference_requests("a")) == 3  # refused requests never reached the node


async def test_max_output_tokens_clamps_what_the_node_is_asked_for(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000)]),
        models=[ModelSettings(id="m1", max_output_tokens=5)],
    )
    for key in ("max_tokens", "max_completion_tokens"):
        status, body, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, key: 50})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == 5
    status, body, _ = await f.post("/v1/completions", {"model": "m1", "prompt": "x", "max_tokens": 50})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 5
    status, body, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": HI, "max_tokens": 3})
    assert body["usage"]["completion_tokens"] == 3  # smaller asks are left alone
    sent = [r.json for r in f.sim("a").requests if r.path in ("/v1/chat/completions", "/v1/completions")]
    assert [r.get("max_tokens", r.get("max_completion_tokens")) for r in sent] == [5, 5, 5, 3]
