"""``cortex replay TRACE.jsonl --fleet FLEET.json``: the strategies side by side on a trace.

It parses its own flags (like ``agent`` and ``sim``): it needs no running gateway and, with ``--fleet``, no
config either. ``--fleet-from cortex.toml`` builds the fleet from a config instead: its nodes and pins, its
eviction settings, and footprints from ``[[models]].vram_mb`` or, failing that, the ones cortex learned
(the state file); such a node is taken to list every model that fits it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cortex.replay.run import STRATEGIES, ReplayResult, replay
from cortex.replay.spec import SpecError, fleet_from_settings, read_fleet, read_trace

__all__ = ["add_replay_arguments", "fleet_from_settings", "run_replay"]

_COLUMNS = (
    "requests",
    "loads",
    "unloads",
    "gb_loaded",
    "waited",
    "p50_wait_s",
    "p95_wait_s",
    "max_wait_s",
    "lower_bound_loads",
)
_BARS = "▁▂▃▄▅▆▇█"


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``cortex replay``."""
    p.add_argument("trace", type=Path, help="JSON lines with t, model, dur (a [gateway] record file works)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--fleet", type=Path, metavar="FLEET.json", help="nodes and models to replay on")
    source.add_argument("--fleet-from", type=Path, metavar="cortex.toml", help="build the fleet from a config")
    p.add_argument("--strategy", choices=(*STRATEGIES, "all"), default="all", help="eviction strategy (default all)")
    p.add_argument("--json", action="store_true", help="one JSON object keyed by strategy")
    p.add_argument("--load-s", type=float, default=30.0, help="load time of every model with --fleet-from (30)")
    p.add_argument("--state", type=Path, help="state file with learned footprints (default: cortex's own)")


def _sparkline(values: list[float]) -> str:
    top = max(values, default=0.0)
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in values)


def _print_table(results: dict[str, ReplayResult], trace: Path, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"cortex replay {trace.name} ({seconds:.1f} s)")
    table.add_column("")
    for name in results:
        table.add_column(name, justify="right")
    rows = {name: r.as_dict() for name, r in results.items()}
    for column in (*_COLUMNS, "failed"):
        table.add_row(column, *(str(row[column]) for row in rows.values()))
    console.print(table)
    hours = max((len(r.hourly_wait_s) for r in results.values()), default=0)
    if console.is_terminal and console.encoding.lower().startswith("utf") and 0 < hours <= console.width - 12:
        console.print("seconds waited per hour (same scale):")
        top = max((max(r.hourly_wait_s, default=0.0) for r in results.values()), default=0.0)
        for name, result in results.items():
            scaled = [*result.hourly_wait_s, top]  # the shared top keeps the lines comparable
            console.print(f"  {name:<9} {_sparkline(scaled)[:-1]}")


def run_replay(args: argparse.Namespace) -> int:
    """Run ``cortex replay``; 2 on a bad trace, fleet or config."""
    try:
        requests = read_trace(args.trace)
        if args.fleet is not None:
            fleet = read_fleet(args.fleet)
            base = None
        else:
            from pydantic import ValidationError

            from cortex.config import ConfigFileError, format_validation_error, load_settings
            from cortex.engine.fleet import StateStore

            try:
                base = load_settings(args.fleet_from if args.fleet_from.is_file() else None)
            except ConfigFileError as exc:
                raise SpecError(str(exc)) from None
            except ValidationError as exc:
                raise SpecError("; ".join(format_validation_error(exc))) from None
            if not args.fleet_from.is_file():
                raise SpecError(f"{args.fleet_from}: no such file")
            store = StateStore(args.state)
            fleet = fleet_from_settings(base, store.footprints, requests, load_s=args.load_s)
    except SpecError as exc:
        sys.stderr.write(f"cortex replay: {exc}\n")
        return 2
    strategies = STRATEGIES if args.strategy == "all" else (args.strategy,)
    started = time.perf_counter()
    results = {s: replay(requests, fleet, s, base=base) for s in strategies}
    seconds = time.perf_counter() - started
    if args.json:
        sys.stdout.write(json.dumps({name: r.as_dict() for name, r in results.items()}, indent=1) + "\n")
    else:
        _print_table(results, args.trace, seconds)
    return 0
