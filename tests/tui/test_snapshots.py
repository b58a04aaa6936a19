"""The main views as SVG snapshots at the smallest supported size and a common one.

Update with ``pytest tests/tui --snapshot-update`` and look at every changed SVG before committing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from textual.pilot import Pilot

SnapCompare = Callable[..., bool]
APP = "snapshot_app.py"
SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])


@SIZES
def test_dashboard(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(APP, terminal_size=size)


@SIZES
def test_help_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(APP, press=["question_mark"], terminal_size=size)


@SIZES
def test_confirm_dialog(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(APP, press=["R"], terminal_size=size)


async def _whatif_shown(pilot: Pilot[int]) -> None:
    await pilot.press("tab", "enter", "w")
    running = [w for w in pilot.app.workers if w.group == "whatif"]
    if running:  # an empty list would mean every worker, the endless event stream included
        await pilot.app.workers.wait_for_complete(running)
    await pilot.pause()


@SIZES
def test_whatif_on_the_detail_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(APP, run_before=_whatif_shown, terminal_size=size)
