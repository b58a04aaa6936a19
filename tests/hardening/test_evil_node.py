"""Every way a node was found to misbehave, through both dialects: a bounded answer, in the client's
envelope, every lease released, the connection dropped when cortex gave up on it, the process alive."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest

from cortex.engine.state import NodeStatus
from cortex.proxy.forward import ERROR_BODY_MAX
from tests.hardening.conftest import WAIT_S, Gateway, GatewayFactory, wait_until
from tests.hardening.evil_node import BEHAVIOURS, EvilNode

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
MESSAGES = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@dataclass(frozen=True)
class Case:
    statuses: tuple[int, ...]
    """Acceptable client statuses (the same for both dialects unless ``anthropic`` says otherwise)."""
    dropped: bool = True
    """cortex must hang up on the node (nothing it could reuse)."""
    anthropic: tuple[int, ...] | None = None


BAD_GATEWAY = Case((502,))
CASES: dict[str, Case] = {
    "ok": Case((200,), dropped=False),
    "error_truncated": Case((500,)),
    "error_trickle": Case((500,)),
    "error_endless": Case((503,), anthropic=(529,)),
    "error_4xx_huge": Case((400,)),
    "huge_head": BAD_GATEWAY,
    "huge_body": BAD_GATEWAY,
    "upgrade_101": BAD_GATEWAY,
    "cut_json": BAD_GATEWAY,
    "late_bytes": Case((200,)),
    "reset_unread": BAD_GATEWAY,
    "silent": BAD_GATEWAY,
    "stall_body": BAD_GATEWAY,
    "not_json_200": Case((502,), dropped=False),
    "foreign_request_id": BAD_GATEWAY,
    "no_request_id": Case((200,), dropped=False),
    "framing_cl_te": BAD_GATEWAY,
    "framing_bad_chunk": BAD_GATEWAY,
    "framing_obs_fold": BAD_GATEWAY,
    "framing_nul": BAD_GATEWAY,
    "framing_bare_cr": BAD_GATEWAY,
    "framing_bad_status": BAD_GATEWAY,
    "framing_negative_length": BAD_GATEWAY,
}


def test_every_behaviour_has_a_case() -> None:
    assert set(CASES) == set(BEHAVIOURS)


async def node_up(gw: Gateway) -> None:
    """Three failed requests mark a node down until its next good poll (0.1 s here): wait for it."""

    def up() -> bool:
        node = gw.engine.snapshot().node("n1")
        return node is not None and node.status is NodeStatus.UP

    await wait_until(up, "the node back up")


async def call(gw: Gateway, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with gw.http.post(gw.url + path, json=body) as resp:
        return resp.status, json.loads(await resp.read()), dict(resp.headers)


def check_envelope(anthropic: bool, status: int, body: dict[str, Any]) -> None:
    if status == 200:
        assert ("content" if anthropic else "choices") in body
        return
    if anthropic:
        assert body["type"] == "error"
        assert isinstance(body["error"]["type"], str)
        assert isinstance(body["error"]["message"], str)
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_a_misbehaving_node(name: str, evil: EvilNode, gateway: GatewayFactory) -> None:
    case = CASES[name]
    evil.behaviour = BEHAVIOURS[name]
    gw = await gateway(evil.url)
    for anthropic in (False, True):
        await node_up(gw)
        path, body = ("/v1/messages", MESSAGES) if anthropic else ("/v1/chat/completions", CHAT)
        before = len(evil.inference)
        status, answer, headers = await asyncio.wait_for(call(gw, path, body), WAIT_S)
        expected = case.anthropic if anthropic and case.anthropic else case.statuses
        assert status in expected, (anthropic, status, answer)
        check_envelope(anthropic, status, answer)
        assert len(evil.inference) - before <= 2, "a request reached the node at most twice"
        await gw.settled()
        if status != 200:
            message = answer["error"]["message"]
            assert evil.url.removeprefix("http://") not in message, "the node's address is not the client's business"
            assert len(message) <= ERROR_BODY_MAX + 200
        if name == "no_request_id":  # a node run with --disable-request-id-header: its answers are taken
            assert "x-request-id" not in {k.lower() for k in headers}
        if case.dropped:
            await wait_until(lambda: evil.open_inference == 0, f"{name}: cortex hung up on the node")
    await gw.alive()


@pytest.mark.parametrize("pause_s", [0.0, 0.1], ids=["at-once", "after-a-pause"])
async def test_late_bytes_are_never_the_next_answer(pause_s: float, evil: EvilNode, gateway: GatewayFactory) -> None:
    """The node sends every answer twice, the copy 20 ms later. A request sent at once may meet the copy
    first (with the previous request's id): refused, a 502, never handed on. After a pause, the copy
    arrived on an idle connection, which is dropped: every request gets its own answer."""
    evil.behaviour = BEHAVIOURS["late_bytes"]
    gw = await gateway(evil.url)
    statuses = []
    for _ in range(6):
        await node_up(gw)
        status, answer, _ = await call(gw, "/v1/chat/completions", CHAT)
        statuses.append(status)
        if status == 200:
            assert answer["choices"][0]["message"]["content"] == "first", "another request's answer was handed on"
        else:
            assert status == 502
        await asyncio.sleep(pause_s)
    assert statuses[0] == 200
    if pause_s:
        assert statuses == [200] * 6
    await gw.settled()


@pytest.mark.parametrize("name", ["error_trickle", "silent", "stall_body", "huge_head", "framing_bad_chunk"])
async def test_a_misbehaving_node_mid_stream(name: str, evil: EvilNode, gateway: GatewayFactory) -> None:
    """Streaming clients: an HTTP error before the stream opened, or an error event and the end of it."""
    evil.behaviour = BEHAVIOURS[name]
    gw = await gateway(evil.url)
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/messages", MESSAGES)):
        await node_up(gw)

        async def stream(path: str = path, body: dict[str, Any] = body) -> tuple[int, bytes]:
            async with gw.http.post(gw.url + path, json={**body, "stream": True}) as resp:
                return resp.status, await resp.read()

        status, raw = await asyncio.wait_for(stream(), WAIT_S)
        if status == 200:
            assert b"error" in raw, raw[-300:]
        else:
            assert 500 <= status < 600
            assert b'"error"' in raw
        await gw.settled()
        await wait_until(lambda: evil.open_inference == 0, f"{name}: cortex hung up on the node")
    await gw.alive()


async def test_the_client_leaving_releases_the_lease_and_the_node(evil: EvilNode, gateway: GatewayFactory) -> None:
    """A client that hangs up while the node is silent: the lease ends and the node's connection closes."""
    evil.behaviour = BEHAVIOURS["silent"]
    gw = await gateway(evil.url, first_byte_timeout_s=30.0)
    request = asyncio.ensure_future(call(gw, "/v1/chat/completions", CHAT))
    await wait_until(lambda: len(evil.inference) == 1 and gw.in_flight() == 1, "the request at the node")
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    await gw.settled()
    await wait_until(lambda: evil.open_inference == 0, "the node's connection closed")
