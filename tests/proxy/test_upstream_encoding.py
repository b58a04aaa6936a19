"""A node (or a proxy in front of it) that compresses what it may: clients must still get readable bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from cortex.config import GatewaySettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import serve

COMPLETION = {
    "id": "0",
    "object": "chat.completion",
    "created": 1,
    "model": "m1",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x" * 2000}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


async def _health(_r: web.Request) -> web.Response:
    return web.Response(text="OK")


async def _models(_r: web.Request) -> web.Response:
    data = [{"id": "default", "object": "model"}, {"id": "m1", "object": "model", "status": "loaded"}]
    return web.json_response({"object": "list", "data": data})


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_compression()  # honours the request's Accept-Encoding
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b'data:{"choices":[{"index":0,"delta":{"content":"' + str(i).encode() * 500 + b'"}}]}\n\n')
        await resp.write(b"data:[DONE]\n\n")
        await resp.write_eof()
        return resp
    out = web.json_response(COMPLETION)
    out.enable_compression()
    return out


@pytest.fixture
async def gateway_url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    settings = Settings(
        gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="", drain_s=1),
        poll=PollSettings(interval_s=0.2),
        nodes=[NodeSettings(name="z", endpoint=f"http://127.0.0.1:{site.port}", vram_mb=1000)],
    )
    try:
        async with Engine(settings) as engine, serve(engine) as servers:
            await asyncio.wait_for(engine.ready.wait(), 5)
            yield servers.url
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("client_accepts", ["gzip, deflate", "identity"])
async def test_compressing_node_answers_reach_the_client_readable(gateway_url: str, client_accepts: str) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "m1", "messages": [{"role": "user", "content": "x"}]}
        headers = {"Accept-Encoding": client_accepts}
        async with http.post(gateway_url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.json() == COMPLETION
        async with http.post(
            gateway_url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers
        ) as resp:
            assert resp.status == 200
            raw = await resp.read()
    frames = [f for f in raw.decode().split("\n\n") if f]
    assert frames[-1] == "data:[DONE]"
    assert [json.loads(f[5:])["choices"][0]["delta"]["content"][0] for f in frames[:-1]] == ["0", "1", "2"]
