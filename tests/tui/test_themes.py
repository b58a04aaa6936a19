"""Theme files: the shipped ones load, bad ones become one notification and the built-in fallback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from cortex.tui.themes import FALLBACK_THEME, ThemeFile, find_theme_dir, load_themes
from tests.tui.fakes import REPO_THEMES, build_app
from tests.tui.pilots import Messages

TCSS = Path(__file__).resolve().parents[2] / "cortex" / "tui" / "cortex.tcss"


def test_shipped_themes_load() -> None:
    found = load_themes(REPO_THEMES)
    assert found.problems == []
    assert [t.name for t in found.themes] == ["cortex-dark", "cortex-light"]
    assert [t.dark for t in found.themes] == [True, False]


def test_theme_file_rejects_a_bad_colour_and_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="not a colour"):
        ThemeFile.model_validate({"primary": "#12345z"})
    with pytest.raises(ValidationError):
        ThemeFile.model_validate({"primary": "#123456", "primry": "#123456"})
    assert ThemeFile.model_validate({"primary": "rgb(1,2,3)"}).to_theme("x").name == "x"


def test_theme_dir_resolution(tmp_path: Path) -> None:
    assert find_theme_dir(tmp_path, "/elsewhere") == (tmp_path, True)
    assert find_theme_dir(None, str(tmp_path)) == (tmp_path, True)
    assert find_theme_dir(None, "") == (REPO_THEMES, False)
    assert load_themes(tmp_path / "missing", explicit=True).problems == [
        f"theme folder {str(tmp_path / 'missing')!r} not found"
    ]
    assert load_themes(None).problems == []


def test_stylesheet_uses_theme_variables_only() -> None:
    declarations = re.findall(r":\s*([^;{}]+);", TCSS.read_text())
    assert declarations, "no declarations found"
    assert not [d for d in declarations if re.search(r"#[0-9a-fA-F]{3,8}\b|rgb\(|hsl\(", d)]


async def test_bad_theme_file_gives_one_error_and_the_fallback(tmp_path: Path, messages: Messages) -> None:
    (tmp_path / "cortex-dark.toml").write_text('primary = "definitely-not-a-colour"\n')
    (tmp_path / "cortex-light.toml").write_text((REPO_THEMES / "cortex-light.toml").read_text())
    (tmp_path / "broken.toml").write_text("primary = [unclosed\n")
    app = build_app(theme_dir=tmp_path)
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        await pilot.pause()
        notes = messages.notifications()
        assert len(notes) == 1
        assert notes[0].severity == "error"
        assert "cortex-dark.toml" in notes[0].message
        assert "broken.toml" in notes[0].message
        assert app.theme == FALLBACK_THEME.name
        await pilot.press("t")
        assert app.theme == "cortex-light"


async def test_missing_theme_folder_falls_back(tmp_path: Path, messages: Messages) -> None:
    app = build_app(theme_dir=tmp_path / "nowhere")
    async with app.run_test(size=(80, 24), message_hook=messages.append) as pilot:
        await pilot.pause()
        assert [n.severity for n in messages.notifications()] == ["error"]
        assert app.theme == FALLBACK_THEME.name
        await pilot.press("t")
        assert app.theme == FALLBACK_THEME.name  # the only theme there is


async def test_t_cycles_the_loaded_themes(messages: Messages) -> None:
    app = build_app()
    async with app.run_test(size=(120, 40), message_hook=messages.append) as pilot:
        assert app.theme == "cortex-dark"
        await pilot.press("t")
        assert app.theme == "cortex-light"
        await pilot.press("t")
        assert app.theme == "cortex-dark"
        # Each switch names the theme it switched to (issue 16), and nothing else is said.
        notes = [(n.title, n.message, n.severity) for n in messages.notifications()]
        assert notes == [
            ("theme", "cortex-light (2 of 2)", "information"),
            ("theme", "cortex-dark (1 of 2)", "information"),
        ]


async def test_a_builtin_textual_theme_can_be_configured(messages: Messages) -> None:
    app = build_app(theme="nord")
    async with app.run_test(size=(80, 24), message_hook=messages.append) as pilot:
        assert app.theme == "nord"
        await pilot.press("t")
        assert app.theme == "cortex-dark"
        assert [(n.title, n.message) for n in messages.notifications()] == [("theme", "cortex-dark (2 of 3)")]
