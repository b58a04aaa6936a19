"""The admin API: the fleet as JSON, commands, a server-sent event feed, the what-if, and agent reports.

Every admin route goes through :func:`check_admin`: with ``gateway.admin_token`` set, a matching bearer
token (constant-time compare); without one, loopback clients only, so a fresh install is never open to
the network. Agent reports authenticate with their node's own ``agent_token`` instead (checked by the
agent hub), because an agent must not hold the operator's token.

Loopback is not enough against a browser on the same machine: any web page can ``fetch`` the gateway
(a ``text/plain`` POST needs no CORS preflight), and DNS rebinding makes a foreign page same-origin with
it. So, for every admin route: a request with an ``Origin`` that is not the gateway's own is refused;
without a token, ``Host`` must name the gateway as loopback, ``localhost`` or a ``gateway.admin_hosts``
entry; and a POST must be ``application/json``, which a page can send cross-site only after a preflight
cortex never answers. Bodies are read only after authentication, and capped (:data:`ADMIN_BODY_MAX`,
:data:`AGENT_BODY_MAX`): a client without a token cannot make the gateway parse megabytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
from collections.abc import AsyncIterator, Callable, Collection
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from cortex.engine import commands as cmd
from cortex.engine.events import Event
from cortex.errors import CortexError
from cortex.proxy.common import read_capped, secret_bytes

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["ADMIN_BODY_MAX", "AGENT_BODY_MAX", "add_admin_routes", "check_admin"]

ADMIN_BODY_MAX = 64 * 1024
"""Largest admin command body (they are a few bytes: ``{"node": ..., "force": ...}``)."""
AGENT_BODY_MAX = 1024 * 1024
"""Largest agent report (a real one is a few kB; the protocol's own limits allow about this much)."""
ADMIN_HOSTS: web.AppKey[Callable[[], Collection[str]]] = web.AppKey("admin_hosts")
"""The configured ``gateway.admin_hosts``, read per request (a config reload may change them)."""

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


def _agent_error(message: str, kind: str) -> dict[str, Any]:
    """An agent report's error body, in the agent hub's shape."""
    return {"error": {"message": message, "type": kind}}


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8000`` → ``::1``), lower-case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _local_host(name: str, extra: Collection[str]) -> bool:
    if name == "localhost" or name.endswith(".localhost") or name in extra:
        return True
    try:
        return ipaddress.ip_address(name.split("%")[0]).is_loopback
    except ValueError:
        return False


def _foreign_origin(request: web.Request) -> bool:
    """Whether the request comes from a web page of another origin than the gateway it reached."""
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # not a browser's cross-origin request (browsers send Origin on those)
    host = request.headers.get("Host", "").strip().lower()
    return not host or origin.strip().lower() not in (f"http://{host}", f"https://{host}")


def _is_json(request: web.Request) -> bool:
    return request.content_type == "application/json"


def check_admin(request: web.Request, token: str, hosts: Collection[str] | None = None) -> web.Response | None:
    """None when the caller may use the admin API, else the 401/403/415 answer.

    Args:
        request: The admin request.
        token: ``gateway.admin_token`` (empty: loopback clients only, and ``Host`` is checked).
        hosts: Extra names allowed in ``Host`` without a token; None reads ``gateway.admin_hosts``
            through the app.
    """
    if _foreign_origin(request):
        return _json(403, {"ok": False, "message": "admin API: requests from another origin are refused"})
    if token:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(secret_bytes(given), secret_bytes(token)):
            return _json(401, {"ok": False, "message": "admin API: missing or wrong bearer token"})
    else:
        if not _is_loopback(request.remote):
            return _json(403, {"ok": False, "message": "admin API: loopback clients only (set gateway.admin_token)"})
        host = request.headers.get("Host")
        if host is not None:
            if hosts is None:
                configured = request.config_dict.get(ADMIN_HOSTS)
                hosts = configured() if configured is not None else ()
            if not _local_host(_host_name(host), {h.lower() for h in hosts}):
                message = "admin API: Host must be loopback or localhost without a token (or list it in admin_hosts)"
                return _json(403, {"ok": False, "message": message})
    if request.method == "POST" and not _is_json(request):
        return _json(415, {"ok": False, "message": "admin API: POST bodies must be application/json"})
    return None


def add_admin_routes(app: web.Application, engine: Engine) -> None:
    """Register ``/admin/...`` on the gateway app."""

    def admin_token() -> str:  # read per request: a config reload may change it
        return engine.settings.gateway.admin_token.get_secret_value()

    closing = asyncio.Event()
    """Set when the gateway shuts down: event feeds end then instead of holding the drain for drain_s."""
    app[ADMIN_HOSTS] = lambda: engine.settings.gateway.admin_hosts

    async def _on_shutdown(_app: web.Application) -> None:
        closing.set()

    app.on_shutdown.append(_on_shutdown)

    async def fleet(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        data = engine.snapshot().to_json()
        data["loads_1h"] = dict(engine.loads_last_hour())  # the console's loads/h column (cortex attach)
        return _json(200, data)

    async def whatif(request: web.Request) -> web.StreamResponse:
        # The replays run in a worker thread and take seconds for a busy hour: only an operator may start one.
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        result = await engine.whatif()
        return _json(200, result.to_json())

    async def body_of(request: web.Request) -> dict[str, Any] | web.Response:
        """The command's JSON object (``{}`` for none), or the error answer for a body that will not do."""
        if not request.can_read_body:
            return {}
        idle_s = engine.settings.gateway.header_timeout_s
        try:
            data = orjson.loads(await read_capped(request, ADMIN_BODY_MAX, idle_s, f"{ADMIN_BODY_MAX // 1024} KiB"))
        except CortexError as exc:
            return _json(exc.status, {"ok": False, "message": f"admin API: {exc.message}"})
        except orjson.JSONDecodeError:
            return _json(400, {"ok": False, "message": "body must be JSON"})
        return data if isinstance(data, dict) else {}

    def result(res: cmd.CommandResult) -> web.Response:
        status = 200 if res.ok else (404 if res.message.startswith(("no node named", "no node serves")) else 409)
        return _json(status, {"ok": res.ok, "message": res.message, "detail": res.detail})

    async def model_action(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        model, action = request.match_info["model"], request.match_info["action"]
        data = await body_of(request)
        if isinstance(data, web.Response):
            return data
        node = data.get("node")
        if node is not None and not isinstance(node, str):
            return _json(400, {"ok": False, "message": "`node` must be a string"})
        command: cmd.Command
        if action == "unload":
            command = cmd.UnloadModel(model, node, force=bool(data.get("force", False)))
        else:
            command = _MODEL_ACTIONS[action](model, node)
        return result(await asyncio.shield(engine.submit(command)))  # carried out even if the caller leaves

    async def node_action(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        name, action = request.match_info["name"], request.match_info["action"]
        return result(await asyncio.shield(engine.submit(_NODE_ACTIONS[action](name))))

    async def events(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        stream = engine.subscribe()
        try:
            await response.prepare(request)
            await response.write(b": cortex events\n\n")
            async for event in _with_keepalive(stream, closing):
                if event is None:
                    await response.write(b":\n\n")
                    continue
                payload = json.dumps(event.to_json(), default=str)
                await response.write(f"event: {event.kind}\ndata: {payload}\n\n".encode())
        except ConnectionResetError:
            pass  # the reader went away: the feed simply ends (aiohttp drops the response quietly)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return response

    async def agent_report(request: web.Request) -> web.StreamResponse:
        # The token is checked before a byte of the body is read (401 for a wrong one, whatever the body);
        # then the body is capped, and one that is not JSON goes to the hub as None, which answers its 400
        # in the usual error shape. No content-type rule here: a web page cannot hold an agent's token.
        node, authorization = request.match_info["node"], request.headers.get("Authorization")
        if _foreign_origin(request):
            return _json(403, _agent_error("requests from another origin are refused", "permission_error"))
        denied = engine.agents.authenticate(node, authorization)
        if denied is not None:
            return _json(*denied)
        idle_s = engine.settings.gateway.header_timeout_s
        body: object = None
        try:
            body = orjson.loads(await read_capped(request, AGENT_BODY_MAX, idle_s, f"{AGENT_BODY_MAX // 1024} KiB"))
        except CortexError as exc:
            return _json(exc.status, _agent_error(exc.message, "invalid_request_error"))
        except orjson.JSONDecodeError:
            body = None
        status, reply = engine.agents.handle_report(node, authorization, body)
        return _json(status, reply)

    async def reload(request: web.Request) -> web.StreamResponse:
        if (denied := check_admin(request, admin_token())) is not None:
            return denied
        if engine.reloader is None:
            return _json(409, {"ok": False, "message": "this gateway has no config file to re-read (--demo)"})
        report = await asyncio.shield(engine.reloader.reload("admin API"))
        return _json(200 if report.ok else 422, report.to_json())

    app.router.add_get("/admin/fleet", fleet)
    app.router.add_get("/admin/whatif", whatif)
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
