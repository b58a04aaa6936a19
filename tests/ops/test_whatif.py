"""The what-if over HTTP (``GET /admin/whatif``, ``loads_1h`` in ``/admin/fleet``) and the engine's last hour.

The route is an admin route like the others (bearer token, or loopback without one); ``cortex attach``
reaches it through :class:`~cortex.remote.RemoteEngine`. The history the what-if replays is the engine's
own, kept whether or not the traffic is recorded, and holds exactly what the record file holds.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from cortex.config import Settings
from cortex.engine.facade import WhatIf
from cortex.engine.history import Finished, TrafficHistory
from cortex.engine.metrics import RequestOutcome
from cortex.engine.state import RequestRecord
from cortex.remote import RemoteEngine
from cortex.tui.app import CortexApp
from cortex.tui.widgets.fleet_table import FleetTable
from tests.tui.pilots import body_text, finish_whatif, select, whatif_rows
from tests.tui.traffic import SEQUENCE, drive, live_gateway

TOKEN = "s3cret-admin"


def rows(result: dict[str, object]) -> object:
    """The figures of a what-if, less when it ran and how long it took."""
    return {k: v for k, v in result.items() if k not in ("until", "seconds")}


async def test_admin_whatif_needs_the_token_and_answers_the_engines_whatif(tmp_path: Path) -> None:
    async with live_gateway(tmp_path, token=TOKEN) as live, aiohttp.ClientSession() as http:
        url = live.url + "/admin/whatif"
        async with http.get(url) as resp:
            assert resp.status == 401
            assert "token" in (await resp.json())["message"]
        async with http.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200
            empty = await resp.json()
        assert empty["live"] is None
        assert empty["replayed"] == []
        assert "no finished requests" in empty["error"]

        await drive(live)
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["error"] == ""
        assert answer["strategy"] == "lru"
        assert answer["live"]["requests"] == len(SEQUENCE)
        assert answer["live"]["loads"] == 5
        assert [r["name"] for r in answer["replayed"]] == ["lru", "priority", "cost"]
        assert all(r["requests"] == len(SEQUENCE) and r["failed"] == 0 for r in answer["replayed"])
        direct = (await live.engine.whatif()).to_json()
        assert rows(answer) == rows(direct)  # replays are deterministic: the route is the engine's answer

        async with http.get(live.url + "/admin/fleet", headers=auth) as resp:
            fleet = await resp.json()
        assert fleet["loads_1h"] == {"m1": 2, "m2": 2, "m3": 1}

        async with RemoteEngine(live.url, TOKEN, refresh_s=0.1) as remote:
            assert isinstance(await remote.whatif(), WhatIf)
            assert rows((await remote.whatif()).to_json()) == rows(direct)
            for _ in range(100):
                if remote.loads_last_hour():
                    break
                await asyncio.sleep(0.05)
            assert remote.loads_last_hour() == {"m1": 2, "m2": 2, "m3": 1}
        async with RemoteEngine(live.url, "wrong") as refused:
            failed = await refused.whatif()
        assert failed.live is None
        assert "token" in failed.error


async def test_the_history_holds_what_the_record_file_holds(tmp_path: Path) -> None:
    async with live_gateway(tmp_path) as live:
        await drive(live)
        kept = live.engine.history.requests_last_hour()
    recorded = [json.loads(line) for line in live.record.read_text().splitlines()]
    assert [(r.t, r.model, r.dur, r.waited) for r in kept] == [
        (r["t"], r["model"], r["dur"], r["waited_s"]) for r in recorded
    ]
    assert [r.model for r in sorted(kept, key=lambda r: r.t)] == list(SEQUENCE)


def outcome(model: str, started: float, ended: float, queue_s: float = 0.0) -> RequestOutcome:
    return RequestOutcome("openai", model, "a", 200, False, started, ended, queue_s=queue_s)


def record_at(ts: float) -> RequestRecord:
    return RequestRecord(ts, "openai", "m", "a", 200, None, None, 1, 1, 0.0)


def test_history_keeps_one_hour_and_counts_loads() -> None:
    now = [10_000.0]
    history = TrafficHistory(lambda: now[0], max_requests=3)
    history.add_request(outcome("m1", 100.0, 102.5, queue_s=0.5), record_at(9_000.0))
    history.add_request(outcome("unknown", 0.0, 1.0), record_at(9_001.0))  # refused before routing: not kept
    assert history.requests_last_hour() == [Finished(t=8_997.5, model="m1", dur=2.0, waited=0.5)]
    for i in range(4):  # the cap drops the oldest
        history.add_request(outcome(f"m{i}", 0.0, 1.0), record_at(9_500.0 + i))
    assert [r.model for r in history.requests_last_hour()] == ["m1", "m2", "m3"]
    now[0] = 9_499.0 + 3600.0 + 1.5  # m1 (arrived at 9,501 less its 1 s) is out of the hour
    assert [r.model for r in history.requests_last_hour()] == ["m2", "m3"]

    history.add_load(now[0] - 4000.0, "old", 1.0)  # already out of the window
    history.add_load(now[0] - 10.0, "m1", 2.0)
    history.add_load(now[0] - 5.0, "m1", 4.0)
    history.add_load(now[0] - 1.0, "m2", None)  # not measured: counted, no load time
    counts = history.loads_last_hour()
    assert counts == {"m1": 2, "m2": 1}
    assert history.loads_last_hour() is counts  # nothing changed: the same object
    assert history.load_seconds() == {"old": 1.0, "m1": 3.0}
    now[0] += 3600.0 - 7.0  # the first m1 load leaves the window
    assert history.loads_last_hour() == {"m1": 1, "m2": 1}
    assert history.loads_last_hour() is not counts


async def test_attach_console_runs_the_whatif_on_the_gateway(tmp_path: Path) -> None:
    async with live_gateway(tmp_path, token=TOKEN) as live:
        await drive(live)
        async with RemoteEngine(live.url, TOKEN, refresh_s=0.1) as remote:
            for _ in range(100):
                if remote.loads_last_hour() and remote.snapshot().model("m1") is not None:
                    break
                await asyncio.sleep(0.05)
            app = CortexApp(remote, Settings(), gateway_url=live.url, clock=remote.clock, attached=True)
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.pause(0.3)
                table = app.dashboard.query_one("#models", FleetTable)
                assert table.cell_text(table.keys.index("m1"), "loads") == "2"
                await select(pilot, "model", "m1")
                await pilot.press("enter", "w")
                await finish_whatif(pilot)
                shown = whatif_rows(body_text(app))
        direct = await live.engine.whatif()
    assert direct.live is not None
    assert shown["live"][:2] == [str(len(SEQUENCE)), str(direct.live.loads)]
    assert {name: shown[name][1] for name in ("lru", "priority", "cost")} == {
        r.name: str(r.loads) for r in direct.replayed
    }
