"""The fleet's live state: the only place node and slot state is mutated, and where snapshots are built.

Records here are plain mutable objects because the request path touches them on every request (in-flight
counts, last use) and must not allocate a snapshot each time. Every mutation marks the fleet dirty; the
immutable :class:`~cortex.engine.state.FleetSnapshot` is rebuilt lazily, at most once per read after a
change, so the console polling at 4 Hz and a burst of 1,000 requests cost one rebuild per read, not one per
request. A snapshot older than a second is rebuilt too, so the sliding-window figures keep moving.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cortex.config import NodeSettings, Settings
from cortex.engine.events import EventBus, ModelLoaded, ModelUnloaded, NodeWentDown, NodeWentUp
from cortex.engine.mistralrs import MistralRsClient, SystemInfo
from cortex.engine.state import (
    AgentInfo,
    ClusterView,
    FleetSnapshot,
    FleetTotals,
    ModelSlot,
    ModelView,
    NodeSnapshot,
    NodeStatus,
    RequestRecord,
    SlotState,
    WindowStats,
)

__all__ = ["Fleet", "NodeRec", "SlotRec", "StateStore"]

log = logging.getLogger(__name__)


class SlotRec:
    """One model on one node (mutable)."""

    __slots__ = ("acted_at", "in_flight", "last_used", "loaded_at", "model_id", "state", "state_since")

    def __init__(self, model_id: str, state: SlotState, now: float) -> None:
        self.model_id = model_id
        self.state = state
        self.state_since = now
        self.in_flight = 0
        self.last_used = 0.0
        self.loaded_at: float | None = now if state is SlotState.LOADED else None
        self.acted_at = 0.0
        """When cortex itself last set the state (not a poll): a poll read before then is stale for it."""


class NodeRec:
    """One node (mutable)."""

    def __init__(self, settings: NodeSettings, client: MistralRsClient) -> None:
        self.settings = settings
        self.name = settings.name
        self.client = client
        self.health = NodeStatus.UNKNOWN
        self.drained = False
        self.restarting = False
        self.failures = 0
        self.request_failures = 0
        self.last_error = ""
        self.last_poll = 0.0
        self.slots: dict[str, SlotRec] = {}
        self.sys_total_mb: int | None = None
        self.sys_used_mb: int | None = None
        self.version = ""
        self.in_flight = 0
        self.cycles = 0
        self.server_created: int | None = None
        """The ``created`` stamp of the node's model list: its server's start time. A new one is a restart."""
        self.actions = 0
        """Loads and unloads cortex has started on this node (a load that saw this unchanged ran alone)."""
        self.load_floor: dict[str, int] = {}
        """model → the used MiB the node reported when cortex began loading it, less its victims' footprints.

        Until the device shows a load's weights, the node's used memory is at least this plus the footprints
        of the loads in progress, whatever the report says (see :meth:`Fleet.vram`)."""

    @property
    def status(self) -> NodeStatus:
        """The routing status: restarting and drained win over up."""
        if self.restarting:
            return NodeStatus.RESTARTING
        if self.health is NodeStatus.UP and self.drained:
            return NodeStatus.DRAINING
        return self.health

    def slot(self, model_id: str) -> SlotRec | None:
        """The slot of a model, if the node lists it."""
        return self.slots.get(model_id)


class StateStore:
    """Learned footprints and live pin changes, kept across restarts in a JSON file.

    The file lives under ``$XDG_STATE_HOME/cortex/`` (``~/.local/state/cortex/``); writes go through a
    temporary file and a rename so a crash never leaves half a file.
    """

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
            path = Path(base) / "cortex" / "state.json"
        self.path = path
        self.footprints: dict[str, int] = {}
        self.floors: dict[str, int] = {}
        """Lower bounds learned from out-of-memory answers (the model needed more than was free)."""
        self.pins_added: dict[str, list[str]] = {}
        self.pins_removed: dict[str, list[str]] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("state file %s unreadable (%s); starting afresh", self.path, exc)
            return
        if isinstance(data, dict):
            self.footprints = {str(k): int(v) for k, v in dict(data.get("footprints", {})).items()}
            self.floors = {str(k): int(v) for k, v in dict(data.get("floors", {})).items()}
            self.pins_added = {str(k): list(v) for k, v in dict(data.get("pins_added", {})).items()}
            self.pins_removed = {str(k): list(v) for k, v in dict(data.get("pins_removed", {})).items()}

    def save(self) -> None:
        """Write the file atomically; failures are logged, never raised."""
        data = {
            "footprints": self.footprints,
            "floors": self.floors,
            "pins_added": self.pins_added,
            "pins_removed": self.pins_removed,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot write state file %s: %s", self.path, exc)


class Fleet:
    """Node records, pins, footprints, queues; builds snapshots."""

    def __init__(
        self,
        settings: Settings,
        clients: dict[str, MistralRsClient],
        bus: EventBus,
        store: StateStore,
        *,
        gateway: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.clock = clock
        self.gateway = gateway
        self.started_at = clock()
        self.nodes: dict[str, NodeRec] = {n.name: NodeRec(n, clients[n.name]) for n in settings.nodes}
        self.facts = {m.id: m for m in settings.models}
        self.priorities = {m.id: m.priority for m in settings.models}
        self.queued: dict[str, int] = {}
        self.loading: dict[str, tuple[str, float]] = {}
        """model id → (node, wall time the load started), for loads cortex is running."""
        self.pins: dict[str, set[str]] = {}
        for node in settings.nodes:
            pins = set(node.pinned) | set(store.pins_added.get(node.name, ()))
            self.pins[node.name] = pins - set(store.pins_removed.get(node.name, ()))
        self.agent_info: Callable[[str], AgentInfo | None] = lambda _name: None
        self.agent_vram: Callable[[str], tuple[int, int] | None] = lambda _name: None
        self.stats_for_model: Callable[[str], WindowStats] = lambda _m: WindowStats()
        self.stats_for_node: Callable[[str], WindowStats] = lambda _n: WindowStats()
        self.totals: Callable[[], FleetTotals] = FleetTotals
        self.recent: Callable[[], tuple[RequestRecord, ...]] = tuple
        self.remote_in_flight: Callable[[str, str], int] = lambda _node, _model: 0
        """(node, model) → requests other gateways have in flight there (a cluster sets it; 0 alone)."""
        self.cluster_view: Callable[[], ClusterView | None] = lambda: None
        """The cluster's gateways and leases for the snapshot (None for a single gateway)."""
        self._dirty = True
        self._snap: FleetSnapshot | None = None
        self._by_model: dict[str, tuple[str, ...]] | None = None
        self.catalogue_rev = 0
        """Counts changes to what ``/v1/models`` shows (a slot's state, a slot listed or dropped, a pin):
        the gateway serialises the catalogue again only when this (or a reload) changed it."""

    # -- change tracking ---------------------------------------------------------------------------

    def touch(self) -> None:
        """Mark the snapshot stale."""
        self._dirty = True

    def snapshot(self) -> FleetSnapshot:
        """The current snapshot, rebuilt only when something changed since the last build."""
        if self._dirty or self._snap is None or self.clock() - self._snap.taken_at >= 1.0:
            self._dirty = False
            self._snap = self._build()
        return self._snap

    # -- facts -------------------------------------------------------------------------------------

    def footprint(self, model_id: str) -> int | None:
        """The model's VRAM footprint in MiB: config first, else learned, else None."""
        facts = self.facts.get(model_id)
        if facts is not None and facts.vram_mb:
            return facts.vram_mb
        return self.store.footprints.get(model_id)

    def learn_footprint(self, model_id: str, mb: int) -> None:
        """Remember a footprint measured from a load that ran alone on its node (ignored when configured)."""
        facts = self.facts.get(model_id)
        if (facts is not None and facts.vram_mb) or mb <= 0:
            return
        if self.store.footprints.get(model_id) != mb:
            self.store.footprints[model_id] = mb
            self.store.floors.pop(model_id, None)
            self.store.save()
            self.touch()

    def learn_floor(self, model_id: str, mb: int) -> None:
        """Remember that ``model_id`` needs more than ``mb`` MiB (a load answered out of memory with that free)."""
        if self.footprint(model_id) is not None or mb <= self.store.floors.get(model_id, 0):
            return
        self.store.floors[model_id] = mb
        self.store.save()
        self.touch()

    def floor(self, model_id: str) -> int:
        """The learned lower bound of a model's footprint (0 when none)."""
        return self.store.floors.get(model_id, 0)

    def estimate(self, model_id: str) -> int:
        """The best estimate of a model's footprint, for reserving and making room; never None.

        The known footprint when there is one; else the larger of the lower bound learned from out-of-memory
        answers and a conservative prior: the largest footprint known or inferred for any model on the nodes
        that list this one. 0 only when nothing at all is known (the load then goes where memory is free and
        an out-of-memory answer teaches the bound).
        """
        known = self.footprint(model_id)
        if known is not None:
            return known
        prior = 0
        for node in self.listed(model_id):
            for slot in node.slots.values():
                fp = self.footprint(slot.model_id)
                if fp is not None:
                    prior = max(prior, fp)
            prior = max(prior, self.unknown_share(node))
        return max(self.floor(model_id), prior)

    def unknown_share(self, node: NodeRec) -> int:
        """The reported memory not explained by known footprints, per loaded model of unknown size (MiB).

        A node started with ``mistralrs from-config`` holds every model from the start and no size is known;
        its report still says how much they hold together. The share includes the CUDA context, so it errs
        on the large side for making room.
        """
        reported = self.reported_used(node)
        if reported is None:
            return 0
        unknown = 0
        known = 0
        for slot in node.slots.values():
            if slot.state in (SlotState.LOADED, SlotState.UNLOADING):
                fp = self.footprint(slot.model_id)
                if fp is None:
                    unknown += 1
                else:
                    known += fp
        if unknown == 0:
            return 0
        return max(0, reported - known) // unknown

    def frees(self, node: NodeRec, model_id: str) -> int:
        """What unloading ``model_id`` from ``node`` is expected to free (MiB): known, else bound or share."""
        known = self.footprint(model_id)
        if known is not None:
            return known
        return max(self.floor(model_id), self.unknown_share(node))

    def is_pinned(self, node: str, model_id: str) -> bool:
        """Whether a model is pinned on a node."""
        return model_id in self.pins.get(node, ())

    def set_pin(self, node: str, model_id: str, pinned: bool) -> None:
        """Pin or unpin live; the difference from the config is saved in the state file."""
        pins = self.pins.setdefault(node, set())
        if pinned:
            pins.add(model_id)
        else:
            pins.discard(model_id)
        configured = set(self.nodes[node].settings.pinned)
        self.store.pins_added[node] = sorted(pins - configured)
        self.store.pins_removed[node] = sorted(configured - pins)
        self.store.save()
        self.catalogue_rev += 1
        self.touch()

    def catalogue(self) -> dict[str, list[str]]:
        """Model id → the nodes that list it (any state), in config order."""
        out: dict[str, list[str]] = {}
        for node in self.nodes.values():
            for model_id in node.slots:
                out.setdefault(model_id, []).append(node.name)
        return out

    def nodes_by_model(self) -> dict[str, tuple[str, ...]]:
        """Like :meth:`catalogue`, cached until a node lists or drops a model (read per request)."""
        if self._by_model is None:
            self._by_model = {k: tuple(v) for k, v in self.catalogue().items()}
        return self._by_model

    def listed(self, model_id: str) -> Iterator[NodeRec]:
        """The nodes that list a model."""
        return (n for n in self.nodes.values() if model_id in n.slots)

    # -- VRAM ----------------------------------------------------------------------------------------

    def estimate_used(self, node: NodeRec) -> int:
        """Known footprints of what is loaded on the node, plus what its loads in progress reserve.

        A load in progress reserves its best estimate (:meth:`estimate`), never 0: concurrent cold loads
        must see each other's memory before the device shows it.
        """
        total = 0
        for slot in node.slots.values():
            if slot.state is SlotState.LOADING:
                total += self.estimate(slot.model_id)
            elif slot.state in (SlotState.LOADED, SlotState.UNLOADING):
                total += self.footprint(slot.model_id) or 0
        return total

    def vram(self, node: NodeRec) -> tuple[int, int, str]:
        """(total, used, source) in MiB: the agent while fresh, else system info, else the estimate.

        A reported figure is never taken below the estimate of what cortex knows is resident, nor, while
        cortex loads models there, below the report at the start of those loads plus their footprints: the
        device may not show a load's weights yet, and the report holds memory the estimate cannot see (the
        CUDA context, models of unknown footprint), so two loads placed side by side are both counted.
        """
        total = node.settings.vram_mb
        estimate = self.estimate_used(node)
        agent = self.agent_vram(node.name)
        if agent is not None:
            return agent[0] or total, max(agent[1], estimate, self._loading_floor(node)), "agent"
        if node.sys_used_mb is not None:
            return node.sys_total_mb or total, max(node.sys_used_mb, estimate, self._loading_floor(node)), "system_info"
        return total, estimate, "estimate"

    def _loading_floor(self, node: NodeRec) -> int:
        if not node.load_floor:
            return 0
        pending = sum(self.estimate(m) for m in node.load_floor)
        return max(node.load_floor.values()) + pending

    def settled(self, node: NodeRec, model_id: str) -> None:
        """A report read after ``model_id`` finished loading on ``node`` now shows its weights."""
        if node.load_floor.pop(model_id, None) is not None:
            self.touch()

    def begin_load(self, node: NodeRec, model_id: str, victims: tuple[str, ...]) -> None:
        """Mark ``model_id`` LOADING and its ``victims`` UNLOADING on ``node``, with no await in between."""
        reported = self.reported_used(node)
        node.actions += 1
        self.set_slot(node, model_id, SlotState.LOADING)
        for victim in victims:
            self.set_slot(node, victim, SlotState.UNLOADING)
        if reported is not None:
            node.load_floor[model_id] = max(0, reported - sum(self.frees(node, v) for v in victims))
            self.touch()

    def reported_used(self, node: NodeRec) -> int | None:
        """The used figure the node (or its agent) reports, without the estimate; None when none."""
        agent = self.agent_vram(node.name)
        if agent is not None:
            return agent[1]
        return node.sys_used_mb

    # -- state changes from polls ---------------------------------------------------------------------

    def set_slot(self, node: NodeRec, model_id: str, state: SlotState, *, by_poll: bool = False) -> SlotRec:
        """Move a slot to a state (creating it), stamping the time (and, unless ``by_poll``, cortex's act)."""
        now = self.clock()
        slot = node.slots.get(model_id)
        if slot is None:
            slot = node.slots[model_id] = SlotRec(model_id, state, now)
            self._by_model = None
            self.catalogue_rev += 1
            if by_poll and state is SlotState.LOADED:
                slot.loaded_at = 0.0
        elif slot.state is not state:
            slot.state = state
            slot.state_since = now
            self.catalogue_rev += 1
        if not by_poll:
            slot.acted_at = now
        if state is SlotState.LOADED and slot.loaded_at is None:
            # Found loaded by a poll (at start, or loaded by someone else): no younger than anything cortex
            # loaded, so min_resident_s does not protect it and LRU sees it as used long ago.
            slot.loaded_at = 0.0 if by_poll else now
        elif state is not SlotState.LOADED:
            slot.loaded_at = None
        if state not in (SlotState.LOADING, SlotState.LOADED):
            node.load_floor.pop(model_id, None)  # a load that ended without its weights; a loaded one keeps its
            # floor until a report read after the load (see :meth:`settled`)
        self.touch()
        return slot

    def poll_ok(self, node: NodeRec, models: dict[str, str], info: SystemInfo | None, *, fresh: bool = False) -> bool:
        """Apply a good poll. Returns True when the node just came (back) up.

        A node's polls run one after another, so this one started after the previous one was applied
        (``last_poll``). A slot cortex changed since then may have been read before the change (a load that
        finished while the poll was in flight would be read back as ``reloading``): its state is left to
        the next poll. ``fresh``: the caller read the node after its own last action; apply everything.
        """
        came_up = node.health is not NodeStatus.UP
        previous = node.last_poll
        node.health = NodeStatus.UP
        node.failures = 0
        node.request_failures = 0
        node.last_error = ""
        node.last_poll = self.clock()
        if info is not None:
            node.sys_total_mb, node.sys_used_mb, node.version = info.total_mb, info.used_mb, info.version
            for model_id in list(node.load_floor):
                done = node.slots.get(model_id)
                if done is not None and done.state is SlotState.LOADED and done.state_since <= previous:
                    del node.load_floor[model_id]  # this poll began after the load ended: it shows the weights
        for model_id, status in models.items():
            slot = node.slots.get(model_id)
            if slot is not None and slot.state in (SlotState.LOADING, SlotState.UNLOADING):
                continue  # cortex is acting on it; its own answer decides
            if slot is not None and slot.acted_at > previous and not (came_up or fresh):
                continue  # possibly read before cortex's own change: the next poll tells
            if status == "loaded":
                new = SlotState.LOADED
            elif status == "reloading":
                new = SlotState.STUCK
            else:
                new = SlotState.UNLOADED
            old = slot.state if slot is not None else None
            if old is new:
                continue
            self.set_slot(node, model_id, new, by_poll=True)
            if old is not None and not came_up:
                if new is SlotState.LOADED:
                    self.bus.publish(ModelLoaded(node.name, model_id))
                elif old is SlotState.LOADED:
                    self.bus.publish(ModelUnloaded(node.name, model_id, "external"))
        for model_id in [m for m in node.slots if m not in models]:
            if node.slots[model_id].state not in (SlotState.LOADING, SlotState.UNLOADING):
                del node.slots[model_id]
                self._by_model = None
                self.catalogue_rev += 1
        self.touch()
        if came_up:
            self.bus.publish(NodeWentUp(node.name))
        return came_up

    def poll_failed(self, node: NodeRec, error: str) -> bool:
        """Count a failed poll. Returns True when the node just went down."""
        node.failures += 1
        node.last_error = error
        node.last_poll = self.clock()
        self.touch()
        if node.health is not NodeStatus.DOWN and node.failures >= self.settings.poll.down_after:
            self.mark_down(node, error)
            return True
        return False

    def request_failed(self, node: NodeRec, error: str) -> None:
        """Count a failed request; three in a row mark the node down."""
        node.request_failures += 1
        node.last_error = error
        if node.health is NodeStatus.UP and node.request_failures >= 3:
            self.mark_down(node, f"3 failed requests: {error}")

    def mark_down(self, node: NodeRec, reason: str) -> None:
        """Take a node out of routing until a good poll."""
        node.health = NodeStatus.DOWN
        self.touch()
        log.warning("node %s is down: %s", node.name, reason)
        self.bus.publish(NodeWentDown(node.name, reason))

    # -- snapshot ------------------------------------------------------------------------------------

    def _build(self) -> FleetSnapshot:
        now = self.clock()
        nodes: list[NodeSnapshot] = []
        headroom = self.settings.eviction.headroom_mb
        for node in self.nodes.values():
            total, used, source = self.vram(node)
            share = self.unknown_share(node)
            slots = tuple(
                ModelSlot(
                    model_id=s.model_id,
                    state=s.state,
                    state_since=s.state_since,
                    vram_mb=self.footprint(s.model_id),
                    frees_mb=self.footprint(s.model_id) or max(self.floor(s.model_id), share),
                    in_flight=s.in_flight + self.remote_in_flight(node.name, s.model_id),
                    last_used=s.last_used,
                    loaded_at=s.loaded_at,
                    pinned=self.is_pinned(node.name, s.model_id),
                )
                for s in node.slots.values()
            )
            nodes.append(
                NodeSnapshot(
                    name=node.name,
                    endpoint=node.settings.endpoint,
                    status=node.status,
                    vram_total_mb=total,
                    vram_used_mb=used,
                    vram_source=source,
                    headroom_mb=headroom,
                    slots=slots,
                    in_flight=node.in_flight,
                    cycles=node.cycles,
                    defrag_after=self.settings.eviction.defrag_after_cycles,
                    failures=node.failures,
                    last_error=node.last_error,
                    last_poll=node.last_poll,
                    version=node.version,
                    agent=self.agent_info(node.name),
                    stats=self.stats_for_node(node.name),
                )
            )
        models: list[ModelView] = []
        for model_id, listed_on in self.catalogue().items():
            loaded = tuple(n for n in listed_on if self.nodes[n].slots[model_id].state is SlotState.LOADED)
            loading = self.loading.get(model_id)
            state = "loaded" if loaded else ("loading" if loading else "unloaded")
            facts = self.facts.get(model_id)
            model_slots = [self.nodes[n].slots[model_id] for n in listed_on]
            pinned_on = tuple(n for n in listed_on if self.is_pinned(n, model_id))
            models.append(
                ModelView(
                    id=model_id,
                    state=state,
                    nodes=loaded,
                    listed_on=tuple(listed_on),
                    pinned=bool(pinned_on),
                    pinned_on=pinned_on,
                    loading_on=loading[0] if loading else None,
                    loading_since=loading[1] if loading else None,
                    vram_mb=self.footprint(model_id),
                    priority=facts.priority if facts else 0,
                    aliases=tuple(facts.aliases) if facts else (),
                    in_flight=sum(s.in_flight for s in model_slots),
                    queued=self.queued.get(model_id, 0),
                    last_used=max((s.last_used for s in model_slots), default=0.0),
                    stats=self.stats_for_model(model_id),
                )
            )
        models.sort(key=lambda m: m.id)
        totals = self.totals()
        return FleetSnapshot(
            taken_at=now,
            started_at=self.started_at,
            gateway=self.gateway,
            nodes=tuple(nodes),
            models=tuple(models),
            requests=self.recent(),
            totals=FleetTotals(
                req_s=totals.req_s,
                tok_s=totals.tok_s,
                requests=totals.requests,
                errors=totals.errors,
                in_flight=sum(n.in_flight for n in self.nodes.values()),
                queued=sum(self.queued.values()),
            ),
            strategy=self.settings.eviction.strategy,
            cluster=self.cluster_view(),
        )
