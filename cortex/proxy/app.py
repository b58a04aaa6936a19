"""The gateway's aiohttp application and the runner that serves it inside the caller's loop.

``create_app`` wires routes to an existing :class:`~cortex.engine.engine.Engine` (the engine is owned by
the runtime, not by the app, so the console and the gateway share one). ``serve`` is an async context
manager around ``AppRunner``: on exit aiohttp stops accepting, lets in-flight handlers (live streams)
finish for up to ``gateway.drain_s``, then closes.

Each listening socket hands new connections to :class:`~cortex.proxy.fast.ClientProtocol`: past
``gateway.max_connections`` it answers 503 and closes (one log line per episode, not one per accept), a
connection that has not sent a complete first request head within ``gateway.header_timeout_s`` is closed
(a slowloris client cannot hold a file descriptor for good), and the inference routes are served by
cortex's own HTTP/1.1 front at a fraction of aiohttp's cost per request; every other request goes to
aiohttp's server (see ``fast.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client.aiohttp import make_aiohttp_handler

from cortex.config import parse_listen
from cortex.errors import ListenError, Unauthorized
from cortex.proxy.admin import add_admin_routes
from cortex.proxy.anthropic import AnthropicError
from cortex.proxy.anthropic_handler import add_anthropic_routes, anthropic_error_response
from cortex.proxy.catalogue import Catalogue
from cortex.proxy.common import check_api_key, secret_bytes
from cortex.proxy.errors import openai_error
from cortex.proxy.fast import ClientProtocol, Connections, Handler, WholeAnswer
from cortex.proxy.openai import handle_openai, models_payload
from cortex.proxy.responses import add_responses_routes

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["CATALOGUE", "ENGINE", "Servers", "create_app", "create_metrics_app", "serve"]

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", object)
FAST_ROUTES = web.AppKey("fast_routes", dict[bytes, Handler])
"""The routes :class:`~cortex.proxy.fast.ClientProtocol` serves itself (path → the handler, which may return a
:class:`~cortex.proxy.fast.WholeAnswer` as it is; aiohttp's routes wrap the same handlers)."""
CATALOGUE = web.AppKey("catalogue", Catalogue)
"""The app's :class:`~cortex.proxy.catalogue.Catalogue` (tests read how often it was built)."""


def create_app(engine: Engine) -> web.Application:
    """The client API, the admin API, ``/health`` and ``/ready`` on one app."""
    settings = engine.settings.gateway
    app = web.Application(
        client_max_size=int(settings.max_body_mb * 1024 * 1024),
        handler_args={"max_field_size": 65536, "keepalive_timeout": settings.keepalive_timeout_s},
    )
    app[ENGINE] = engine
    keys = engine.api_keys  # one shared list: a config reload changes it in place

    def inference(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            answer = await handle_openai(request, engine, path, keys)
            return answer.to_response() if isinstance(answer, WholeAnswer) else answer

        return handler

    fast: dict[bytes, Handler] = {}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, inference(path))
        # cortex's own front (fast.py) calls the same handler without the wrapper's coroutine frame
        fast[path.encode()] = functools.partial(handle_openai, engine=engine, path=path, keys=keys)
    app[FAST_ROUTES] = fast

    catalogue = Catalogue(engine, models_payload)  # serialised once per fleet change, see catalogue.py
    app[CATALOGUE] = catalogue

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
                page = catalogue.anthropic(request.query)
            except AnthropicError as err:
                return anthropic_error_response(err.status, err.type, err.message)
        else:
            page = catalogue.openai()
        if page.matches(request.headers.get("If-None-Match")):
            return web.Response(status=304, headers={"ETag": page.etag})
        return web.Response(body=page.body, content_type="application/json", headers={"ETag": page.etag})

    async def health(_request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def ready(_request: web.Request) -> web.StreamResponse:
        # From the node records, not a snapshot: a snapshot of 64 nodes is a rebuild a prober need not pay.
        up = [n.name for n in engine.fleet.nodes.values() if n.status.value in ("up", "draining")]
        status = 200 if up else 503
        body: dict[str, object] = {"ready": bool(up), "nodes_up": up}
        cluster = engine.cluster
        if cluster is not None:  # loaded models serve while Redis is down; loads and evictions wait for it
            view = cluster.view()
            body["cluster"] = {
                "gateway": view.name,
                "store": "up" if view.store_up else "down",
                "read_only": view.read_only,
            }
        return web.json_response(body, status=status)

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    fast[b"/v1/messages"] = add_anthropic_routes(app, engine, keys)
    add_responses_routes(app, engine, keys)
    add_admin_routes(app, engine)
    if not settings.metrics_listen:
        app.router.add_get("/metrics", _metrics_handler(engine))

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
    app = web.Application(handler_args={"keepalive_timeout": engine.settings.gateway.keepalive_timeout_s})
    app.router.add_get("/metrics", _metrics_handler(engine))
    return app


def _metrics_handler(engine: Engine) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Prometheus' handler, behind ``gateway.metrics_token`` when one is set (read per scrape)."""
    expose = make_aiohttp_handler(registry=engine.metrics.registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        token = engine.settings.gateway.metrics_token.get_secret_value()
        if token:
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not given or not hmac.compare_digest(secret_bytes(given), secret_bytes(token)):
                return web.Response(
                    status=401, text="metrics: missing or wrong bearer token\n", headers={"WWW-Authenticate": "Bearer"}
                )
        return await expose(request)

    return metrics


_FD_RESERVE = 64
"""Open files kept for everything but client connections (nodes' polls, logs, the state file...)."""


class _ClientFaults(logging.Filter):
    """aiohttp's log of a client's malformed HTTP, turned into one debug line.

    aiohttp logs bad framing, or a broken chunked or gzip body, as an error with a traceback, once per
    request: a hostile client could fill the log. It is the client's fault, and the client got its 400.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) or (isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500):
            log.debug("gateway: refused a malformed request: %s", str(exc).replace("\n", " ")[:200])
            return False
        return True


_CLIENT_FAULTS = _ClientFaults()


class _GuardedSite(web.BaseSite):
    """A TCP listening socket whose connections go through :class:`~cortex.proxy.fast.ClientProtocol`."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, conns: Connections, routes: dict[bytes, Handler]
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._conns = conns
        self._routes = routes

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            functools.partial(ClientProtocol, server, self._conns, self._routes),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


def _connection_limit(configured: int) -> int:
    """``configured``, lowered to fit the open-file limit (raised to its hard ceiling first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return configured
    fits = max(16, (soft - _FD_RESERVE) // 2)  # a proxied connection may hold one to a node too
    if configured > fits:
        log.warning(
            "gateway.max_connections = %d lowered to %d: the open-file limit is %d (raise LimitNOFILE)",
            configured,
            fits,
            soft,
        )
        return fits
    return configured


class Servers:
    """The bound addresses of a running gateway."""

    def __init__(self) -> None:
        self.api: tuple[str, int] = ("", 0)
        self.metrics: tuple[str, int] | None = None
        self.catalogue: Catalogue | None = None
        """The client API's model list cache (tests count its builds)."""
        self.connections: Connections | None = None
        """The client connections (tests read how many requests the fast front took)."""

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
    conns = Connections(
        _connection_limit(settings.max_connections), settings.header_timeout_s, settings.keepalive_timeout_s
    )
    servers.connections = conns
    logging.getLogger("aiohttp.server").addFilter(_CLIENT_FAULTS)  # a set: adding it twice is a no-op
    log.info(
        "gateway: at most %d client connections, request heads within %g s, idle keep-alive %g s",
        conns.max_connections,
        settings.header_timeout_s,
        settings.keepalive_timeout_s,
    )
    try:
        # handler_cancellation: a client that hangs up cancels its handler, which releases its lease and
        # drops the node's connection at once (without it, a non-streaming request waiting for a node
        # would hold both until first_byte_timeout_s). Admin commands shield themselves from it.
        app = create_app(engine)
        servers.catalogue = app[CATALOGUE]
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=settings.drain_s,
            handler_cancellation=True,
        )
        await runner.setup()
        runners.append(runner)
        host, port = parse_listen(settings.listen)
        site = _GuardedSite(runner, host, port, conns, app[FAST_ROUTES])
        await _start_site(site, "gateway.listen", settings.listen)
        servers.api = _bound(runner, host)
        if settings.metrics_listen:
            mrunner = web.AppRunner(
                create_metrics_app(engine), access_log=None, handle_signals=False, shutdown_timeout=1.0
            )
            await mrunner.setup()
            runners.append(mrunner)
            mhost, mport = parse_listen(settings.metrics_listen)
            await _start_site(
                _GuardedSite(mrunner, mhost, mport, conns, {}), "gateway.metrics_listen", settings.metrics_listen
            )
            servers.metrics = _bound(mrunner, mhost)
        engine.gateway = f"{servers.api[0]}:{servers.api[1]}"
        engine.fleet.gateway = engine.gateway
        engine.fleet.touch()
        yield servers
    finally:
        # The fast front's connections are not aiohttp's: they drain beside aiohttp's own shutdown.
        await asyncio.gather(conns.drain(settings.drain_s), *(runner.cleanup() for runner in reversed(runners)))


async def _start_site(site: web.BaseSite, key: str, address: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(key, address, exc.strerror or str(exc)) from None


def _bound(runner: web.AppRunner, host: str) -> tuple[str, int]:
    for sock_addr in runner.addresses:
        if isinstance(sock_addr, tuple):
            return host, int(sock_addr[1])
    return host, 0
