"""The floor for any Python proxy: bytes copied between two sockets by uvloop, nothing parsed.

``python bench/floor_proxy.py --route 127.0.0.1:8001=127.0.0.1:9001 [--route ...]`` accepts on each LISTEN
address and, for every client connection, opens one connection to its UPSTREAM and copies bytes both ways
as they arrive, in the read callbacks themselves (no task, no parsing, no headers rewritten). It is not a
usable proxy (one upstream connection per client, no routing, no errors of its own); it measures what the
extra hop costs on its own: one more TCP exchange each way, one more process woken, and the least Python a
proxy can run per read. ``bench/run.py`` times it at concurrency 1 beside the real proxies, so the added
latency that a proxy's own work leaves can be told from the hop's. Runs on uvloop (asyncio's loop when
uvloop is not installed) until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
from typing import cast


class _Back(asyncio.Protocol):
    """The upstream side: what the node sends goes to the client."""

    def __init__(self, front: _Front) -> None:
        self.front = front

    def data_received(self, data: bytes) -> None:
        if self.front.transport is not None:
            self.front.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.front.transport is not None:
            self.front.transport.close()


class _Front(asyncio.Protocol):
    """The client side: what the client sends goes to the node (held until the connection is up)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        """The connect task, held so that it is not garbage-collected while it runs."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(lambda: _Back(self), self.host, self.port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None:
            upstream.close()
            return
        self.upstream = upstream
        for data in self.early:
            upstream.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None:
            self.upstream.close()


async def main(routes: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    for route in routes:
        listen, _, upstream = route.partition("=")
        lhost, _, lport = listen.rpartition(":")
        uhost, _, uport = upstream.rpartition(":")

        def front(h: str = uhost, p: int = int(uport)) -> _Front:
            return _Front(h, p)

        servers.append(await loop.create_server(front, lhost, int(lport)))
    print("floor_proxy ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", action="append", required=True, help="LISTEN_HOST:PORT=UPSTREAM_HOST:PORT")
    args = parser.parse_args()
    if importlib.util.find_spec("uvloop") is not None:  # one of cortex's dependencies
        import uvloop

        uvloop.run(main(args.route))
    else:
        asyncio.run(main(args.route))
