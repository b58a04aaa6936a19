"""The gateway on uvloop (``gateway.event_loop``, the default when installed), end to end.

The rest of the suite runs on the standard library's loop (pytest-asyncio's); ``cortex`` itself runs on
uvloop. This test drives one whole fleet on a uvloop loop of its own: the official SDKs for a chat, a
stream and an Anthropic message, a pipelined keep-alive connection, and a clean shutdown.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import anthropic
import openai
import pytest

from cortex.config import GatewaySettings, NodeSettings, PollSettings, Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import serve
from cortex.runtime import loop_factory
from cortex.sim import SimModel, SimNode

uvloop = pytest.importorskip("uvloop")

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()


def test_auto_picks_uvloop_and_asyncio_opts_out() -> None:
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


async def _scenario(tmp: Path) -> dict[str, object]:
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    node = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01, tok_s=500.0)
    await node.start()
    try:
        settings = Settings(
            gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="", drain_s=1.0),
            poll=PollSettings(interval_s=0.1, timeout_s=1.0),
            nodes=[NodeSettings(name="n1", endpoint=node.url, vram_mb=8192)],
        )
        async with Engine(settings, state_path=tmp / "state.json") as engine, serve(engine) as servers:
            await asyncio.wait_for(engine.ready.wait(), 5)
            oai = openai.AsyncOpenAI(base_url=servers.url + "/v1", api_key="x", max_retries=0)
            chat = await oai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            stream = await oai.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, usage = [], None
            async for chunk in stream:
                pieces += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
            await oai.close()
            ant = anthropic.AsyncAnthropic(base_url=servers.url, api_key="x", max_retries=0)
            msg = await ant.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
            await ant.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", servers.api[1])
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(CHAT)
            writer.write((head + CHAT) * 2)
            answers = []
            for _ in range(2):
                got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(got.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                answers.append(json.loads(await reader.readexactly(length)))
            writer.close()
            conns = servers.connections
            assert conns is not None
            return {
                "chat": chat.usage.completion_tokens if chat.usage else 0,
                "stream": ("".join(pieces), usage.completion_tokens if usage else 0),
                "anthropic": msg.usage.output_tokens,
                "pipelined": [a["object"] for a in answers],
                "fast": conns.served,
                "in_flight": engine.snapshot().totals.in_flight,
            }
    finally:
        await node.stop()


def test_a_fleet_on_uvloop(tmp_path: Path) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        got = runner.run(asyncio.wait_for(_scenario(tmp_path), 30))
    assert got["chat"] == 4
    stream = got["stream"]
    assert isinstance(stream, tuple)
    text, tokens = stream
    assert text
    assert tokens == 6
    assert got["anthropic"] == 4
    assert got["pipelined"] == ["chat.completion", "chat.completion"]
    assert got["fast"] == 5  # chat, stream, the Anthropic message and the two pipelined
    assert got["in_flight"] == 0
