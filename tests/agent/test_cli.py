from __future__ import annotations

import argparse

import pytest

from cortex.agent.cli import AgentUsageError, add_agent_arguments, config_from_args, run_agent

FULL = [
    "--node",
    "gpu-1",
    "--gateway",
    "http://gw:8000/",
    "--token",
    "tok",
    "--mistralrs",
    "http://127.0.0.1:1234",
    "--restart-cmd",
    "systemctl restart 'mistral rs'",
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CORTEX_AGENT_"):
            monkeypatch.delenv(name)


def test_flags_give_a_config_with_defaults() -> None:
    config = config_from_args(parse(FULL), environ={})

    assert config.node == "gpu-1"
    assert config.gateway == "http://gw:8000"
    assert config.report_url == "http://gw:8000/admin/agents/gpu-1/report"
    assert config.restart_argv == ("systemctl", "restart", "mistral rs")
    assert config.gpus is None
    assert (config.interval_s, config.restart_timeout_s, config.max_backoff_s) == (2.0, 300.0, 30.0)
    assert "tok" not in repr(config)


def test_environment_fills_in_and_flags_win() -> None:
    environ = {
        "CORTEX_AGENT_NODE": "env-node",
        "CORTEX_AGENT_GATEWAY": "https://gw.example",
        "CORTEX_AGENT_TOKEN": "env-token",
        "CORTEX_AGENT_MISTRALRS": "http://127.0.0.1:1234",
        "CORTEX_AGENT_RESTART_CMD": "/usr/local/bin/restart",
        "CORTEX_AGENT_GPUS": "1,0,1",
        "CORTEX_AGENT_INTERVAL": "0.5",
        "CORTEX_AGENT_RESTART_TIMEOUT": "60",
    }

    config = config_from_args(parse(["--node", "flag-node"]), environ=environ)

    assert config.node == "flag-node"
    assert config.token == "env-token"
    assert config.gateway == "https://gw.example"
    assert config.restart_argv == ("/usr/local/bin/restart",)
    assert config.gpus == (1, 0)
    assert (config.interval_s, config.restart_timeout_s) == (0.5, 60.0)


def test_missing_values_exit_2_with_one_line_naming_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_agent(parse(["--node", "n1", "--token", "tok"])) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--gateway" in err
    assert "--mistralrs" in err
    assert "--restart-cmd" in err
    assert "CORTEX_AGENT_GATEWAY" in err
    assert "--node" not in err
    assert "tok" not in err.replace("--token", "")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--interval", "0"], "--interval: expected seconds above 0"),
        (["--interval", "soon"], "--interval: expected seconds"),
        (["--restart-timeout", "-5"], "--restart-timeout"),
        (["--gpus", "0,x"], "--gpus: expected a comma-separated list"),
        (["--gpus", "-1"], "--gpus: -1 is not a GPU index"),
        (["--gateway", "ftp://gw"], "--gateway: 'ftp://gw' is not a URL"),
        (["--mistralrs", "http://h:99999"], "--mistralrs: 'http://h:99999' has a bad port"),
        (["--restart-cmd", "restart 'unbalanced"], "--restart-cmd: cannot split"),
        (["--restart-cmd", "   "], "--restart-cmd: the command is empty"),
        (["--node", "bad name"], "--node: 'bad name' is not a node name"),
    ],
    ids=["zero", "nan", "neg-timeout", "gpus-x", "gpus-neg", "ftp", "bad-port", "quote", "blank", "node"],
)
def test_invalid_values_name_the_flag(extra: list[str], fragment: str) -> None:
    with pytest.raises(AgentUsageError) as caught:
        config_from_args(parse(FULL + extra), environ={})

    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)
