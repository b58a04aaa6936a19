"""``cortex.engine.deadline.Deadline``: one loop timer that follows the last time set, later or sooner."""

from __future__ import annotations

import asyncio

from cortex.engine.deadline import Deadline


async def test_it_fires_at_the_last_time_set_later_or_sooner() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    deadline = Deadline(loop, lambda: fired.append(loop.time()))
    start = loop.time()
    deadline.set(start + 0.05)
    deadline.set(start + 0.15)  # moved later: the armed timer fires early and re-arms
    await asyncio.sleep(0.1)
    assert fired == []
    assert deadline.pending
    await asyncio.sleep(0.1)
    assert len(fired) == 1
    assert fired[0] >= start + 0.15
    assert not deadline.pending
    deadline.set(loop.time() + 5.0)
    deadline.set(loop.time() + 0.03)  # moved sooner: re-armed at once
    await asyncio.sleep(0.1)
    assert len(fired) == 2, "a sooner time is kept, not the armed later one"


async def test_clear_and_cancel_stop_it() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    cleared = Deadline(loop, lambda: fired.append("cleared"))
    cancelled = Deadline(loop, lambda: fired.append("cancelled"))
    cleared.set(loop.time() + 0.02)
    cancelled.set(loop.time() + 0.02)
    cleared.clear()
    cancelled.cancel()
    assert not cleared.pending
    await asyncio.sleep(0.06)
    assert fired == []
    cleared.set(loop.time() + 0.02)  # usable again after a clear
    await asyncio.sleep(0.06)
    assert fired == ["cleared"]
