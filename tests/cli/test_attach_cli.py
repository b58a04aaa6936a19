"""``cortex attach`` and ``cortex`` on a taken address: which gateway, which token, read-only or not."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cortex import cli, runtime
from cortex.config import Settings
from cortex.sim import SimModel
from tests.cli.helpers import run_cortex_async
from tests.conftest import FleetFactory, NodeSpec


@pytest.fixture
def attached(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what `cortex attach` would attach to, instead of opening a console on the test's terminal."""
    calls: list[dict[str, Any]] = []

    async def fake_attach(url: str, token: str, settings: Settings, *, read_only: bool) -> int:
        calls.append({"url": url, "token": token, "read_only": read_only})
        return 0

    monkeypatch.setattr(runtime, "attach", fake_attach)
    monkeypatch.setattr(runtime, "configure_logging", lambda **_: None)
    return calls


def write(tmp_path: Path, gateway: str) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text(f"[gateway]\n{gateway}\n")
    return path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {"url": "http://127.0.0.1:8123", "token": "s3cret", "read_only": False}),
        (["--read-only"], {"url": "http://127.0.0.1:8123", "token": "s3cret", "read_only": True}),
        # A URL typed on the command line never receives the config's token: read-only, no token sent.
        (["http://elsewhere:8000"], {"url": "http://elsewhere:8000", "token": "", "read_only": True}),
        (["http://elsewhere:8000", "--token", "t"], {"url": "http://elsewhere:8000", "token": "t", "read_only": False}),
        (["http://elsewhere:8000/", "--read-write"], {"url": "http://elsewhere:8000", "token": "", "read_only": False}),
    ],
    ids=["config", "forced-read-only", "url-no-token", "url-token", "url-read-write"],
)
def test_attach_picks_the_gateway_token_and_mode(
    tmp_path: Path, attached: list[dict[str, Any]], argv: list[str], expected: dict[str, Any]
) -> None:
    path = write(tmp_path, 'listen = "0.0.0.0:8123"\nadmin_token = "s3cret"')
    assert cli.main(["--config", str(path), "attach", *argv]) == 0
    assert attached == [expected]


def test_attach_without_a_token_is_read_only(tmp_path: Path, attached: list[dict[str, Any]]) -> None:
    path = write(tmp_path, 'listen = "127.0.0.1:8124"')
    assert cli.main(["--config", str(path), "attach"]) == 0
    assert attached == [{"url": "http://127.0.0.1:8124", "token": "", "read_only": True}]


async def test_a_taken_address_held_by_cortex_points_to_attach(fleet: FleetFactory, tmp_path: Path) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    host_port = f.url.removeprefix("http://")
    path = tmp_path / "cortex.toml"
    path.write_text(
        f'[gateway]\nlisten = "{host_port}"\nmetrics_listen = ""\n'
        f'[[nodes]]\nname = "a"\nendpoint = "{f.sim("a").url}"\nvram_mb = 8192\n'
    )
    code, _, err = await run_cortex_async(tmp_path, "--no-tui", "--config", str(path))
    assert code == 1
    assert f"gateway.listen: cannot listen on {host_port}" in err
    assert f"a cortex gateway already runs at {f.url}; `cortex attach {f.url}` shows its console" in err


async def test_on_a_terminal_cortex_offers_to_attach(
    fleet: FleetFactory, tmp_path: Path, attached: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]))
    settings = Settings.model_validate({"gateway": {"listen": f.url.removeprefix("http://")}})
    args = cli.build_parser().parse_args([])
    answers = iter(["n", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(answers))
    # (in a thread: the CLI's probe is a blocking HTTP call, and this loop serves the gateway it probes)
    assert await asyncio.to_thread(cli._offer_attach, args, settings, interactive=True) == 1  # "n": just the failure
    assert attached == []
    assert await asyncio.to_thread(cli._offer_attach, args, settings, interactive=True) == 0  # Enter: attach
    # Its own gateway, as `cortex` was started: with its token (none here) and the actions (no --read-only).
    assert attached == [{"url": f.url, "token": "", "read_only": False}]


def test_nothing_is_offered_when_something_else_holds_the_address(tmp_path: Path) -> None:
    settings = Settings.model_validate({"gateway": {"listen": "127.0.0.1:9"}})  # discard: nobody answers
    args = cli.build_parser().parse_args([])
    assert cli._offer_attach(args, settings, interactive=True) == 1
