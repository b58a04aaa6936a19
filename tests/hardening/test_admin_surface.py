"""The admin API against a browser on the same machine, the agent route before authentication, /metrics.

A web page can ``fetch`` the gateway: a ``text/plain`` POST needs no preflight, and DNS rebinding makes a
foreign page same-origin with it. Each case below was a working attack on the loopback-only admin API.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from cortex.engine.state import NodeStatus
from cortex.proxy.admin import ADMIN_BODY_MAX, AGENT_BODY_MAX
from cortex.sim import SimModel, SimNode
from tests.hardening.conftest import WAIT_S, Gateway, GatewayFactory, wait_until
from tests.hardening.rawhttp import Reply, exchange, read_reply, request_bytes

JSON = (b"Content-Type", b"application/json")


@pytest.fixture
async def sim2() -> AsyncIterator[SimNode]:
    """A node with a loaded model ``m`` and an unloaded ``u``."""
    node = SimNode([SimModel("m", 1000), SimModel("u", 1000, loaded=False)], name="n1", vram_mb=8192, load_s=0.01)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def reloads(sim: SimNode) -> int:
    return sum(r.path == "/v1/models/reload" for r in sim.requests)


async def admin(
    gw: Gateway, path: str, *headers: tuple[bytes, bytes], body: bytes = b"{}", method: bytes = b"POST"
) -> Reply:
    """An admin request from loopback, with the gateway's own address in ``Host``."""
    raw = request_bytes(path, body, list(headers), method=method, host=b"127.0.0.1:%d" % gw.port)
    return await exchange(gw.port, raw)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/admin/models/u/load", [(b"Content-Type", b"text/plain")]),
        ("/admin/models/u/pin", [(b"Content-Type", b"text/plain;charset=UTF-8")]),
        ("/admin/models/m/unload", [(b"Content-Type", b"application/x-www-form-urlencoded")]),
        ("/admin/nodes/n1/drain", [(b"Content-Type", b"multipart/form-data; boundary=x")]),
        ("/admin/nodes/n1/drain", []),
    ],
    ids=["load-text-plain", "pin-text-plain", "unload-form", "drain-multipart", "drain-no-type"],
)
async def test_a_post_a_page_could_send_without_preflight_is_refused(
    path: str, headers: list[tuple[bytes, bytes]], sim2: SimNode, gateway: GatewayFactory
) -> None:
    gw = await gateway(sim2.url)
    reply = await admin(gw, path, *headers, body=b'{"force": true}')
    assert reply.status == 415
    assert reply.json()["ok"] is False
    await asyncio.sleep(0.05)
    assert reloads(sim2) == 0
    assert sim2.model_status("m") == "loaded"
    node = gw.engine.snapshot().node("n1")
    assert node is not None
    assert node.status is NodeStatus.UP


async def test_json_posts_from_loopback_still_work(sim2: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim2.url)
    reply = await admin(gw, "/admin/models/u/load", JSON)
    assert reply.status == 200, reply.body
    assert sim2.model_status("u") == "loaded"


@pytest.mark.parametrize(
    "origin", [b"http://evil.example", b"null", b"http://127.0.0.1:1", b"https://localhost"], ids=str
)
async def test_a_foreign_origin_is_refused(origin: bytes, sim2: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim2.url)
    assert (await admin(gw, "/admin/fleet", (b"Origin", origin), method=b"GET", body=b"")).status == 403
    reply = await admin(gw, "/admin/models/u/load", JSON, (b"Origin", origin))
    assert reply.status == 403
    assert reloads(sim2) == 0
    # the gateway's own origin is fine
    own = b"http://127.0.0.1:%d" % gw.port
    assert (await admin(gw, "/admin/fleet", (b"Origin", own), method=b"GET", body=b"")).status == 200


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"evil.example:%d", False),
        (b"evil.example", False),
        (b"127.0.0.1.nip.io:%d", False),
        (b"localhost:%d", True),
        (b"127.0.0.1:%d", True),
        (b"[::1]:%d", True),
        (b"app.localhost:%d", True),
        (b"gw.lan:%d", True),
    ],
    ids=lambda v: v.decode() if isinstance(v, bytes) else str(v),
)
async def test_host_must_name_the_gateway_without_a_token(
    host: bytes, allowed: bool, sim2: SimNode, gateway: GatewayFactory
) -> None:
    """DNS rebinding: a foreign name resolving to 127.0.0.1 reaches the gateway with its own name in Host."""
    gw = await gateway(sim2.url, admin_hosts=["GW.lan"])
    value = host % gw.port if b"%d" in host else host
    for path in ("/admin/fleet", "/admin/events"):
        raw = request_bytes(path, method=b"GET", host=value)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(raw)
            reply_head = await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT_S)
        finally:
            writer.transport.abort()
        assert reply_head.startswith(b"HTTP/1.1 200" if allowed else b"HTTP/1.1 403"), (path, reply_head)


async def test_with_a_token_any_host_but_still_no_foreign_origin(sim2: SimNode, gateway: GatewayFactory) -> None:
    gw = await gateway(sim2.url, admin_token="s3cret")
    auth = (b"Authorization", b"Bearer s3cret")
    raw = request_bytes("/admin/fleet", method=b"GET", host=b"cortex.example", headers=[auth])
    assert (await exchange(gw.port, raw)).status == 200
    raw = request_bytes("/admin/fleet", method=b"GET", host=b"cortex.example", headers=[auth, (b"Origin", b"http://x")])
    assert (await exchange(gw.port, raw)).status == 403


@pytest.mark.parametrize(
    "auth", [b"Bearer \xff\xfe", "Bearer s3cret€".encode(), b"Bearer s3cre\xe9"], ids=["ff", "utf8", "latin1"]
)
async def test_credentials_that_are_not_utf8_are_a_401_not_a_500(
    auth: bytes, sim2: SimNode, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await gateway(sim2.url, admin_token="s3cret", metrics_token="m3trics", api_keys=["k1"])
    for path, method in (("/admin/fleet", b"GET"), ("/metrics", b"GET"), ("/admin/agents/n1/report", b"POST")):
        reply = await exchange(gw.port, request_bytes(path, b"{}", [(b"Authorization", auth)], method=method))
        assert reply.status == 401, (path, reply.body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_agent_reports_are_authenticated_before_the_body_is_read(sim2: SimNode, gateway: GatewayFactory) -> None:
    """A 44 MB report without a token: the 401 comes while the body is still on its way (it is never read)."""
    gw = await gateway(sim2.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        head = request_bytes("/admin/agents/n1/report", b"", [JSON, (b"Content-Length", b"46137344")])
        writer.write(head + b'{"node": "n1", "pad": "' + b"x" * 4096)
        reply = await asyncio.wait_for(read_reply(reader), WAIT_S)
        assert reply.status == 401
    finally:
        writer.transport.abort()
    async with gw.http.get(gw.url + "/health") as resp:
        assert resp.status == 200


async def test_admin_and_agent_bodies_are_capped(sim2: SimNode, gateway: GatewayFactory, tmp_path: object) -> None:
    gw = await gateway(sim2.url)
    reply = await admin(gw, "/admin/models/u/load", JSON, body=b'{"node": "' + b"n" * ADMIN_BODY_MAX + b'"}')
    assert reply.status == 413
    assert reloads(sim2) == 0
    # a node with an agent token: the right token, a body over the cap (announced, so refused unread)
    gw2 = await gateway_with_agent(gateway, sim2)
    auth = (b"Authorization", b"Bearer agent-t")
    head = request_bytes(
        "/admin/agents/n1/report", b"", [JSON, auth, (b"Content-Length", b"%d" % (AGENT_BODY_MAX + 1))]
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw2.port)
    try:
        writer.write(head)
        reply = await asyncio.wait_for(read_reply(reader), WAIT_S)
        assert reply.status == 413
        assert reply.json()["error"]["type"] == "invalid_request_error"
    finally:
        writer.transport.abort()


async def gateway_with_agent(gateway: GatewayFactory, sim: SimNode) -> Gateway:
    gw = await gateway(sim.url)
    # the agent token lives on the node entry: rebuild the hub the way a config with a token would
    from cortex.config import NodeSettings
    from cortex.engine.agents import AgentHub

    settings = gw.engine.settings.model_copy(
        update={"nodes": [NodeSettings(name="n1", endpoint=sim.url, vram_mb=8192, agent_token="agent-t")]}
    )
    gw.engine.agents = AgentHub(settings, on_change=lambda: None)
    return gw


@pytest.mark.parametrize("separate", [False, True], ids=["on-listen", "on-metrics-listen"])
async def test_metrics_can_require_a_token(separate: bool, sim2: SimNode, gateway: GatewayFactory) -> None:
    extra = {"metrics_listen": "127.0.0.1:0"} if separate else {}
    gw = await gateway(sim2.url, metrics_token="m3trics", **extra)
    if separate:
        assert gw.servers.metrics is not None
        port = gw.servers.metrics[1]
    else:
        port = gw.port
    for headers, status in (
        ([], 401),
        ([(b"Authorization", b"Bearer nope")], 401),
        ([(b"Authorization", b"Bearer m3trics")], 200),
    ):
        reply = await exchange(port, request_bytes("/metrics", method=b"GET", headers=headers))
        assert reply.status == status
        if status == 401:
            assert reply.headers["www-authenticate"] == "Bearer"
            assert b"cortex_" not in reply.body
        else:
            assert b"cortex_requests_total" in reply.body


async def test_an_events_reader_that_leaves_is_quiet(
    sim2: SimNode, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client of /admin/events hangs up: its subscription ends, no 500, no traceback in the log."""
    caplog.set_level(logging.DEBUG)
    gw = await gateway(sim2.url)
    bus = gw.engine.bus
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(request_bytes("/admin/events", method=b"GET", host=b"127.0.0.1:%d" % gw.port))
    await asyncio.wait_for(reader.readuntil(b": cortex events\n\n"), WAIT_S)
    await wait_until(lambda: bus.subscribers >= 1, "the feed subscribed")
    writer.transport.abort()
    reply = await admin(gw, "/admin/nodes/n1/drain", JSON)  # an event for the gone reader
    assert reply.status == 200
    await wait_until(lambda: bus.subscribers == 0, "the subscription ended")
    await asyncio.sleep(0.05)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    assert not [r for r in caplog.records if "500" in r.getMessage() and "admin/events" in r.getMessage()]
    body = json.loads((await admin(gw, "/admin/nodes/n1/undrain", JSON)).body)
    assert body["ok"]


async def test_an_events_reader_that_leaves_at_once_is_quiet(
    sim2: SimNode, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Readers that hang up before the feed's first bytes: no 500 and no traceback, every subscription gone."""
    caplog.set_level(logging.DEBUG)
    gw = await gateway(sim2.url)
    raw = request_bytes("/admin/events", method=b"GET", host=b"127.0.0.1:%d" % gw.port)
    for _ in range(30):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(raw)
        await writer.drain()
        writer.transport.abort()
    await wait_until(lambda: gw.engine.bus.subscribers == 0, "every subscription ended")
    await asyncio.sleep(0.1)
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
