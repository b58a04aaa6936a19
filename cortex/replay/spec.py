"""What a replay runs on: a trace of requests and a fleet, read from files and checked up front.

A trace line needs only ``t`` (Unix seconds), ``model`` and ``dur`` (seconds the node was busy with it), so
a recording (``[gateway] record``) and a hand-written or generated trace are read the same way; other keys
are ignored. A fleet is ``{"nodes": [{"name", "vram_mb", "models", "pinned"}], "models": [{"id", "mb",
"load_s", "priority"}]}``. Bad input is one :class:`SpecError` naming the file, line and key, never a
traceback halfway through a replay.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cortex.config import Settings

__all__ = [
    "FleetSpec",
    "ModelSpec",
    "NodeSpec",
    "Request",
    "SpecError",
    "fleet_from_json",
    "fleet_from_settings",
    "read_fleet",
    "read_trace",
]


class SpecError(ValueError):
    """A trace or fleet file cannot be used (the message names where and why)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a trace."""

    t: float
    """Arrival, in seconds (Unix time in recordings; any origin works)."""
    model: str
    dur: float
    """Seconds the node was busy with it (the lease is held this long once granted)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model of the simulated fleet."""

    id: str
    mb: int
    """Its footprint in MiB (what a load takes and an unload frees)."""
    load_s: float = 30.0
    """Seconds a load takes on any node."""
    priority: int = 0


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node of the simulated fleet."""

    name: str
    vram_mb: int
    models: tuple[str, ...]
    """The models the node lists (loadable there)."""
    pinned: tuple[str, ...] = ()
    """Loaded from the start and never evicted (their loads are not counted)."""


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The whole simulated fleet, plus eviction settings that differ from the defaults."""

    nodes: tuple[NodeSpec, ...]
    models: tuple[ModelSpec, ...]
    eviction: Mapping[str, Any] = field(default_factory=dict)
    """``[eviction]`` keys (``headroom_mb``, ``min_resident_s``...) for the replayed engine; ``strategy`` is
    set per replay."""

    def model(self, model_id: str) -> ModelSpec | None:
        """The spec of a model, if the fleet has one."""
        for spec in self.models:
            if spec.id == model_id:
                return spec
        return None


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise SpecError(f"{where}: must be {'positive' if positive else 'zero or more'}, got {value!r}")
    return float(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of model ids")
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))


def parse_trace(lines: Iterable[str], source: str = "trace") -> list[Request]:
    """Requests from JSON lines (blank lines skipped), sorted by arrival (stable for equal times)."""
    out: list[Request] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SpecError(f"{where}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise SpecError(f"{where}: expected an object with t, model and dur")
        for key in ("t", "model", "dur"):
            if key not in row:
                raise SpecError(f"{where}: missing {key!r}")
        out.append(
            Request(
                _number(row["t"], f"{where}: t"),
                _text(row["model"], f"{where}: model"),
                _number(row["dur"], f"{where}: dur"),
            )
        )
    out.sort(key=lambda r: r.t)
    return out


def read_trace(path: Path) -> list[Request]:
    """The requests of a JSONL trace file.

    Raises:
        SpecError: the file is unreadable, or a line is not a request.
    """
    try:
        with path.open(encoding="utf-8") as fh:
            return parse_trace(fh, str(path))
    except OSError as exc:
        raise SpecError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason})") from None


def fleet_from_json(data: Any, source: str = "fleet") -> FleetSpec:
    """A fleet from its parsed JSON (see the module docstring), checked for consistency.

    Raises:
        SpecError: a key is missing or wrong, a node lists or pins a model with no spec, names repeat.
    """
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected an object with nodes and models")
    raw_models = data.get("models")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_models, list) or not isinstance(raw_nodes, list) or not raw_nodes:
        raise SpecError(f"{source}: expected a non-empty list 'nodes' and a list 'models'")
    models: list[ModelSpec] = []
    for i, m in enumerate(raw_models):
        where = f"{source}: models[{i}]"
        if not isinstance(m, dict):
            raise SpecError(f"{where}: expected an object")
        priority = m.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise SpecError(f"{where}.priority: expected an integer, got {priority!r}")
        models.append(
            ModelSpec(
                id=_text(m.get("id"), f"{where}.id"),
                mb=int(_number(m.get("mb"), f"{where}.mb", positive=True)),
                load_s=_number(m.get("load_s", 30.0), f"{where}.load_s"),
                priority=priority,
            )
        )
    known = {m.id for m in models}
    if len(known) != len(models):
        raise SpecError(f"{source}: models: an id appears twice")
    nodes: list[NodeSpec] = []
    for i, n in enumerate(raw_nodes):
        where = f"{source}: nodes[{i}]"
        if not isinstance(n, dict):
            raise SpecError(f"{where}: expected an object")
        node = NodeSpec(
            name=_text(n.get("name"), f"{where}.name"),
            vram_mb=int(_number(n.get("vram_mb"), f"{where}.vram_mb", positive=True)),
            models=_names(n.get("models"), f"{where}.models"),
            pinned=_names(n.get("pinned"), f"{where}.pinned"),
        )
        for model_id in (*node.models, *node.pinned):
            if model_id not in known:
                raise SpecError(f"{where}: {model_id!r} has no entry in models (its mb and load_s)")
        missing = [p for p in node.pinned if p not in node.models]
        if missing:
            raise SpecError(f"{where}.pinned: {missing[0]!r} is not in the node's models")
        nodes.append(node)
    if len({n.name for n in nodes}) != len(nodes):
        raise SpecError(f"{source}: nodes: a name appears twice")
    eviction = data.get("eviction", {})
    if not isinstance(eviction, dict):
        raise SpecError(f"{source}: eviction: expected an object of [eviction] keys")
    return FleetSpec(tuple(nodes), tuple(models), dict(eviction))


def read_fleet(path: Path) -> FleetSpec:
    """A fleet from a JSON file.

    Raises:
        SpecError: the file is unreadable, not JSON, or not a fleet.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SpecError(f"{path}: not JSON ({exc})") from None
    return fleet_from_json(data, str(path))


def fleet_from_settings(
    settings: Settings,
    footprints: Mapping[str, int],
    requests: Sequence[Request],
    *,
    load_s: float,
    load_times: Mapping[str, float] | None = None,
    listed: Mapping[str, Iterable[str]] | None = None,
    pinned: Mapping[str, Iterable[str]] | None = None,
    vram: Mapping[str, int] | None = None,
) -> FleetSpec:
    """A fleet from a config and learned footprints (``cortex replay --fleet-from``).

    Sizes come from ``[[models]].vram_mb``, else the footprints cortex learned; each node is taken to list
    every model that fits it, its pins included.

    The optional mappings put what a running gateway knows in place of the config's guesses (the
    console's what-if, :mod:`cortex.replay.live`); a node missing from one keeps the config's value.

    Args:
        settings: the config: nodes, pins, ``[[models]]`` sizes and priorities, headroom.
        footprints: learned sizes (MiB) by model; ``[[models]].vram_mb`` wins over them.
        requests: the trace (every model it asks for needs a size).
        load_s: the load time of a model ``load_times`` does not name.
        load_times: measured load seconds by model.
        listed: node → the models it lists (else every model that fits it).
        pinned: node → its pins as they are now (else the config's).
        vram: node → its memory as it reports it (else ``vram_mb``).

    Raises:
        SpecError: a model the trace asks for has no known footprint.
    """
    mb = dict(footprints)
    for facts in settings.models:
        if facts.vram_mb:
            mb[facts.id] = facts.vram_mb
    unknown = sorted({r.model for r in requests} - mb.keys())
    if unknown:
        raise SpecError(
            f"no footprint known for {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}: "
            "set [[models]].vram_mb, or write a FLEET.json"
        )
    priorities = {m.id: m.priority for m in settings.models}
    nodes = []
    for n in settings.nodes:
        total = (vram or {}).get(n.name) or n.vram_mb
        pins = set((pinned or {}).get(n.name, n.pinned))
        usable = total - settings.eviction.headroom_mb
        names = set((listed or {}).get(n.name, mb))
        fits = {m for m in names if m in mb and mb[m] <= usable}
        nodes.append(NodeSpec(n.name, total, tuple(sorted(fits | (pins & mb.keys()))), tuple(sorted(pins & mb.keys()))))
    if not nodes:
        raise SpecError("the config has no [[nodes]]")
    times = load_times or {}
    models = tuple(ModelSpec(m, size, times.get(m, load_s), priorities.get(m, 0)) for m, size in sorted(mb.items()))
    return FleetSpec(tuple(nodes), models)
