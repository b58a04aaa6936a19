"""Immutable views of the fleet: what the console, the admin API and ``cortex status`` read.

The engine rebuilds a :class:`FleetSnapshot` whenever something changes and hands out the same object until
the next change, so a reader (the console at 4 Hz, ``GET /admin/fleet``) pays nothing for asking. Everything
here is a frozen dataclass of plain values: safe to share across tasks, cheap to render, trivially
JSON-serialisable through :meth:`FleetSnapshot.to_json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "AgentInfo",
    "ClusterView",
    "FleetSnapshot",
    "FleetTotals",
    "GatewayInfo",
    "GpuInfo",
    "LeaseInfo",
    "ModelSlot",
    "ModelView",
    "NodeSnapshot",
    "NodeStatus",
    "RequestRecord",
    "SlotState",
    "WindowStats",
]


class NodeStatus(StrEnum):
    """Where a node stands for routing."""

    UNKNOWN = "unknown"
    """Not polled yet."""
    UP = "up"
    """Answering polls; receives requests."""
    DOWN = "down"
    """`poll.down_after` polls (or 3 requests) failed in a row."""
    DRAINING = "draining"
    """Up, but receives no new requests (operator drain or defrag)."""
    RESTARTING = "restarting"
    """Its agent is restarting mistralrs (defrag or operator restart)."""


class SlotState(StrEnum):
    """The state of one model on one node, as cortex knows it."""

    LOADED = "loaded"
    LOADING = "loading"
    """cortex called reload and waits for the answer."""
    UNLOADING = "unloading"
    UNLOADED = "unloaded"
    STUCK = "reloading"
    """The node says `reloading` but cortex started no load: the mistral.rs stuck-reload bug, or a lazy load."""


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Sliding-window figures for one model or node (default window 60 s)."""

    req_s: float = 0.0
    tok_s: float = 0.0
    """Completion tokens per second over the window (throughput, all requests together)."""
    decode_tok_s: float | None = None
    """Median per-request decode speed from mistral.rs usage."""
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    errors: int = 0
    tok_s_series: tuple[float, ...] = ()
    """Completion tokens per second, one value per second of the window, oldest first (sparklines)."""
    ttft_series: tuple[float, ...] = ()
    """Mean TTFT in seconds per second of the window (0 where no request), oldest first."""


@dataclass(frozen=True, slots=True)
class ModelSlot:
    """One model on one node."""

    model_id: str
    state: SlotState
    state_since: float
    """Wall-clock time the slot entered its state."""
    vram_mb: int | None = None
    """Known footprint (config, else learned), None when unknown."""
    in_flight: int = 0
    last_used: float = 0.0
    """Wall-clock time of the last request routed here (0 = never)."""
    loaded_at: float | None = None
    pinned: bool = False
    frees_mb: int = 0
    """What unloading it is expected to free (MiB): ``vram_mb`` when known, else the learned lower bound or
    the node's reported memory not explained by known footprints, shared among the models of unknown size."""


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU as the node's agent reads it through NVML."""

    index: int
    name: str
    total_mb: int
    used_mb: int
    util_pct: float | None = None


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What the node's agent last reported."""

    seen_at: float
    version: str = ""
    fresh: bool = True
    """False once the report is older than three agent intervals."""
    mistralrs_up: bool | None = None
    gpus: tuple[GpuInfo, ...] = ()
    nvml: bool = True
    """False when the agent has no NVML (no GPU figures)."""
    gpu_error: str = ""
    last_command: dict[str, Any] | None = None
    """The result of the last command the agent ran (id, kind, exit code, output tail)."""


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One node."""

    name: str
    endpoint: str
    status: NodeStatus
    vram_total_mb: int
    vram_used_mb: int
    vram_source: str
    """Where `vram_used_mb` comes from: `agent`, `system_info` or `estimate`."""
    headroom_mb: int
    slots: tuple[ModelSlot, ...] = ()
    in_flight: int = 0
    cycles: int = 0
    """Eviction cycles since the last defrag."""
    defrag_after: int = 0
    failures: int = 0
    """Consecutive failed polls."""
    last_error: str = ""
    last_poll: float = 0.0
    version: str = ""
    agent: AgentInfo | None = None
    stats: WindowStats = field(default_factory=WindowStats)

    @property
    def vram_free_mb(self) -> int:
        """VRAM that can still be used, headroom excluded."""
        return self.vram_total_mb - self.headroom_mb - self.vram_used_mb

    @property
    def cycles_to_defrag(self) -> int | None:
        """Eviction cycles left before a defrag restart (None when defrag is off)."""
        return None if self.defrag_after <= 0 else max(0, self.defrag_after - self.cycles)

    @property
    def routable(self) -> bool:
        """Whether new requests may go here."""
        return self.status is NodeStatus.UP

    def slot(self, model_id: str) -> ModelSlot | None:
        """The slot of a model on this node, if the node lists it."""
        for slot in self.slots:
            if slot.model_id == model_id:
                return slot
        return None


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model across the fleet (the merged catalogue entry)."""

    id: str
    state: str
    """`loaded` (somewhere), `loading` (somewhere, nowhere loaded yet) or `unloaded`."""
    nodes: tuple[str, ...]
    """Nodes where it is loaded."""
    listed_on: tuple[str, ...]
    """Nodes that can serve it."""
    pinned: bool
    pinned_on: tuple[str, ...] = ()
    loading_on: str | None = None
    loading_since: float | None = None
    vram_mb: int | None = None
    priority: int = 0
    aliases: tuple[str, ...] = ()
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0
    stats: WindowStats = field(default_factory=WindowStats)


@dataclass(slots=True, unsafe_hash=True)
class RequestRecord:
    """One finished request, for the console's request log.

    Treat it as immutable (it is hashed: the console caches its rendered cells per record). It is not
    ``frozen`` only because a frozen dataclass sets each field through ``object.__setattr__``: 1.7 µs per
    request against 0.25 µs, on the request path.
    """

    ts: float
    api: str
    model: str
    node: str
    status: int
    ttft_s: float | None
    tok_s: float | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    queue_s: float = 0.0
    stream: bool = False


@dataclass(frozen=True, slots=True)
class FleetTotals:
    """Gateway-wide figures for the console header."""

    req_s: float = 0.0
    tok_s: float = 0.0
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    queued: int = 0


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """One gateway of a cluster, as its Redis heartbeat last said."""

    name: str
    address: str
    heartbeat: float
    """Wall-clock time of its last heartbeat."""
    me: bool = False
    """Whether this is the gateway the snapshot comes from."""


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds one node's lifecycle lease (only while a gateway loads, unloads or restarts there)."""

    node: str
    holder: str
    """The gateway's name; "" when nobody holds it."""
    token: int = 0
    """The holder's fencing token (grows with every grant of this node's lease)."""


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The gateways sharing the fleet through Redis (``[cluster] redis_url``)."""

    name: str
    """This gateway's name."""
    store_up: bool
    """Whether Redis answers; False: read-only lifecycle (loaded models serve, the rest waits)."""
    gateways: tuple[GatewayInfo, ...] = ()
    leases: tuple[LeaseInfo, ...] = ()

    @property
    def read_only(self) -> bool:
        """Whether this gateway may not load, unload, evict or restart anything now."""
        return not self.store_up


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """The whole fleet at one moment."""

    taken_at: float
    started_at: float
    gateway: str
    """The gateway's listen address (`host:port`)."""
    nodes: tuple[NodeSnapshot, ...] = ()
    models: tuple[ModelView, ...] = ()
    requests: tuple[RequestRecord, ...] = ()
    """Recent requests, newest first (bounded)."""
    totals: FleetTotals = field(default_factory=FleetTotals)
    strategy: str = "lru"
    cluster: ClusterView | None = None
    """The other gateways and the node leases; None for a single gateway (no `[cluster] redis_url`)."""

    def node(self, name: str) -> NodeSnapshot | None:
        """A node by name."""
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    def model(self, model_id: str) -> ModelView | None:
        """A catalogue entry by id."""
        for model in self.models:
            if model.id == model_id:
                return model
        return None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data (used by ``GET /admin/fleet`` and ``cortex status --json``)."""
        data = dataclasses.asdict(self)
        for node, raw in zip(self.nodes, data["nodes"], strict=True):
            raw["vram_free_mb"] = node.vram_free_mb
            raw["cycles_to_defrag"] = node.cycles_to_defrag
        return data
