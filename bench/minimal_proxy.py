"""The floor for a Python proxy on aiohttp: a pass-through with one shared ClientSession and no parsing.

``python bench/minimal_proxy.py [--uvloop] --route 127.0.0.1:8001=http://127.0.0.1:9001 [--route ...]``
serves each LISTEN address as a plain reverse proxy of its UPSTREAM (several routes share one session).
Bodies are read whole and sent on; answers are streamed back chunk by chunk as they arrive (``iter_any``).
It does what any proxy must (drop hop-by-hop headers, 502 when the upstream is unreachable) and nothing
else, so the benchmark can quote cortex as a multiple of it. ``--uvloop`` runs the very same code on
uvloop's event loop instead of the standard library's, since cortex itself runs on uvloop by default: the
floor is then quoted for both loops. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

import aiohttp
from aiohttp import web

HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def make_app(session: aiohttp.ClientSession, upstream: str) -> web.Application:
    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        try:
            async with session.request(request.method, upstream + request.path_qs, data=body, headers=headers) as up:
                resp = web.StreamResponse(status=up.status)
                resp.headers.extend((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
                resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientError as exc:
            return web.Response(status=502, text=f"upstream error: {exc}")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


async def main(routes: list[str]) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        runners = []
        for route in routes:
            listen, _, upstream = route.partition("=")
            host, _, port = listen.rpartition(":")
            runner = web.AppRunner(make_app(session, upstream.rstrip("/")), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, int(port), reuse_address=True).start()
            runners.append(runner)
        print("minimal_proxy ready", flush=True)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", action="append", required=True, metavar="HOST:PORT=UPSTREAM_URL")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop's event loop (the default is asyncio's)")
    args = parser.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.route))
