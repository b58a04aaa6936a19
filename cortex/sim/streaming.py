"""Pacing one SSE stream: token timing, keep-alives, unload aborts and scripted faults.

A stream is handed over as already-encoded frames (one per token step, ``b""`` for a token that shows
nothing, such as a buffered tool call) plus a callback for the finish frame, which needs the measured
decode time for its usage. Keeping the pacing separate from the encoding means the benchmark path
(``tok_s <= 0``) is one joined body (:func:`burst_body`, sent by :func:`sse_response` with the headers
and the chunked terminator in a single socket write) with no sleeps and no per-token awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress

from aiohttp import web

from cortex.sim.frames import DONE, KEEPALIVE, error_frame
from cortex.sim.models import Engine
from cortex.sim.script import StreamFault

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def sse_response(body: bytes) -> web.Response:
    """A complete, chunked ``text/event-stream`` response: headers, body and terminator in one write."""
    resp = web.Response(body=body, headers=SSE_HEADERS)
    resp.enable_chunked_encoding()
    return resp


def burst_body(steps: list[bytes], finish: Callable[[float], bytes], fault: StreamFault | None) -> tuple[bytes, bool]:
    """Every frame of an undelayed stream, joined, up to the fault point if a fault is armed.

    Returns:
        The body, and whether it is complete (ends with ``[DONE]`` or a scripted error and ``[DONE]``)
        rather than cut short for an ``end``/``abort`` fault.
    """
    frames = [f for f in steps if f]
    if fault is not None and fault.after <= len(frames):
        body = b"".join(frames[: fault.after])
        if fault.kind == "error":
            return body + error_frame(fault.message) + DONE, True
        return body, False
    frames.append(finish(0.0))
    frames.append(DONE)
    return b"".join(frames), True


async def open_stream(request: web.Request) -> web.StreamResponse:
    """Send the 200 ``text/event-stream`` headers."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    return resp


class Pacer:
    """Emits the frames of one stream at ``tok_s`` tokens per second.

    Args:
        request: The HTTP request (its transport is cut for an ``abort`` fault).
        resp: The prepared stream response.
        tok_s: Tokens per second; ``<= 0`` writes everything at once.
        keepalive_s: Idle seconds before a ``:`` comment; ``<= 0`` disables keep-alives.
        engine: The engine serving the request; once terminated, the stream ends without ``[DONE]``.
        fault: A scripted fault for this stream, if any.
    """

    def __init__(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        *,
        tok_s: float,
        keepalive_s: float,
        engine: Engine,
        fault: StreamFault | None,
    ) -> None:
        self._request = request
        self._resp = resp
        self._tok_s = tok_s
        self._keepalive_s = keepalive_s
        self._engine = engine
        self._fault = fault
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._sent = 0
        self.first_frame_at: float | None = None
        """Loop time of the first data frame (for the TTFT histogram)."""

    async def run(self, steps: list[bytes], finish: Callable[[float], bytes]) -> None:
        """Emit ``steps`` (one per token), ``finish(decode_seconds)`` as the last token, then ``[DONE]``."""
        start = self._loop.time()
        if self._tok_s <= 0:
            await self._burst(steps, finish)
            return
        interval = 1.0 / self._tok_s
        try:
            for i, frame in enumerate(steps):
                await self._wait_until(start + (i + 1) * interval)
                if not await self._emit(frame):
                    return
            await self._wait_until(start + (len(steps) + 1) * interval)
            if await self._emit(finish(self._loop.time() - start)):
                await self._write(DONE)
                await self._resp.write_eof()
        except ConnectionError:
            return

    async def _burst(self, steps: list[bytes], finish: Callable[[float], bytes]) -> None:
        """The no-delay path on an open stream (used for ``abort`` faults): one write, then the fault."""
        body, complete = burst_body(steps, finish, self._fault)
        if body:
            self.first_frame_at = self._loop.time()
        try:
            await self._resp.write(body)
            if complete or self._fault is None:
                await self._resp.write_eof()
            else:
                await self._apply(self._fault)
        except ConnectionError:
            return

    async def _emit(self, frame: bytes) -> bool:
        """Write one data frame unless the engine died or a fault fires first. Returns whether to go on."""
        if self._engine.terminated.is_set():
            await self._resp.write_eof()  # mistral.rs: the stream just ends, no [DONE]
            return False
        if not frame:
            return True
        fault = self._fault
        if fault is not None and self._sent >= fault.after:
            await self._apply(fault)
            return False
        if self.first_frame_at is None:
            self.first_frame_at = self._loop.time()
        await self._write(frame)
        self._sent += 1
        return True

    async def _apply(self, fault: StreamFault) -> None:
        if fault.kind == "error":
            await self._write(error_frame(fault.message) + DONE)
            await self._resp.write_eof()
        elif fault.kind == "end":
            await self._resp.write_eof()
        else:
            transport = self._request.transport
            if transport is not None:
                with suppress(Exception):
                    transport.abort()

    async def _write(self, data: bytes) -> None:
        await self._resp.write(data)
        self._last_write = self._loop.time()

    async def _wait_until(self, deadline: float) -> None:
        """Sleep until ``deadline``, sending a keep-alive comment whenever the stream idles keepalive_s."""
        while True:
            now = self._loop.time()
            if now >= deadline:
                return
            if self._keepalive_s <= 0:
                await asyncio.sleep(deadline - now)
                return
            due = self._last_write + self._keepalive_s
            if due <= now:
                await self._write(KEEPALIVE)
                continue
            await asyncio.sleep(min(deadline, due) - now)
