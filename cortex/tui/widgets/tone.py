"""Toned runs (:mod:`cortex.tui.render`) as textual ``Content`` styled with theme variables.

Text widgets (the header, the sparkline captions, the detail screen) take ``Content``, whose styles may
name theme variables; the mapping from tone to variable lives here once, so there is no colour literal
anywhere in the console.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.content import Content

from cortex.tui.render import Cell

__all__ = ["tone_content"]

TONE_STYLE = {
    "": "",
    "success": "$success",
    "warning": "$warning",
    "error": "bold $error",
    "muted": "$text-muted",
    "accent": "bold $accent",
}


def tone_content(lines: Sequence[Cell]) -> Content:
    """Lines of toned runs as one Content, one line each."""
    return Content("\n").join(
        Content.assemble(*((text, TONE_STYLE.get(tone, "")) for text, tone in line)) for line in lines
    )
