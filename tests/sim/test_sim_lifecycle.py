"""Model listing, lifecycle endpoints, lazy loading, VRAM reporting and restarts of the simulated node."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from cortex.sim import SimModel, SimNode
from tests.sim.conftest import ALPHA, BETA, NodeFactory
from tests.sim.sse import USER_HI, get_json, post

MIB = 1024 * 1024


async def lifecycle(http: aiohttp.ClientSession, node: SimNode, action: str, model_id: str) -> dict[str, str]:
    status, body = await post(http, node, f"/v1/models/{action}", {"model_id": model_id})
    assert status == 200, body  # always 200, whatever the outcome
    assert isinstance(body, dict)
    return body


async def listing(http: aiohttp.ClientSession, node: SimNode) -> list[tuple[str, str | None]]:
    data = (await get_json(http, node, "/v1/models"))["data"]
    return [(entry["id"], entry.get("status")) for entry in data]


async def available_mb(http: aiohttp.ClientSession, node: SimNode) -> float:
    info = await get_json(http, node, "/v1/system/info")
    (device,) = info["devices"]
    assert device["kind"] == "cuda"
    assert device["total_memory_bytes"] == node.vram_mb * MIB
    return float(device["available_memory_bytes"]) / MIB


async def test_health_and_root_answer_ok(http: aiohttp.ClientSession, node: SimNode) -> None:
    for path in ("/health", "/"):
        async with http.get(node.url + path) as resp:
            assert (resp.status, await resp.text()) == (200, "OK")


async def test_models_list_default_first_then_reloading_loaded_unloaded(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(
        [SimModel("u1", 100, loaded=False), SimModel("l1", 100), SimModel("r1", 100, loaded=False)],
        load_s=0.2,
    )
    reload = asyncio.create_task(post(http, node, "/v1/models/reload", {"model_id": "r1"}))
    await asyncio.sleep(0.05)
    body = await get_json(http, node, "/v1/models")
    assert body["object"] == "list"
    data = body["data"]
    assert data[0] == {
        "id": "default",
        "object": "model",
        "created": data[0]["created"],
        "owned_by": "local",
        "root": "default",
    }
    assert [(e["id"], e["status"]) for e in data[1:]] == [
        ("r1", "reloading"),
        ("l1", "loaded"),
        ("u1", "unloaded"),
    ]
    assert {e["created"] for e in data} == {data[0]["created"]}
    assert all(e["root"] == e["id"] and None not in e.values() for e in data)
    assert (await reload)[1]["status"] == "loaded"


async def test_lifecycle_statuses_are_always_http_200(http: aiohttp.ClientSession, node: SimNode) -> None:
    assert await lifecycle(http, node, "status", ALPHA) == {"model_id": ALPHA, "status": "loaded"}
    assert await lifecycle(http, node, "status", BETA) == {"model_id": BETA, "status": "unloaded"}
    assert await lifecycle(http, node, "status", "nope") == {"model_id": "nope", "status": "not_found"}
    assert await lifecycle(http, node, "unload", "nope") == {"model_id": "nope", "status": "not_found"}
    assert await lifecycle(http, node, "unload", BETA) == {"model_id": BETA, "status": "unloaded"}
    assert await lifecycle(http, node, "reload", "nope") == {"model_id": "nope", "status": "not_found"}
    assert await lifecycle(http, node, "unload", ALPHA) == {"model_id": ALPHA, "status": "unloaded"}
    assert node.model_status(ALPHA) == "unloaded"


async def test_lifecycle_without_model_id_is_422_plain_text(http: aiohttp.ClientSession, node: SimNode) -> None:
    status, body = await post(http, node, "/v1/models/reload", {"model": ALPHA})
    assert status == 422
    assert isinstance(body, str)
    assert body.startswith("Failed to deserialize the JSON body")


async def test_reload_blocks_for_load_time_and_concurrent_reload_says_reloading(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(load_s=0.2)
    started = time.monotonic()
    first = asyncio.create_task(lifecycle(http, node, "reload", BETA))
    await asyncio.sleep(0.05)
    second_started = time.monotonic()
    assert await lifecycle(http, node, "reload", BETA) == {"model_id": BETA, "status": "reloading"}
    assert time.monotonic() - second_started < 0.1
    assert await lifecycle(http, node, "status", BETA) == {"model_id": BETA, "status": "reloading"}
    assert await first == {"model_id": BETA, "status": "loaded"}
    assert time.monotonic() - started >= 0.19
    assert node.model_status(BETA) == "loaded"


async def test_reload_of_loaded_model_is_not_found_and_harmless_without_bug(
    http: aiohttp.ClientSession, node: SimNode
) -> None:
    assert (await lifecycle(http, node, "reload", ALPHA))["status"] == "not_found"
    assert node.model_status(ALPHA) == "loaded"
    assert await listing(http, node) == [("default", None), (ALPHA, "loaded"), (BETA, "unloaded")]


async def test_reload_bug_leaves_ids_stuck_reloading(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(reload_bug=True)
    assert (await lifecycle(http, node, "reload", ALPHA))["status"] == "not_found"
    assert (await lifecycle(http, node, "reload", "ghost"))["status"] == "not_found"
    assert (await lifecycle(http, node, "status", ALPHA))["status"] == "reloading"
    assert await listing(http, node) == [
        ("default", None),
        (ALPHA, "reloading"),
        ("ghost", "reloading"),
        (ALPHA, "loaded"),
        (BETA, "unloaded"),
    ]
    # A stuck but loaded model keeps serving until it is unloaded...
    assert (await post(http, node, "/v1/chat/completions", {"model": ALPHA, "messages": USER_HI}))[0] == 200
    assert (await lifecycle(http, node, "unload", ALPHA))["status"] == "unloaded"
    # ...then it can never come back.
    assert (await lifecycle(http, node, "reload", ALPHA))["status"] == "reloading"
    status, body = await post(http, node, "/v1/chat/completions", {"model": ALPHA, "messages": USER_HI})
    assert (status, body) == (500, {"message": f"model `{ALPHA}` is being reloaded"})


async def test_reload_failure_is_internal_error_and_model_stays_unloaded(
    http: aiohttp.ClientSession, node: SimNode
) -> None:
    node.set_load_failure(BETA, "CUDA out of memory")
    assert await lifecycle(http, node, "reload", BETA) == {
        "model_id": BETA,
        "status": "internal_error",
        "error": "Failed to load model: CUDA out of memory",
    }
    assert node.model_status(BETA) == "unloaded"
    status, body = await post(http, node, "/v1/chat/completions", {"model": BETA, "messages": USER_HI})
    assert (status, body) == (
        500,
        {"message": "failed to reload model: Failed to load model: CUDA out of memory"},
    )
    node.set_load_failure(BETA, None)
    assert (await lifecycle(http, node, "reload", BETA))["status"] == "loaded"


async def test_system_info_memory_follows_loads_and_unloads(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(vram_mb=10000, base_vram_mb=300, load_s=0.2)
    info = await get_json(http, node, "/v1/system/info")
    assert {"os", "kernel", "cpu", "memory", "devices", "build", "hf_cache_path"} <= info.keys()
    assert await available_mb(http, node) == 10000 - 300 - 4000
    reload = asyncio.create_task(lifecycle(http, node, "reload", BETA))
    await asyncio.sleep(0.13)
    # the weights arrive in steps: part of the model is held mid-load, all of it once loaded
    assert 10000 - 300 - 4000 - 2000 < await available_mb(http, node) < 10000 - 300 - 4000
    await reload
    assert await available_mb(http, node) == 10000 - 300 - 4000 - 2000
    await lifecycle(http, node, "unload", ALPHA)
    assert await available_mb(http, node) == 10000 - 300 - 2000


async def test_unloaded_memory_is_freed_after_unload_free_s(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(vram_mb=10000, unload_free_s=0.15)
    await lifecycle(http, node, "unload", ALPHA)
    assert await available_mb(http, node) == 10000 - 300 - 4000
    await asyncio.sleep(0.2)
    assert await available_mb(http, node) == 10000 - 300


async def test_unloading_the_default_moves_it(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node([SimModel(ALPHA, 10), SimModel(BETA, 10)])
    await lifecycle(http, node, "unload", ALPHA)
    status, body = await post(http, node, "/v1/chat/completions", {"messages": USER_HI})
    assert (status, body["model"]) == (200, BETA)
    await lifecycle(http, node, "unload", BETA)
    status, body = await post(http, node, "/v1/chat/completions", {"messages": USER_HI})
    assert (status, body) == (500, {"message": "engine state lock is poisoned"})


async def test_lazy_load_blocks_and_concurrent_request_gets_being_reloaded(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(load_s=0.2)
    body = {"model": BETA, "messages": USER_HI, "max_tokens": 2}
    started = time.monotonic()
    first = asyncio.create_task(post(http, node, "/v1/chat/completions", body))
    await asyncio.sleep(0.05)
    assert node.model_status(BETA) == "reloading"
    assert await post(http, node, "/v1/chat/completions", body) == (
        500,
        {"message": f"model `{BETA}` is being reloaded"},
    )
    assert (await post(http, node, "/v1/embeddings", {"model": BETA, "input": "x"}))[0] == 500
    status, reply = await first
    assert status == 200
    assert reply["model"] == BETA
    assert time.monotonic() - started >= 0.19
    assert node.model_status(BETA) == "loaded"


async def test_unload_aborts_inflight_stream_without_done(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(tok_s=40)
    body = {"messages": USER_HI, "max_tokens": 100, "stream": True}
    async with http.post(node.url + "/v1/chat/completions", json=body) as resp:
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data:{")
        started = time.monotonic()
        assert (await lifecycle(http, node, "unload", ALPHA))["status"] == "unloaded"
        rest = await resp.content.read()
    assert time.monotonic() - started < 0.5  # well before the 2.5 s the stream would have taken
    assert b"[DONE]" not in rest


async def test_unload_fails_inflight_non_streaming_request(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(tok_s=40)
    pending = asyncio.create_task(post(http, node, "/v1/completions", {"prompt": "x", "max_tokens": 100}))
    await asyncio.sleep(0.1)
    await lifecycle(http, node, "unload", ALPHA)
    assert await pending == (500, {"message": "No response received from the model."})


async def test_restart_rebinds_same_port_with_every_model_loaded(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(reload_bug=True, load_s=0.05)
    port = node.port
    await lifecycle(http, node, "reload", ALPHA)  # bug damage, cleared by the restart
    restart = asyncio.create_task(node.restart(down_s=0.1))
    await asyncio.sleep(0.05)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(node.url + "/health"):
            pass
    await restart
    assert node.port == port
    assert await listing(http, node) == [("default", None), (ALPHA, "loaded"), (BETA, "loaded")]
    _, body = await post(http, node, "/v1/chat/completions", {"messages": USER_HI})
    assert body["id"] == "0"  # a fresh engine counts from zero again
