"""Theme files → :class:`textual.theme.Theme`, and the theme the console falls back to.

Themes are data (``themes/*.toml``) so an operator can add or edit one without touching code, which means
a theme file can be wrong. Each file is validated into a :class:`ThemeFile` (every colour through
textual's ``Color.parse``); a bad file is reported as a *problem* rather than raised, and the app turns
all problems into one notification and keeps running on :data:`FALLBACK_THEME`, which lives here in code
so that the console always has a theme.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from textual.color import Color, ColorParseError
from textual.theme import Theme

from cortex.config import format_validation_error

__all__ = ["FALLBACK_THEME", "ThemeFile", "ThemeSet", "find_theme_dir", "load_themes"]

FALLBACK_THEME = Theme(
    name="cortex-builtin",
    primary="#4EA1D3",
    secondary="#2E6F95",
    accent="#E0AF68",
    warning="#E0AF68",
    error="#F7768E",
    success="#9ECE6A",
    foreground="#C8D0E8",
    background="#14161F",
    surface="#1B1E2B",
    panel="#262B3D",
    dark=True,
)
"""The theme used when the configured one is missing or its file is bad."""

_COLOUR_FIELDS = (
    "primary",
    "secondary",
    "warning",
    "error",
    "success",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
)


class ThemeFile(BaseModel):
    """One ``themes/*.toml`` file: the fields of :class:`textual.theme.Theme`, colours checked."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    """The theme's name; empty = the file name without ``.toml``."""
    primary: str
    secondary: str | None = None
    warning: str | None = None
    error: str | None = None
    success: str | None = None
    accent: str | None = None
    foreground: str | None = None
    background: str | None = None
    surface: str | None = None
    panel: str | None = None
    boost: str | None = None
    dark: bool = True
    """Whether this is a dark theme (textual derives its shades from it)."""
    luminosity_spread: float = 0.15
    text_alpha: float = 0.95
    variables: dict[str, str] = {}
    """Extra textual CSS variables (``footer-key-foreground`` ...), passed through as given."""

    @field_validator(*_COLOUR_FIELDS)
    @classmethod
    def _colour(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Color.parse(value)
            except ColorParseError:
                raise ValueError(f"not a colour: {value!r}") from None
        return value

    def to_theme(self, default_name: str) -> Theme:
        """The textual theme this file describes."""
        colours = {name: getattr(self, name) for name in _COLOUR_FIELDS}
        return Theme(
            name=self.name or default_name,
            dark=self.dark,
            luminosity_spread=self.luminosity_spread,
            text_alpha=self.text_alpha,
            variables=dict(self.variables),
            **colours,
        )


@dataclass
class ThemeSet:
    """The themes found in a folder, and what was wrong with the files that failed."""

    themes: list[Theme] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_theme_dir(explicit: Path | None, configured: str) -> tuple[Path | None, bool]:
    """Where theme files live, and whether the operator named the place (so its absence is news).

    Args:
        explicit: the app's ``theme_dir`` argument.
        configured: ``tui.theme_dir`` from the settings ("" = not set).

    Returns:
        The folder (None when the shipped one is not there either) and whether it was named explicitly.
    """
    if explicit is not None:
        return explicit, True
    if configured:
        return Path(configured).expanduser(), True
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "themes", here.parents[1] / "_themes"):
        if candidate.is_dir():
            return candidate, False
    return None, False


def load_themes(directory: Path | None, *, explicit: bool = False) -> ThemeSet:
    """Read every ``*.toml`` in a folder; bad files become problems, not exceptions."""
    found = ThemeSet()
    if directory is None or not directory.is_dir():
        if explicit:
            found.problems.append(f"theme folder {str(directory)!r} not found")
        return found
    for path in sorted(directory.glob("*.toml")):
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
            found.themes.append(ThemeFile.model_validate(data).to_theme(path.stem))
        except tomllib.TOMLDecodeError as exc:
            found.problems.append(f"{path.name}: not valid TOML: {exc}")
        except ValidationError as exc:
            found.problems.append(f"{path.name}: " + "; ".join(format_validation_error(exc)))
        except OSError as exc:
            found.problems.append(f"{path.name}: {exc.strerror}")
    return found
