"""``[gateway] record``: live traffic through the gateway becomes a trace ``cortex replay`` reads back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from cortex.engine.engine import Engine
from cortex.engine.metrics import RequestOutcome
from cortex.engine.recorder import TraceRecorder
from cortex.engine.state import RequestRecord
from cortex.replay import read_trace
from cortex.sim import SimModel
from tests.lifecycle.conftest import SimFactory
from tests.lifecycle.support import CHAT, make_settings, node_cfg, running

SECRET_PROMPT = "the launch code is 0000"


async def test_requests_through_the_gateway_are_recorded_without_their_text(
    sims: SimFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    n = await sims("n", [SimModel("m/a", 1000), SimModel("m/b", 1000, loaded=False)], load_s=0.2)
    settings = make_settings([node_cfg(n)])
    trace = tmp_path / "traces" / "day.jsonl"
    settings.gateway.record = str(trace)
    async with running(settings, tmp_path / "state.json") as (eng, srv):
        for model in ("m/a", "m/b", "m/a"):
            body = {"model": model, "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 5}
            async with http.post(srv.url + CHAT, json=body, headers={"Authorization": "Bearer sk-who"}) as resp:
                assert resp.status == 200
                await resp.read()
        await asyncio.sleep(0.05)  # the last request is counted just after its answer left
    text = trace.read_text()
    assert SECRET_PROMPT not in text
    assert "sk-who" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["model"] for line in lines] == ["m/a", "m/b", "m/a"]
    for line in lines:
        assert set(line) == {"t", "model", "dur", "node", "prompt_tokens", "completion_tokens", "waited_s", "status"}
        assert line["node"] == "n"
        assert line["status"] == 200
        assert line["completion_tokens"] == 5
        assert line["dur"] >= 0
    assert lines[0]["t"] <= lines[1]["t"] <= lines[2]["t"]
    assert lines[1]["waited_s"] >= 0.15  # m/b waited for its 0.2 s load; the others did not wait
    assert lines[0]["waited_s"] == 0
    # the file is a trace replay reads as is
    assert [r.model for r in read_trace(trace)] == ["m/a", "m/b", "m/a"]
    assert eng.recorder is not None
    assert eng.recorder.written == 3


def _outcome(model: str) -> tuple[RequestOutcome, RequestRecord]:
    outcome = RequestOutcome(api="openai", model=model, node="n", status=200, stream=False, started=1.0, ended=2.5)
    record = RequestRecord(
        ts=1_000_000.0,
        api="openai",
        model=model,
        node="n",
        status=200,
        ttft_s=None,
        tok_s=None,
        prompt_tokens=3,
        completion_tokens=4,
        latency_s=1.5,
    )
    return outcome, record


async def test_the_record_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    recorder = TraceRecorder(path, max_mb=0.001)  # about 1 KiB
    for i in range(40):
        recorder.add(*_outcome(f"m/{i}"))
        await recorder.flush()
    rotated = path.with_name("r.jsonl.1")
    assert rotated.exists()
    assert path.stat().st_size <= 1100
    assert rotated.stat().st_size <= 1100
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["model"] == "m/39"
    assert last["t"] == 1_000_000.0 - 1.5  # when it arrived, not when it ended
    assert recorder.written == 40


async def test_requests_refused_before_routing_are_not_recorded(tmp_path: Path) -> None:
    recorder = TraceRecorder(tmp_path / "r.jsonl", max_mb=1)
    outcome, record = _outcome("unknown")
    recorder.add(outcome, record)
    await recorder.flush()
    assert not (tmp_path / "r.jsonl").exists()


async def test_an_unwritable_record_does_not_stop_the_gateway(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    recorder = TraceRecorder(blocker / "r.jsonl", max_mb=1)  # its folder is a file
    recorder.add(*_outcome("m/a"))
    await recorder.flush()
    assert recorder.written == 0
    recorder.add(*_outcome("m/a"))
    await recorder.flush()  # logged once, no exception
    assert recorder.written == 0


async def test_engine_without_record_has_no_recorder(tmp_path: Path) -> None:
    settings = make_settings([])
    async with Engine(settings, state_path=tmp_path / "s.json") as eng:
        assert eng.recorder is None
