"""``cortex check-config``: one ``key.path: problem`` line per error and exit 2 (§1).

The contract cases run ``python -m cortex`` in a subprocess, as a user would; the variations call
:func:`cortex.cli.main` in-process (same code path after ``sys.argv``) to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from cortex.cli import main
from tests.cli.helpers import ROOT, run_cortex


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


CliRunner = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> CliRunner:
    """``cortex ARGS`` in-process, in tmp_path, with only the given CORTEX_* variables."""
    for key in list(os.environ):
        if key.startswith("CORTEX_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def run(*args: str, **env: str) -> Result:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        for key in env:
            monkeypatch.delenv(key)
        return Result(code, out.out, out.err)

    return run


BAD = """
[gateway]
listen = "8000"
max_queue = 0
[eviction]
strategy = "fifo"
[[nodes]]
name = "a"
endpoint = "http://a:1234"
vram_mb = 1000
[[nodes]]
name = "b"
endpoint = "not a url"
vram_mb = 1000
"""

GOOD = """
[gateway]
listen = "127.0.0.1:8123"
admin_token = "adm-s3cret"
[[nodes]]
name = "a"
endpoint = "http://a:1234"
vram_mb = 1000
"""


def test_bad_config_one_line_per_error_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(BAD)
    proc = run_cortex(tmp_path, "check-config", "--config", "bad.toml")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "gateway.listen: expected HOST:PORT, e.g. 127.0.0.1:8000",
        "gateway.max_queue: Input should be greater than 0",
        "eviction.strategy: Input should be 'lru', 'priority' or 'cost'",
        "nodes[1].endpoint: not a URL (expected http://HOST:PORT)",
    ]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_global_flag_before_the_subcommand(tmp_path: Path, cli: CliRunner) -> None:
    (tmp_path / "bad.toml").write_text(BAD)
    proc = cli("--config", "bad.toml", "check-config")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 4


def test_duplicate_node_names(tmp_path: Path, cli: CliRunner) -> None:
    node = '[[nodes]]\nname = "a"\nendpoint = "http://a:1"\nvram_mb = 1\n'
    (tmp_path / "dup.toml").write_text(node + node)
    proc = cli("check-config", "--config", "dup.toml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["nodes: duplicate node name 'a'"]


@pytest.mark.parametrize(
    ("args", "setup", "expect"),
    [
        (["--config", "missing.toml"], None, r"^cortex: --config: no such file .*missing\.toml'$"),
        ([], "not = [valid", r"^cortex: cortex\.toml: not valid TOML: "),
    ],
    ids=["missing-file", "invalid-toml"],
)
def test_unreadable_config_is_one_line_exit_2(
    tmp_path: Path, cli: CliRunner, args: list[str], setup: str | None, expect: str
) -> None:
    if setup is not None:
        (tmp_path / "cortex.toml").write_text(setup)
    proc = cli("check-config", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(expect, lines[0]), lines


def test_good_config_prints_resolved_settings_without_secrets(tmp_path: Path, cli: CliRunner) -> None:
    (tmp_path / "cortex.toml").write_text(GOOD)  # found as ./cortex.toml
    proc = cli("check-config", CORTEX_POLL__DOWN_AFTER="9")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["gateway"]["listen"] == "127.0.0.1:8123"
    assert resolved["poll"]["down_after"] == 9  # env override applied
    assert resolved["nodes"][0]["endpoint"] == "http://a:1234"
    assert "adm-s3cret" not in proc.stdout


def test_env_override_of_listen_and_cortex_config(tmp_path: Path, cli: CliRunner) -> None:
    (tmp_path / "elsewhere.toml").write_text(GOOD)
    proc = cli(
        "check-config",
        CORTEX_CONFIG=str(tmp_path / "elsewhere.toml"),
        CORTEX_GATEWAY__LISTEN="127.0.0.1:9001",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["gateway"]["listen"] == "127.0.0.1:9001"
    bad = cli("check-config", CORTEX_GATEWAY__LISTEN="nowhere")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[0].startswith("gateway.listen: ")


def test_repository_example_passes_check_config(cli: CliRunner) -> None:
    proc = cli("check-config", "--config", str(ROOT / "cortex.toml"))
    assert proc.returncode == 0, proc.stderr
    assert [n["name"] for n in json.loads(proc.stdout)["nodes"]] == ["gpu-large", "gpu-medium", "gpu-small"]


def test_serve_without_nodes_is_a_config_error(tmp_path: Path, cli: CliRunner) -> None:
    (tmp_path / "empty.toml").write_text('[gateway]\nlisten = "127.0.0.1:0"\n')
    proc = cli("--no-tui", "--config", "empty.toml")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["cortex: nodes: no [[nodes]] configured (try `cortex --demo`)"]


def test_version(cli: CliRunner) -> None:
    proc = cli("--version")
    assert proc.returncode == 0
    assert re.fullmatch(r"cortex \d+\.\d+\.\d+\S*\n", proc.stdout)


def test_a_non_json_env_value_is_one_line_exit_2(cli: CliRunner) -> None:
    proc = cli("check-config", CORTEX_GATEWAY__API_KEYS="sk-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cortex: gateway.api_keys: environment variable CORTEX_GATEWAY__API_KEYS must be JSON"
        " (Expecting value: line 1 column 1 (char 0))"
    ]
