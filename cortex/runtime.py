"""One process, one loop: the engine and the gateway start first, the console (if any) runs on top.

The engine and the servers start before Textual and stop after it, so quitting the console always drains
the proxy (aiohttp's graceful shutdown lets live streams finish for ``gateway.drain_s``). Headless, the
same stack waits for SIGTERM or SIGINT instead of the console, tells systemd where it stands
(:mod:`cortex.sdnotify`) and, with JSON logs, logs one line per request (only then: a line per request is
real CPU at thousands of requests a second, and the structured line is what journald users follow).
SIGHUP re-reads the config in both modes (:mod:`cortex.engine.reload`), and so does a change of the file
when ``gateway.watch_config`` is on.

``cortex attach`` runs the same console on :class:`~cortex.remote.RemoteEngine` instead: no engine, no
servers, only the admin API of a gateway running elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from cortex.config import Settings, load_settings, parse_listen
from cortex.engine.engine import Engine
from cortex.engine.events import RequestCompleted
from cortex.engine.reload import Reloader, watch_file
from cortex.proxy.app import Servers, serve
from cortex.sdnotify import SdNotify

__all__ = ["attach", "configure_logging", "run", "state_dir"]

log = logging.getLogger("cortex")
requests_log = logging.getLogger("cortex.request")
"""One line per finished request (headless), for journald users to follow a request."""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            data.update(fields)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``gateway.event_loop``; None for the standard library's loop.

    Raises:
        ImportError: ``uvloop`` was asked for by name and is not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def state_dir() -> Path:
    """``$XDG_STATE_HOME/cortex`` (``~/.local/state/cortex``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cortex"


def configure_logging(*, fmt: str = "text", verbose: int = 0, to_file: Path | None = None) -> None:
    """Logs to stderr (headless) or to a file (with the console, which owns the terminal)."""
    level = logging.DEBUG if verbose > 1 else logging.INFO
    handler: logging.Handler
    if to_file is not None:
        to_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(to_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def wait_for_signal() -> signal.Signals:
    """Wait until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[signal.Signals] = loop.create_future()

    def _got(sig: signal.Signals) -> None:
        if not got.done():
            got.set_result(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _got, sig)
    try:
        return await got
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def _demo_state(demo: bool, state_path: Path | None) -> AsyncIterator[Path | None]:
    """The state file: the given one, or, for ``--demo``, a throwaway one.

    A demo's live pins must never reach the real state file, where a later real run would inherit them
    for a node of the same name.
    """
    if not demo or state_path is not None:
        yield state_path
        return
    with tempfile.TemporaryDirectory(prefix="cortex-demo-") as tmp:
        yield Path(tmp) / "state.json"


async def run(
    settings: Settings,
    *,
    headless: bool,
    read_only: bool = False,
    demo: bool = False,
    state_path: Path | None = None,
    config_path: Path | None = None,
    log_requests: bool = False,
) -> int:
    """Run cortex until a signal (headless) or until the console quits. Returns the exit code.

    Args:
        settings: the settings read at start.
        headless: no console: wait for SIGTERM/SIGINT, notify systemd, log every request.
        read_only: a console without actions.
        demo: run on a simulated fleet with synthetic traffic (and a throwaway state file).
        state_path: the state file (else ``$XDG_STATE_HOME/cortex/state.json``).
        config_path: the file the settings came from; SIGHUP, ``cortex reload`` and
            ``gateway.watch_config`` read it again (None: the environment alone).
        log_requests: log one line per finished request (``--log-format json`` headless: for journald).
    """
    from cortex.demo import DemoFleet

    async with _demo_state(demo, state_path) as state, DemoFleet.maybe(demo, settings) as fleet_settings:
        settings = fleet_settings
        async with Engine(settings, state_path=state) as engine, serve(engine) as servers:
            notifier = SdNotify.from_env() if headless else SdNotify()
            if not demo:
                engine.reloader = Reloader(
                    engine,
                    lambda: load_settings(config_path),
                    source=str(config_path or "(environment only)"),
                )
            _announce(servers, settings, demo)
            tasks: list[asyncio.Task[Any]] = []

            def start(coro: Coroutine[Any, Any, Any]) -> None:
                tasks.append(asyncio.ensure_future(coro))

            if demo:
                start(DemoFleet.traffic(servers.url, engine))
            if headless:
                start(notifier.watchdog())
            if log_requests:
                start(_log_requests(engine))
            if engine.reloader is not None and config_path is not None:
                start(watch_file(config_path, engine.reloader))
            quit_console: list[Callable[[], None]] = []
            _on_sighup(engine.reloader, notifier, quit_console)
            notifier.ready(f"serving {len(settings.nodes)} nodes on {settings.gateway.listen}")
            try:
                if headless:
                    sig = await wait_for_signal()
                    log.info("%s: draining (up to %g s)", sig.name, settings.gateway.drain_s)
                    return 0
                from cortex.tui.app import CortexApp

                app = CortexApp(
                    engine,
                    settings,
                    gateway_url=servers.url,
                    read_only=read_only,
                    metrics_url=_metrics_url(servers),
                )
                quit_console.append(lambda: app.exit(0))
                code = await app.run_async()
                return int(code or 0)
            finally:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
                in_flight = engine.snapshot().totals.in_flight
                notifier.stopping(f"draining {in_flight} requests")
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                notifier.close()
                log.info("stopping: %d requests in flight", in_flight)


def _on_sighup(reloader: Reloader | None, notifier: SdNotify, quit_console: list[Callable[[], None]]) -> None:
    """SIGHUP re-reads the config; with a console whose terminal has hung up, it quits instead."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[Any]] = set()

    async def reload() -> None:
        assert reloader is not None
        notifier.reloading()
        report = await reloader.reload("SIGHUP")
        notifier.ready(report.message)

    def hangup() -> None:
        if quit_console and not _terminal_alive():
            log.info("SIGHUP: the console's terminal is gone; stopping")
            quit_console[0]()
            return
        if reloader is None:
            log.warning("SIGHUP: --demo has no config file to re-read")
            return
        task = asyncio.ensure_future(reload())
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)


def _terminal_alive() -> bool:
    try:
        os.tcgetpgrp(sys.stdin.fileno())
    except (OSError, ValueError):
        return False
    return True


async def _log_requests(engine: Engine) -> None:
    """One log line per finished request: node, model, status, TTFT, queue time (JSON fields with json logs)."""
    async for event in engine.subscribe(requests=True):
        if not isinstance(event, RequestCompleted):
            continue
        rec = event.record
        fields = {
            "api": rec.api,
            "model": rec.model,
            "node": rec.node,
            "status": rec.status,
            "stream": rec.stream,
            "ttft_s": None if rec.ttft_s is None else round(rec.ttft_s, 4),
            "queue_s": round(rec.queue_s, 4),
            "latency_s": round(rec.latency_s, 4),
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens,
        }
        ttft = "-" if rec.ttft_s is None else f"{rec.ttft_s:.3f}s"
        requests_log.info(
            "%s %s -> %s %d ttft %s queue %.3fs took %.3fs",
            rec.api,
            rec.model,
            rec.node or "-",
            rec.status,
            ttft,
            rec.queue_s,
            rec.latency_s,
            extra={"fields": fields},
        )


def _host_url(host: str, port: int) -> tuple[str, bool]:
    """A URL that reaches ``host:port`` from this machine, and whether ``host`` means every interface."""
    if host in ("0.0.0.0", "", "::"):
        return f"http://{'[::1]' if host == '::' else '127.0.0.1'}:{port}", True
    return f"http://{f'[{host}]' if ':' in host else host}:{port}", False


def _metrics_url(servers: Servers) -> str:
    if servers.metrics is None:
        return servers.url + "/metrics"
    return _host_url(*servers.metrics)[0] + "/metrics"


def _announce(servers: Servers, settings: Settings, demo: bool) -> None:
    host, port = servers.api
    url, everywhere = _host_url(host, port)
    nodes = f"{len(settings.nodes)} nodes"
    if everywhere:
        lines = [f"cortex gateway on {host or '0.0.0.0'}:{port}, all interfaces ({url} from this machine; {nodes})"]
    else:
        lines = [f"cortex gateway on {url} ({nodes})"]
    metrics = _metrics_url(servers)
    if servers.metrics is not None and _host_url(*servers.metrics)[1]:
        lines.append(f"metrics on port {servers.metrics[1]}, all interfaces ({metrics} from this machine)")
    else:
        lines.append(f"metrics on {metrics}")
    if demo:
        lines.append(f"demo fleet: point a client at {url}/v1 (OPENAI_BASE_URL={url}/v1, ANTHROPIC_BASE_URL={url})")
        lines.append(f"  curl {url}/v1/models")
        lines.append(f"  curl {metrics}")
    for line in lines:
        log.info("%s", line)


async def attach(url: str, token: str, settings: Settings, *, read_only: bool) -> int:
    """Run the console against a gateway running elsewhere until it quits. Returns the exit code."""
    from cortex.remote import RemoteEngine
    from cortex.tui.app import CortexApp

    async with RemoteEngine(url, token) as remote:
        app = CortexApp(
            remote,
            settings,
            gateway_url=url,
            read_only=read_only,
            clock=remote.clock,
            attached=True,
            metrics_url=_remote_metrics(url, settings),
        )
        return int(await app.run_async() or 0)


def _remote_metrics(url: str, settings: Settings) -> str:
    """Where the attached gateway's metrics are, as far as the local config says (same host assumed)."""
    if not settings.gateway.metrics_listen:
        return url + "/metrics"
    port = parse_listen(settings.gateway.metrics_listen)[1]
    host = url.split("://", 1)[-1].rsplit(":", 1)[0]
    return f"http://{host}:{port}/metrics"
