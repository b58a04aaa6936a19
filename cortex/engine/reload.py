"""Applying a new config to a running engine: nodes come and go, settings change, nothing in flight is lost.

SIGHUP, ``cortex reload`` (``POST /admin/reload``) and a watched file all end in :meth:`Reloader.reload`,
which reads the config the way the start did and applies it whole or refuses it whole: a file with one bad
key changes nothing, the old config keeps serving, and the refusal names the key as a bad file at start
does. Applying never awaits, so no request sees half of one config and half of the other. What a running
server cannot change (the listen addresses, the body limit, the drain time, the console's settings) keeps
its running value and is reported as needing a restart, never silently dropped.

A node removed from the file is retired, not cut off: it takes no new requests, its in-flight streams and
any load or unload cortex runs there finish, and only then does it leave the fleet (its poll loop ends with
it). A node whose endpoint changed is retired that way and comes back at its new address. Requests queued
for a model keep their place in its queue throughout and go to whichever nodes serve it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr, ValidationError

from cortex.config import ConfigFileError, NodeSettings, Settings, format_validation_error
from cortex.engine.events import ConfigReloaded, NodeStatusChanged
from cortex.engine.fleet import NodeRec
from cortex.engine.mistralrs import MistralRsClient
from cortex.engine.state import NodeStatus, SlotState

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["RESTART_KEYS", "ReloadReport", "Reloader", "watch_file"]

log = logging.getLogger(__name__)

RESTART_KEYS = (
    "gateway.listen",
    "gateway.metrics_listen",
    "gateway.max_body_mb",
    "gateway.drain_s",
    "gateway.max_connections",
    "gateway.header_timeout_s",
    "gateway.keepalive_timeout_s",
    "gateway.event_loop",
    "gateway.record",
    "gateway.record_max_mb",
)
"""Settings the servers read once, when they start: a change is reported, and applies at the next start."""
RETIRE_CHECK_S = 0.05
"""How often a retiring node is checked for the last of its work."""

SettingsLoader = Callable[[], Settings]
"""Reads the config as the start did; raises ``ConfigFileError`` or ``ValidationError`` for a bad one."""


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What a reload did: applied (``ok``) or refused whole."""

    ok: bool
    message: str
    """One line for a log or a notification."""
    changes: tuple[str, ...] = ()
    """What changed live, one item per key or node."""
    restart_needed: tuple[str, ...] = ()
    """Keys that changed but keep their running value until the next start."""
    errors: tuple[str, ...] = ()
    """``key.path: problem`` lines of a refused file."""

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data (the body of ``POST /admin/reload``)."""
        return asdict(self)


class Reloader:
    """Re-reads the config on demand and applies it to one engine (see the module docstring).

    Args:
        engine: the running engine (inside its ``async with``).
        load: reads the config as the start did.
        source: where the config comes from, for messages (the file's path).
    """

    def __init__(self, engine: Engine, load: SettingsLoader, *, source: str = "") -> None:
        self.engine = engine
        self._load = load
        self.source = source
        self._lock = asyncio.Lock()
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._comeback: dict[str, NodeSettings] = {}
        """Nodes to add again once their old record has retired (an endpoint changed)."""

    @property
    def retiring(self) -> frozenset[str]:
        """Nodes on their way out: drained, finishing their work."""
        return frozenset(self._retiring)

    async def reload(self, why: str = "reload") -> ReloadReport:
        """Read the config again and apply it, or refuse it whole; one reload at a time.

        Args:
            why: what asked for it (``SIGHUP``, ``admin API``...), for the log.

        Returns:
            The report; also published as a :class:`~cortex.engine.events.ConfigReloaded` event.
        """
        async with self._lock:
            errors: tuple[str, ...] = ()
            try:
                new = self._load()
            except ConfigFileError as exc:
                errors = (str(exc),)
            except ValidationError as exc:
                errors = tuple(format_validation_error(exc))
            else:
                if not new.nodes:
                    errors = ("nodes: no [[nodes]] configured",)
            if errors:
                where = f" {self.source}" if self.source else ""
                report = ReloadReport(
                    False, f"config{where} refused, the running config stays: {errors[0]}", errors=errors
                )
                log.error("%s: %s", why, report.message)
                for line in errors[1:]:
                    log.error("  %s", line)
            else:
                report = self.apply(new)
                log.info("%s: %s", why, report.message)
                for line in report.changes:
                    log.info("  %s", line)
            self.engine.bus.publish(
                ConfigReloaded(report.ok, report.message, report.changes, report.restart_needed, report.errors)
            )
            return report

    # -- applying ---------------------------------------------------------------------------------------

    def apply(self, new: Settings) -> ReloadReport:
        """Apply validated settings now, without awaiting (nothing sees half a config)."""
        engine = self.engine
        old = engine.settings
        restart = [key for key in RESTART_KEYS if _get(old, key) != _get(new, key)]
        keep = {key.split(".", 1)[1]: _get(old, key) for key in restart}  # the running value stays in force
        if new.tui != old.tui:
            restart.append("tui")
        if new.cluster != old.cluster:
            restart.append("cluster")  # the Redis connection and this gateway's name are set up at start
        new = new.model_copy(
            update={"gateway": new.gateway.model_copy(update=keep), "tui": old.tui, "cluster": old.cluster}
        )
        changes = [
            *_section_changes("gateway", old.gateway, new.gateway),
            *_section_changes("eviction", old.eviction, new.eviction),
            *_section_changes("poll", old.poll, new.poll),
        ]
        engine.settings = new
        engine.fleet.settings = new
        engine.lifecycle.settings = new
        engine.api_keys[:] = [k.get_secret_value().encode() for k in new.gateway.api_keys]
        changes += self._apply_models(old, new)
        changes += self._apply_nodes(old, new)
        engine.fleet.touch()
        engine.lifecycle.changed()
        message = f"config applied: {len(changes)} change(s)" if changes else "config unchanged"
        if restart:
            message += f"; needs a restart: {', '.join(restart)}"
        return ReloadReport(True, message, tuple(changes), tuple(restart))

    def _apply_models(self, old: Settings, new: Settings) -> list[str]:
        fleet = self.engine.fleet
        fleet.facts = {m.id: m for m in new.models}
        fleet.priorities = {m.id: m.priority for m in new.models}
        self.engine._aliases.clear()  # the alias cache still answers from the old [[models]]
        before = {m.id: m for m in old.models}
        after = {m.id: m for m in new.models}
        out = [f"models: added {mid}" for mid in after if mid not in before]
        out += [f"models: removed {mid}" for mid in before if mid not in after]
        out += [f"models: changed {mid}" for mid in after if mid in before and after[mid] != before[mid]]
        return out

    def _apply_nodes(self, old: Settings, new: Settings) -> list[str]:
        engine, fleet = self.engine, self.engine.fleet
        before = {n.name: n for n in old.nodes}
        wanted = {n.name: n for n in new.nodes}
        out: list[str] = []
        for name, spec in wanted.items():
            node = fleet.nodes.get(name)
            if name in self._retiring:
                self._comeback[name] = spec  # back in the file: added again once the old record is gone
                out.append(f"nodes: {name} comes back after it has drained")
            elif node is None:
                self._add(spec)
                out.append(f"nodes: added {name} ({spec.endpoint})")
            elif spec.endpoint != node.settings.endpoint:
                self._comeback[name] = spec
                self._retire(node)
                out.append(f"nodes: {name} moves to {spec.endpoint} after it has drained ({node.in_flight} in flight)")
            elif spec != node.settings:
                out += self._update(node, before.get(name, node.settings), spec)
        for name, node in list(fleet.nodes.items()):
            if name not in wanted and name not in self._retiring:
                self._comeback.pop(name, None)
                self._retire(node)
                out.append(f"nodes: removing {name} once drained ({node.in_flight} in flight)")
        if old.poll.timeout_s != new.poll.timeout_s:
            for node in fleet.nodes.values():
                node.client = MistralRsClient(engine.session, node.settings.endpoint, timeout_s=new.poll.timeout_s)
        self._order(new)
        return out

    def _add(self, spec: NodeSettings) -> None:
        engine, fleet = self.engine, self.engine.fleet
        client = MistralRsClient(engine.session, spec.endpoint, timeout_s=engine.settings.poll.timeout_s)
        node = NodeRec(spec, client)
        fleet.nodes[spec.name] = node
        store = fleet.store
        pins = set(spec.pinned) | set(store.pins_added.get(spec.name, ()))
        fleet.pins[spec.name] = pins - set(store.pins_removed.get(spec.name, ()))
        fleet._by_model = None  # the catalogue cache must see the new node
        _agent_token(engine, spec)
        engine.poll_node(node)
        log.info("node %s added (%s)", spec.name, spec.endpoint)

    def _update(self, node: NodeRec, old: NodeSettings, spec: NodeSettings) -> list[str]:
        """Same node, same endpoint: VRAM, pins and the agent token change in place."""
        engine, fleet = self.engine, self.engine.fleet
        out: list[str] = []
        node.settings = spec
        if spec.vram_mb != old.vram_mb:
            out.append(f"nodes: {spec.name} vram_mb {old.vram_mb} → {spec.vram_mb}")
        if spec.agent_token != old.agent_token:
            _agent_token(engine, spec)
            out.append(f"nodes: {spec.name} agent_token")
        if spec.pinned != old.pinned:
            # A pin the file now adds or drops is the operator's latest word: it replaces a live change
            # to the same pin kept in the state file.
            changed = set(old.pinned) ^ set(spec.pinned)
            store = fleet.store
            added = [m for m in store.pins_added.get(spec.name, ()) if m not in changed]
            removed = [m for m in store.pins_removed.get(spec.name, ()) if m not in changed]
            store.pins_added[spec.name], store.pins_removed[spec.name] = added, removed
            store.save()
            fleet.pins[spec.name] = (set(spec.pinned) | set(added)) - set(removed)
            out.append(f"nodes: {spec.name} pinned {sorted(spec.pinned)}")
            if node.status is NodeStatus.UP:
                engine.background(engine.lifecycle.load_pins(node))
        return out

    def _order(self, new: Settings) -> None:
        """Keep the fleet in config order (routing breaks ties by it); retiring nodes go last."""
        fleet = self.engine.fleet
        order = [n.name for n in new.nodes if n.name in fleet.nodes and n.name not in self._retiring]
        rest = [name for name in fleet.nodes if name not in order]
        fleet.nodes = {name: fleet.nodes[name] for name in (*order, *rest)}

    # -- retiring -----------------------------------------------------------------------------------------

    def _retire(self, node: NodeRec) -> None:
        old = node.status.value
        node.drained = True
        self.engine.fleet.touch()
        self.engine.node_status_changed(node, old)
        self._retiring[node.name] = self.engine.spawn(self._retired(node))

    async def _retired(self, node: NodeRec) -> None:
        """Wait until the node has no work left, then take it out of the fleet (and add its comeback)."""
        engine, fleet = self.engine, self.engine.fleet
        while _busy(node) or node.name in engine.lifecycle.defragging:
            node.drained = True  # an undrain, or the end of a defrag, must not reopen a retiring node
            await asyncio.sleep(RETIRE_CHECK_S)
        if fleet.nodes.get(node.name) is node:
            del fleet.nodes[node.name]
            fleet.pins.pop(node.name, None)
            fleet._by_model = None  # the catalogue cache must forget the node
            engine.agents._nodes.pop(node.name, None)  # its agent's reports are refused from now on
        fleet.touch()
        engine.bus.publish(NodeStatusChanged(node.name, "draining", "removed"))
        log.info("node %s removed from the fleet", node.name)
        self._retiring.pop(node.name, None)
        spec = self._comeback.pop(node.name, None)
        if spec is not None:
            self._add(spec)
            self._order(engine.settings)
        engine.lifecycle.changed()


def _busy(node: NodeRec) -> bool:
    return node.in_flight > 0 or any(s.state in (SlotState.LOADING, SlotState.UNLOADING) for s in node.slots.values())


def _agent_token(engine: Engine, spec: NodeSettings) -> None:
    """Give the agent hub the node's (new) token, keeping what its agent already reported."""
    from cortex.engine import agents

    token = spec.agent_token.get_secret_value()
    digest = agents._digest(token) if token else None  # the hub keeps digests, never tokens
    # The hub learns its nodes once, at start; this is the one place that adds one later.
    hub = engine.agents._nodes
    entry = hub.get(spec.name)
    if entry is None:
        hub[spec.name] = agents._Node(digest)
    else:
        entry.token_digest = digest


def _get(settings: Settings, key: str) -> object:
    section, field = key.split(".", 1)
    return getattr(getattr(settings, section), field, None)


def _section_changes(name: str, old: BaseModel, new: BaseModel) -> list[str]:
    """``section.key: old → new`` per changed key; secrets by name only."""
    out: list[str] = []
    for key in type(new).model_fields:
        was, now = getattr(old, key), getattr(new, key)
        if was == now:
            continue
        out.append(f"{name}.{key}" if _secret(was) or _secret(now) else f"{name}.{key}: {was!r} → {now!r}")
    return out


def _secret(value: object) -> bool:
    if isinstance(value, list):
        return any(isinstance(v, SecretStr) for v in value)
    return isinstance(value, SecretStr)


async def watch_file(path: Path, reloader: Reloader, *, every_s: float = 2.0) -> None:
    """Reload whenever ``path`` changes (size, time or inode), while ``gateway.watch_config`` is on.

    Polling the file's stat is enough at this rate and works on every filesystem, editors' rename-on-save
    included.

    Args:
        path: the config file.
        reloader: what reloads it.
        every_s: seconds between two looks at the file.
    """

    def stamp() -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    seen = stamp()
    while True:
        await asyncio.sleep(every_s)
        now = stamp()
        if now == seen or now is None:
            continue
        seen = now
        if reloader.engine.settings.gateway.watch_config:
            await reloader.reload(f"{path} changed")
