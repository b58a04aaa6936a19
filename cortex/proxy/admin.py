"""The admin API: the fleet as JSON, commands, a server-sent event feed, and agent reports.

Every admin route goes through :func:`check_admin`: with ``gateway.admin_token`` set, a matching bearer
token (constant-time compare); without one, loopback clients only, so a fresh install is never open to
the network. Agent reports authenticate with their node's own ``agent_token`` instead (checked by the
agent hub), because an agent must not hold the operator's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cortex.engine import commands as cmd
from cortex.engine.events import Event

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["add_admin_routes", "check_admin"]

_MODEL_ACTIONS = {"pin": cmd.PinModel, "unpin": cmd.UnpinModel, "load": cmd.LoadModel, "unload": cmd.UnloadModel}
_NODE_ACTIONS = {"drain": cmd.DrainNode, "undrain": cmd.UndrainNode, "restart": cmd.RestartNode}
EVENTS_KEEPALIVE_S = 15.0


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(status=status, text=json.dumps(payload), content_type="application/json")


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def check_admin(request: web.Request, token: str) -> web.Response | None:
    """None when the caller may use the admin API, else the 401/403 answer."""
    if token:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return _json(401, {"ok": False, "message": "admin API: missing or wrong bearer token"})
        return None
    if not _is_loopback(request.remote):
        return _json(403, {"ok": False, "message": "admin API: loopback clients only (set gateway.admin_token)"})
    return None


def add_admin_routes(app: web.Application, engine: Engine) -> None:
    """Register ``/admin/...`` on the gateway app."""

    def admin_token() -> str:  # read per request: a config reload may change it
        return engine.settings.gateway.admin_token.get_secret_value()

    closing = asyncio.Event()
    """Set when the gateway shuts down: event feeds end then instead of holding the drain for drain_s."""

    async def _on_shutdown(_app: web.Application) -> None:
        closing.set()

    app.on_shutdown.append(_on_shutdown)

    async def fleet(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        return _json(200, engine.snapshot().to_json())

    async def body_of(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text='{"ok": false, "message": "body must be JSON"}', content_type="application/json"
            ) from None
        return data if isinstance(data, dict) else {}

    def result(res: cmd.CommandResult) -> web.Response:
        status = 200 if res.ok else (404 if res.message.startswith(("no node named", "no node serves")) else 409)
        return _json(status, {"ok": res.ok, "message": res.message, "detail": res.detail})

    async def model_action(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        model, action = request.match_info["model"], request.match_info["action"]
        data = await body_of(request)
        node = data.get("node")
        if node is not None and not isinstance(node, str):
            return _json(400, {"ok": False, "message": "`node` must be a string"})
        command: cmd.Command
        if action == "unload":
            command = cmd.UnloadModel(model, node, force=bool(data.get("force", False)))
        else:
            command = _MODEL_ACTIONS[action](model, node)
        return result(await engine.submit(command))

    async def node_action(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        name, action = request.match_info["name"], request.match_info["action"]
        return result(await engine.submit(_NODE_ACTIONS[action](name)))

    async def events(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b": cortex events\n\n")
        stream = engine.subscribe()
        try:
            async for event in _with_keepalive(stream, closing):
                if event is None:
                    await response.write(b":\n\n")
                    continue
                payload = json.dumps(event.to_json(), default=str)
                await response.write(f"event: {event.kind}\ndata: {payload}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return response

    async def agent_report(request: web.Request) -> web.StreamResponse:
        # A body that is not JSON goes to the hub as None: the token is checked first (401 for a wrong one,
        # whatever the body), and a right token with a bad body gets the hub's 400 in the usual error shape.
        try:
            body: object = await request.json()
        except ValueError:
            body = None
        status, reply = engine.agents.handle_report(
            request.match_info["node"], request.headers.get("Authorization"), body
        )
        return _json(status, reply)

    async def reload(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        if engine.reloader is None:
            return _json(409, {"ok": False, "message": "this gateway has no config file to re-read (--demo)"})
        report = await asyncio.shield(engine.reloader.reload("admin API"))
        return _json(200 if report.ok else 422, report.to_json())

    app.router.add_get("/admin/fleet", fleet)
    app.router.add_post("/admin/reload", reload)
    app.router.add_post(r"/admin/models/{model:.+}/{action:(pin|unpin|load|unload)}", model_action)
    app.router.add_post(r"/admin/nodes/{name}/{action:(drain|undrain|restart)}", node_action)
    app.router.add_get("/admin/events", events)
    app.router.add_post("/admin/agents/{node}/report", agent_report)


async def _with_keepalive(stream: AsyncIterator[Event], closing: asyncio.Event) -> AsyncIterator[Event | None]:
    """Events from ``stream``, with None every :data:`EVENTS_KEEPALIVE_S` seconds of silence; ends on ``closing``."""
    pending: asyncio.Task[Event] | None = None
    stop = asyncio.ensure_future(closing.wait())
    try:
        while not closing.is_set():
            if pending is None:
                pending = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait(
                {pending, stop}, timeout=EVENTS_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if pending not in done:
                if not closing.is_set():
                    yield None
                continue
            event = pending.result()
            pending = None
            yield event
    finally:
        for task in (pending, stop):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
