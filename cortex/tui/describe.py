"""Pure functions that put a node, a model or an engine event into words.

The detail screen and the notifications read these, so both say the same thing about the same object.
Like :mod:`cortex.tui.render` they return toned runs and take the clock as an argument, which keeps the
detail screen a thin widget and these texts testable on their own.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from cortex.engine import FleetSnapshot, ModelSlot, ModelView, NodeSnapshot, WindowStats, commands, events
from cortex.engine.facade import WhatIf, WhatIfRow
from cortex.tui import fmt
from cortex.tui.render import STATE_TONE, STATUS_TONE, Cell, Span, cell, vram_bar

__all__ = ["Notice", "command_label", "event_notice", "model_lines", "node_lines", "whatif_lines"]

Severity = Literal["information", "warning", "error"]
SLOT_HEADER = "  {first:<28} state       since   VRAM busy   used"
WHATIF_HEADER = "  {name:<14}{requests:>9}{loads:>8}{p95:>10}{max:>10}{failed:>8}"
WHATIF_HINT = "w: what if? replay the last hour's traffic under each strategy (lru, priority, cost)"


@dataclass(frozen=True, slots=True)
class Notice:
    """A notification to show for an engine event."""

    message: str
    severity: Severity = "information"


def _kv(label: str, *value: Span) -> Cell:
    return ((f"  {label:<14}", "muted"), *value)


def _title(text: str) -> Cell:
    return cell(text, "accent")


def _stats_lines(stats: WindowStats) -> list[Cell]:
    return [
        _kv("throughput", (f"{fmt.rate(stats.req_s)} req/s, {fmt.rate(stats.tok_s)} tok/s", "")),
        _kv("decode", (f"{fmt.rate(stats.decode_tok_s)} tok/s per request (median)", "")),
        _kv("TTFT", (f"p50 {fmt.seconds(stats.ttft_p50)}, p95 {fmt.seconds(stats.ttft_p95)}", "")),
        _kv("errors", (str(stats.errors), "error" if stats.errors else "")),
    ]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _slot_line(slot: ModelSlot, now: float) -> Cell:
    state = slot.state.value
    return (
        (f"  {_clip(slot.model_id, 28):<28} ", ""),
        (f"{state:<10}", STATE_TONE.get(state, "warning")),
        (f"{fmt.short_duration(now - slot.state_since):>7}", ""),
        (f"{fmt.mb(slot.vram_mb):>7}", ""),
        (f"{slot.in_flight:>5}", ""),
        (f"{fmt.short_age(slot.last_used, now):>7}", ""),
        (" pinned" if slot.pinned else "", "accent"),
    )


def node_lines(node: NodeSnapshot, now: float, tz: dt.tzinfo | None) -> list[Cell]:
    """Every field of a node, its agent and GPUs, and its slots."""
    left = node.cycles_to_defrag
    lines: list[Cell] = [
        _kv("endpoint", (node.endpoint, "")),
        _kv("status", (node.status.value, STATUS_TONE.get(node.status, ""))),
        _kv("VRAM", *vram_bar(node.vram_used_mb, node.vram_total_mb, 20)),
        _kv(
            "",
            (
                f"free {fmt.mb(node.vram_free_mb)} after {fmt.mb(node.headroom_mb)} headroom; "
                f"source {node.vram_source}",
                "muted",
            ),
        ),
        _kv("in flight", (str(node.in_flight), "")),
        _kv(
            "defrag",
            (
                f"{node.cycles} cycles"
                + ("" if left is None else f", {left} left of {node.defrag_after}")
                + (" (off)" if left is None else ""),
                "",
            ),
        ),
        _kv("last poll", (fmt.age(node.last_poll, now) + (" ago" if node.last_poll else ""), "")),
        _kv("failures", (str(node.failures), "error" if node.failures else "")),
        _kv("last error", (node.last_error or fmt.DASH, "error" if node.last_error else "muted")),
        _kv("mistralrs", (node.version or "version unknown", "")),
        *_stats_lines(node.stats),
        (),
        _title("agent"),
    ]
    agent = node.agent
    if agent is None:
        lines.append(_kv("agent", ("no agent has reported", "muted")))
    else:
        lines += [
            _kv(
                "seen",
                (f"{fmt.age(agent.seen_at, now)} ago at {fmt.clock_time(agent.seen_at, tz)}", ""),
                ("  fresh" if agent.fresh else "  stale", "success" if agent.fresh else "warning"),
            ),
            _kv("version", (agent.version or fmt.DASH, "")),
            _kv("mistralrs up", ({True: "yes", False: "no", None: "unknown"}[agent.mistralrs_up], "")),
            _kv("NVML", ("yes" if agent.nvml else f"no {agent.gpu_error}".rstrip(), "")),
        ]
        for gpu in agent.gpus:
            util = "" if gpu.util_pct is None else f"  util {gpu.util_pct:.0f}%"
            lines.append(
                _kv(
                    f"GPU {gpu.index}",
                    (f"{gpu.name}  ", ""),
                    *vram_bar(gpu.used_mb, gpu.total_mb, 12),
                    (util, ""),
                )
            )
        if agent.last_command:
            text = ", ".join(f"{k}={v}" for k, v in agent.last_command.items())
            lines.append(_kv("last command", (text, "")))
    lines += [
        (),
        _title("slots"),
        cell(SLOT_HEADER.format(first="model"), "muted"),
    ]
    lines += [_slot_line(slot, now) for slot in node.slots] or [cell("  none", "muted")]
    return lines


def model_lines(model: ModelView, snap: FleetSnapshot, now: float, loads: int = 0) -> list[Cell]:
    """Every field of a catalogue entry, and its slot on each node that lists it (``loads``: in the last hour)."""
    loading = fmt.DASH
    if model.loading_on:
        since = "" if model.loading_since is None else f" for {fmt.duration(now - model.loading_since)}"
        loading = f"on {model.loading_on}{since}"
    lines: list[Cell] = [
        _kv("state", (model.state, STATE_TONE.get(model.state, "warning"))),
        _kv("loaded on", (", ".join(model.nodes) or fmt.DASH, "")),
        _kv("listed on", (", ".join(model.listed_on) or fmt.DASH, "")),
        _kv("loading", (loading, "warning" if model.loading_on else "muted")),
        _kv(
            "pinned",
            ("yes" if model.pinned else "no", "accent" if model.pinned else ""),
            (f" on {', '.join(model.pinned_on)}" if model.pinned_on else "", ""),
        ),
        _kv("VRAM", (fmt.mb(model.vram_mb), "")),
        _kv("priority", (str(model.priority), "")),
        _kv("aliases", (", ".join(model.aliases) or fmt.DASH, "")),
        _kv("in flight", (f"{model.in_flight}, {model.queued} queued", "")),
        _kv("last used", (fmt.age(model.last_used, now), "")),
        _kv("loads", (f"{loads} in the last hour", "" if loads else "muted")),
        *_stats_lines(model.stats),
        (),
        _title("slots"),
        cell(SLOT_HEADER.format(first="node"), "muted"),
    ]
    for name in model.listed_on:
        node = snap.node(name)
        slot = None if node is None else node.slot(model.id)
        if slot is not None:
            line = _slot_line(slot, now)
            lines.append(((f"  {name:<28} ", ""), *line[1:]))
    return lines


def _whatif_row(row: WhatIfRow, label: str, tone: str = "") -> Cell:
    text = WHATIF_HEADER.format(
        name=_clip(label, 13),
        requests=row.requests,
        loads=row.loads,
        p95=fmt.seconds(row.p95_wait_s),
        max=fmt.seconds(row.max_wait_s),
        failed=row.failed if row.name != "live" else fmt.DASH,
    )
    return cell(text, tone)


def whatif_lines(result: WhatIf | None, *, running: bool, tz: dt.tzinfo | None) -> list[Cell]:
    """The what-if block of a detail screen: the hint, "replaying…", the comparison, or why there is none.

    The live row is what really happened in the window (loads cortex made, waits requests had); each
    strategy row is a replay of the same requests on the same fleet (:func:`cortex.replay.replay_all`).
    """
    if running:
        return [_title("what if · replaying the last hour under each strategy…")]
    if result is None:
        return [cell(WHATIF_HINT, "muted")]
    window = f"{fmt.clock_time(result.since, tz)} to {fmt.clock_time(result.until, tz)}"
    if result.error:
        return [_title(f"what if · {window}"), cell(f"  {result.error}", "warning"), cell(WHATIF_HINT, "muted")]
    head = WHATIF_HEADER.format(
        name="", requests="requests", loads="loads", p95="p95 wait", max="max wait", failed="failed"
    )
    lines: list[Cell] = [
        _title(f"what if · {window}, replayed in {fmt.seconds(result.seconds)} · w runs it again"),
        cell(head, "muted"),
    ]
    if result.live is not None:
        lines.append(_whatif_row(result.live, f"live ({result.strategy})", "accent"))
    best = min((r.loads for r in result.replayed), default=0)
    for row in result.replayed:
        lines.append(
            _whatif_row(
                row,
                row.name + (" (now)" if row.name == result.strategy else ""),
                "success" if row.loads == best else "",
            )
        )
    lines.append(cell("  replays start with only the pins loaded; live counts the loads cortex made", "muted"))
    return lines


def event_notice(event: events.Event) -> Notice | None:
    """What the operator should be told about an engine event (None: nothing, the tables show it)."""
    match event:
        case events.ModelLoadFailed(node=node, model=model, message=message):
            return Notice(f"Loading {model} on {node} failed: {message}", "error")
        case events.NodeWentDown(node=node, reason=reason):
            return Notice(f"Node {node} is down: {reason}", "error")
        case events.NodeWentUp(node=node):
            return Notice(f"Node {node} is up")
        case events.DefragStarted(node=node, cycles=cycles):
            return Notice(f"Defragmenting {node} after {cycles} eviction cycles", "warning")
        case events.DefragFinished(node=node, ok=ok, message=message):
            outcome = ("finished" if ok else "failed") + (f": {message}" if message else "")
            return Notice(f"Defrag of {node} {outcome}", "information" if ok else "error")
        case events.ModelLoaded(node=node, model=model, seconds=secs) if secs is not None:
            return Notice(f"{model} loaded on {node} in {fmt.duration(secs)}")
        case events.ModelUnloaded(node=node, model=model, reason="evict"):
            return Notice(f"{model} evicted from {node}")
        case events.ConfigReloaded(ok=False, message=message, errors=errors):
            return Notice("\n".join((message, *errors[1:4])), "error")
        case events.ConfigReloaded(message=message, restart_needed=restart) if restart:
            return Notice(message, "warning")
        case events.ConfigReloaded(message=message):
            return Notice(message)
    return None


def command_label(command: commands.Command) -> str:
    """A command in words, for the notification that reports its result."""
    match command:
        case commands.PinModel(model=model):
            return f"pin {model}"
        case commands.UnpinModel(model=model):
            return f"unpin {model}"
        case commands.LoadModel(model=model):
            return f"load {model}"
        case commands.UnloadModel(model=model, force=force):
            return f"unload {model}" + (" (force)" if force else "")
        case commands.DrainNode(node=node):
            return f"drain {node}"
        case commands.UndrainNode(node=node):
            return f"undrain {node}"
        case commands.RestartNode(node=node):
            return f"restart {node}"
    return type(command).__name__
