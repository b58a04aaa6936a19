"""A gateway over one simulated node whose model answers to ``claude-*`` names, and an official SDK client.

Built on the shared ``fleet`` fixture (tests/conftest.py), which stops every server it started.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anthropic
import pytest

from cortex.config import ModelSettings
from cortex.sim import SimModel, SimNode
from tests.conftest import Fleet, FleetFactory, NodeSpec

MAX_OUTPUT = 64
"""``max_output_tokens`` of the aliased model: a larger ``max_tokens`` is clamped to it."""


@dataclass
class Gateway:
    """A running gateway for the Anthropic tests."""

    fleet: Fleet
    client: anthropic.AsyncAnthropic

    @property
    def url(self) -> str:
        return self.fleet.url

    @property
    def sim(self) -> SimNode:
        return self.fleet.sim("a")

    def upstream(self) -> list[dict[str, Any]]:
        """The chat bodies the node received, oldest first."""
        return [r.json for r in self.fleet.inference_requests("a")]

    def last_upstream(self) -> dict[str, Any]:
        bodies = self.upstream()
        assert bodies, "the node received no chat request"
        return bodies[-1]

    def new_client(self, **kwargs: Any) -> anthropic.AsyncAnthropic:
        kwargs.setdefault("api_key", "k")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 10.0)
        return anthropic.AsyncAnthropic(base_url=self.url, **kwargs)


class GatewayFactory(Protocol):
    async def __call__(
        self,
        *,
        tool_style: str = "mistralrs",
        sim: dict[str, Any] | None = None,
        extra_models: Sequence[SimModel] = (),
        models: Sequence[ModelSettings] = (),
        gateway: dict[str, Any] | None = None,
        poll: dict[str, Any] | None = None,
        load_s: float = 0.05,
        vram_mb: int = 8192,
        tok_s: float = 0.0,
    ) -> Gateway: ...


@pytest.fixture
async def make_gateway(fleet: FleetFactory) -> AsyncIterator[GatewayFactory]:
    async with contextlib.AsyncExitStack() as stack:

        async def factory(
            *,
            tool_style: str = "mistralrs",
            sim: dict[str, Any] | None = None,
            extra_models: Sequence[SimModel] = (),
            models: Sequence[ModelSettings] = (),
            gateway: dict[str, Any] | None = None,
            poll: dict[str, Any] | None = None,
            load_s: float = 0.05,
            vram_mb: int = 8192,
            tok_s: float = 0.0,
        ) -> Gateway:
            spec = NodeSpec(
                "a",
                [SimModel("m1", 1000), *extra_models],
                vram_mb=vram_mb,
                pinned=("m1",),
                load_s=load_s,
                tok_s=tok_s,
                sim={"tool_style": tool_style, **(sim or {})},
            )
            settings = [
                ModelSettings(id="m1", vram_mb=1000, aliases=["claude-*"], max_output_tokens=MAX_OUTPUT),
                *models,
            ]
            f = await fleet(spec, models=settings, gateway=gateway, poll=poll)
            client = anthropic.AsyncAnthropic(base_url=f.url, api_key="k", max_retries=0, timeout=10.0)
            stack.push_async_callback(client.close)
            return Gateway(f, client)

        yield factory


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> Gateway:
    """The default gateway: mistral.rs-style tool calls, no token delay."""
    return await make_gateway()
