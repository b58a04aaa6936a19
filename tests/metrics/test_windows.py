"""The console's sliding windows and recent-request ring, on a fake clock; and ``GET /admin/fleet``."""

from __future__ import annotations

import pytest

from cortex.engine.metrics import CortexMetrics, RequestOutcome, SlidingWindow
from cortex.sim import SimModel
from tests.conftest import FleetFactory, NodeSpec
from tests.metrics.helpers import wait_until

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outcome(
    model: str = "m1",
    node: str = "a",
    *,
    status: int = 200,
    ttft: float | None = 0.1,
    tokens: int = 10,
    rate: float | None = 50.0,
    api: str = "openai",
    latency: float = 1.0,
) -> RequestOutcome:
    usage: dict[str, float] = {"prompt_tokens": 4, "completion_tokens": tokens}
    if rate is not None:
        usage["avg_compl_tok_per_sec"] = rate
    return RequestOutcome(
        api=api,
        model=model,
        node=node,
        status=status,
        stream=True,
        started=100.0,
        ended=100.0 + latency,
        first_byte=None if ttft is None else 100.0 + ttft,
        usage=usage if status < 400 else None,
    )


def test_window_rates_percentiles_and_series() -> None:
    w = SlidingWindow(60)
    # 101 requests spread over 10 seconds: TTFT 0.00 .. 1.00 s, 5 tokens each, one error every 10th.
    for i in range(101):
        w.add(T0 + i * 0.099, error=i % 10 == 0, tokens=5, ttft=i / 100, decode=float(i))
    now = T0 + 10.0
    stats = w.stats(now)
    assert stats.req_s == pytest.approx(101 / 60)
    assert stats.tok_s == pytest.approx(505 / 60)
    assert stats.errors == 11
    assert stats.ttft_p50 == pytest.approx(0.50)
    assert stats.ttft_p95 == pytest.approx(0.95)
    assert stats.decode_tok_s == pytest.approx(50.0)
    # One value per second of the window, oldest first: the last 11 seconds hold the requests.
    assert len(stats.tok_s_series) == 60
    assert len(stats.ttft_series) == 60
    assert stats.tok_s_series[:49] == (0.0,) * 49
    assert sum(stats.tok_s_series) == 505
    per_second = [sum(1 for i in range(101) if int(T0 + i * 0.099) == s) for s in range(int(T0), int(T0) + 11)]
    assert list(stats.tok_s_series[49:]) == [5.0 * n for n in per_second]
    first_second = [i / 100 for i in range(101) if int(T0 + i * 0.099) == int(T0)]
    assert stats.ttft_series[49] == pytest.approx(sum(first_second) / len(first_second))


def test_window_expiry() -> None:
    w = SlidingWindow(60)
    w.add(T0 + 0.5, error=True, tokens=100, ttft=0.2, decode=30.0)
    assert w.stats(T0 + 59.9).req_s == pytest.approx(1 / 60)
    assert w.stats(T0 + 59.9).ttft_p50 == pytest.approx(0.2)
    gone = w.stats(T0 + 60.0)  # the second T0 has left the window, for the counts and the percentiles alike
    assert (gone.req_s, gone.tok_s, gone.errors) == (0.0, 0.0, 0)
    assert gone.ttft_p50 is None
    assert gone.ttft_p95 is None
    assert gone.decode_tok_s is None
    assert set(gone.tok_s_series) == {0.0}
    # A reused slot starts from zero.
    w.add(T0 + 60.2, error=False, tokens=7, ttft=None, decode=None)
    again = w.stats(T0 + 60.5)
    assert (again.req_s * 60, again.tok_s * 60, again.errors) == pytest.approx((1, 7, 0))
    assert again.ttft_p50 is None
    assert again.tok_s_series[-1] == 7.0


def test_window_ignores_samples_older_than_its_slots() -> None:
    """A wall clock that steps back must not wipe a newer second sharing the slot."""
    w = SlidingWindow(60)
    w.add(T0 + 60, error=False, tokens=10, ttft=0.1, decode=None)
    w.add(T0, error=False, tokens=99, ttft=0.1, decode=None)
    assert w.stats(T0 + 60).tok_s_series[-1] == 10.0


def test_metrics_windows_per_model_and_node_on_a_fake_clock() -> None:
    clock = FakeClock()
    m = CortexMetrics(clock=clock, window_s=60)
    for i in range(20):
        clock.now = T0 + i
        m.request_done(outcome("m1", "a", ttft=0.1 + i / 100, tokens=10))
        m.request_done(outcome("m2", "b", ttft=1.0, tokens=30, rate=None, latency=2.0))
    m.request_done(outcome("unknown", "", status=404, ttft=None))
    clock.now = T0 + 20
    m1, m2, a, b = m.model_stats("m1"), m.model_stats("m2"), m.node_stats("a"), m.node_stats("b")
    assert m1.req_s == pytest.approx(20 / 60)
    assert m1.tok_s == pytest.approx(200 / 60)
    assert m2.tok_s == pytest.approx(600 / 60)
    assert (a.req_s, a.tok_s) == (m1.req_s, m1.tok_s)
    assert (b.req_s, b.tok_s) == (m2.req_s, m2.tok_s)
    assert m1.ttft_p50 == pytest.approx(0.2)
    assert m1.ttft_p95 == pytest.approx(0.28)
    assert m1.decode_tok_s == 50.0
    # No rate in the usage: a stream's decode speed comes from cortex's clock, first byte to end.
    assert m2.decode_tok_s == pytest.approx((30 - 1) / (2.0 - 1.0))
    assert m.model_stats("unknown").errors == 1
    assert m.node_stats("").req_s == 0.0  # errors that reached no node make no node window
    assert m.model_stats("never").req_s == 0.0
    totals = m.totals()
    assert (totals.requests, totals.errors) == (41, 1)
    assert totals.req_s == pytest.approx(41 / 60)
    assert totals.tok_s == pytest.approx(800 / 60)
    clock.now = T0 + 19 + 60
    assert m.model_stats("m1").req_s == 0.0
    assert m.totals().requests == 41  # lifetime counts do not expire


def test_ring_is_bounded_and_newest_first() -> None:
    clock = FakeClock()
    m = CortexMetrics(clock=clock, ring=5)
    for i in range(8):
        clock.now = T0 + i
        m.request_done(outcome(f"m{i}", "a", tokens=i + 1, latency=0.5 + i))
    recent = m.recent()
    assert len(recent) == 5
    assert [r.model for r in recent] == ["m7", "m6", "m5", "m4", "m3"]
    assert [r.ts for r in recent] == [T0 + i for i in (7, 6, 5, 4, 3)]
    newest = recent[0]
    assert (newest.api, newest.node, newest.status, newest.stream) == ("openai", "a", 200, True)
    assert newest.ttft_s == pytest.approx(0.1)
    assert newest.tok_s == 50.0
    assert (newest.prompt_tokens, newest.completion_tokens) == (4, 8)
    assert newest.latency_s == pytest.approx(7.5)
    assert m.recent() is recent  # cached until the next request
    m.request_done(outcome("m8", "a"))
    assert m.recent()[0].model == "m8"
    assert len(m.recent()) == 5


async def test_admin_fleet_exposes_window_stats_and_the_ring(fleet: FleetFactory) -> None:
    f = await fleet(
        NodeSpec("a", [SimModel("m1", 1000)], tok_s=500),
        NodeSpec("b", [SimModel("m2", 1000)], tok_s=500),
    )
    for model in ("m1", "m1", "m2"):
        for stream in (False, True):
            body = {"model": model, "max_tokens": 4, "stream": stream, "messages": [{"role": "user", "content": "x"}]}
            status, _, _ = await f.post("/v1/chat/completions", body)
            assert status == 200
    status, _, _ = await f.post("/v1/chat/completions", {"model": "m1", "messages": []})
    assert status == 400
    await wait_until(lambda: f.engine.metrics.requests_total == 7, what="requests recorded")
    f.engine.fleet.touch()

    async with f.http.get(f.url + "/admin/fleet") as resp:
        assert resp.status == 200
        data = await resp.json()
    models = {m["id"]: m["stats"] for m in data["models"]}
    nodes = {n["name"]: n["stats"] for n in data["nodes"]}
    assert models["m1"]["req_s"] == pytest.approx(4 / 60)
    assert "unknown" not in models  # not a catalogue entry
    assert models["m2"]["req_s"] == pytest.approx(2 / 60)
    assert nodes["a"]["req_s"] == pytest.approx(4 / 60)
    assert nodes["b"]["req_s"] == pytest.approx(2 / 60)
    for stats in (models["m1"], models["m2"], nodes["a"], nodes["b"]):
        assert stats["tok_s"] > 0
        assert stats["ttft_p50"] > 0
        assert stats["ttft_p95"] >= stats["ttft_p50"]
        assert stats["decode_tok_s"] > 0
        assert len(stats["tok_s_series"]) == 60
        assert len(stats["ttft_series"]) == 60
    ring = data["requests"]
    assert len(ring) == 7
    assert (ring[0]["status"], ring[0]["model"], ring[0]["node"]) == (400, "unknown", "")
    assert [r["ts"] for r in ring] == sorted((r["ts"] for r in ring), reverse=True)
    answered = ring[1:]
    assert {(r["model"], r["node"]) for r in answered} == {("m1", "a"), ("m2", "b")}
    assert sorted(r["stream"] for r in answered) == [False, False, False, True, True, True]
    for r in answered:
        assert r["api"] == "openai"
        assert r["status"] == 200
        assert r["completion_tokens"] == 4
        assert r["prompt_tokens"] > 0
        if r["stream"]:
            assert r["ttft_s"] > 0
            assert r["latency_s"] >= r["ttft_s"]
        else:  # a non-streaming answer has no TTFT of its own (issue 16)
            assert r["ttft_s"] is None
        assert r["tok_s"] > 0
    assert data["totals"]["requests"] == 7
    assert data["totals"]["errors"] == 1


async def test_admin_fleet_shows_a_request_that_took_no_lease_at_once(fleet: FleetFactory) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), poll={"interval_s": 30.0})
    body = {"model": "m1", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    assert (await f.post("/v1/chat/completions", body))[0] == 200
    async with f.http.get(f.url + "/admin/fleet") as resp:
        assert len((await resp.json())["requests"]) == 1
    assert (await f.post("/v1/chat/completions", {**body, "model": "nope"}))[0] == 404
    async with f.http.get(f.url + "/admin/fleet") as resp:
        data = await resp.json()
    assert len(data["requests"]) == 2
    assert data["totals"]["errors"] == 1
