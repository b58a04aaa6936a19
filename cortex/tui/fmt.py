"""Small text formatters shared by the console's render functions.

They live apart from :mod:`cortex.tui.render` so that the tables, the detail screen and the notices all
print a duration, a size or a rate the same way, and so that each is testable without a snapshot.
"""

from __future__ import annotations

import datetime as dt

__all__ = [
    "age",
    "clock_time",
    "duration",
    "mb",
    "rate",
    "seconds",
    "short_age",
    "short_duration",
    "short_model",
    "vram",
]

DASH = "\u2013"
"""What an absent figure prints as."""


def duration(secs: float) -> str:
    """A compact duration: ``42s``, ``3m05s``, ``2h07m``, ``3d04h``."""
    s = max(0, int(secs))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def short_duration(secs: float) -> str:
    """A duration in its largest unit only, for narrow columns: ``42s``, ``3m``, ``2h``, ``3d``."""
    s = max(0, int(secs))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def short_age(ts: float, now: float) -> str:
    """:func:`age` in its largest unit only."""
    return "never" if ts <= 0 else short_duration(now - ts)


def age(ts: float, now: float) -> str:
    """How long ago a wall-clock time was (``never`` for 0)."""
    if ts <= 0:
        return "never"
    return duration(now - ts)


def mb(value: int | None) -> str:
    """A memory size given in MiB: ``512M``, ``23.1G``."""
    if value is None:
        return "?"
    if abs(value) < 1024:
        return f"{value}M"
    return f"{value / 1024:.1f}G"


def vram(used: int, total: int) -> str:
    """Used over total memory with one unit: ``36.0/48.0G`` (``900/1024M`` below a GiB)."""
    if total < 1024:
        return f"{used}/{total}M"
    return f"{used / 1024:.1f}/{total / 1024:.1f}G"


def rate(value: float | None) -> str:
    """A per-second figure with as many decimals as it deserves."""
    if value is None or value <= 0:
        return DASH
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def seconds(value: float | None) -> str:
    """A latency: ``850ms``, ``1.24s``, ``12.0s``."""
    if value is None:
        return DASH
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 10:
        return f"{value:.2f}s"
    return f"{value:.1f}s"


def clock_time(ts: float, tz: dt.tzinfo | None) -> str:
    """``HH:MM:SS`` of a wall-clock time, in `tz` (None = the local zone)."""
    return dt.datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")


def short_model(model_id: str) -> str:
    """A model id without its organisation (``org/name`` → ``name``), for narrow columns."""
    return model_id.rsplit("/", 1)[-1]
