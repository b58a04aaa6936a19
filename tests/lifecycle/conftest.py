"""Fixtures for the lifecycle integration tests: simulated nodes on loopback and an HTTP session."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import aiohttp
import pytest

from cortex.sim import SimModel, SimNode


class SimFactory(Protocol):
    async def __call__(self, name: str, models: Sequence[SimModel], **kwargs: Any) -> SimNode: ...


@pytest.fixture
async def sims() -> AsyncIterator[SimFactory]:
    """Start simulated nodes (no token delay, 0.1 s loads, 8 GiB unless given); all stopped at teardown."""
    started: list[SimNode] = []

    async def factory(name: str, models: Sequence[SimModel], **kwargs: Any) -> SimNode:
        kwargs.setdefault("tok_s", 0)
        kwargs.setdefault("load_s", 0.1)
        kwargs.setdefault("vram_mb", 8192)
        node = SimNode(models, name=name, **kwargs)
        await node.start()
        started.append(node)
        return node

    yield factory
    for node in started:
        await node.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
