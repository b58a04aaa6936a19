"""One process, one loop: the engine and the gateway start first, the console (if any) runs on top.

The engine and the servers start before Textual and stop after it, so quitting the console always drains
the proxy (aiohttp's graceful shutdown lets live streams finish for ``gateway.drain_s``). Headless, the
same stack waits for SIGTERM or SIGINT instead of the console.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cortex.config import Settings
from cortex.engine.engine import Engine
from cortex.proxy.app import Servers, serve

__all__ = ["configure_logging", "run", "state_dir"]

log = logging.getLogger("cortex")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


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


async def run(
    settings: Settings,
    *,
    headless: bool,
    read_only: bool = False,
    demo: bool = False,
    state_path: Path | None = None,
) -> int:
    """Run cortex until a signal (headless) or until the console quits. Returns the exit code."""
    from cortex.demo import DemoFleet

    async with DemoFleet.maybe(demo, settings) as fleet_settings:
        settings = fleet_settings
        async with Engine(settings, state_path=state_path) as engine, serve(engine) as servers:
            _announce(servers, settings, demo)
            traffic = asyncio.ensure_future(DemoFleet.traffic(servers.url, engine)) if demo else None
            try:
                if headless:
                    sig = await wait_for_signal()
                    log.info("%s: draining (up to %g s)", sig.name, settings.gateway.drain_s)
                    return 0
                from cortex.tui.app import CortexApp

                app = CortexApp(engine, settings, gateway_url=servers.url, read_only=read_only)
                code = await app.run_async()
                return int(code or 0)
            finally:
                if traffic is not None:
                    traffic.cancel()
                    await asyncio.gather(traffic, return_exceptions=True)
                log.info("stopping: %d requests in flight", engine.snapshot().totals.in_flight)


def _announce(servers: Servers, settings: Settings, demo: bool) -> None:
    url = servers.url
    lines = [f"cortex gateway on {url} ({len(settings.nodes)} nodes)"]
    if servers.metrics:
        host, port = servers.metrics
        lines.append(f"metrics on http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/metrics")
    if demo:
        lines.append(f"demo fleet: point a client at {url}/v1 (OPENAI_BASE_URL={url}/v1, ANTHROPIC_BASE_URL={url})")
        lines.append(f"  curl {url}/v1/models")
    for line in lines:
        log.info("%s", line)
