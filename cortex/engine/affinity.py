"""Which node holds each stored OpenAI response, and leases pinned to that node.

mistral.rs keeps a stored response, and the conversation history a follow-up continues, in the memory of
the process that made it. A follow-up (``previous_response_id``) sent to another node is not refused
there: that node finds no history and silently answers without it. So the gateway remembers where every
response was made (:class:`AffinityStore`) and sends follow-ups, retrievals, deletions and cancellations
there and only there (:func:`acquire_on`), even when the same model is loaded on several nodes. When that
node cannot serve, the client gets a 503 naming it rather than an answer that lost the conversation.

The map is an LRU bounded at :data:`CAPACITY` ids (about 11 MB of JSON when full) and survives gateway
restarts in its own file beside the state file (``$XDG_STATE_HOME/cortex/responses.json``): written
atomically (temporary file, then rename), and only :data:`SAVE_DELAY_S` after a change (longer for a large
map), serialized in small batches in a thread, so a burst of requests costs one write and the event loop
never waits on the disk. A crash loses the ids of the last few seconds; a clean stop writes them all.

Each id also records its node's server start time (``created`` of the node's model list): a node that
restarted since has lost the response, and a follow-up gets a 404 saying so instead of a silently
shortened conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from cortex.engine.lifecycle import Lease
from cortex.engine.state import NodeStatus, SlotState
from cortex.errors import BadRequest, CortexError, LoadFailed, QueueTimeout

if TYPE_CHECKING:
    from cortex.engine.engine import Engine
    from cortex.engine.fleet import NodeRec

__all__ = [
    "CAPACITY",
    "IDS_PER_DELAY_S",
    "SAVE_DELAY_S",
    "AffinityStore",
    "Holder",
    "HolderUnavailable",
    "ResponseNotFound",
    "acquire_on",
    "holder_node",
    "responses_path",
    "server_epoch",
]

log = logging.getLogger(__name__)

CAPACITY = 100_000
"""Response ids remembered at most (the least recently used go first)."""
SAVE_DELAY_S = 2.0
"""A change is written this long after it happened, with every other change made meanwhile."""
IDS_PER_DELAY_S = 10_000
"""A large map waits one more second per this many ids: a write's cost on the event loop (copying the map,
about 15 ms per 100,000 ids on a small machine) stays under a few ms per second of traffic."""
_FORMAT = 2
_BATCH = 2000


@dataclass(frozen=True, slots=True)
class Holder:
    """Where a response was made."""

    node: str
    model: str
    epoch: int | None
    """The node's server start time when the response was made (None when the node does not say)."""


class ResponseNotFound(CortexError):
    """The gateway knows no (live) response with this id."""

    status = 404
    kind = "invalid_request_error"


class HolderUnavailable(CortexError):
    """The node that holds a response cannot serve now; sending elsewhere would lose the conversation."""

    status = 503
    kind = "server_error"
    retry_after = 5.0


def responses_path(state_path: Path | None) -> Path:
    """The map's file: ``responses.json`` beside the state file (``$XDG_STATE_HOME/cortex/``)."""
    if state_path is not None:
        return state_path.with_name("responses.json")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cortex" / "responses.json"


def server_epoch(node: NodeRec) -> int | None:
    """The node's server start time (``created`` of its model list) as last polled; None if it never said."""
    return node.client.created


class AffinityStore:
    """Response id → :class:`Holder`, bounded and persisted (see the module docstring).

    Args:
        path: The JSON file (read now, written later).
        capacity: Ids kept at most.
        save_delay_s: Seconds between a change and its write.
    """

    def __init__(self, path: Path, *, capacity: int = CAPACITY, save_delay_s: float = SAVE_DELAY_S) -> None:
        self.path = path
        self.capacity = capacity
        self.save_delay_s = save_delay_s
        self.saves = 0
        """Writes done so far (tests check that a burst of changes is one write)."""
        self.loads: dict[tuple[str, str], asyncio.Task[Any]] = {}
        """Pinned loads in progress, by (node, model): waiters for the same one share it."""
        self._map: OrderedDict[str, Holder] = OrderedDict()
        self._dirty = False
        self._changed = asyncio.Event()
        self._lock = threading.Lock()
        self.on_change: Callable[[str, Holder | None], None] | None = None
        """Called after :meth:`remember` and :meth:`forget` (a cluster shares the map with other gateways)."""
        self._load()

    def __len__(self) -> int:
        return len(self._map)

    def _load(self) -> None:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("response map %s unreadable (%s); starting empty", self.path, exc)
            return
        rows = data.get("responses") if isinstance(data, dict) else None
        for key, row in rows.items() if isinstance(rows, dict) else ():
            if not isinstance(row, dict):
                continue
            node, model, epoch = row.get("node"), row.get("model"), row.get("epoch")
            if isinstance(node, str) and isinstance(model, str) and (epoch is None or isinstance(epoch, int)):
                self._map[key] = Holder(node, model, epoch)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    # -- the map ----------------------------------------------------------------------------------------

    def remember(self, response_id: str, node: str, model: str, epoch: int | None) -> None:
        """Record where a response was made (the most recently used id from now on)."""
        self._map[response_id] = Holder(node, model, epoch)
        self._map.move_to_end(response_id)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)
        self._touch()
        if self.on_change is not None:
            self.on_change(response_id, self._map[response_id])

    def adopt(self, response_id: str, holder: Holder | None) -> None:
        """Take another gateway's change (a response it made, or forgot) without telling anyone back."""
        if holder is None:
            if self._map.pop(response_id, None) is not None:
                self._touch()
            return
        self._map[response_id] = holder
        self._map.move_to_end(response_id)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)
        self._touch()

    def lookup(self, response_id: str) -> Holder | None:
        """Where a response was made, or None; a hit counts as a use (LRU)."""
        holder = self._map.get(response_id)
        if holder is not None:
            self._map.move_to_end(response_id)
        return holder

    def forget(self, response_id: str) -> bool:
        """Drop an id (deleted, or gone with its node's restart); True when it was known."""
        if self._map.pop(response_id, None) is None:
            return False
        self._touch()
        if self.on_change is not None:
            self.on_change(response_id, None)
        return True

    # -- persistence ------------------------------------------------------------------------------------

    def _touch(self) -> None:
        self._dirty = True
        self._changed.set()

    async def run(self) -> None:
        """Write the map :attr:`save_delay_s` after each change, until cancelled (an engine task).

        A map of more than :data:`IDS_PER_DELAY_S` ids waits longer, one second per that many ids.
        """
        while True:
            await self._changed.wait()
            await asyncio.sleep(max(self.save_delay_s, len(self._map) / IDS_PER_DELAY_S))
            self._changed.clear()
            ids, holders = self._rows()
            await asyncio.to_thread(self._write, ids, holders)

    def flush(self) -> None:
        """Write now if anything changed since the last write (the engine calls it when it stops)."""
        if self._dirty:
            self._write(*self._rows())

    def _rows(self) -> tuple[list[str], list[Holder]]:
        """The map's contents now, as two plain lists: copied in C, no object made per id (no GC pass)."""
        self._dirty = False
        return list(self._map), list(self._map.values())

    def _write(self, ids: list[str], holders: list[Holder]) -> None:
        """Serialize and replace the file atomically; failures are logged, never raised.

        Runs in a thread. It serializes :data:`_BATCH` rows per ``orjson`` call, because one call holds the
        GIL throughout: a single call for 100,000 rows would stall the event loop for tens of milliseconds.
        """
        parts = [
            orjson.dumps(dict(zip(ids[i : i + _BATCH], holders[i : i + _BATCH], strict=True)))[1:-1]
            for i in range(0, len(ids), _BATCH)
        ]  # Holder dataclasses are serialized by orjson itself: no Python object per id (no GC pass)
        payload = b'{"format":%d,"responses":{' % _FORMAT + b",".join(p for p in parts if p) + b"}}"
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(payload)
                os.replace(tmp, self.path)
                self.saves += 1
            except OSError as exc:
                log.warning("cannot write response map %s: %s", self.path, exc)


def holder_node(engine: Engine, response_id: str, holder: Holder, *, serving: bool = True) -> NodeRec:
    """The node that holds ``response_id``, if it can take a request now.

    Args:
        engine: The engine.
        response_id: The id (for messages).
        holder: Its record.
        serving: True for a request that generates (an undrained node is needed); False for retrieval,
            deletion and cancellation, which a draining node still answers.

    Raises:
        HolderUnavailable: the node is gone from the config, down, restarting or (``serving``) drained.
        ResponseNotFound: the node restarted since, so the response is gone (the id is forgotten).
    """
    node = engine.fleet.nodes.get(holder.node)
    if node is None:
        raise HolderUnavailable(
            f"response {response_id} is held by node {holder.node}, which is no longer in this gateway's config"
        )
    epoch = server_epoch(node)
    if holder.epoch is not None and epoch is not None and epoch != holder.epoch:
        engine.affinity.forget(response_id)
        raise ResponseNotFound(
            f"response {response_id} was held by node {node.name}, whose server has restarted since and lost it "
            "(mistral.rs keeps responses in memory); start a new conversation"
        )
    status = node.status
    if status is NodeStatus.UP or (status is NodeStatus.DRAINING and not serving):
        return node
    detail = f" ({node.last_error})" if status is NodeStatus.DOWN and node.last_error else ""
    raise HolderUnavailable(
        f"node {node.name} holds response {response_id} and is {status.value}{detail}; the conversation lives "
        "only there, so it is not sent elsewhere: retry when the node is back"
    )


async def acquire_on(
    engine: Engine,
    model: str,
    response_id: str,
    holder: Holder,
    on_wait: Callable[[float], Awaitable[None]] | None = None,
) -> Lease:
    """A lease for ``model`` on the node that holds ``response_id``, loading it there (only there) if needed.

    When the model is loaded on that node the lease comes from the engine's own ``acquire`` with every
    other node excluded. When it is not, the lifecycle's placement is asked for that node alone and the
    load runs as any other load (victims, memory wait, ``reload``); requests pinned to the same (node,
    model) share it. ``on_wait(seconds)`` is awaited about once a second while waiting, as in ``acquire``.

    Raises:
        HolderUnavailable: the node is down, restarting, drained or gone.
        ResponseNotFound: the node restarted since the response was made.
        BadRequest: the node does not serve ``model``.
        LoadFailed: loading the model there failed.
        QueueTimeout: it was not ready within ``gateway.queue_timeout_s``.
    """
    fleet = engine.fleet
    others = tuple(name for name in fleet.nodes if name != holder.node)
    started = time.monotonic()
    deadline = started + engine.settings.gateway.queue_timeout_s
    next_notice = started + 1.0
    while True:
        node = holder_node(engine, response_id, holder)
        if model not in node.slots:
            raise BadRequest(
                f"node {node.name}, which holds response {response_id}, does not serve {model!r}", param="model"
            )
        if engine.lifecycle.route(model, others) is not None:
            lease = await engine.acquire(model, others)
            waited = time.monotonic() - started
            if waited > 0.001:
                lease.queue_s = waited
                engine.metrics.queue_waited(model, waited)
            return lease
        task = _pinned_load(engine, node, model)
        now = time.monotonic()
        if now >= deadline:
            raise QueueTimeout(
                f"{model} was not ready on {node.name} within {engine.settings.gateway.queue_timeout_s:g} s"
            )
        wait = max(0.01, min(deadline, next_notice) - now)
        if task is None:
            await asyncio.sleep(min(wait, 0.25))
        else:
            await asyncio.wait({task}, timeout=wait)
            if task.done() and not task.cancelled():
                error = task.result()
                if error is not None:
                    raise LoadFailed(f"loading {model} on {node.name} failed: {error}")
        now = time.monotonic()
        if on_wait is not None and now >= next_notice:
            await on_wait(now - started)
            next_notice = now + 1.0


def _pinned_load(engine: Engine, node: NodeRec, model: str) -> asyncio.Task[Any] | None:
    """The load of ``model`` on ``node`` to wait for: a running one, a new one, or None (wait and look again).

    None when another load of the model is in progress anywhere (the fleet loads a model in one place at a
    time) or when the node has no room now without breaking the eviction rules (busy or young victims).
    """
    store = engine.affinity
    key = (node.name, model)
    task = store.loads.get(key)
    if task is not None and not task.done():
        return task
    slot = node.slots.get(model)
    if slot is None or slot.state is not SlotState.UNLOADED or model in engine.fleet.loading:
        return None
    cluster = engine.cluster
    if cluster is not None and not cluster.may_act(node.name):
        return None  # another gateway acts on the node (or the store is down): wait and look again
    placement = engine.lifecycle.plan(model, set(), node=node.name)
    if placement is None:
        return None
    task = engine.spawn(engine.lifecycle.load_on(node, model, placement.victims))
    store.loads[key] = task

    def done(finished: asyncio.Task[Any]) -> None:
        if store.loads.get(key) is finished:
            del store.loads[key]
        with contextlib.suppress(asyncio.CancelledError):
            finished.exception()  # retrieved: a failed load is reported through its result, not a warning

    task.add_done_callback(done)
    return task
