"""What the review found solid, kept so: llhttp refuses malformed framing, a client's hang-up aborts the
node's stream, no client credential or hop-by-hop header reaches a node, keys are compared in constant
time, and no secret shows in logs, ``/admin/fleet`` or ``/metrics``."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cortex.config import NodeSettings
from cortex.engine.agents import AgentHub
from cortex.sim import SimModel, SimNode
from tests.hardening.conftest import WAIT_S, GatewayFactory, wait_until
from tests.hardening.evil_node import EvilNode, Request
from tests.hardening.rawhttp import exchange, read_reply, request_bytes

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BODY = json.dumps(CHAT).encode()
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"

FRAMING = {
    "cl-and-te": HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-lengths": HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}}",
    "negative-length": HEAD + b"Content-Length: -1\r\n\r\n",
    "bad-chunk-size": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "chunk-size-overflow": HEAD + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    "obs-fold": HEAD + b"X-A: one\r\n two\r\nContent-Length: 2\r\n\r\n{}",
    "nul-in-header": HEAD + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\n{}",
    "control-in-header": HEAD + b"x-request-id: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
    "bare-cr": b"POST /v1/chat/completions HTTP/1.1\rHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "space-before-colon": HEAD + b"Content-Length : 2\r\n\r\n{}",
    "bad-version": b"POST /v1/chat/completions HTTP/9.9\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "header-too-large": HEAD + b"X-Big: " + b"b" * 70_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
}


def _finalised_elsewhere(record: logging.LogRecord) -> bool:
    """An earlier test's client, collected now, failing to close on its own loop (gone): not this gateway's."""
    error = record.exc_info[1] if record.exc_info else None
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


@pytest.mark.parametrize("name", sorted(FRAMING))
async def test_malformed_framing_is_refused_quietly(
    name: str, sim: SimNode, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway(sim.url)
    reply = await exchange(gw.port, FRAMING[name])
    assert 400 <= reply.status < 500
    assert not [r for r in sim.requests if r.path == "/v1/chat/completions"], "nothing reached the node"
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR and not _finalised_elsewhere(r)]
    assert not noisy, "a client's malformed request is not an error of the gateway's (one debug line)"
    await gw.alive()


async def stream_forever(
    node: EvilNode, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    delta = {"index": 0, "delta": {"content": "x"}}
    event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [delta]}
    chunk = b"data: " + json.dumps(event).encode() + b"\n\n"
    while True:
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_client_hanging_up_aborts_the_node_stream(path: str, evil: EvilNode, gateway: GatewayFactory) -> None:
    evil.behaviour = stream_forever
    gw = await gateway(evil.url)
    body = json.dumps({**CHAT, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request_bytes(path, body))
    await asyncio.wait_for(reader.readuntil(b"\n\n"), WAIT_S)  # the stream is flowing
    assert gw.in_flight() == 1
    writer.transport.abort()
    await gw.settled()
    await wait_until(lambda: evil.open_inference == 0, "the node's stream closed")


async def test_no_client_credential_or_hop_by_hop_header_reaches_a_node(sim: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim.url, api_keys=["k1"])
    hostile = [
        (b"Authorization", b"Bearer k1"),
        (b"x-api-key", b"k1"),
        (b"Cookie", b"session=abc"),
        (b"Proxy-Authorization", b"Basic eDp5"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"Forwarded", b"for=10.0.0.1"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"h2c"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Accept-Encoding", b"gzip, br"),
        (b"anthropic-version", b"2023-06-01"),
        (b"X-Custom", b"1"),
    ]
    for path, body in (("/v1/chat/completions", BODY), ("/v1/messages", BODY)):
        reply = await exchange(gw.port, request_bytes(path, body, hostile, host=b"client.example"))
        assert reply.status == 200, reply.body
    sent = [r for r in sim.requests if r.path == "/v1/chat/completions"]
    assert len(sent) == 2
    for request in sent:
        names = {k.lower() for k in request.headers}
        assert names == {"host", "content-length", "content-type", "accept-encoding", "x-request-id"}, names
        assert request.headers["Host"] == sim.url.removeprefix("http://")
        assert request.headers["Accept-Encoding"] == "identity"


async def test_keys_are_compared_in_constant_time(
    sim: SimNode, gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every configured key is compared, with hmac.compare_digest, whatever matches first."""
    gw = await gateway(sim.url, api_keys=["k1", "k2", "k3"], admin_token="adm")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for key, status in ((b"k1", 200), (b"nope", 401)):
        reply = await exchange(
            gw.port, request_bytes("/v1/chat/completions", BODY, [(b"Authorization", b"Bearer " + key)])
        )
        assert reply.status == status
        assert [b for _, b in calls] == [b"k1", b"k2", b"k3"], "no early exit on the first match"
        calls.clear()
    reply = await exchange(
        gw.port, request_bytes("/admin/fleet", method=b"GET", headers=[(b"Authorization", b"Bearer adm")])
    )
    assert reply.status == 200
    assert calls == [(b"adm", b"adm")]


@pytest.fixture
async def sim_agent() -> AsyncIterator[SimNode]:
    node = SimNode([SimModel("m", 1000)], name="n1", vram_mb=8192, load_s=0.01)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def test_no_secret_in_logs_fleet_or_metrics(
    sim_agent: SimNode, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {"api": "sk-live-1111", "admin": "adm-2222", "metrics": "met-3333", "agent": "agt-4444"}
    wrong = ["sk-wrong-5555", "adm-wrong-6666", "agt-wrong-7777"]
    gw = await gateway(
        sim_agent.url, api_keys=[secrets["api"]], admin_token=secrets["admin"], metrics_token=secrets["metrics"]
    )
    settings = gw.engine.settings.model_copy(
        update={"nodes": [NodeSettings(name="n1", endpoint=sim_agent.url, vram_mb=8192, agent_token=secrets["agent"])]}
    )
    gw.engine.agents = AgentHub(settings, on_change=lambda: None)

    def bearer(token: str) -> list[tuple[bytes, bytes]]:
        return [(b"Authorization", b"Bearer " + token.encode())]

    for token in (secrets["api"], wrong[0]):
        await exchange(gw.port, request_bytes("/v1/chat/completions", BODY, bearer(token)))
        await exchange(gw.port, request_bytes("/v1/messages", BODY, [(b"x-api-key", token.encode())]))
    for token in (secrets["agent"], wrong[2]):
        await exchange(gw.port, request_bytes("/admin/agents/n1/report", b"{}", bearer(token)))
    await exchange(gw.port, request_bytes("/admin/fleet", method=b"GET", headers=bearer(wrong[1])))
    fleet = await exchange(gw.port, request_bytes("/admin/fleet", method=b"GET", headers=bearer(secrets["admin"])))
    metrics = await exchange(gw.port, request_bytes("/metrics", method=b"GET", headers=bearer(secrets["metrics"])))
    assert fleet.status == 200
    assert metrics.status == 200
    for text in (fleet.body.decode(), metrics.body.decode(), caplog.text):
        for secret in [*secrets.values(), *wrong]:
            assert secret not in text


async def test_a_reader_that_is_too_slow_for_the_head_gets_no_lease(sim: SimNode, gateway: GatewayFactory) -> None:
    """A head cut in two with a pause under the limit is fine; the body then comes: a normal answer."""
    gw = await gateway(sim.url, header_timeout_s=1.0)
    raw = request_bytes("/v1/chat/completions", BODY)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(raw[:20])
        await asyncio.sleep(0.1)
        writer.write(raw[20:])
        reply = await asyncio.wait_for(read_reply(reader), WAIT_S)
        assert reply.status == 200
    finally:
        writer.transport.abort()
    await gw.settled()
