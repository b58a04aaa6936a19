"""Traffic recording for ``cortex replay``: one JSON line per finished request, written off the event loop.

``[gateway] record = "PATH"`` turns it on. A line is ``{"t", "model", "dur", "node", "prompt_tokens",
"completion_tokens", "waited_s", "status"}``: when the request arrived (Unix seconds), the model as routed, the
seconds the node was busy with it (its whole time less the wait for a load), where it ran, its token counts
and how long it waited for its model. No prompt text and no client identity: a trace says what the fleet
did, not who asked for what. That is exactly what ``cortex replay TRACE.jsonl`` reads.

The request path only appends a small dict to a list. Once a second (and at stop) the lines are
serialised and appended to the file in a worker thread, so a slow disk never stalls the gateway; when the
file passes ``record_max_mb`` it is renamed to ``PATH.1`` (replacing the previous one) and a new file begins.
A write that fails is logged once and the recording goes on with the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from cortex.engine.history import finished
from cortex.engine.metrics import RequestOutcome
from cortex.engine.state import RequestRecord

__all__ = ["TraceRecorder"]

log = logging.getLogger(__name__)

FLUSH_S = 1.0
"""Seconds between two writes of the buffered lines."""
MAX_BUFFERED = 100_000
"""Lines kept in memory at most while the disk is slow; beyond, the oldest are dropped (and counted)."""


class TraceRecorder:
    """Buffers one line per finished request and appends them to ``path`` in the background.

    Args:
        path: The trace file (its folder is created).
        max_mb: Size at which the file is rotated to ``PATH.1``.
    """

    def __init__(self, path: Path, max_mb: float) -> None:
        self.path = path
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._lines: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.dropped = 0
        """Lines dropped because the buffer was full (the disk could not keep up)."""
        self.written = 0
        """Lines written so far."""

    def add(self, outcome: RequestOutcome, record: RequestRecord) -> None:
        """Note one finished request (cheap: the request path calls this)."""
        item = finished(outcome, record)
        if item is None:
            return
        if len(self._lines) >= MAX_BUFFERED:
            del self._lines[0]
            self.dropped += 1
        self._lines.append(
            {
                "t": item.t,
                "model": item.model,
                "dur": item.dur,
                "node": outcome.node,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "waited_s": item.waited,
                "status": outcome.status,
            }
        )

    def start(self) -> None:
        """Begin the periodic writes (inside the running loop)."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop the periodic writes and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        """Write the buffered lines now (in a worker thread)."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        blob = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        try:
            await asyncio.to_thread(self._append, blob)
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write the traffic record %s: %s (recording goes on)", self.path, exc)
            self._failing = True
            return
        self._failing = False
        self.written += len(lines)

    def _append(self, blob: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_size + len(blob) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        with self.path.open("ab") as out:
            out.write(blob)
