"""Pure functions from a :class:`~cortex.engine.FleetSnapshot` to the cells the dashboard shows.

Dolphie's shape: nothing here touches a widget, a theme or the clock. Each function takes the snapshot and
the time to render against and returns plain tuples, so a redraw is "compute rows, diff against what is
shown, update the cells that changed", and every column is testable without running the app. Colours are
named by *tone* (``success``, ``warning``, ``error``, ``muted``, ``accent``); the table widget maps a tone
to a component class styled with theme variables in ``cortex.tcss``.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cortex.engine import (
    FleetSnapshot,
    ModelView,
    NodeSnapshot,
    NodeStatus,
    RequestRecord,
    SlotState,
    WindowStats,
)
from cortex.tui import fmt

__all__ = [
    "MODEL_COLUMNS",
    "MODEL_SORTS",
    "NODE_COLUMNS",
    "NODE_SORTS",
    "REQUEST_COLUMNS",
    "Cell",
    "ColumnSpec",
    "ModelItem",
    "NodeItem",
    "Row",
    "Selection",
    "cell",
    "header_line",
    "model_item_cells",
    "model_items",
    "model_rows",
    "node_item_cells",
    "node_items",
    "node_rows",
    "request_rows",
    "selection_stats",
    "spark_captions",
    "vram_bar",
]

Span = tuple[str, str]
"""A run of text and its tone ("" = the table's own colour)."""
Cell = tuple[Span, ...]
"""One table cell (or one line of text) as toned runs."""
Row = tuple[str, tuple[Cell, ...]]
"""A row's identity (node name, model id...) and its cells."""

STATUS_TONE: dict[NodeStatus, str] = {
    NodeStatus.UP: "success",
    NodeStatus.DRAINING: "warning",
    NodeStatus.RESTARTING: "warning",
    NodeStatus.DOWN: "error",
    NodeStatus.UNKNOWN: "muted",
}
STATE_TONE = {"loaded": "success", "loading": "warning", "unloaded": "muted"}
REQUEST_LOG_LIMIT = 30
"""Rows the request log shows at most (the engine bounds its own list too)."""


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A table column: its key, header, width in cells, and whether it takes the width left over."""

    key: str
    label: str
    width: int
    """The fewest cells the column gets; fleet tables widen it to its content when there is room."""
    flex: bool = False
    right: bool = False
    trim: bool = False
    """A model id: when it does not fit, its ``org/`` goes before its name is cut."""
    short: str = ""
    """The header when ``label`` does not fit the column (a narrow terminal)."""


@dataclass(frozen=True, slots=True)
class Selection:
    """What the operator has selected: a node or a model, by name."""

    kind: Literal["node", "model"]
    key: str


def cell(text: str, tone: str = "") -> Cell:
    """A cell of one run."""
    return ((text, tone),)


NODE_COLUMNS = (
    ColumnSpec("node", "node", 10),
    ColumnSpec("status", "status", 8),
    ColumnSpec("vram", "VRAM used/total", 17),
    ColumnSpec("models", "loaded models", 8, flex=True),
    ColumnSpec("in_flight", "busy", 4, right=True),
    ColumnSpec("defrag", "defrag", 6, right=True),
    ColumnSpec("agent", "agent", 8),
)
"""The minimum widths; the fleet tables widen each column to its content when there is room."""
MODEL_COLUMNS = (
    ColumnSpec("model", "model", 12, flex=True, trim=True),
    ColumnSpec("nodes", "node(s)", 10),
    ColumnSpec("state", "state", 8),
    ColumnSpec("pin", "pin", 3),
    ColumnSpec("vram", "VRAM", 5, right=True),
    ColumnSpec("in_flight", "busy", 4, right=True),
    ColumnSpec("queued", "queue", 5, right=True),
    ColumnSpec("loads", "loads/h", 4, right=True, short="ld/h"),
    ColumnSpec("last_used", "used", 5, right=True),
    ColumnSpec("tok_s", "tok/s", 5, right=True),
    ColumnSpec("ttft", "TTFT", 5, right=True),
)
"""At 80 columns the model id gets 13 cells (its ``org/`` goes first) and ``loads/h`` reads ``ld/h``; the rest
always shows."""
REQUEST_COLUMNS = (
    ColumnSpec("time", "time", 8),
    ColumnSpec("api", "api", 9),
    ColumnSpec("model", "model", 10, flex=True),
    ColumnSpec("node", "node", 10),
    ColumnSpec("status", "st", 3, right=True),
    ColumnSpec("ttft", "TTFT", 5, right=True),
    ColumnSpec("tok_s", "tok/s", 5, right=True),
    ColumnSpec("tokens", "tokens", 9, right=True),
    ColumnSpec("latency", "took", 6, right=True),
)


def header_line(
    snap: FleetSnapshot, now: float, *, address: str, read_only: bool, link: str = "", metrics: str = ""
) -> Cell:
    """The one-line header: where the gateway listens, uptime, throughput and trouble.

    Args:
        snap: the fleet.
        now: the time to render ages against.
        address: the gateway's URL.
        read_only: whether the console refuses actions.
        link: what is wrong with the link to a remote gateway (``cortex attach``), "" when it is fine.
        metrics: where Prometheus scrapes (shown last: the first thing a narrow terminal cuts).
    """
    totals = snap.totals
    spans: list[Span] = [(" cortex ", "accent")]
    if read_only:
        spans.append(("read-only ", "warning"))
    if link:
        spans.append((f"{link} ", "error"))
    spans += [
        (address or snap.gateway, ""),
        (f"  up {fmt.duration(now - snap.started_at)}", ""),
        (f"  {fmt.rate(totals.req_s)} req/s", ""),
        (f"  {fmt.rate(totals.tok_s)} tok/s", ""),
        (f"  {totals.errors} errors", "error" if totals.errors else "muted"),
        (f"  {totals.in_flight} in flight", ""),
    ]
    if totals.queued:
        spans.append((f", {totals.queued} queued", "warning"))
    cluster = snap.cluster
    if cluster is not None:
        if cluster.store_up:
            others = [g for g in cluster.gateways if not g.me]
            ages = ", ".join(f"{g.name} {fmt.short_age(g.heartbeat, now)}" for g in others) or "no other"
            spans.append((f"  cluster {cluster.name} + {ages}", "muted"))
        else:
            spans.append(("  redis down: read-only", "error"))
    if metrics:
        host = (address or "").rsplit(":", 1)[0]
        if host and metrics.startswith(host + ":"):
            metrics = metrics[len(host) :]  # same host as the gateway: ":9100/metrics" says it
        spans.append((f"  metrics {metrics}", "muted"))
    return tuple(spans)


def pressure_tone(used: int, total: int) -> str:
    """How alarming a memory use is."""
    frac = used / total if total > 0 else 0.0
    return "success" if frac < 0.7 else "warning" if frac < 0.9 else "error"


def vram_bar(used: int, total: int, width: int = 6, *, approx: bool = False) -> Cell:
    """``████░░ 23.1/48.0G`` coloured by pressure (``~`` before an estimate)."""
    frac = min(1.0, max(0.0, used / total)) if total > 0 else 0.0
    filled = round(frac * width)
    return (
        ("█" * filled, pressure_tone(used, total)),
        ("░" * (width - filled), "muted"),
        (" ~" if approx else " ", ""),
        (fmt.vram(used, total), ""),
    )


def _node_models(node: NodeSnapshot) -> Cell:
    """The models loaded on a node; loads in progress (or stuck) only as a count after them."""
    loaded = [fmt.short_model(slot.model_id) for slot in node.slots if slot.state is SlotState.LOADED]
    busy = sum(slot.state in (SlotState.LOADING, SlotState.STUCK) for slot in node.slots)
    spans: list[Span] = [(", ".join(loaded), "")] if loaded else [("none", "muted")]
    if busy:
        spans.append((f" +{busy} loading", "warning"))
    return tuple(spans)


def _agent(node: NodeSnapshot, now: float) -> Cell:
    agent = node.agent
    if agent is None:
        return cell("none", "muted")
    seen = fmt.short_age(agent.seen_at, now)
    return cell(f"ok {seen}", "success") if agent.fresh else cell(f"stale {seen}", "warning")


def _lease_mark(node: str, holders: Mapping[str, str] | None) -> str:
    """`` @gw-b`` after a node's status while a gateway holds its lifecycle lease (clusters only)."""
    holder = holders.get(node, "") if holders else ""
    return f" @{holder}" if holder else ""


def node_cells(node: NodeSnapshot, now: float, lease_holders: Mapping[str, str] | None = None) -> tuple[Cell, ...]:
    """The cells of one node's row (``lease_holders``: node → the gateway acting on it, in a cluster)."""
    left = node.cycles_to_defrag
    vram = vram_bar(node.vram_used_mb, node.vram_total_mb, approx=node.vram_source == "estimate")
    return (
        cell(node.name),
        cell(node.status.value + _lease_mark(node.name, lease_holders), STATUS_TONE.get(node.status, "")),
        vram,
        _node_models(node),
        cell(str(node.in_flight), "" if node.in_flight else "muted"),
        cell("off", "muted") if left is None else cell(str(left), "warning" if left <= 5 else ""),
        _agent(node, now),
    )


_STATUS_ORDER = {"down": 0, "restarting": 1, "draining": 2, "unknown": 3, "up": 4}
NODE_SORTS: dict[str, Callable[[NodeSnapshot], Any]] = {
    "name": lambda n: n.name,
    "status": lambda n: (_STATUS_ORDER.get(n.status.value, 9), n.name),
    "vram": lambda n: (-(n.vram_used_mb / n.vram_total_mb if n.vram_total_mb else 0.0), n.name),
    "in-flight": lambda n: (-n.in_flight, n.name),
}
"""Sort orders of the nodes table, cycled by `s`."""


def _matches(needle: str, names: Iterable[str]) -> bool:
    return not needle or any(needle in name.lower() for name in names)


def _loaded_ids(node: NodeSnapshot) -> Iterable[str]:
    return (slot.model_id for slot in node.slots if slot.state is SlotState.LOADED)


NodeItem = tuple[NodeSnapshot, float, str]
"""What one node's row is made from: the node, the time to render ages against, its lease holder ("" none)."""


def node_items(snap: FleetSnapshot, now: float, *, needle: str = "", sort: str = "name") -> list[tuple[str, NodeItem]]:
    """The nodes table's rows unformatted: filtered by name or loaded model, in the chosen order.

    The table formats only the rows it shows (:func:`node_item_cells`), and each row again only when its
    item changed: an item compares equal exactly when its cells would.
    """
    needle = needle.lower()
    nodes = [n for n in snap.nodes if _matches(needle, (n.name, *_loaded_ids(n)))]
    nodes.sort(key=NODE_SORTS.get(sort, NODE_SORTS["name"]))
    holders = {lease.node: lease.holder for lease in snap.cluster.leases} if snap.cluster is not None else {}
    return [(n.name, (n, now, holders.get(n.name, ""))) for n in nodes]


def node_item_cells(item: NodeItem) -> tuple[Cell, ...]:
    """The cells of a row of :func:`node_items`."""
    node, now, holder = item
    return node_cells(node, now, {node.name: holder} if holder else None)


def node_rows(snap: FleetSnapshot, now: float, *, needle: str = "", sort: str = "name") -> list[Row]:
    """Rows of the nodes table: filtered by name or loaded model, in the chosen order."""
    return [(key, node_item_cells(item)) for key, item in node_items(snap, now, needle=needle, sort=sort)]


def _state(model: ModelView, now: float) -> Cell:
    if model.state == "loading" and model.loading_since is not None:
        return cell(f"loading {fmt.short_duration(now - model.loading_since)}", "warning")
    return cell(model.state, STATE_TONE.get(model.state, "warning"))


def _where(model: ModelView) -> Cell:
    if model.nodes:
        return cell(", ".join(model.nodes))
    if model.loading_on:
        return cell(model.loading_on, "warning")
    if len(model.listed_on) > 1:  # where it could go: the first node says enough in a narrow column
        return ((model.listed_on[0], "muted"), (f" +{len(model.listed_on) - 1}", "muted"))
    return cell(", ".join(model.listed_on), "muted")


def model_cells(model: ModelView, now: float, loads: int = 0) -> tuple[Cell, ...]:
    """The cells of one model's row (``loads``: how many times cortex loaded it in the last hour)."""
    stats = model.stats
    return (
        cell(model.id),
        _where(model),
        _state(model, now),
        cell("●", "accent") if model.pinned else cell(""),
        cell(fmt.mb(model.vram_mb), "" if model.vram_mb else "muted"),
        cell(str(model.in_flight), "" if model.in_flight else "muted"),
        cell(str(model.queued), "warning" if model.queued else "muted"),
        cell(str(loads), "" if loads else "muted"),
        cell(fmt.short_age(model.last_used, now), "" if model.last_used else "muted"),
        cell(fmt.rate(stats.tok_s)),
        cell(fmt.seconds(stats.ttft_p50)),
    )


_STATE_ORDER = {"loaded": 0, "loading": 1, "unloaded": 2}
MODEL_SORTS: dict[str, Callable[[ModelView], Any]] = {
    "id": lambda m: m.id.casefold(),
    "state": lambda m: (_STATE_ORDER.get(m.state, 1), m.id.casefold()),
    "vram": lambda m: (-(m.vram_mb or 0), m.id.casefold()),
    "in-flight": lambda m: (-(m.in_flight + m.queued), m.id.casefold()),
    "last used": lambda m: (-m.last_used, m.id.casefold()),
    "tok/s": lambda m: (-m.stats.tok_s, m.id.casefold()),
}
"""Sort orders of the models table, cycled by `s`."""


ModelItem = tuple[ModelView, float, int]
"""What one model's row is made from: the model, the time to render ages against, its loads in the last hour."""


def model_items(
    snap: FleetSnapshot,
    now: float,
    *,
    needle: str = "",
    sort: str = "id",
    loads: Mapping[str, int] | None = None,
) -> list[tuple[str, ModelItem]]:
    """The models table's rows unformatted: filtered by id or node, in the chosen order.

    A catalogue of 64 nodes x 32 models is 2,048 rows of which a terminal shows about forty: the table
    formats only those (:func:`model_item_cells`), so a redraw costs the filter and the sort, not 2,048
    rows of figures. ``loads`` is the engine's count of loads per model in the last hour.
    """
    needle = needle.lower()
    models = [m for m in snap.models if _matches(needle, (m.id, *m.listed_on, *m.nodes))]
    models.sort(key=MODEL_SORTS.get(sort, MODEL_SORTS["id"]))
    counts = loads or {}
    return [(m.id, (m, now, counts.get(m.id, 0))) for m in models]


def model_item_cells(item: ModelItem) -> tuple[Cell, ...]:
    """The cells of a row of :func:`model_items`."""
    return model_cells(*item)


def model_rows(
    snap: FleetSnapshot,
    now: float,
    *,
    needle: str = "",
    sort: str = "id",
    loads: Mapping[str, int] | None = None,
) -> list[Row]:
    """Rows of the models table: filtered by id or node, in the chosen order."""
    items = model_items(snap, now, needle=needle, sort=sort, loads=loads)
    return [(key, model_item_cells(item)) for key, item in items]


def _status_tone(status: int) -> str:
    return "success" if status < 400 else "warning" if status < 500 else "error"


@functools.lru_cache(maxsize=4 * REQUEST_LOG_LIMIT)
def request_cells(rec: RequestRecord, tz: dt.tzinfo | None) -> tuple[Cell, ...]:
    """The cells of one request-log line (records are immutable, so each is formatted once)."""
    return (
        cell(fmt.clock_time(rec.ts, tz), "muted"),
        cell(rec.api),
        cell(fmt.short_model(rec.model)),
        cell(rec.node or fmt.DASH, "" if rec.node else "muted"),
        cell(str(rec.status), _status_tone(rec.status)),
        cell(fmt.seconds(rec.ttft_s)),
        cell(fmt.rate(rec.tok_s)),
        cell(f"{rec.prompt_tokens}→{rec.completion_tokens}"),
        cell(fmt.seconds(rec.latency_s)),
    )


def request_rows(requests: Sequence[RequestRecord], tz: dt.tzinfo | None, *, needle: str = "") -> list[Row]:
    """The request log, newest first, bounded, filtered by model or node like the tables.

    Rows are keyed by position (``r0`` is the newest): the log keeps each painted line by its cells, not
    by its key (:mod:`cortex.tui.widgets.request_log`).
    """
    needle = needle.lower()
    rows: list[Row] = []
    for rec in requests:
        if _matches(needle, (rec.model, rec.node)):
            rows.append((f"r{len(rows)}", request_cells(rec, tz)))
            if len(rows) >= REQUEST_LOG_LIMIT:
                break
    return rows


def selection_stats(snap: FleetSnapshot, selection: Selection | None) -> tuple[str, WindowStats] | None:
    """The name and window figures behind the sparklines for a selection (None when it is gone)."""
    if selection is None:
        return None
    if selection.kind == "node":
        node = snap.node(selection.key)
        return None if node is None else (node.name, node.stats)
    model = snap.model(selection.key)
    return None if model is None else (fmt.short_model(model.id), model.stats)


def spark_captions(selected: tuple[str, WindowStats] | None) -> tuple[tuple[Cell, Cell], tuple[Cell, Cell]]:
    """The two-line captions of the tok/s and TTFT sparklines for a selection's figures."""
    if selected is None:
        hint = cell("no selection", "muted")
        return (cell("tok/s", "muted"), hint), (cell("TTFT", "muted"), hint)
    name, stats = selected
    tok = ((("tok/s ", "muted"), (name, "accent")), cell(f"{fmt.rate(stats.tok_s)} tok/s"))
    ttft = (
        (("TTFT ", "muted"), (name, "accent")),
        cell(f"p50 {fmt.seconds(stats.ttft_p50)} p95 {fmt.seconds(stats.ttft_p95)}"),
    )
    return tok, ttft
