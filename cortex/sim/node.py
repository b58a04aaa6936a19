"""``SimNode``: a simulated mistral.rs server that tests, the demo and the benchmarks run in-process.

A real node needs weights and a GPU, so everything in cortex that talks to mistral.rs is exercised
against this instead. It follows the aiohttp "fake server" pattern (``start()`` binds, by default on an
ephemeral port, and returns the port; ``stop()`` cleans up) and adds two kinds of controls:

* knobs that model a real node's timing and memory (``load_s``, ``tok_s``, ``keepalive_s``,
  ``unload_free_s``, ``vram_mb``...), plain attributes that can be changed while it runs;
* scripting hooks that make one later request misbehave (``fail_next``, ``drop_stream_after``,
  ``error_stream_after``, ``script_tool_call``...), plus ``requests``, a record of what arrived.

The wire behaviour itself lives in the handler modules; this class only owns the state and the socket.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Literal, Self

from aiohttp import web

from cortex.sim.app import RecordedRequest, create_app
from cortex.sim.metrics import SimMetrics
from cortex.sim.models import ModelTable, SimModel
from cortex.sim.script import InjectedFailure, Script, StreamFault

ToolStyle = Literal["mistralrs", "openai"]

DEFAULT_BODY_LIMIT = 50 * 1024 * 1024
"""mistral.rs's default request body limit (50 MiB)."""


class SimNode:
    """A simulated mistral.rs node serving ``models`` on one port.

    Args:
        models: The configured models; the first loaded one is the default.
        name: A label for logs and the device name.
        host: Address to bind.
        port: Port to bind; 0 picks an ephemeral one.
        vram_mb: The device's total memory, MiB.
        base_vram_mb: Memory used with no model loaded (context, KV cache), MiB.
        load_s: Seconds a model load takes (reload, lazy load, restart).
        tok_s: Generated tokens per second; ``<= 0`` means no delay at all.
        keepalive_s: Idle seconds between SSE ``:`` keep-alive comments (mistral.rs: 10).
        reload_bug: Copy mistral.rs's reload-on-loaded bug (ids stuck in the reloading set).
        unload_free_s: Seconds after an unload before its memory shows as free.
        max_seq_len: Context length; longer prompts fail as in mistral.rs.
        tool_style: ``mistralrs`` (whole call in the finish chunk) or ``openai`` (fragmented arguments).
        enforce_vram: A load that does not fit in ``vram_mb`` (base use, loaded weights and other loads in
            progress included) fails with CUDA out of memory, as on a real GPU. Off: memory is unlimited.
        kinds: Model id → kind (``diffusion``, ``speech``, ``text``...), as in a ``[[models]] kind`` of the
            node's TOML; listed in ``/v1/models`` and checked by the image and speech routes.
    """

    def __init__(
        self,
        models: Sequence[SimModel],
        *,
        name: str = "sim",
        host: str = "127.0.0.1",
        port: int = 0,
        vram_mb: int = 24576,
        base_vram_mb: int = 300,
        load_s: float = 0.5,
        tok_s: float = 50.0,
        keepalive_s: float = 10.0,
        reload_bug: bool = False,
        unload_free_s: float = 0.0,
        max_seq_len: int = 32768,
        tool_style: ToolStyle = "mistralrs",
        enforce_vram: bool = True,
        kinds: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.vram_mb = vram_mb
        self.base_vram_mb = base_vram_mb
        self.load_s = load_s
        self.tok_s = tok_s
        self.keepalive_s = keepalive_s
        self.reload_bug = reload_bug
        self.unload_free_s = unload_free_s
        self.max_seq_len = max_seq_len
        self.tool_style: ToolStyle = tool_style
        self.max_body_bytes = DEFAULT_BODY_LIMIT
        """Request body limit in bytes (413 above it); read when the node (re)binds."""
        self.record_requests = True
        """Whether to append to :attr:`requests` (a long benchmark turns it off)."""
        self.requests: list[RecordedRequest] = []
        """Every request received, in arrival order."""
        self.running = 0
        """Generations in progress (``mistralrs_sequences_running``)."""
        self.enforce_vram = enforce_vram
        self.kinds: dict[str, str] = dict(kinds or {})
        """Model id → kind (see ``kinds`` above)."""
        self.media_hold: asyncio.Event | None = None
        """When set, image and speech answers send their first half, then wait for this event."""
        self.awake = asyncio.Event()
        """Cleared by :meth:`hang`: every request and every load step waits until :meth:`resume`."""
        self.awake.set()
        self.models = ModelTable.from_models(models)
        self.models.capacity_mb = self._weights_capacity
        self.models.gate = self._wait_awake
        self.script = Script()
        self.metrics = SimMetrics(lambda: float(self.running))
        self._configured_models = list(models)
        self._port = port
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the requested one before :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL, ``http://HOST:PORT`` (a wildcard host is reported as loopback)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self._port}"

    async def start(self) -> int:
        """Bind and serve, with the models in their initial states (no load delay).

        Returns:
            The bound port.
        """
        if self._runner is not None:
            raise RuntimeError("SimNode already started")
        await self._bind(self._port)
        return self._port

    async def stop(self) -> None:
        """Close the socket and end every in-flight request."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def restart(self, down_s: float = 0.0, *, unloaded: bool = False) -> None:
        """Simulate a restarted ``mistralrs`` process on the same port.

        The socket closes (in-flight requests die), the node stays down ``down_s`` seconds, loads every
        configured model again one after another (``load_s`` each, refusing connections meanwhile), then
        re-binds the same port. The reloading set (and so any reload-bug damage) is cleared.

        Args:
            down_s: Extra seconds before the loads start.
            unloaded: Come back fast with every model unloaded (a server started with nothing loaded, whose
                models then lazy-load on the first request) instead of loading them all first.
        """
        await self.stop()
        if down_s > 0:
            await asyncio.sleep(down_s)
        if not unloaded:
            for _ in self._configured_models:
                if self.load_s > 0:
                    await asyncio.sleep(self.load_s)
        self.models.reset_loaded(loaded=not unloaded)
        await self._bind(self._port)

    async def _bind(self, port: int) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            raise
        runner = web.AppRunner(create_app(self), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._port = sock.getsockname()[1]
        self._runner = runner

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- inspection ------------------------------------------------------------------------------------

    def model_status(self, model_id: str) -> str:
        """What ``/v1/models/status`` would answer for ``model_id``."""
        return self.models.status(model_id)

    def hang(self) -> None:
        """Stop answering, like a process under SIGSTOP: the socket still accepts, nothing replies, loads pause."""
        self.awake.clear()

    def resume(self) -> None:
        """Undo :meth:`hang`: everything that waited carries on."""
        self.awake.set()

    async def _wait_awake(self) -> None:
        await self.awake.wait()

    def _weights_capacity(self) -> int | None:
        return self.vram_mb - self.base_vram_mb if self.enforce_vram else None

    def used_vram_mb(self) -> int:
        """Device memory in use now, MiB (base plus held weights)."""
        return self.base_vram_mb + self.models.used_vram_mb()

    # -- scripting hooks -------------------------------------------------------------------------------

    def set_load_failure(self, model_id: str, message: str | None) -> None:
        """Make every later load of ``model_id`` fail with ``Failed to load model: <message>`` (None: stop).

        Reloads then answer ``internal_error``; lazy loads answer 500. Restarts are not affected.
        """
        if message is None:
            self.models.load_failures.pop(model_id, None)
        else:
            self.models.load_failures[model_id] = message

    def fail_next(self, path: str, status: int, body_json: object = None, count: int = 1) -> None:
        """Answer the next ``count`` requests to ``path`` with ``status`` and ``body_json`` instead.

        Args:
            path: Exact request path, e.g. ``/v1/chat/completions``.
            status: HTTP status.
            body_json: JSON-serializable body; a ``str`` goes out as text/plain, None as an empty body.
            count: How many requests it answers.
        """
        self.script.failures.setdefault(path, deque()).append(InjectedFailure(status, body_json, count))

    def set_first_byte_delay(self, seconds: float) -> None:
        """Delay every chat/completions response (headers included) by ``seconds``; counted as prefill."""
        self.script.first_byte_delay = max(0.0, seconds)

    def drop_stream_after(self, n_chunks: int, *, abort: bool = False) -> None:
        """End the next stream after ``n_chunks`` data chunks, without ``[DONE]``.

        Args:
            n_chunks: Data chunks sent first.
            abort: Cut the TCP connection instead of ending the body cleanly (a crash rather than an
                unload).
        """
        self.script.stream_faults.append(StreamFault(n_chunks, "abort" if abort else "end"))

    def error_stream_after(self, n_chunks: int, message: str = "engine error") -> None:
        """After ``n_chunks`` data chunks of the next stream, send ``data:{"error":...}`` then ``[DONE]``."""
        self.script.stream_faults.append(StreamFault(n_chunks, "error", message))

    def script_tool_call(self, name: str, arguments: str) -> None:
        """Answer the next chat request carrying ``tools`` with a call to ``name`` (``arguments``: JSON)."""
        self.script.tool_calls.append((name, arguments))

    def set_reply(self, text: str | None) -> None:
        """Generate ``text`` (split into word tokens) instead of the cycling words; None restores them."""
        self.script.reply = text
