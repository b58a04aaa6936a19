"""An address that cannot be bound is one line naming the right key, and exit 1 (no traceback)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import cortex.runtime
from cortex.cli import main


@pytest.fixture
def taken_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CORTEX_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    # `cortex` replaces the root logger's handlers; keep pytest's.
    monkeypatch.setattr(cortex.runtime, "configure_logging", lambda **_kw: None)


def _config(tmp_path: Path, listen: str, metrics: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[gateway]\nlisten = "{listen}"\nmetrics_listen = "{metrics}"\n'
        '[[nodes]]\nname = "a"\nendpoint = "http://127.0.0.1:9"\nvram_mb = 1000\n'
    )
    return str(path)


@pytest.mark.parametrize("which", ["listen", "metrics_listen"])
def test_port_in_use_names_the_key(
    tmp_path: Path, taken_port: int, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = f"127.0.0.1:{taken_port}"
    config = _config(tmp_path, taken, "") if which == "listen" else _config(tmp_path, "127.0.0.1:0", taken)
    assert main(["--no-tui", "--config", config]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cortex: gateway.{which}: cannot listen on {taken}: "), lines
    assert "in use" in lines[0]
