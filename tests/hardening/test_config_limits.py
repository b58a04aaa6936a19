"""Config-level hardening: node URLs with credentials are refused, the connection limit fits the fd limit."""

from __future__ import annotations

import resource

import pytest
from pydantic import ValidationError

from cortex.config import NodeSettings, format_validation_error
from cortex.proxy import app


@pytest.mark.parametrize("endpoint", ["http://user:pass@gpu:1234", "https://token@gpu", "http://:pw@gpu:1"])
def test_credentials_in_a_node_url_are_refused(endpoint: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NodeSettings(name="gpu", endpoint=endpoint, vram_mb=1000)
    [line] = format_validation_error(exc.value)
    assert line.startswith("endpoint: credentials in the URL are not supported")
    assert "pass" not in line
    assert "token" not in line


def test_the_connection_limit_is_lowered_to_fit_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 1024))
    assert app._connection_limit(2048) == (1024 - 64) // 2
    assert "lowered to 480" in caplog.text
    caplog.clear()
    assert app._connection_limit(100) == 100
    assert not caplog.records


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 65536))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, limits: calls.append(limits))
    assert app._connection_limit(2048) == 2048
    assert calls == [(65536, 65536)]
