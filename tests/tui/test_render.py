"""The pure snapshot → cells functions: every column is checked here without running the app."""

from __future__ import annotations

import datetime as dt

import pytest

from cortex.engine import events
from cortex.tui import fmt
from cortex.tui.describe import event_notice, model_lines, node_lines
from cortex.tui.render import (
    REQUEST_LOG_LIMIT,
    Cell,
    Selection,
    header_line,
    model_rows,
    node_rows,
    request_rows,
    selection_stats,
    vram_bar,
)
from tests.tui.fakes import GEMMA, LLAMA, NOW, PHI, QWEN7, QWEN32, build_fleet, build_requests


def text(cell: Cell) -> str:
    return "".join(run for run, _ in cell)


def tones(cell: Cell) -> set[str]:
    return {tone for _, tone in cell if tone}


@pytest.mark.parametrize(
    ("secs", "expected"),
    [(0, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m"), (90000, "1d01h"), (-5, "0s")],
    ids=["zero", "seconds", "minutes", "hours", "days", "negative"],
)
def test_duration(secs: float, expected: str) -> None:
    assert fmt.duration(secs) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, fmt.DASH), (0.0, fmt.DASH), (3.4, "3.40"), (41.66, "41.7"), (812.4, "812")],
    ids=["none", "zero", "small", "tens", "hundreds"],
)
def test_rate(value: float | None, expected: str) -> None:
    assert fmt.rate(value) == expected


def test_sizes_and_latencies() -> None:
    assert (fmt.mb(None), fmt.mb(512), fmt.mb(16384)) == ("?", "512M", "16.0G")
    assert (fmt.seconds(0.21), fmt.seconds(1.234), fmt.seconds(13.2)) == ("210ms", "1.23s", "13.2s")
    assert fmt.vram(36864, 49152) == "36.0/48.0G"
    assert fmt.short_age(0, NOW) == "never"
    assert fmt.clock_time(NOW - 1, dt.UTC) == "23:59:59"


@pytest.mark.parametrize(
    ("used", "tone"), [(0, "success"), (36000, "warning"), (48000, "error")], ids=["idle", "busy", "full"]
)
def test_vram_bar_is_coloured_by_pressure(used: int, tone: str) -> None:
    bar = vram_bar(used, 49152, 6)
    assert len(bar[0][0]) + len(bar[1][0]) == 6
    assert bar[0][1] == tone


def test_header_shows_address_uptime_rates_and_errors() -> None:
    line = header_line(build_fleet(), NOW, address="http://gw:8000", read_only=True)
    assert text(line) == (
        " cortex read-only http://gw:8000  up 1h02m  3.40 req/s  736 tok/s  3 errors  3 in flight, 3 queued"
    )
    assert "error" in tones(line)


def test_header_says_when_the_link_is_down_and_where_metrics_are() -> None:
    line = header_line(
        build_fleet(),
        NOW,
        address="http://gw:8000",
        read_only=False,
        link="reconnecting in 4 s: connection refused",
        metrics="http://gw:9100/metrics",
    )
    assert text(line).startswith(" cortex reconnecting in 4 s: connection refused http://gw:8000  up 1h02m")
    assert text(line).endswith("  metrics :9100/metrics")  # last: the first thing a narrow screen cuts
    assert ("reconnecting in 4 s: connection refused ", "error") in line
    elsewhere = header_line(build_fleet(), NOW, address="http://gw:8000", read_only=False, metrics="http://m:9/metrics")
    assert text(elsewhere).endswith("  metrics http://m:9/metrics")


def test_node_rows_show_status_vram_models_defrag_and_agent() -> None:
    rows = dict(node_rows(build_fleet(), NOW))
    large, medium, small = rows["gpu-large"], rows["gpu-medium"], rows["gpu-small"]
    assert [text(c) for c in large] == [
        "gpu-large", "up", "████░░ 36.0/48.0G", "Llama-3.1-8B-Instruct, Qwen2.5-32B-Instruct-AWQ", "3", "38",
        "ok 2s",
    ]  # fmt: skip
    assert tones(large[1]) == {"success"}
    assert (text(medium[1]), tones(medium[1])) == ("draining", {"warning"})
    # Only what is loaded is listed; a load in progress is a count after it (issue 16).
    assert text(medium[3]) == "gemma-2-9b-it +1 loading"
    assert medium[3][-1] == (" +1 loading", "warning")
    assert text(medium[5]) == "3"
    assert tones(medium[5]) == {"warning"}
    assert (text(small[1]), tones(small[1])) == ("down", {"error"})
    assert text(small[2]).endswith("~0.0/12.0G")  # an estimate
    assert (text(small[6]), tones(small[6])) == ("stale 1m", {"warning"})


def test_model_rows_show_state_pin_queue_and_figures() -> None:
    rows = dict(model_rows(build_fleet(), NOW, loads={PHI: 12}))
    llama, phi, qwen7 = rows[LLAMA], rows[PHI], rows[QWEN7]
    assert [text(c) for c in llama] == [
        LLAMA, "gpu-large", "loaded", "●", "16.0G", "2", "0", "0", "3s", "412", "210ms"
    ]  # fmt: skip
    assert [text(c) for c in phi][:3] == [PHI, "gpu-medium", "loading 12s"]
    assert text(phi[6]) == "1"
    assert tones(phi[6]) == {"warning"}
    assert (text(phi[7]), tones(phi[7])) == ("12", set())  # loads in the last hour, as the engine counts them
    assert tones(llama[7]) == {"muted"}  # none
    assert [text(c) for c in qwen7][2:4] == ["unloaded", ""]
    assert text(qwen7[8]) == "never"


@pytest.mark.parametrize(
    ("sort", "first"),
    [("id", GEMMA), ("state", GEMMA), ("vram", QWEN32), ("in-flight", QWEN32), ("last used", LLAMA),
     ("tok/s", LLAMA)],
    ids=["id", "state", "vram", "in-flight", "last-used", "tok-s"],
)  # fmt: skip
def test_model_sorts(sort: str, first: str) -> None:
    assert model_rows(build_fleet(), NOW, sort=sort)[0][0] == first


def test_node_sorts() -> None:
    snap = build_fleet()
    assert [k for k, _ in node_rows(snap, NOW, sort="status")] == ["gpu-small", "gpu-medium", "gpu-large"]
    assert next(k for k, _ in node_rows(snap, NOW, sort="vram")) == "gpu-medium"


def test_filter_matches_names_and_related_names_case_insensitively() -> None:
    snap = build_fleet()
    assert [k for k, _ in node_rows(snap, NOW, needle="GEMMA")] == ["gpu-medium"]
    assert {k for k, _ in model_rows(snap, NOW, needle="gpu-small")} == {QWEN7}
    assert model_rows(snap, NOW, needle="no-such-thing") == []


def test_request_log_is_newest_first_bounded_and_filterable() -> None:
    rows = request_rows(build_requests(), dt.UTC)
    assert [text(r[1][0]) for r in rows][:2] == ["23:59:59", "23:59:56"]
    assert [text(c) for c in rows[2][1]][3:5] == [fmt.DASH, "503"]
    assert tones(rows[2][1][4]) == {"error"}
    assert len(request_rows(build_requests() * 40, dt.UTC)) == REQUEST_LOG_LIMIT
    assert len(request_rows(build_requests(), dt.UTC, needle="gemma")) == 1


def test_selection_stats_follow_the_selection() -> None:
    snap = build_fleet()
    node = selection_stats(snap, Selection("node", "gpu-large"))
    assert node is not None
    assert node[0] == "gpu-large"
    assert len(node[1].tok_s_series) == 60
    model = selection_stats(snap, Selection("model", LLAMA))
    assert model is not None
    assert model[0] == "Llama-3.1-8B-Instruct"
    assert selection_stats(snap, Selection("model", "gone")) is None
    assert selection_stats(snap, None) is None


def test_detail_lines_cover_agent_gpus_and_slots() -> None:
    snap = build_fleet()
    node = snap.node("gpu-large")
    assert node is not None
    body = "\n".join(text(line) for line in node_lines(node, NOW, dt.UTC))
    for needle in ("http://gpu-large.internal:8080", "NVIDIA RTX 6000 Ada", "util 71%", "kind=restart",
                   "38 left of 50", LLAMA[:27], " pinned"):  # fmt: skip
        assert needle in body
    model = snap.model(PHI)
    assert model is not None
    body = "\n".join(text(line) for line in model_lines(model, snap, NOW))
    assert "on gpu-medium for 12s" in body
    assert "gpu-medium" in body


@pytest.mark.parametrize(
    ("event", "severity", "words"),
    [
        (events.ModelLoadFailed(node="n", model="m", message="oom"), "error", "Loading m on n failed: oom"),
        (events.NodeWentDown(node="n", reason="3 polls failed"), "error", "Node n is down"),
        (events.NodeWentUp(node="n"), "information", "Node n is up"),
        (events.DefragStarted(node="n", cycles=50), "warning", "after 50"),
        (events.DefragFinished(node="n", ok=True), "information", "Defrag of n finished"),
        (events.DefragFinished(node="n", ok=False, message="agent gone"), "error", "failed: agent gone"),
        (events.ModelLoaded(node="n", model="m", seconds=12.0), "information", "m loaded on n in 12s"),
    ],
    ids=["load-failed", "down", "up", "defrag-started", "defrag-ok", "defrag-failed", "loaded"],
)
def test_event_notices(event: events.Event, severity: str, words: str) -> None:
    notice = event_notice(event)
    assert notice is not None
    assert notice.severity == severity
    assert words in notice.message


def test_quiet_events_make_no_notice() -> None:
    assert event_notice(events.ModelLoaded(node="n", model="m")) is None
    assert event_notice(events.ModelUnloaded(node="n", model="m", reason="ttl")) is None
