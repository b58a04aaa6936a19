"""Fixtures for the simulator tests: nodes on ephemeral loopback ports, and an aiohttp client session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import aiohttp
import pytest

from cortex.sim import SimModel, SimNode

ALPHA = "org/alpha"
BETA = "org/beta"


class NodeFactory(Protocol):
    async def __call__(self, models: Sequence[SimModel] | None = None, **kwargs: Any) -> SimNode: ...


@pytest.fixture
async def make_node() -> AsyncIterator[NodeFactory]:
    """Start nodes (default: alpha loaded 4000 MiB, beta unloaded 2000 MiB, no token delay, 0.1 s loads)."""
    nodes: list[SimNode] = []

    async def factory(models: Sequence[SimModel] | None = None, **kwargs: Any) -> SimNode:
        kwargs.setdefault("tok_s", 0)
        kwargs.setdefault("load_s", 0.1)
        if models is None:
            models = [SimModel(ALPHA, 4000), SimModel(BETA, 2000, loaded=False)]
        node = SimNode(models, **kwargs)
        await node.start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        await node.stop()


@pytest.fixture
async def node(make_node: NodeFactory) -> SimNode:
    return await make_node()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
