"""What kind of model each id is (text, diffusion, speech...), when its nodes say it.

A mistral.rs ``[[models]]`` entry has a ``kind`` (auto, text, multimodal, diffusion, speech, embedding), but
the server's ``/v1/models`` at the spec's commit does not list it; a node that does (a newer server, or the
simulator) gives a ``kind`` per entry, and the gateway's ``/v1/models`` passes it on, so a client can tell
an image model from a chat model. A kind only changes when a node's server restarts with another config,
so each node's list is read once when it is first seen up and again when it comes back or restarts: one
extra ``GET /v1/models`` per node per restart, never one per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import aiohttp

from cortex.engine.affinity import server_epoch
from cortex.engine.state import NodeStatus

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["ModelKinds", "parse_kinds"]

log = logging.getLogger(__name__)


def parse_kinds(payload: Any) -> dict[str, str]:
    """Model id → kind from a ``/v1/models`` body (entries without a string ``kind`` are skipped)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    out: dict[str, str] = {}
    for entry in data if isinstance(data, list) else ():
        if not isinstance(entry, dict):
            continue
        model_id, kind = entry.get("id"), entry.get("kind")
        if isinstance(model_id, str) and model_id != "default" and isinstance(kind, str) and kind:
            out[model_id] = kind
    return out


class ModelKinds:
    """The kinds the nodes report, per node; :meth:`of` answers for the fleet."""

    def __init__(self) -> None:
        self.by_node: dict[str, dict[str, str]] = {}
        self._seen: dict[str, tuple[NodeStatus, int | None]] = {}

    def of(self, model_id: str) -> str | None:
        """The kind a node reports for ``model_id`` (nodes serving one id are expected to agree)."""
        for kinds in self.by_node.values():
            kind = kinds.get(model_id)
            if kind is not None:
                return kind
        return None

    async def run(self, engine: Engine) -> None:
        """Read the list of every node that came up or restarted since the last look (an engine task).

        It looks every five poll intervals (at least once a second), so a kind shows soon after its node.
        """
        while True:
            await engine.ready.wait()
            for node in list(engine.fleet.nodes.values()):
                seen = (node.status, server_epoch(node))
                if seen == self._seen.get(node.name):
                    continue
                if node.status is not NodeStatus.UP or await self._learn(engine, node.name, node.client.endpoint):
                    self._seen[node.name] = seen
            await asyncio.sleep(max(1.0, 5 * engine.settings.poll.interval_s))

    async def _learn(self, engine: Engine, name: str, endpoint: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=engine.settings.poll.timeout_s)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with engine.session.get(endpoint + "/v1/models", timeout=timeout) as resp:
                if resp.status == 200:
                    kinds = parse_kinds(await resp.json(content_type=None))
                    if kinds and kinds != self.by_node.get(name):
                        log.info("node %s reports model kinds: %s", name, kinds)
                    self.by_node[name] = kinds
                    return True
        return False
