"""The simulated node's memory is honest: loads that do not fit fail with CUDA OOM, concurrent loads overcommit,
and a hung node answers nothing until resumed."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from cortex.sim import SimModel
from tests.sim.conftest import NodeFactory
from tests.sim.sse import USER_HI, post


async def test_reload_that_does_not_fit_answers_oom_and_frees_its_allocation(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(
        [SimModel("a", 5000), SimModel("b", 5000, loaded=False)], vram_mb=8000, base_vram_mb=500, load_s=0.05
    )
    status, body = await post(http, node, "/v1/models/reload", {"model_id": "b"})
    assert status == 200
    assert isinstance(body, dict)
    assert body["status"] == "internal_error"
    assert "CUDA out of memory" in body["error"]
    assert node.model_status("b") == "unloaded"
    assert node.used_vram_mb() == 5500  # the partial allocation was given back
    # once room is made, the same load succeeds
    await post(http, node, "/v1/models/unload", {"model_id": "a"})
    _, body = await post(http, node, "/v1/models/reload", {"model_id": "b"})
    assert isinstance(body, dict)
    assert body["status"] == "loaded"


async def test_two_loads_that_fit_alone_overcommit_together(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(
        [SimModel("x", 5000, loaded=False), SimModel("y", 5000, loaded=False)],
        vram_mb=8000,
        base_vram_mb=0,
        load_s=0.2,
    )
    replies = await asyncio.gather(
        post(http, node, "/v1/models/reload", {"model_id": "x"}),
        post(http, node, "/v1/models/reload", {"model_id": "y"}),
    )
    statuses = sorted(body["status"] for _, body in replies if isinstance(body, dict))
    assert statuses == ["internal_error", "loaded"]
    assert node.used_vram_mb() == 5000


async def test_lazy_load_that_does_not_fit_is_a_500(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node([SimModel("a", 6000), SimModel("b", 6000, loaded=False)], vram_mb=8000, load_s=0.02)
    status, body = await post(http, node, "/v1/chat/completions", {"model": "b", "messages": USER_HI})
    assert status == 500
    assert isinstance(body, dict)
    assert "CUDA out of memory" in body["message"]


async def test_enforce_vram_off_never_fails_a_load(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(
        [SimModel("a", 6000), SimModel("b", 6000, loaded=False)], vram_mb=8000, load_s=0.02, enforce_vram=False
    )
    _, body = await post(http, node, "/v1/models/reload", {"model_id": "b"})
    assert isinstance(body, dict)
    assert body["status"] == "loaded"


async def test_a_hung_node_answers_nothing_until_resumed(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(load_s=0.1)
    node.hang()
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.3):
            await http.get(node.url + "/health")
    node.resume()
    async with http.get(node.url + "/health") as resp:
        assert resp.status == 200


async def test_a_load_pauses_while_the_node_hangs(http: aiohttp.ClientSession, make_node: NodeFactory) -> None:
    node = await make_node(load_s=0.1)
    reload = asyncio.create_task(post(http, node, "/v1/models/reload", {"model_id": "org/beta"}))
    await asyncio.sleep(0.03)
    node.hang()
    await asyncio.sleep(0.3)
    assert not reload.done()
    assert node.model_status("org/beta") == "reloading"
    node.resume()
    _, body = await asyncio.wait_for(reload, 2)
    assert isinstance(body, dict)
    assert body["status"] == "loaded"


async def test_restart_unloaded_comes_back_with_nothing_loaded(
    http: aiohttp.ClientSession, make_node: NodeFactory
) -> None:
    node = await make_node(load_s=0.05)
    await node.restart(unloaded=True)
    assert node.model_status("org/alpha") == "unloaded"
    assert node.used_vram_mb() == node.base_vram_mb
