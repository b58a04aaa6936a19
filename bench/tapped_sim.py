"""``cortex sim`` with timestamps, for ``bench/cold_load.py``: the same flags, plus one line per event on stdout.

    python bench/tapped_sim.py --port P --model ID=MB --unloaded ID --load-s 2 --tok-s 0

Lines are ``EVENT MONOTONIC DETAIL`` (``time.monotonic()``, which every process on the machine shares):
``reload_start``/``reload_answer`` around each ``/v1/models/reload`` (the answer's status as detail) and
``chat`` for each chat request as it arrives (the requested model as detail), ``http`` for any other
request (method and path). Nothing else changes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

from cortex.sim.cli import add_sim_arguments, build_node, serve


def emit(kind: str, at: float, detail: str) -> None:
    sys.stdout.write(f"{kind} {at:.6f} {detail}\n")
    sys.stdout.flush()


class ArrivalTap(list):  # type: ignore[type-arg]
    """Stands in for ``SimNode.requests``: reports chat arrivals instead of keeping them."""

    def append(self, item: Any) -> None:
        if item.path == "/v1/chat/completions":
            model = item.json.get("model") if isinstance(item.json, dict) else None
            emit("chat", item.at, str(model))
        else:
            emit("http", item.at, f"{item.method} {item.path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sim_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    node = build_node(args)
    table = node.models
    reload = table.reload

    async def timed_reload(model_id: str, load_s: float, *, bug: bool) -> tuple[str, str | None]:
        emit("reload_start", time.monotonic(), model_id)
        result = await reload(model_id, load_s, bug=bug)
        emit("reload_answer", time.monotonic(), f"{model_id} {result[0]}")
        return result

    table.reload = timed_reload  # type: ignore[method-assign]
    node.record_requests = True
    node.requests = ArrivalTap()
    return asyncio.run(serve(node, table.loaded_ids()))


if __name__ == "__main__":
    raise SystemExit(main())
