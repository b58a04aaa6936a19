"""The per-model lifecycle of a simulated node: loaded, unloaded, reloading, and the VRAM they hold.

This mirrors the three collections of mistral.rs's ``MistralRs`` state (``engines``, ``unloaded_models``,
``reloading_models``) rather than one status field per model, because the real reload bug only makes sense
that way: a loaded or unknown id left in the reloading set is *both* reloading and loaded (or a phantom),
and ``/v1/models`` lists it twice. Everything the HTTP handlers need to answer lifecycle, listing,
routing and ``/v1/system/info`` questions lives here; the handlers only translate to and from JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

SlotState = Literal["loaded", "unloaded", "loading"]


@dataclass
class SimModel:
    """One model a simulated node serves."""

    id: str
    """The API id (the pipeline name, normally a Hugging Face id)."""
    vram_mb: int
    """Weight footprint in MiB while loaded (and while loading)."""
    loaded: bool = True
    """Whether the model starts loaded. A real node has no such option; tests use it to skip an unload."""


class SimError(Exception):
    """A request that fails with an OpenAI-surface ``{"message"}`` error.

    Args:
        status: The HTTP status.
        message: The error text.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Engine:
    """One loaded instance of a model: its request-id counter and its "terminated" signal.

    A reload makes a new engine, so ids restart at 0 and requests still running on the old one see it
    terminated, as when mistral.rs drops an engine thread.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.terminated = asyncio.Event()
        self._next_id = 0

    def next_request_id(self) -> str:
        """The next per-model integer id, as a string."""
        rid = self._next_id
        self._next_id += 1
        return str(rid)


@dataclass
class _Slot:
    model: SimModel
    state: SlotState
    engine: Engine | None = None
    allocated: int = 0
    """MiB a load in progress has allocated so far (weights arrive in steps, as from disk)."""


LOAD_STEPS = 4
"""A load allocates its weights in this many steps over ``load_s``; an allocation that does not fit fails it."""


def oom_message(model_id: str, want_mb: int, free_mb: int) -> str:
    """The error of a load that ran out of device memory, shaped like candle's CUDA driver error."""
    return (
        f'Failed to load model: CUDA out of memory: DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory") '
        f"while allocating {want_mb} MiB for {model_id} ({free_mb} MiB free)"
    )


async def _awake() -> None:
    return None


@dataclass
class _Freeing:
    until: float
    mb: int


@dataclass
class ModelTable:
    """The lifecycle state of every model on one node."""

    slots: dict[str, _Slot] = field(default_factory=dict)
    reloading: dict[str, None] = field(default_factory=dict)
    """The reloading set, in insertion order (a dict used as an ordered set)."""
    default_id: str | None = None
    load_failures: dict[str, str] = field(default_factory=dict)
    """Model id → message; loads of these ids fail until cleared."""
    freeing: list[_Freeing] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    clock: Callable[[], float] = time.monotonic
    capacity_mb: Callable[[], int | None] = lambda: None
    """MiB of device memory weights may use (device total less the base use); None: unlimited."""
    gate: Callable[[], Awaitable[None]] = _awake
    """Awaited at every load step: a hung (stopped) node's loads stop too."""

    @classmethod
    def from_models(cls, models: Sequence[SimModel]) -> ModelTable:
        """Build the table in the models' initial states; the first loaded model is the default."""
        table = cls()
        for model in models:
            if model.id in table.slots:
                raise ValueError(f"duplicate model id {model.id!r}")
            slot = _Slot(model, "loaded" if model.loaded else "unloaded")
            if model.loaded:
                slot.engine = Engine(model.id)
            table.slots[model.id] = slot
        table.default_id = next(iter(table.loaded_ids()), None)
        return table

    # -- queries -------------------------------------------------------------------------------------

    def loaded_ids(self) -> list[str]:
        """Ids of loaded models, in configuration order."""
        return [mid for mid, slot in self.slots.items() if slot.state == "loaded"]

    def status(self, model_id: str) -> str:
        """``/v1/models/status`` order: reloading set, then loaded, then unloaded, else ``not_found``."""
        if model_id in self.reloading:
            return "reloading"
        slot = self.slots.get(model_id)
        if slot is None:
            return "not_found"
        return "reloading" if slot.state == "loading" else slot.state

    def listing(self) -> list[tuple[str, str]]:
        """``(id, status)`` rows of ``/v1/models``: the reloading set, then loaded, then unloaded models.

        A model stuck in the reloading set by the reload bug appears twice; an unknown stuck id once.
        """
        rows = [(mid, "reloading") for mid in self.reloading]
        rows += [(mid, "loaded") for mid, slot in self.slots.items() if slot.state == "loaded"]
        rows += [(mid, "unloaded") for mid, slot in self.slots.items() if slot.state == "unloaded"]
        return rows

    def is_known(self, model_id: str) -> bool:
        """Whether request validation accepts the id (configured, or in the reloading set)."""
        return model_id in self.slots or model_id in self.reloading

    def used_vram_mb(self) -> int:
        """Weights held now: loaded and loading models, plus unloads whose memory is not yet freed."""
        now = self.clock()
        self.freeing = [f for f in self.freeing if f.until > now]
        held = sum(s.model.vram_mb if s.state == "loaded" else s.allocated for s in self.slots.values())
        return held + sum(f.mb for f in self.freeing)

    def not_available(self, model_id: str, status: int) -> SimError:
        """The routing error for an unknown id (the list names only loaded models)."""
        return SimError(
            status,
            f"Requested model '{model_id}' is not available. Available models: "
            f"{', '.join(self.loaded_ids())}. Use 'default' to use the default model.",
        )

    def resolve(self, requested: str | None, unknown_status: int) -> str:
        """Map a request's ``model`` to a real id: missing or ``default`` → the default model.

        Raises:
            SimError: The id is unknown, or there is no default model left.
        """
        if requested is None or requested == "default":
            if self.default_id is None:
                raise SimError(500, "engine state lock is poisoned")
            return self.default_id
        if not self.is_known(requested):
            raise self.not_available(requested, unknown_status)
        return requested

    # -- transitions ---------------------------------------------------------------------------------

    def unload(self, model_id: str, free_after_s: float) -> str:
        """``/v1/models/unload``: terminate the engine and free its weights (possibly later)."""
        slot = self.slots.get(model_id)
        if slot is None:
            return "not_found"
        if slot.state != "loaded":
            return "unloaded"
        slot.state = "unloaded"
        if slot.engine is not None:
            slot.engine.terminated.set()
            slot.engine = None
        if free_after_s > 0:
            self.freeing.append(_Freeing(self.clock() + free_after_s, slot.model.vram_mb))
        if self.default_id == model_id:
            self.default_id = next(iter(self.loaded_ids()), None)
        return "unloaded"

    async def reload(self, model_id: str, load_s: float, *, bug: bool) -> tuple[str, str | None]:
        """``/v1/models/reload``: block for the load and return ``(status, error)``.

        Args:
            model_id: The id sent.
            load_s: Seconds the load takes.
            bug: Copy mistral.rs's bug: a loaded or unknown id stays in the reloading set forever.
        """
        if model_id in self.reloading:
            return "reloading", None
        slot = self.slots.get(model_id)
        if slot is None or slot.state != "unloaded":
            if bug:
                self.reloading[model_id] = None
            return "not_found", None
        error = await self._load(slot, load_s)
        return ("internal_error", error) if error else ("loaded", None)

    async def acquire(self, model_id: str, load_s: float) -> Engine:
        """The engine that serves a request, lazily loading an unloaded model (blocking for the load).

        Raises:
            SimError: 500 ``being reloaded`` during another load, or a failed lazy load.
        """
        slot = self.slots.get(model_id)
        if slot is not None and slot.engine is not None:
            return slot.engine
        if model_id in self.reloading or slot is None or slot.state == "loading":
            raise SimError(500, f"model `{model_id}` is being reloaded")
        error = await self._load(slot, load_s)
        if error:
            raise SimError(500, f"failed to reload model: {error}")
        assert slot.engine is not None
        return slot.engine

    async def _load(self, slot: _Slot, load_s: float) -> str | None:
        """Load an unloaded slot in :data:`LOAD_STEPS` allocations. Returns an error or None.

        Each step allocates a share of the weights; a step that would take the device past its capacity fails
        the load with a CUDA out-of-memory error and frees what it had. So a load that does not fit fails,
        and two loads that fit one at a time but not together overcommit the device and one of them fails,
        as on a real GPU.
        """
        mid = slot.model.id
        self.reloading[mid] = None
        slot.state = "loading"
        slot.allocated = 0
        ok = False
        try:
            size = slot.model.vram_mb
            for step in range(LOAD_STEPS):
                await self.gate()
                if load_s > 0:
                    await asyncio.sleep(load_s / LOAD_STEPS)
                await self.gate()
                share = size * (step + 1) // LOAD_STEPS - slot.allocated
                capacity = self.capacity_mb()
                if capacity is not None:
                    free = capacity - self.used_vram_mb()
                    if share > free:
                        return oom_message(mid, size - slot.allocated, max(0, free))
                slot.allocated += share
            failure = self.load_failures.get(mid)
            if failure is not None:
                return f"Failed to load model: {failure}"
            ok = True
        finally:
            self.reloading.pop(mid, None)
            slot.state = "loaded" if ok else "unloaded"
            slot.allocated = 0
            if ok:
                slot.engine = Engine(mid)
        return None

    def reset_loaded(self, *, loaded: bool = True) -> None:
        """A process restart: every configured model loaded (or none), the reloading set and default reset."""
        for slot in self.slots.values():
            if slot.engine is not None:
                slot.engine.terminated.set()
            slot.state = "loaded" if loaded else "unloaded"
            slot.engine = Engine(slot.model.id) if loaded else None
            slot.allocated = 0
        self.reloading.clear()
        self.freeing.clear()
        self.default_id = next(iter(self.slots), None) if loaded else None
        # the server's start time in seconds; a restart within the same second still shows as a new start
        self.created = max(int(time.time()), self.created + 1)
