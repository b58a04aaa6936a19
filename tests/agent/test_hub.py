from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

import pytest

from cortex.engine.agents import AgentHub, RestartOutcome
from tests.agent.fakes import FakeClock, make_hub, report_body

TOKEN = "s3cret-token"
AUTH = f"Bearer {TOKEN}"


def result_body(command_id: str, exit_code: int | None = 0, **overrides: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": command_id,
        "kind": "restart",
        "exit_code": exit_code,
        "output_tail": "restarted\n",
        "error": "",
        "started_at": 10.0,
        "finished_at": 12.5,
    }
    result.update(overrides)
    return result


# -- authentication ---------------------------------------------------------------------------------------


def test_right_token_is_accepted_and_stored() -> None:
    clock = FakeClock()
    hub, changes = make_hub(clock, n1=TOKEN)

    status, body = hub.handle_report("n1", AUTH, report_body())

    assert (status, body) == (200, {"commands": []})
    info = hub.info("n1")
    assert info is not None
    assert info.seen_at == clock.now
    assert info.fresh
    assert info.nvml
    assert info.mistralrs_up
    assert info.version == "0.1.0"
    assert [(g.index, g.name, g.total_mb, g.used_mb) for g in info.gpus] == [
        (0, "GPU-A", 80_000, 1_000),
        (1, "GPU-B", 40_000, 500),
    ]
    assert hub.seen("n1")
    assert changes == [1]


@pytest.mark.parametrize(
    ("configured", "authorization"),
    [
        (TOKEN, "Bearer wrong-token"),
        (TOKEN, None),
        (TOKEN, ""),
        (TOKEN, "Bearer "),
        (TOKEN, f"Basic {TOKEN}"),
        (TOKEN, f"Bearer {TOKEN}x"),
        ("", "Bearer "),
        ("", "Bearer anything"),
    ],
    ids=[
        "wrong",
        "missing",
        "empty-header",
        "empty-bearer",
        "other-scheme",
        "longer",
        "empty-configured",
        "disabled",
    ],
)
def test_bad_credentials_are_refused_with_401(
    configured: str, authorization: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hub, changes = make_hub(n1=configured)

    status, body = hub.handle_report("n1", authorization, report_body())

    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    assert hub.info("n1") is None
    assert not hub.seen("n1")
    assert changes == []
    assert TOKEN not in caplog.text
    assert "wrong-token" not in caplog.text
    assert "anything" not in caplog.text


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # cortex.engine.agents calls hmac.compare_digest
    hub, _ = make_hub(n1=TOKEN)

    assert hub.handle_report("n1", "Bearer nope", report_body())[0] == 401
    assert hub.handle_report("n1", AUTH, report_body())[0] == 200
    assert len(calls) == 2
    # digests of equal length whatever the presented token's length
    assert all(len(a) == len(b) == 32 for a, b in calls)


def test_unknown_node_is_404() -> None:
    hub, _ = make_hub(n1=TOKEN)

    status, body = hub.handle_report("nope", AUTH, report_body("nope"))

    assert status == 404
    assert "nope" in body["error"]["message"]
    assert hub.info("nope") is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (None, "malformed report"),
        ([1, 2], "malformed report"),
        ({"node": "n1"}, "mistralrs"),
        (report_body(gpus=[{"index": 0, "name": "x", "total_mb": -1, "used_mb": 0}]), "gpus[0].total_mb"),
        (report_body(interval_s=0), "interval_s"),
        (report_body(mistralrs={"up": "perhaps"}), "mistralrs.up"),
        (report_body("n2"), "report is for node 'n2'"),
    ],
    ids=["null", "list", "missing-fields", "negative-memory", "zero-interval", "bad-bool", "other-node"],
)
def test_bad_body_is_400_with_a_message(body: object, fragment: str) -> None:
    hub, _ = make_hub(n1=TOKEN)

    status, reply = hub.handle_report("n1", AUTH, body)

    assert status == 400
    assert fragment in reply["error"]["message"]
    assert hub.info("n1") is None


def test_unknown_fields_are_ignored_for_newer_agents() -> None:
    hub, _ = make_hub(n1=TOKEN)

    status, _ = hub.handle_report("n1", AUTH, report_body(future_field={"x": 1}))

    assert status == 200


# -- freshness, VRAM and change notification -------------------------------------------------------------


def test_freshness_follows_three_agent_intervals() -> None:
    clock = FakeClock()
    hub, changes = make_hub(clock, n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body(interval_s=2.0))

    clock.advance(5.9)
    info = hub.info("n1")
    assert info is not None
    assert info.fresh
    assert hub.vram("n1") == (120_000, 1_500)

    clock.advance(0.2)
    info = hub.info("n1")
    assert info is not None
    assert not info.fresh
    assert hub.vram("n1") is None
    assert hub.seen("n1")

    hub.refresh()
    assert changes == [1, 1]  # the report, then going stale
    hub.refresh()
    assert changes == [1, 1]  # announced once

    hub.handle_report("n1", AUTH, report_body(interval_s=2.0))
    info = hub.info("n1")
    assert info is not None
    assert info.fresh
    assert changes == [1, 1, 1]


def test_on_change_only_when_something_but_the_time_changed() -> None:
    clock = FakeClock()
    hub, changes = make_hub(clock, n1=TOKEN)

    hub.handle_report("n1", AUTH, report_body())
    clock.advance(1)
    hub.handle_report("n1", AUTH, report_body(time=99.0))
    assert changes == [1]

    hub.handle_report("n1", AUTH, report_body(mistralrs={"up": False, "error": "connection refused"}))
    assert changes == [1, 1]
    info = hub.info("n1")
    assert info is not None
    assert info.mistralrs_up is False


@pytest.mark.parametrize(
    "overrides",
    [{"nvml": False, "gpus": []}, {"gpus": []}, {"gpu_error": "GPU 1: GPU is lost"}],
    ids=["no-nvml", "no-gpus", "gpu-error"],
)
def test_vram_is_none_without_complete_gpu_figures(overrides: dict[str, Any]) -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body(**overrides))

    assert hub.vram("n1") is None
    assert hub.info("n1") is not None


def test_a_raising_listener_does_not_fail_the_report() -> None:
    def boom() -> None:
        raise RuntimeError("listener bug")

    from tests.agent.fakes import make_settings

    hub = AgentHub(make_settings(n1=TOKEN), boom)

    assert hub.handle_report("n1", AUTH, report_body())[0] == 200


# -- commands and restart ---------------------------------------------------------------------------------


async def next_commands(hub: AgentHub, results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    await asyncio.sleep(0)  # let a restart() that was just started queue its command
    status, body = hub.handle_report("n1", AUTH, report_body(results=results or []))
    assert status == 200
    commands: list[dict[str, Any]] = body["commands"]
    return commands


async def test_restart_is_handed_out_until_acknowledged_and_resolves_on_the_result() -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body())
    task = asyncio.create_task(hub.restart("n1", timeout_s=5))

    first = await next_commands(hub)
    assert [c["kind"] for c in first] == ["restart"]
    again = await next_commands(hub)
    assert again == first  # not acknowledged yet: sent again
    assert not task.done()

    after = await next_commands(hub, [result_body(first[0]["id"], exit_code=0)])
    outcome = await asyncio.wait_for(task, 1)

    assert after == []
    assert outcome == RestartOutcome(
        ok=True,
        message="restart of n1: the restart command exited 0 after 2.5 s",
        exit_code=0,
        output_tail="restarted\n",
        command_id=first[0]["id"],
        duration_s=2.5,
    )
    info = hub.info("n1")
    assert info is not None
    assert info.last_command is not None
    assert info.last_command["id"] == first[0]["id"]


async def test_failed_restart_carries_exit_code_and_output() -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body())
    task = asyncio.create_task(hub.restart("n1", timeout_s=5))
    [command] = await next_commands(hub)

    await next_commands(hub, [result_body(command["id"], exit_code=3, output_tail="unit not found")])
    outcome = await task

    assert not outcome.ok
    assert outcome.exit_code == 3
    assert outcome.output_tail == "unit not found"
    assert "exited 3" in outcome.message


async def test_killed_restart_is_not_ok() -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body())
    task = asyncio.create_task(hub.restart("n1", timeout_s=5))
    [command] = await next_commands(hub)

    await next_commands(hub, [result_body(command["id"], exit_code=None, error="timed out after 300 s; killed")])
    outcome = await task

    assert not outcome.ok
    assert outcome.message == "restart of n1 failed: timed out after 300 s; killed"


async def test_restart_times_out_and_withdraws_the_command() -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body())

    outcome = await hub.restart("n1", timeout_s=0.05)

    assert not outcome.ok
    assert outcome.command_id
    assert "did not fetch the command within 0.05 s" in outcome.message
    assert await next_commands(hub) == []


async def test_restart_timeout_after_hand_out_says_so() -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body())
    task = asyncio.create_task(hub.restart("n1", timeout_s=0.2))
    assert len(await next_commands(hub)) == 1

    outcome = await task

    assert not outcome.ok
    assert "took the command but reported no result" in outcome.message
    # a late result is still recorded, though nobody waits for it
    await next_commands(hub, [result_body(outcome.command_id)])
    info = hub.info("n1")
    assert info is not None
    assert info.last_command is not None
    assert info.last_command["id"] == outcome.command_id


async def test_concurrent_restarts_share_one_command() -> None:
    hub, _ = make_hub(n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body())
    first = asyncio.create_task(hub.restart("n1", timeout_s=5))
    second = asyncio.create_task(hub.restart("n1", timeout_s=5))

    commands = await next_commands(hub)
    assert len(commands) == 1
    await next_commands(hub, [result_body(commands[0]["id"])])

    one, two = await asyncio.gather(first, second)
    assert one.ok
    assert two.ok
    assert one.command_id == two.command_id == commands[0]["id"]


async def test_restart_without_an_agent_returns_at_once() -> None:
    hub, _ = make_hub(n1=TOKEN)

    outcome = await asyncio.wait_for(hub.restart("n1", timeout_s=60), 0.5)

    assert outcome == RestartOutcome(ok=False, message="no agent for n1: restart skipped")


async def test_restart_with_a_stale_agent_returns_at_once() -> None:
    clock = FakeClock()
    hub, _ = make_hub(clock, n1=TOKEN)
    hub.handle_report("n1", AUTH, report_body(interval_s=1.0))
    clock.advance(3.5)

    outcome = await asyncio.wait_for(hub.restart("n1", timeout_s=60), 0.5)

    assert not outcome.ok
    assert outcome.message == "no agent for n1: restart skipped"
    assert await next_commands(hub) == []


async def test_restart_of_an_unknown_node() -> None:
    hub, _ = make_hub(n1=TOKEN)

    outcome = await hub.restart("ghost", timeout_s=60)

    assert not outcome.ok
    assert "unknown node 'ghost'" in outcome.message
