"""Fixtures of the console tests: no cursor blink, no animations, no NO_COLOR, a fake engine."""

from __future__ import annotations

import pytest
import textual.constants
from textual.widgets import Input

from tests.tui.fakes import FakeEngine
from tests.tui.pilots import Messages


@pytest.fixture(autouse=True)
def _steady_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeze the input cursor and turn animations off, so renders and timings do not drift."""
    monkeypatch.setattr(Input, "_toggle_cursor", lambda self: None)
    monkeypatch.setattr(textual.constants, "TEXTUAL_ANIMATIONS", "none")
    monkeypatch.delenv("NO_COLOR", raising=False)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def messages() -> Messages:
    return Messages()
