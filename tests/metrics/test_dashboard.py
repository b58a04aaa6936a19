"""contrib/grafana-cortex.json: a valid dashboard whose queries use only metrics cortex exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cortex.sim import SimModel
from tests.conftest import FleetFactory, NodeSpec
from tests.metrics.helpers import scrape

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana-cortex.json"
METRIC = re.compile(r"\bcortex_[a-z0-9_]+\b")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def load() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in data["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def exprs(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, template variables included."""
    found = [(p["title"], t["expr"]) for p in panels(data) for t in p.get("targets", [])]
    for var in data["templating"]["list"]:
        query = var["query"]
        found.append((f"${var['name']}", query["query"] if isinstance(query, dict) else query))
    return found


def test_dashboard_shape() -> None:
    data = load()
    assert 36 <= data["schemaVersion"] <= 41
    assert data["uid"]
    assert data["title"]
    assert data["id"] is None  # importable anywhere
    assert [(i["name"], i["type"], i["pluginId"]) for i in data["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    ids = [p["id"] for p in panels(data)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(data):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        assert grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for var in data["templating"]["list"]:
        assert var["datasource"] == DS


def test_dashboard_has_the_issue_panels() -> None:
    data = load()
    queries = " ".join(e for _, e in exprs(data))
    titles = " ".join(p["title"].lower() for p in panels(data))
    for needle in (
        "sum by (status) (rate(cortex_requests_total",
        "histogram_quantile(0.5, sum by (le) (rate(cortex_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(cortex_time_to_first_token_seconds_bucket",
        "rate(cortex_completion_tokens_total",
        "histogram_quantile(0.5, sum by (le, model) (rate(cortex_generation_tokens_per_second_bucket",
        "cortex_node_vram_used_bytes",
        "cortex_node_vram_total_bytes",
        "sum by (result) (rate(cortex_model_loads_total",
        "sum by (reason) (rate(cortex_model_unloads_total",
        "cortex_queue_depth",
        "cortex_requests_in_flight",
        "histogram_quantile(0.99, sum by (le, api) (rate(cortex_proxy_overhead_seconds_bucket",
    ):
        assert needle in queries, needle
    for word in ("status", "first token", "tokens/s", "vram", "loads", "unloads", "queue", "in flight", "overhead"):
        assert word in titles, word


async def test_dashboard_queries_only_exported_metrics(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), gateway={"metrics_listen": "127.0.0.1:0"})
    exported = (await scrape(f.http, f.servers.metrics)).names()
    assert "cortex_requests_total" in exported
    assert "cortex_time_to_first_token_seconds_bucket" in exported
    for title, expr in exprs(load()):
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr} queries no cortex metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported by cortex"
