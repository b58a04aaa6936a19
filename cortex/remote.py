"""The engine facade over a running gateway's admin API, for ``cortex attach``.

The console is written against :class:`~cortex.engine.EngineFacade` (``snapshot()``, ``subscribe()``,
``submit()``), so the same console drives a gateway in another process or on another machine once
something offers those three over HTTP. :class:`RemoteEngine` does: it keeps the last
``GET /admin/fleet`` as the snapshot (fetched about once a second, and again whenever an event says the
fleet changed), turns the ``GET /admin/events`` server-sent events back into engine events on a local
bus, and sends commands to the admin routes the CLI uses. The loads of the last hour come with each
snapshot (``loads_1h``), and a what-if is one ``GET /admin/whatif``.

The link may drop (the gateway restarts, the network blinks). The facade then keeps the last snapshot,
reconnects with exponential backoff (0.5 s doubling to 15 s) and says what it is doing through
:meth:`RemoteEngine.link_status`, which the console shows in its header. Snapshot timestamps are the
gateway's clock; :meth:`RemoteEngine.clock` is local time shifted by the measured offset, so ages and
uptimes read right even when the two machines' clocks disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import sys
import time
import types
import typing
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

from cortex.engine import commands as cmd
from cortex.engine.events import Event, EventBus
from cortex.engine.facade import WhatIf
from cortex.engine.state import FleetSnapshot

__all__ = ["RemoteEngine", "event_from_json", "snapshot_from_json"]

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 15.0
REFRESH_S = 1.0
"""How often the snapshot is fetched while the link is up (the request log and the rates move)."""
WHATIF_TIMEOUT_S = 600.0
"""How long a what-if may take on the gateway (an hour of a busy gateway's traffic, three replays)."""


class LinkDown(Exception):
    """The gateway cannot be reached, refused us, or closed the event feed."""


class RemoteEngine:
    """:class:`~cortex.engine.EngineFacade` backed by a gateway's admin API (see the module docstring).

    Args:
        url: the gateway's base URL (``http://host:8000``).
        token: the admin bearer token ("" for a gateway that admits loopback clients without one).
        refresh_s: seconds between snapshot fetches while connected.
    """

    def __init__(self, url: str, token: str = "", *, refresh_s: float = REFRESH_S) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.refresh_s = refresh_s
        self.bus = EventBus()
        now = time.time()
        self._snap = FleetSnapshot(taken_at=now, started_at=now, gateway=self.url)
        self._loads: Mapping[str, int] = {}
        self._offset = 0.0
        """The gateway's clock minus ours, from the last snapshot."""
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._connected = False
        self._problem = "connecting"
        self._retry_at: float | None = None
        self.connects = 0
        """How many times the link came up (tests watch reconnects through it)."""

    # -- resources ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> RemoteEngine:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
            headers={"Authorization": f"Bearer {self.token}"} if self.token else None,
        )
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the facade -----------------------------------------------------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        """The last fleet the gateway reported (kept while the link is down)."""
        return self._snap

    def subscribe(self, *, requests: bool = True) -> AsyncIterator[Event]:
        """The gateway's events, as they arrive over the link."""
        return self.bus.subscribe(requests=requests)

    async def submit(self, command: cmd.Command) -> cmd.CommandResult:
        """Send a command to the gateway's admin API; an unreachable gateway is a failed result, not an error."""
        path, body = _route(command)
        session = self._session
        if session is None:
            return cmd.CommandResult(False, "not connected")
        try:
            async with session.post(self.url + path, json=body, timeout=aiohttp.ClientTimeout(total=900)) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = {}
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return cmd.CommandResult(False, f"cannot reach the gateway at {self.url}: {_describe(exc)}")
        if not isinstance(data, dict):
            data = {}
        message = str(data.get("message", f"HTTP {resp.status}"))
        detail = data.get("detail") if isinstance(data.get("detail"), dict) else {}
        return cmd.CommandResult(resp.status == 200 and bool(data.get("ok")), message, detail or {})

    def loads_last_hour(self) -> Mapping[str, int]:
        """The loads per model the gateway counted in its last hour (with the last snapshot)."""
        return self._loads

    async def whatif(self) -> WhatIf:
        """Ask the gateway to replay its last hour (``GET /admin/whatif``); a failure is in ``error``."""
        now = self.clock()
        failed = WhatIf(since=now - 3600.0, until=now, strategy=self._snap.strategy)
        session = self._session
        if session is None:
            return dataclasses.replace(failed, error="not connected")
        timeout = aiohttp.ClientTimeout(total=WHATIF_TIMEOUT_S)
        try:
            async with session.get(self.url + "/admin/whatif", timeout=timeout) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return dataclasses.replace(
                failed, error=f"what-if: cannot reach the gateway at {self.url}: {_describe(exc)}"
            )
        if resp.status != 200 or not isinstance(data, dict):
            message = data.get("message") if isinstance(data, dict) else None
            return dataclasses.replace(failed, error=f"what-if: {message or f'HTTP {resp.status}'}")
        try:
            return _build(WhatIf, data)
        except (TypeError, ValueError, KeyError) as exc:
            return dataclasses.replace(failed, error=f"what-if: unreadable answer ({exc})")

    # -- the link ------------------------------------------------------------------------------------------

    def link_status(self) -> str:
        """Empty while connected; otherwise what is wrong and when the next try comes."""
        if self._connected:
            return ""
        if self._retry_at is None:
            return f"{self._problem}…"
        wait = max(0, math.ceil(self._retry_at - time.monotonic()))
        return f"reconnecting in {wait} s: {self._problem}"

    def clock(self) -> float:
        """Now, on the gateway's clock (as far as the last snapshot tells)."""
        return time.time() + self._offset

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._fetch()
                if not self._connected:
                    self.connects += 1
                    log.info("attached to %s", self.url)
                self._connected, self._retry_at, attempt = True, None, 0
                await self._follow()
                raise LinkDown("the gateway closed the event feed")
            except (LinkDown, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                delay = min(BACKOFF_MAX_S, BACKOFF_START_S * 2**attempt)
                attempt += 1
                self._connected = False
                self._problem = _describe(exc)
                self._retry_at = time.monotonic() + delay
                log.warning("link to %s: %s; retrying in %g s", self.url, self._problem, delay)
                await asyncio.sleep(delay)

    async def _fetch(self) -> None:
        """``GET /admin/fleet`` into the snapshot."""
        assert self._session is not None
        async with self._session.get(self.url + "/admin/fleet", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                message = data.get("message") if isinstance(data, dict) else None
                raise LinkDown(str(message or f"GET /admin/fleet: HTTP {resp.status}"))
        if not isinstance(data, dict):
            raise LinkDown("GET /admin/fleet: not a fleet")
        snap = snapshot_from_json(data)
        self._offset = snap.taken_at - time.time()
        self._snap = snap
        loads = data.get("loads_1h")
        if isinstance(loads, dict):
            counts = {str(k): v for k, v in loads.items() if isinstance(v, int) and not isinstance(v, bool)}
            if counts != self._loads:
                self._loads = counts  # a new object only when a count changed (callers compare by identity)

    async def _follow(self) -> None:
        """Read the event feed and keep the snapshot fresh until either fails (raises) or the feed ends."""
        assert self._session is not None
        async with self._session.get(self.url + "/admin/events") as resp:
            if resp.status != 200:
                raise LinkDown(f"GET /admin/events: HTTP {resp.status}")
            refresher = asyncio.ensure_future(self._refresh())
            try:
                await self._read_events(resp.content)
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError, LinkDown, aiohttp.ClientError, OSError):
                    await refresher
        # The refresher's own failure (the gateway stopped answering /admin/fleet) also ends up here.

    async def _refresh(self) -> None:
        """Fetch the snapshot every ``refresh_s``, or soon after an event said something changed."""
        while True:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.refresh_s)
            await self._fetch()

    async def _read_events(self, content: aiohttp.StreamReader) -> None:
        kind = ""
        data: list[str] = []
        while True:
            raw = await content.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(":"):
                continue
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                event = _parse_event(kind, "\n".join(data))
                kind, data = "", []
                if event is not None:
                    self.bus.publish(event)
                    if not event.coalesce:
                        self._changed.set()


def _route(command: cmd.Command) -> tuple[str, dict[str, Any]]:
    """The admin route and body of a command (the same routes ``cortex pin`` & co. use)."""
    match command:
        case cmd.PinModel() | cmd.UnpinModel() | cmd.LoadModel() | cmd.UnloadModel():
            action = type(command).__name__.removesuffix("Model").lower()
            body: dict[str, Any] = {"node": command.node} if command.node else {}
            if isinstance(command, cmd.UnloadModel):
                body["force"] = command.force
            return f"/admin/models/{urllib.parse.quote(command.model, safe='/')}/{action}", body
        case cmd.DrainNode() | cmd.UndrainNode() | cmd.RestartNode():
            action = type(command).__name__.removesuffix("Node").lower()
            return f"/admin/nodes/{urllib.parse.quote(command.node, safe='')}/{action}", {}
    raise ValueError(f"no admin route for {type(command).__name__}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        return f"cannot connect: {os.strerror(errno).lower() if errno else exc.os_error}"
    return str(exc) or type(exc).__name__


# -- JSON back into the engine's value types ------------------------------------------------------------


def snapshot_from_json(data: dict[str, Any]) -> FleetSnapshot:
    """A :class:`FleetSnapshot` from ``GET /admin/fleet`` (unknown keys are ignored, missing ones default)."""
    return _build(FleetSnapshot, data)


def _event_kinds() -> dict[str, type[Event]]:
    """Every event class by its ``kind``.

    ``@dataclass(slots=True)`` builds a new class and leaves the one it replaced among the base's
    subclasses (until collected): only the class its module really exports counts.
    """
    kinds: dict[str, type[Event]] = {}
    todo: list[type[Event]] = [Event]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        module = sys.modules.get(cls.__module__)
        if cls is not Event and getattr(module, cls.__qualname__, None) is cls:
            kinds[cls.kind] = cls
    return kinds


def event_from_json(data: dict[str, Any]) -> Event | None:
    """An engine event from its ``to_json()`` form (None for a kind this version does not know)."""
    cls = _event_kinds().get(str(data.get("kind", "")))
    if cls is None:
        return None
    return _build(cls, data)


def _parse_event(kind: str, payload: str) -> Event | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    data.setdefault("kind", kind)
    try:
        return event_from_json(data)
    except (TypeError, ValueError):
        log.debug("unreadable %s event: %s", kind, payload[:200])
        return None


def _build(cls: type[T], data: Any) -> T:
    """A (frozen) dataclass from JSON-ready data, nested dataclasses, enums and tuples included."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object")
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: _value(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}  # type: ignore[arg-type]
    return cls(**kwargs)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        return tuple(_value(inner, item) for item in value)
    if isinstance(hint, type):
        if dataclasses.is_dataclass(hint):
            return _build(hint, value)
        if issubclass(hint, enum.Enum):
            return hint(value)
        if hint is float and isinstance(value, int):
            return float(value)
    return value
