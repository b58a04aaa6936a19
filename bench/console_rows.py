"""The console with a 2,048-model catalogue: what one redraw and one filter keystroke cost (issue 18 point 4).

    python bench/console_rows.py [--nodes 64] [--models 32] [--ticks 8] [--out FILE]

In-process and headless (Textual's ``run_test``, 160x50): the console of ``tests/tui/fakes.py`` on a
snapshot whose catalogue has ``--nodes`` x ``--models`` entries. It times, with ``time.perf_counter``
around the call and the pause that lets Textual paint:

* ``model_rows`` alone (formatting every row of the models table);
* one redraw per tick with a new snapshot whose in-flight figures and last-use times moved (what the
  dashboard does every second while anything changes);
* typing a 10-character filter (one redraw per key) and clearing it.

The console shares its loop with the gateway, so a redraw is time the gateway's requests wait: these are
the figures to bring down (a virtualised models table formats only the rows on screen).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import median, save_results  # noqa: E402


def snapshot(nodes: int, models: int, tick: int) -> Any:
    from cortex.engine.state import ModelView
    from tests.tui.fakes import NOW, build_fleet

    views = []
    for i in range(nodes):
        for j in range(models):
            loaded = j < 2
            views.append(
                ModelView(
                    f"org{i:02d}/model-{i:02d}-{j:02d}",
                    "loaded" if loaded else "unloaded",
                    (f"n{i:02d}",) if loaded else (),
                    (f"n{i:02d}",),
                    False,
                    in_flight=(tick + j) % 3 if loaded else 0,
                    last_used=NOW - 10 - j,
                )
            )
    return dataclasses.replace(build_fleet(NOW), models=tuple(views), taken_at=NOW + tick)


async def measure(nodes: int, models: int, ticks: int) -> dict[str, Any]:
    from cortex.tui.render import model_rows
    from tests.tui.fakes import NOW, FakeEngine, build_app

    engine = FakeEngine(snapshot(nodes, models, 0))
    app = build_app(engine)
    result: dict[str, Any] = {"rows": nodes * models}
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        screen: Any = app.screen
        rows_ms = []
        for _ in range(3):
            t0 = time.perf_counter()
            model_rows(engine.fleet, NOW)
            rows_ms.append((time.perf_counter() - t0) * 1000)
        result["model_rows_ms"] = median(rows_ms)
        redraw_ms = []
        for tick in range(1, ticks + 1):
            engine.fleet = snapshot(nodes, models, tick)
            t0 = time.perf_counter()
            screen.show(engine.fleet, NOW + tick)
            await pilot.pause()
            redraw_ms.append((time.perf_counter() - t0) * 1000)
        result["redraw_ms"] = median(redraw_ms)
        result["redraw_max_ms"] = max(redraw_ms)
        needle = "model-05-1"
        t0 = time.perf_counter()
        await pilot.press("slash", *needle, "enter")
        await pilot.pause()
        result["filter_ms_per_key"] = (time.perf_counter() - t0) * 1000 / len(needle)
        result["filtered_rows"] = screen.tables["models"].row_count
        t0 = time.perf_counter()
        await pilot.press("escape")
        await pilot.pause()
        result["clear_ms"] = (time.perf_counter() - t0) * 1000
        result["rows_after_clear"] = screen.tables["models"].row_count
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description="the console with a large catalogue")
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--ticks", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = asyncio.run(measure(args.nodes, args.models, args.ticks))
    for key, value in result.items():
        print(f"  {key:20s} {value:.1f}" if isinstance(value, float) else f"  {key:20s} {value}")
    save_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
