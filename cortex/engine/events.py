"""Facts the engine publishes, and the bus that carries them to subscribers.

Events are small frozen dataclasses named as past-tense facts. Subscribers (the console, ``GET
/admin/events``) each get a bounded queue: a slow reader loses the oldest coalescible events
(``RequestCompleted``) first and never slows the engine, because the engine must keep proxying tokens while
a terminal redraws.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cortex.engine.state import RequestRecord

__all__ = [
    "ConfigReloaded",
    "DefragFinished",
    "DefragStarted",
    "Event",
    "EventBus",
    "ModelLoadFailed",
    "ModelLoaded",
    "ModelLoading",
    "ModelPinChanged",
    "ModelUnloaded",
    "NodeStatusChanged",
    "NodeWentDown",
    "NodeWentUp",
    "RequestCompleted",
]


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every engine event."""

    kind: ClassVar[str] = "event"
    coalesce: ClassVar[bool] = False
    """Whether a full subscriber queue may drop this event."""
    at: float = field(default_factory=time.time, kw_only=True)

    def to_json(self) -> dict[str, Any]:
        """The event as JSON-ready data, with its `kind`."""
        data = dataclasses.asdict(self)
        data["kind"] = self.kind
        return data


@dataclass(frozen=True, slots=True)
class NodeWentUp(Event):
    """A node answered a poll after being down or unknown."""

    kind: ClassVar[str] = "node_up"
    node: str


@dataclass(frozen=True, slots=True)
class NodeWentDown(Event):
    """A node failed `poll.down_after` polls (or 3 requests) in a row."""

    kind: ClassVar[str] = "node_down"
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeStatusChanged(Event):
    """A node changed status (drained, undrained, restarting...)."""

    kind: ClassVar[str] = "node_status"
    node: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class ModelLoading(Event):
    """cortex asked a node to load a model."""

    kind: ClassVar[str] = "model_loading"
    node: str
    model: str


@dataclass(frozen=True, slots=True)
class ModelLoaded(Event):
    """A model became loaded on a node (cortex's load, or seen by a poll)."""

    kind: ClassVar[str] = "model_loaded"
    node: str
    model: str
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class ModelLoadFailed(Event):
    """A load cortex asked for failed."""

    kind: ClassVar[str] = "model_load_failed"
    node: str
    model: str
    message: str


@dataclass(frozen=True, slots=True)
class ModelUnloaded(Event):
    """A model left a node's memory."""

    kind: ClassVar[str] = "model_unloaded"
    node: str
    model: str
    reason: str
    """`evict`, `ttl`, `manual`, `defrag`, `reconcile` or `external` (seen by a poll)."""


@dataclass(frozen=True, slots=True)
class ModelPinChanged(Event):
    """A model was pinned or unpinned live."""

    kind: ClassVar[str] = "model_pin"
    model: str
    node: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class DefragStarted(Event):
    """A node is being drained and restarted to defragment its memory."""

    kind: ClassVar[str] = "defrag_started"
    node: str
    cycles: int


@dataclass(frozen=True, slots=True)
class DefragFinished(Event):
    """A defrag sequence ended (`ok` false when a step failed)."""

    kind: ClassVar[str] = "defrag_finished"
    node: str
    ok: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class RequestCompleted(Event):
    """A client request finished (high rate: may be dropped for slow subscribers)."""

    kind: ClassVar[str] = "request"
    coalesce: ClassVar[bool] = True
    record: RequestRecord


@dataclass(frozen=True, slots=True)
class ConfigReloaded(Event):
    """The config file was read again (SIGHUP, ``cortex reload``, a watched change): applied, or refused whole."""

    kind: ClassVar[str] = "config_reload"
    ok: bool
    message: str
    """One line: what changed, or why the file was refused (the old config keeps serving then)."""
    changes: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    """Keys that changed but take effect only at the next start (listen addresses...)."""
    errors: tuple[str, ...] = ()
    """``key.path: problem`` lines of a refused file."""


class EventBus:
    """Fan-out of events to any number of bounded subscriber queues."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._maxsize = maxsize
        self._queues: set[asyncio.Queue[Event]] = set()
        self._all: set[asyncio.Queue[Event]] = set()
        """The queues that also want coalescible (per-request) events."""

    @property
    def subscribers(self) -> int:
        """How many subscribers want every event, per-request ones included."""
        return len(self._all)

    def publish(self, event: Event) -> None:
        """Hand an event to every subscriber without waiting; full queues drop coalescible events."""
        for queue in self._all if event.coalesce else self._queues:
            if queue.full():
                if event.coalesce:
                    continue
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    async def subscribe(self, *, requests: bool = True) -> AsyncGenerator[Event, None]:
        """Yield events as they are published, until the consumer stops iterating.

        Args:
            requests: also deliver the per-request events (``RequestCompleted``); a reader that takes the
                request log from snapshots says False and costs the proxy nothing per request.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue(self._maxsize)
        self._queues.add(queue)
        if requests:
            self._all.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)
            self._all.discard(queue)
