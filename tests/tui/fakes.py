"""A FakeEngine implementing the facade over a fixed fleet, and the app the console tests drive.

The fleet is built from fixed times (:data:`NOW`) so that every rendered age, uptime and clock time is
the same on every run; the snapshot tests depend on it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from cortex.config import Settings, TuiSettings
from cortex.engine import (
    AgentInfo,
    Command,
    CommandResult,
    Event,
    FleetSnapshot,
    FleetTotals,
    GpuInfo,
    ModelSlot,
    ModelView,
    NodeSnapshot,
    NodeStatus,
    RequestRecord,
    SlotState,
    WindowStats,
)
from cortex.engine.facade import WhatIf, WhatIfRow
from cortex.tui.app import CortexApp

NOW = 1_767_225_600.0
"""2026-01-01 00:00:00 UTC: the fixed clock of every console test."""
REPO_THEMES = Path(__file__).resolve().parents[2] / "themes"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN32 = "Qwen/Qwen2.5-32B-Instruct-AWQ"
GEMMA = "google/gemma-2-9b-it"
PHI = "microsoft/phi-4"
MISTRAL = "mistralai/Mistral-Small-24B-Instruct"
QWEN7 = "Qwen/Qwen2.5-7B-Instruct"


def _series(base: float, n: int = 60) -> tuple[float, ...]:
    return tuple(round(base * (0.5 + ((i * 7) % 11) / 10), 3) for i in range(n))


def _stats(tok_s: float, ttft: float | None, *, errors: int = 0) -> WindowStats:
    return WindowStats(
        req_s=round(tok_s / 240, 2),
        tok_s=tok_s,
        decode_tok_s=tok_s / 4 if tok_s else None,
        ttft_p50=ttft,
        ttft_p95=None if ttft is None else ttft * 3,
        errors=errors,
        tok_s_series=_series(tok_s) if tok_s else (),
        ttft_series=_series(ttft) if ttft else (),
    )


def build_nodes(now: float = NOW) -> tuple[NodeSnapshot, ...]:
    """gpu-large (up, fresh agent), gpu-medium (draining, loading phi-4), gpu-small (down, stale agent)."""
    large = NodeSnapshot(
        name="gpu-large",
        endpoint="http://gpu-large.internal:8080",
        status=NodeStatus.UP,
        vram_total_mb=49152,
        vram_used_mb=36864,
        vram_source="agent",
        headroom_mb=512,
        slots=(
            ModelSlot(LLAMA, SlotState.LOADED, now - 5400, 16384, 2, now - 3, now - 5400, pinned=True),
            ModelSlot(QWEN32, SlotState.LOADED, now - 900, 19456, 1, now - 40, now - 900),
            ModelSlot(MISTRAL, SlotState.UNLOADED, now - 3600, None, 0, now - 7200),
        ),
        in_flight=3,
        cycles=12,
        defrag_after=50,
        last_poll=now - 1,
        version="0.6.0",
        agent=AgentInfo(
            seen_at=now - 2,
            version="0.1.0",
            mistralrs_up=True,
            gpus=(GpuInfo(0, "NVIDIA RTX 6000 Ada", 49152, 36864, 71.0),),
            last_command={"id": 7, "kind": "restart", "exit": 0},
        ),
        stats=_stats(640.0, 0.24),
    )
    medium = NodeSnapshot(
        name="gpu-medium",
        endpoint="http://gpu-medium.internal:8080",
        status=NodeStatus.DRAINING,
        vram_total_mb=24576,
        vram_used_mb=21504,
        vram_source="system_info",
        headroom_mb=512,
        slots=(
            ModelSlot(GEMMA, SlotState.LOADED, now - 3000, 9800, 0, now - 600, now - 3000),
            ModelSlot(PHI, SlotState.LOADING, now - 12, 9200),
            ModelSlot(MISTRAL, SlotState.UNLOADED, now - 3600),
        ),
        cycles=47,
        defrag_after=50,
        last_poll=now - 1,
        version="0.6.0",
        agent=AgentInfo(seen_at=now - 1, version="0.1.0", mistralrs_up=True, nvml=False, gpu_error="no NVML"),
        stats=_stats(96.5, 0.41),
    )
    small = NodeSnapshot(
        name="gpu-small",
        endpoint="http://gpu-small.internal:8080",
        status=NodeStatus.DOWN,
        vram_total_mb=12288,
        vram_used_mb=0,
        vram_source="estimate",
        headroom_mb=512,
        slots=(ModelSlot(QWEN7, SlotState.UNLOADED, now - 7200),),
        failures=4,
        last_error="connect: connection refused",
        last_poll=now - 2,
        agent=AgentInfo(seen_at=now - 95, version="0.1.0", fresh=False, mistralrs_up=False),
    )
    return large, medium, small


def build_models(now: float = NOW) -> tuple[ModelView, ...]:
    """Loaded, pinned, loading and unloaded catalogue entries."""
    return (
        ModelView(
            LLAMA,
            "loaded",
            ("gpu-large",),
            ("gpu-large",),
            True,
            ("gpu-large",),
            vram_mb=16384,
            priority=10,
            aliases=("gpt-4o-mini",),
            in_flight=2,
            last_used=now - 3,
            stats=_stats(412.5, 0.21),
        ),
        ModelView(
            QWEN32,
            "loaded",
            ("gpu-large",),
            ("gpu-large",),
            False,
            vram_mb=19456,
            in_flight=1,
            queued=2,
            last_used=now - 40,
            stats=_stats(227.5, 0.85, errors=1),
        ),
        ModelView(
            GEMMA,
            "loaded",
            ("gpu-medium",),
            ("gpu-medium",),
            False,
            vram_mb=9800,
            last_used=now - 600,
            stats=_stats(96.5, 0.41),
        ),
        ModelView(
            PHI,
            "loading",
            (),
            ("gpu-medium",),
            False,
            loading_on="gpu-medium",
            loading_since=now - 12,
            vram_mb=9200,
            queued=1,
        ),
        ModelView(MISTRAL, "unloaded", (), ("gpu-large", "gpu-medium"), False, last_used=now - 7200),
        ModelView(QWEN7, "unloaded", (), ("gpu-small",), False),
    )


def build_requests(now: float = NOW) -> tuple[RequestRecord, ...]:
    """Recent requests, newest first: successes, a queue timeout, a rate limit, a streamed Anthropic call."""
    return (
        RequestRecord(now - 1, "openai", LLAMA, "gpu-large", 200, 0.18, 96.2, 812, 256, 2.84, stream=True),
        RequestRecord(now - 4, "anthropic", QWEN32, "gpu-large", 200, 0.92, 41.7, 2048, 512, 13.2, 0.4, True),
        RequestRecord(now - 9, "openai", PHI, "", 503, None, None, 120, 0, 300.0, 300.0),
        RequestRecord(now - 15, "openai", GEMMA, "gpu-medium", 200, 0.35, 88.0, 301, 128, 1.81),
        RequestRecord(now - 22, "anthropic", LLAMA, "gpu-large", 429, None, None, 64, 0, 0.01),
        RequestRecord(now - 31, "openai", LLAMA, "gpu-large", 200, 0.2, 102.4, 1500, 1024, 10.2, stream=True),
    )


def build_fleet(now: float = NOW, *, in_flight: int = 3) -> FleetSnapshot:
    """The fixed fleet every console test starts from."""
    return FleetSnapshot(
        taken_at=now,
        started_at=now - 3725,
        gateway="0.0.0.0:8000",
        nodes=build_nodes(now),
        models=build_models(now),
        requests=build_requests(now),
        totals=FleetTotals(req_s=3.4, tok_s=736.5, requests=1234, errors=3, in_flight=in_flight, queued=3),
    )


LOADS = {QWEN32: 3, GEMMA: 1, PHI: 12}
"""Loads per model in the last hour, as the fake engine counts them."""


def build_whatif(now: float = NOW) -> WhatIf:
    """A fixed what-if: the live hour beside the three strategies."""
    return WhatIf(
        since=now - 3600,
        until=now,
        strategy="lru",
        live=WhatIfRow("live", 240, 16, 12.5, 31.0),
        replayed=(
            WhatIfRow("lru", 240, 18, 13.2, 33.5),
            WhatIfRow("priority", 240, 17, 12.9, 30.1),
            WhatIfRow("cost", 240, 9, 4.25, 31.2, failed=1),
        ),
        seconds=0.42,
    )


class FakeEngine:
    """The engine facade over a settable snapshot; records commands; events come from a queue."""

    def __init__(self, fleet: FleetSnapshot | None = None) -> None:
        self.fleet = fleet if fleet is not None else build_fleet()
        self.submitted: list[Command] = []
        self.results: dict[type[Command], CommandResult] = {}
        """Canned results by command type (default: ok)."""
        self.fail_with: Exception | None = None
        """When set, submit() raises it."""
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.subscribed = 0
        self.wants_requests: bool | None = None
        self.loads: Mapping[str, int] = dict(LOADS)
        self.whatif_result = build_whatif()
        self.whatif_gate: asyncio.Event | None = None
        """When set, whatif() waits for it (a test sees "replaying…" meanwhile)."""
        self.whatifs = 0

    def snapshot(self) -> FleetSnapshot:
        return self.fleet

    async def subscribe(self, *, requests: bool = True) -> AsyncIterator[Event]:
        self.subscribed += 1
        self.wants_requests = requests
        while True:
            yield await self.events.get()

    def loads_last_hour(self) -> Mapping[str, int]:
        return self.loads

    async def whatif(self) -> WhatIf:
        self.whatifs += 1
        if self.whatif_gate is not None:
            await self.whatif_gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return self.whatif_result

    async def submit(self, command: Command) -> CommandResult:
        self.submitted.append(command)
        if self.fail_with is not None:
            raise self.fail_with
        return self.results.get(type(command), CommandResult(True, f"{type(command).__name__} accepted"))


def build_app(
    engine: FakeEngine | None = None,
    *,
    read_only: bool = False,
    theme: str = "cortex-dark",
    theme_dir: Path | None = REPO_THEMES,
) -> CortexApp:
    """The console on a fake engine with a fixed clock and UTC times."""
    settings = Settings(tui=TuiSettings(theme=theme, refresh_hz=4))
    return CortexApp(
        engine if engine is not None else FakeEngine(),
        settings,
        gateway_url="http://127.0.0.1:8000",
        metrics_url="http://127.0.0.1:9100/metrics",
        read_only=read_only,
        theme_dir=theme_dir,
        clock=lambda: NOW,
        tz=dt.UTC,
    )
