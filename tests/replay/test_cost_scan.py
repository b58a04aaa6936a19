"""The ``cost`` strategy against a repeated evaluation scan: it keeps what the next pass needs first.

A harness walks models in order, one burst each, twice. Recency (``lru``) evicts the model the next pass
needs first, every time; the ``cost`` strategy treats a model seen in one finished burst as "far" and evicts
the most recently used of those, and in the second pass evicts models the pass already served before the ones
it has yet to reach, which is Belady's choice here: its loads equal the offline bound. These run the real
engine on virtual time (:func:`cortex.replay.replay`), so the counts are exact.
"""

from __future__ import annotations

from cortex.engine.placement import ModelStats, UseLog, victim_order
from cortex.engine.state import ModelSlot, SlotState
from cortex.replay import FleetSpec, ModelSpec, NodeSpec, Request, replay

_LOAD_S = 4.5


def _scan_trace(models: list[str], *, passes: int = 2, chat: str | None = None) -> list[Request]:
    """Each model: 10 requests 1 s apart, then 500 s of silence; ``chat`` asked every 60 s meanwhile."""
    out: list[Request] = []
    t = 0.0
    for _ in range(passes):
        for model in models:
            out.extend(Request(t + i, model, 0.5) for i in range(10))
            t += 510.0
    if chat is not None:
        out.extend(Request(c + 0.25, chat, 0.5) for c in range(0, int(t), 60))
    return sorted(out, key=lambda r: r.t)


def _fleet(vram_mb: int, models: list[str]) -> FleetSpec:
    return FleetSpec(
        nodes=(NodeSpec("n", vram_mb, tuple(models)),),
        models=tuple(ModelSpec(m, 3_000, _LOAD_S) for m in models),
        eviction={"headroom_mb": 0},
    )


def test_cost_keeps_a_repeated_scan_at_the_offline_bound_and_never_evicts_the_everyday_model() -> None:
    scan = ["s0", "s1", "s2", "s3"]
    fleet = _fleet(9_000, [*scan, "chat"])  # three fit: chat and two scan models
    trace = _scan_trace(scan, chat="chat")
    cost = replay(trace, fleet, "cost")
    # chat once; pass 1: s0, s1, then s2 evicts s1 and s3 evicts s2 (the most recent one-burst model, s0 stays);
    # pass 2: s0 hits, s1 evicts s0 (served again already), s2 evicts s1, s3 hits: 1 + 4 + 2
    assert cost.loads == 7 == cost.lower_bound_loads
    assert cost.failed == 0
    # each load keeps the first requests of a burst waiting (chat's first one alone: nothing else was there)
    assert cost.max_wait_s == _LOAD_S
    lru = replay(trace, fleet, "lru")
    # recency evicts what comes next: every scan burst of pass 2 loads again
    assert lru.loads == 1 + 4 + 4
    assert lru.loads > cost.loads


def test_a_single_pass_costs_nothing_extra() -> None:
    scan = ["s0", "s1", "s2", "s3"]
    fleet = _fleet(6_000, scan)
    cost = replay(_scan_trace(scan, passes=1), fleet, "cost")
    assert (cost.loads, cost.lower_bound_loads, cost.failed) == (4, 4, 0)


def _slot(model: str, last_used: float) -> ModelSlot:
    return ModelSlot(model, SlotState.LOADED, 0.0, vram_mb=3_000, frees_mb=3_000, last_used=last_used)


def _stats(log: UseLog, now: float, models: list[str]) -> dict[str, ModelStats]:
    out = {}
    for m in models:
        figures = log.figures(m, now)
        assert figures is not None
        since, bursts, gap, pace = figures
        out[m] = ModelStats(load_s=10.0, since_s=since, bursts=bursts, gap_s=gap, pace_s=pace)
    return out


def test_one_burst_models_leave_most_recent_first_and_an_everyday_model_last() -> None:
    log = UseLog()
    for t in range(0, 3_000, 30):  # an everyday model: a request every 30 s
        log.note("chat", float(t))
    for start, model in ((0.0, "old"), (1_000.0, "mid"), (2_000.0, "new")):
        for i in range(20):  # one burst each, a request a second
            log.note(model, start + i)
    now = 2_990.0
    stats = _stats(log, now, ["chat", "old", "mid", "new"])
    assert stats["new"].bursts == stats["old"].bursts == 1
    slots = [_slot("chat", 2_970.0), _slot("old", 19.0), _slot("mid", 1_019.0), _slot("new", 2_019.0)]
    order = [s.model_id for s in victim_order(slots, strategy="cost", priorities={}, stats=stats)]
    assert order == ["new", "mid", "old", "chat"]
    assert [s.model_id for s in victim_order(slots, strategy="lru", priorities={})] == ["old", "mid", "new", "chat"]


def test_a_model_the_pass_served_again_leaves_before_one_it_has_yet_to_reach() -> None:
    log = UseLog()
    for start, model in ((0.0, "a"), (600.0, "b"), (1_200.0, "a")):  # a: two bursts 1,190 s apart; b: one
        for i in range(10):
            log.note(model, start + i)
    stats = _stats(log, 1_400.0, ["a", "b"])
    assert (stats["a"].bursts, stats["a"].gap_s) == (2, 1_191.0)
    # a is expected back at 1,209 + 1,191; b (one burst) one cycle after its own, at 609 + 1,191: a goes first
    slots = [_slot("a", 1_209.0), _slot("b", 609.0)]
    assert [s.model_id for s in victim_order(slots, strategy="cost", priorities={}, stats=stats)] == ["a", "b"]
    assert [s.model_id for s in victim_order(slots, strategy="lru", priorities={})] == ["b", "a"]
