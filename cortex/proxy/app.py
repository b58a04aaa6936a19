"""The gateway's aiohttp application and the runner that serves it inside the caller's loop.

``create_app`` wires routes to an existing :class:`~cortex.engine.engine.Engine` (the engine is owned by
the runtime, not by the app, so the console and the gateway share one). ``serve`` is an async context
manager around ``AppRunner``: on exit aiohttp stops accepting, lets in-flight handlers (live streams)
finish for up to ``gateway.drain_s``, then closes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from cortex.config import parse_listen
from cortex.errors import ListenError, Unauthorized
from cortex.proxy.admin import add_admin_routes
from cortex.proxy.anthropic import AnthropicError
from cortex.proxy.anthropic_handler import add_anthropic_routes, anthropic_error_response, anthropic_models
from cortex.proxy.common import check_api_key
from cortex.proxy.errors import openai_error
from cortex.proxy.openai import handle_openai, models_payload
from cortex.proxy.responses import add_responses_routes

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["ENGINE", "Servers", "create_app", "create_metrics_app", "serve"]

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", object)


def create_app(engine: Engine) -> web.Application:
    """The client API, the admin API, ``/health`` and ``/ready`` on one app."""
    settings = engine.settings.gateway
    app = web.Application(
        client_max_size=int(settings.max_body_mb * 1024 * 1024), handler_args={"max_field_size": 65536}
    )
    app[ENGINE] = engine
    keys = engine.api_keys  # one shared list: a config reload changes it in place

    def inference(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await handle_openai(request, engine, path, keys)

        return handler

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, inference(path))

    async def list_models(request: web.Request) -> web.StreamResponse:
        anthropic = "anthropic-version" in request.headers
        try:
            check_api_key(request, keys)
        except Unauthorized as exc:
            if anthropic:
                return anthropic_error_response(401, "authentication_error", exc.message)
            return openai_error(401, exc.message, code="invalid_api_key")
        if anthropic:
            try:
                return web.json_response(anthropic_models(engine, request.query))
            except AnthropicError as err:
                return anthropic_error_response(err.status, err.type, err.message)
        return web.json_response(models_payload(engine))

    async def health(_request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def ready(_request: web.Request) -> web.StreamResponse:
        up = [n.name for n in engine.snapshot().nodes if n.status.value in ("up", "draining")]
        status = 200 if up else 503
        return web.json_response({"ready": bool(up), "nodes_up": up}, status=status)

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    add_anthropic_routes(app, engine, keys)
    add_responses_routes(app, engine, keys)
    add_admin_routes(app, engine)
    if not settings.metrics_listen:
        app.router.add_get("/metrics", make_aiohttp_handler(registry=engine.metrics.registry))

    known = {r.resource.canonical: r.method for r in app.router.routes() if r.resource is not None}

    async def not_found(request: web.Request) -> web.StreamResponse:
        allowed = known.get(request.path)
        if allowed is not None:
            return openai_error(
                405,
                f"{request.method} is not allowed on {request.path}; use {allowed}",
                code="method_not_allowed",
                headers={"Allow": allowed},
            )
        return openai_error(404, f"no route {request.method} {request.path}", code="not_found")

    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def create_metrics_app(engine: Engine) -> web.Application:
    """``/metrics`` alone, for ``gateway.metrics_listen``."""
    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry=engine.metrics.registry))
    return app


class Servers:
    """The bound addresses of a running gateway."""

    def __init__(self) -> None:
        self.api: tuple[str, int] = ("", 0)
        self.metrics: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        """The client API's base URL."""
        host, port = self.api
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serve(engine: Engine) -> AsyncIterator[Servers]:
    """Serve the gateway (and metrics) until the block exits, then drain for up to ``drain_s``."""
    settings = engine.settings.gateway
    servers = Servers()
    runners: list[web.AppRunner] = []
    try:
        runner = web.AppRunner(
            create_app(engine), access_log=None, handle_signals=False, shutdown_timeout=settings.drain_s
        )
        await runner.setup()
        runners.append(runner)
        host, port = parse_listen(settings.listen)
        await _start_site(web.TCPSite(runner, host, port, reuse_address=True), "gateway.listen", settings.listen)
        servers.api = _bound(runner, host)
        if settings.metrics_listen:
            mrunner = web.AppRunner(
                create_metrics_app(engine), access_log=None, handle_signals=False, shutdown_timeout=1.0
            )
            await mrunner.setup()
            runners.append(mrunner)
            mhost, mport = parse_listen(settings.metrics_listen)
            await _start_site(
                web.TCPSite(mrunner, mhost, mport, reuse_address=True),
                "gateway.metrics_listen",
                settings.metrics_listen,
            )
            servers.metrics = _bound(mrunner, mhost)
        engine.gateway = f"{servers.api[0]}:{servers.api[1]}"
        engine.fleet.gateway = engine.gateway
        engine.fleet.touch()
        yield servers
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def _start_site(site: web.TCPSite, key: str, address: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(key, address, exc.strerror or str(exc)) from None


def _bound(runner: web.AppRunner, host: str) -> tuple[str, int]:
    for sock_addr in runner.addresses:
        if isinstance(sock_addr, tuple):
            return host, int(sock_addr[1])
    return host, 0
