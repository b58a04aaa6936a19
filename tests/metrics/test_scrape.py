"""A scripted mix through the real gateway, then ``/metrics`` scraped over HTTP and checked exactly.

Two simulated nodes: ``a`` serves ``m1`` (pinned), ``b`` serves ``m2`` (alias ``claude-test-*``) and
``m3``, which starts unloaded so that one request pays for a cold load. The token counters are checked
against what the simulators actually put in their ``usage`` (recorded by wrapping ``frames.usage``).
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from cortex.config import ModelSettings
from cortex.engine.metrics import CortexMetrics, RequestOutcome
from cortex.engine.state import FleetSnapshot, ModelSlot, ModelView, NodeSnapshot, NodeStatus, SlotState
from cortex.sim import SimModel, frames
from tests.conftest import Fleet, FleetFactory, NodeSpec
from tests.metrics.helpers import MIB, counts_by, labels, parse, promtool_check, scrape, wait_until

LOAD_S = 0.3
OAI_MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
ANT_MSG: list[MessageParam] = [{"role": "user", "content": "hello there"}]
Key = tuple[str, str, str]


@pytest.fixture
def sim_usage(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every usage object the simulators build, in order (one per generation)."""
    seen: list[dict[str, Any]] = []
    real = frames.usage

    def recording(*args: Any, **kwargs: Any) -> dict[str, Any]:
        use = real(*args, **kwargs)
        seen.append(use)
        return use

    monkeypatch.setattr(frames, "usage", recording)
    return seen


async def mix_fleet(fleet: FleetFactory) -> Fleet:
    return await fleet(
        NodeSpec("a", [SimModel("m1", 4000)], vram_mb=8192, pinned=["m1"], tok_s=200),
        NodeSpec(
            "b", [SimModel("m2", 2000), SimModel("m3", 3000, loaded=False)], vram_mb=12288, load_s=LOAD_S, tok_s=200
        ),
        models=[ModelSettings(id="m2", aliases=["claude-test-*"])],
        gateway={"metrics_listen": "127.0.0.1:0"},
        poll={"interval_s": 0.2},
    )


class Script:
    """Runs the mix and remembers what each successful request's node reported."""

    def __init__(self, seen: list[dict[str, Any]]) -> None:
        self.seen = seen
        self.usage: dict[Key, list[dict[str, Any]]] = {}

    async def ok(self, key: Key, action: Awaitable[object]) -> None:
        before = len(self.seen)
        await action
        new = self.seen[before:]
        assert len(new) == 1, f"{key}: expected one generation, saw {len(new)}"
        self.usage.setdefault(key, []).append(new[0])


async def run_mix(f: Fleet, seen: list[dict[str, Any]]) -> Script:
    script = Script(seen)
    oai = f.openai()
    ant = anthropic.AsyncAnthropic(base_url=f.url, api_key="none", max_retries=0, timeout=10.0)

    async def oai_unary(model: str) -> None:
        done = await oai.chat.completions.create(model=model, messages=OAI_MSG, max_tokens=5)
        assert done.choices[0].message.content

    async def oai_stream(model: str) -> None:
        stream = await oai.chat.completions.create(
            model=model,
            messages=OAI_MSG,
            max_tokens=5,
            stream=True,
        )
        assert [c async for c in stream]

    async def ant_unary(model: str) -> None:
        msg = await ant.messages.create(model=model, max_tokens=5, messages=ANT_MSG)
        assert msg.content

    async def ant_stream(model: str) -> None:
        async with ant.messages.stream(model=model, max_tokens=5, messages=ANT_MSG) as stream:
            assert [e async for e in stream]

    async with oai, ant:
        await script.ok(("m1", "a", "openai"), oai_unary("m1"))
        await script.ok(("m1", "a", "openai"), oai_unary("m1"))
        await script.ok(("m1", "a", "openai"), oai_stream("m1"))
        await script.ok(("m2", "b", "anthropic"), ant_unary("claude-test-sonnet"))
        await script.ok(("m2", "b", "anthropic"), ant_stream("claude-test-haiku"))
        with pytest.raises(openai.NotFoundError):
            await oai_unary("no-such-model")
        with pytest.raises(anthropic.NotFoundError):
            await ant_unary("claude-opus-none")
        for path in ("/v1/chat/completions", "/v1/messages"):
            async with f.http.post(
                f.url + path, data=b"{not json", headers={"Content-Type": "application/json"}
            ) as resp:
                assert resp.status == 400
        assert f.engine.snapshot().model("m3").state == "unloaded"  # type: ignore[union-attr]
        await script.ok(("m3", "b", "openai"), oai_stream("m3"))  # the cold load
    await wait_until(lambda: f.engine.metrics.requests_total == 10, what="every request recorded")
    return script


async def test_scripted_mix_exact_metrics(fleet: FleetFactory, sim_usage: list[dict[str, Any]]) -> None:
    f = await mix_fleet(fleet)
    script = await run_mix(f, sim_usage)
    # The VRAM gauges read the last poll: wait until both nodes' reports include the cold load.
    await wait_until(
        lambda: all(
            f.engine.snapshot().node(name).vram_used_mb == f.sim(name).used_vram_mb()  # type: ignore[union-attr]
            for name in ("a", "b")
        ),
        what="polls to report the nodes' memory",
    )
    m = await scrape(f.http, f.servers.metrics)

    assert m.series("cortex_requests_total") == {
        labels(model="m1", node="a", api="openai", status="200"): 3,
        labels(model="m2", node="b", api="anthropic", status="200"): 2,
        labels(model="m3", node="b", api="openai", status="200"): 1,
        labels(model="unknown", node="", api="openai", status="404"): 1,
        labels(model="unknown", node="", api="openai", status="400"): 1,
        labels(model="unknown", node="", api="anthropic", status="404"): 1,
        labels(model="unknown", node="", api="anthropic", status="400"): 1,
    }
    served = {("m1", "a", "openai"): 3, ("m2", "b", "anthropic"): 2, ("m3", "b", "openai"): 1}
    everyone = {**served, ("unknown", "", "openai"): 2, ("unknown", "", "anthropic"): 2}
    by_mna = ("model", "node", "api")
    assert counts_by(m.series("cortex_request_duration_seconds_count"), by_mna) == everyone
    # TTFT, tokens and decode speed exist only for requests a node answered: no all-zero error series.
    # TTFT only for the streams: a non-streaming answer's first byte is its last (issue 16).
    streamed = {("m1", "a", "openai"): 1, ("m2", "b", "anthropic"): 1, ("m3", "b", "openai"): 1}
    assert counts_by(m.series("cortex_time_to_first_token_seconds_count"), by_mna) == streamed
    assert counts_by(m.series("cortex_proxy_overhead_seconds_count"), ("api",)) == {("openai",): 6, ("anthropic",): 4}

    prompt = {k: sum(u["prompt_tokens"] for u in us) for k, us in script.usage.items()}
    completion = {k: sum(u["completion_tokens"] for u in us) for k, us in script.usage.items()}
    assert all(v > 0 for v in (*prompt.values(), *completion.values()))
    assert counts_by(m.series("cortex_prompt_tokens_total"), by_mna) == prompt
    assert counts_by(m.series("cortex_completion_tokens_total"), by_mna) == completion
    # Decode speed: one observation per answered request, the node's own avg_compl_tok_per_sec.
    decode_n = counts_by(m.series("cortex_generation_tokens_per_second_count"), ("model", "node"))
    assert decode_n == {("m1", "a"): 3, ("m2", "b"): 2, ("m3", "b"): 1}
    decode_sum = counts_by(m.series("cortex_generation_tokens_per_second_sum"), ("model", "node"))
    for (model, node, _api), uses in script.usage.items():
        assert decode_sum[(model, node)] == pytest.approx(sum(u["avg_compl_tok_per_sec"] for u in uses))

    # The cold request: its TTFT includes the load, it waited in the queue once, and the load is counted.
    cold = labels(model="m3", node="b", api="openai", le="0.25")
    assert m.samples[("cortex_time_to_first_token_seconds_bucket", cold)] == 0
    assert m.value("cortex_time_to_first_token_seconds_sum", model="m3", node="b", api="openai") >= LOAD_S
    assert m.series("cortex_queue_wait_seconds_count") == {labels(model="m3"): 1}
    assert m.value("cortex_queue_wait_seconds_sum", model="m3") >= LOAD_S * 0.9
    assert m.series("cortex_model_loads_total") == {labels(model="m3", node="b", result="ok"): 1}
    assert m.series("cortex_model_load_duration_seconds_count") == {labels(model="m3", node="b"): 1}
    assert m.value("cortex_model_load_duration_seconds_sum", model="m3", node="b") >= LOAD_S * 0.9
    assert m.series("cortex_model_unloads_total") == {}
    assert m.series("cortex_eviction_cycles_total") == {}
    assert m.series("cortex_node_restarts_total") == {}

    # Fleet gauges.
    assert m.series("cortex_node_up") == {labels(node="a"): 1, labels(node="b"): 1}
    assert m.series("cortex_node_vram_total_bytes") == {labels(node="a"): 8192 * MIB, labels(node="b"): 12288 * MIB}
    assert m.series("cortex_node_vram_used_bytes") == {
        labels(node="a"): f.sim("a").used_vram_mb() * MIB,
        labels(node="b"): f.sim("b").used_vram_mb() * MIB,
    }
    slots = {labels(model="m1", node="a"), labels(model="m2", node="b"), labels(model="m3", node="b")}
    assert m.series("cortex_model_loaded") == dict.fromkeys(slots, 1)
    assert m.series("cortex_model_pinned") == {**dict.fromkeys(slots, 0), labels(model="m1", node="a"): 1}
    assert m.series("cortex_requests_in_flight") == dict.fromkeys(slots, 0)
    assert m.series("cortex_queue_depth") == {labels(model=x): 0 for x in ("m1", "m2", "m3")}
    assert m.series("cortex_node_eviction_cycles") == {labels(node="a"): 0, labels(node="b"): 0}

    # Every label value is bounded: apis, statuses and models from the catalogue (or `unknown`).
    for (name, lab), _ in m.samples.items():
        d = dict(lab)
        assert d.get("api", "openai") in ("openai", "anthropic"), name
        assert d.get("model", "m1") in ("m1", "m2", "m3", "unknown"), name
    assert not any(name.endswith("_created") for name, _ in m.samples)
    promtool_check(m.text)


SPEC_METRICS = {
    "cortex_requests": ("counter", {"model", "node", "api", "status"}),
    "cortex_request_duration_seconds": ("histogram", {"model", "node", "api"}),
    "cortex_time_to_first_token_seconds": ("histogram", {"model", "node", "api"}),
    "cortex_prompt_tokens": ("counter", {"model", "node", "api"}),
    "cortex_completion_tokens": ("counter", {"model", "node", "api"}),
    "cortex_generation_tokens_per_second": ("histogram", {"model", "node"}),
    "cortex_requests_in_flight": ("gauge", {"model", "node"}),
    "cortex_queue_depth": ("gauge", {"model"}),
    "cortex_queue_wait_seconds": ("histogram", {"model"}),
    "cortex_model_loads": ("counter", {"model", "node", "result"}),
    "cortex_model_load_duration_seconds": ("histogram", {"model", "node"}),
    "cortex_model_unloads": ("counter", {"model", "node", "reason"}),
    "cortex_node_up": ("gauge", {"node"}),
    "cortex_node_vram_total_bytes": ("gauge", {"node"}),
    "cortex_node_vram_used_bytes": ("gauge", {"node"}),
    "cortex_model_loaded": ("gauge", {"model", "node"}),
    "cortex_model_pinned": ("gauge", {"model", "node"}),
    "cortex_node_restarts": ("counter", {"node"}),
    "cortex_proxy_overhead_seconds": ("histogram", {"api"}),
    "cortex_eviction_cycles": ("counter", {"node"}),
    "cortex_node_eviction_cycles": ("gauge", {"node"}),
}
"""product.md §5 (plus eviction cycles): family name as the parser reports it → type and label names."""

AGENT_METRICS = {
    "cortex_agent_up": ("gauge", {"node"}),
    "cortex_gpu_memory_total_bytes": ("gauge", {"node", "gpu", "name"}),
    "cortex_gpu_memory_used_bytes": ("gauge", {"node", "gpu", "name"}),
    "cortex_gpu_utilization_ratio": ("gauge", {"node", "gpu", "name"}),
}
"""Issue 7: what a node's agent reports (only present once an agent has reported)."""


def test_every_spec_metric_has_its_type_and_labels() -> None:
    metrics = CortexMetrics()
    metrics.request_done(
        RequestOutcome(
            api="openai",
            model="m1",
            node="a",
            status=200,
            stream=True,
            started=0.0,
            ended=1.0,
            first_byte=0.1,
            usage={"prompt_tokens": 3, "completion_tokens": 9, "avg_compl_tok_per_sec": 40.0},
        )
    )
    metrics.queue_waited("m1", 0.5)
    metrics.load_done("m1", "a", "ok", 2.0)
    metrics.unloaded("m1", "a", "ttl")
    metrics.cycle("a")
    metrics.restarted("a")
    node = NodeSnapshot(
        name="a",
        endpoint="http://x",
        status=NodeStatus.UP,
        vram_total_mb=10,
        vram_used_mb=5,
        vram_source="estimate",
        headroom_mb=0,
        slots=(ModelSlot("m1", SlotState.LOADED, 0.0),),
    )
    snap = FleetSnapshot(
        taken_at=0.0,
        started_at=0.0,
        gateway="",
        nodes=(node,),
        models=(ModelView(id="m1", state="loaded", nodes=("a",), listed_on=("a",), pinned=False),),
    )
    metrics.bind_fleet(lambda: snap)
    m = parse(metrics.exposition().decode())
    for family, (kind, names) in SPEC_METRICS.items():
        assert m.types.get(family) == kind, family
        sample = family + "_total" if kind == "counter" else (family + "_count" if kind == "histogram" else family)
        series = m.series(sample)
        assert series, f"{sample} has no sample"
        for lab in series:
            assert {k for k, _ in lab} == names, sample
    assert set(m.types) == set(SPEC_METRICS) | set(AGENT_METRICS), "an exported family is not in the lists above"
    for family, (kind, _names) in AGENT_METRICS.items():
        assert m.types[family] == kind, family
    promtool_check(m.text)  # every family with samples, unloads and restarts included


def test_promtool_is_skipped_locally_but_required_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        promtool_check("")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        promtool_check("")


@pytest.mark.parametrize(
    ("given", "counted"),
    [("evict", "evict"), ("ttl", "ttl"), ("manual", "manual"), ("defrag", "defrag"), ("reconcile", "evict")],
)
def test_unload_reasons_stay_in_the_documented_set(given: str, counted: str) -> None:
    metrics = CortexMetrics()
    metrics.unloaded("m", "n", given)
    assert (
        metrics.registry.get_sample_value("cortex_model_unloads_total", {"model": "m", "node": "n", "reason": counted})
        == 1.0
    )


def test_load_results_stay_bounded() -> None:
    metrics = CortexMetrics()
    for result in ("ok", "failed", "timeout", "weird"):
        metrics.load_done("m", "n", result, 1.0)
    got = {
        s.labels["result"]: s.value
        for fam in metrics.registry.collect()
        if fam.name == "cortex_model_loads"
        for s in fam.samples
    }
    assert got == {"ok": 1.0, "failed": 2.0, "timeout": 1.0}
    assert (
        metrics.registry.get_sample_value("cortex_model_load_duration_seconds_count", {"model": "m", "node": "n"}) == 1
    )


def test_agent_gpu_figures_are_exported_while_fresh() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from cortex.engine.state import AgentInfo, FleetSnapshot, GpuInfo, NodeSnapshot, NodeStatus

    gpus = (GpuInfo(0, "NVIDIA H200", 143771, 9000, 37.0), GpuInfo(1, "NVIDIA H200", 143771, 100, None))

    def snap(fresh: bool) -> FleetSnapshot:
        node = NodeSnapshot(
            name="a",
            endpoint="http://127.0.0.1:1",
            status=NodeStatus.UP,
            vram_total_mb=287542,
            vram_used_mb=9100,
            vram_source="agent",
            headroom_mb=0,
            agent=AgentInfo(seen_at=1.0, fresh=fresh, gpus=gpus),
        )
        return FleetSnapshot(taken_at=1.0, started_at=0.0, gateway="x", nodes=(node,))

    metrics = CortexMetrics()
    current = snap(True)
    metrics.bind_fleet(lambda: current)
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(metrics.exposition().decode())
        for s in fam.samples
    }
    assert values[("cortex_agent_up", (("node", "a"),))] == 1.0
    key = (("gpu", "0"), ("name", "NVIDIA H200"), ("node", "a"))
    assert values[("cortex_gpu_memory_used_bytes", key)] == 9000 * 1024 * 1024
    assert values[("cortex_gpu_memory_total_bytes", key)] == 143771 * 1024 * 1024
    assert values[("cortex_gpu_utilization_ratio", key)] == pytest.approx(0.37)
    assert ("cortex_gpu_utilization_ratio", (("gpu", "1"), ("name", "NVIDIA H200"), ("node", "a"))) not in values
    current = snap(False)
    stale = metrics.exposition().decode()
    assert 'cortex_agent_up{node="a"} 0.0' in stale
    assert "cortex_gpu_memory_used_bytes{" not in stale
