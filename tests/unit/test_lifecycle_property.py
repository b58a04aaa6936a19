"""A property test of the lifecycle rules over random sequences of fleet events.

The real :class:`~cortex.engine.fleet.Fleet` and :class:`~cortex.engine.lifecycle.Lifecycle` run against
in-memory fake nodes (no HTTP): requests (placed and loaded the way the placer does it), completions,
waiting requests, pins, unpins, node failures (with or without a restart that loads everything), recoveries
with their reconcile, idle-TTL sweeps, defrags and the passing of time. Events come in small batches run
concurrently, so cortex's own awaits interleave. Whatever happens:

* no pinned, busy (in flight), queued or too-young model is ever chosen as a victim, unloaded by the TTL,
  a reconcile or a defrag;
* a load cortex starts with a known footprint never pushes the node's real memory over
  ``vram_mb - headroom_mb``;
* a load whose size cortex only estimates never runs beside another load on its node (two guesses could
  overcommit the device);
* cortex never calls reload for a model the node has loaded.

The fake nodes are honest: m4 and m5 have no configured size (cortex estimates them, learns them from a load
that ran alone, or learns a lower bound from an out-of-memory answer), and a load that does not fit in the
device's real memory answers ``internal_error`` "CUDA out of memory", as a real node does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.config import EvictionSettings, GatewaySettings, ModelSettings, NodeSettings, PollSettings, Settings
from cortex.engine.events import EventBus
from cortex.engine.fleet import Fleet, NodeRec, StateStore
from cortex.engine.lifecycle import Lease, Lifecycle
from cortex.engine.metrics import CortexMetrics
from cortex.engine.mistralrs import LifecycleReply, MistralRsClient, NodeError, SystemInfo
from cortex.engine.state import NodeStatus, SlotState

MIN_RESIDENT_S = 30.0
BASE_MB = 200
MODELS: dict[str, int] = {"m0": 3000, "m1": 2500, "m2": 2000, "m3": 4000, "m4": 1500, "m5": 1000}
"""True footprints. m4 and m5 have no `vram_mb` in the config: cortex learns them on their first load."""
CONFIGURED = ("m0", "m1", "m2", "m3")
PRIORITIES = {"m0": 5, "m1": 1, "m2": 0, "m3": 3}
NODES: dict[str, tuple[int, tuple[str, ...]]] = {
    "a": (6_500, ("m0", "m1", "m2", "m3", "m4", "m5")),
    "b": (5_000, ("m0", "m1", "m2", "m4")),
    "c": (4_000, ("m1", "m3", "m5")),
}
"""name → (vram_mb, catalogue): overlapping catalogues."""
HEADROOM = 300


class Violations(list[str]):
    def add(self, text: str) -> None:
        self.append(text)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeNode:
    """An in-memory mistral.rs node: loaded set, real memory, the lifecycle answers (HTTP 200 semantics)."""

    def __init__(self, name: str, total: int, budget: int, catalogue: tuple[str, ...], found: Violations) -> None:
        self.name = name
        self.total = total
        self.budget = budget
        self.catalogue = catalogue
        self.loaded: set[str] = set()
        self.loading: dict[str, bool] = {}
        """model → whether cortex knew its footprint when it asked for the load."""
        self.down = False
        self.found = found
        self.known: dict[str, bool] = {}
        self.guessed: dict[str, bool] = {}
        """model → whether cortex only estimated its size when it asked for the load."""
        self.ooms = 0
        self.endpoint = f"fake://{name}"

    def used(self) -> int:
        return BASE_MB + sum(MODELS[m] for m in self.loaded)

    def _check(self) -> None:
        if self.down:
            raise NodeError(f"{self.name} is down")

    async def health(self) -> None:
        await asyncio.sleep(0)
        self._check()

    async def models(self) -> dict[str, str]:
        await asyncio.sleep(0)
        self._check()
        return {m: ("loaded" if m in self.loaded else "unloaded") for m in self.catalogue}

    async def system_info(self) -> SystemInfo | None:
        await asyncio.sleep(0)
        self._check()
        return SystemInfo(self.total, self.used(), "fake")

    async def lifecycle(self, action: str, model: str, *, timeout_s: float | None = None) -> LifecycleReply:
        await asyncio.sleep(0)
        self._check()
        if model not in self.catalogue:
            return LifecycleReply("not_found")
        if action == "status":
            if model in self.loading:
                return LifecycleReply("reloading")
            return LifecycleReply("loaded" if model in self.loaded else "unloaded")
        if action == "unload":
            self.loaded.discard(model)
            return LifecycleReply("unloaded")
        assert action == "reload", action
        if model in self.loaded or model in self.loading:
            self.found.add(f"reload of {model} on {self.name} while the node has it loaded/reloading")
            return LifecycleReply("not_found")
        known = self.known.get(model, False)
        guessed = self.guessed.get(model, False)
        others = [m for m in self.loading if m != model]
        if others and (guessed or any(self.guessed.get(m, False) for m in others)):
            self.found.add(f"load of {model} on {self.name} beside {others} while a size is only estimated")
        if self.used() + MODELS[model] > self.total:
            self.ooms += 1
            return LifecycleReply(
                "internal_error", f"Failed to load model: CUDA out of memory ({MODELS[model]} MiB for {model})"
            )
        if known and self.used() + MODELS[model] > self.budget:
            self.found.add(
                f"load of {model} ({MODELS[model]} MiB) on {self.name} with {self.used()} MiB used "
                f"exceeds the budget {self.budget} (loaded: {sorted(self.loaded)})"
            )
        self.loading[model] = known
        self.loaded.add(model)  # the weights count from the start of the load, as on a real node
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.loading.pop(model, None)
        if self.down:
            self.loaded.discard(model)
            raise NodeError(f"{self.name} went down during the load")
        return LifecycleReply("loaded")


class MemoryStore(StateStore):
    def save(self) -> None:  # no file: the property test must not touch the disk
        pass


class World:
    """One example's fleet, lifecycle, fakes and the requests it holds."""

    def __init__(self, strategy: str) -> None:
        self.found = Violations()
        self.clock = Clock()
        self.settings = Settings(
            gateway=GatewaySettings(listen="127.0.0.1:0", metrics_listen="", queue_timeout_s=1, drain_s=0),
            poll=PollSettings(interval_s=1),
            eviction=EvictionSettings(
                strategy=strategy,
                min_resident_s=MIN_RESIDENT_S,
                headroom_mb=HEADROOM,
                idle_ttl_s=120,
                defrag_after_cycles=2,
            ),
            nodes=[
                NodeSettings(name=name, endpoint=f"http://{name}.invalid:1", vram_mb=total)
                for name, (total, _) in NODES.items()
            ],
            models=[ModelSettings(id=m, vram_mb=MODELS[m], priority=PRIORITIES[m]) for m in CONFIGURED],
        )
        self.fakes = {
            name: FakeNode(name, total, total - HEADROOM, catalogue, self.found)
            for name, (total, catalogue) in NODES.items()
        }
        clients = {name: cast(MistralRsClient, fake) for name, fake in self.fakes.items()}
        store = MemoryStore(Path("/nonexistent/cortex-property/state.json"))
        self.fleet = Fleet(self.settings, clients, EventBus(), store, gateway="test", clock=self.clock)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.lifecycle = Lifecycle(
            self.settings, self.fleet, CortexMetrics(clock=self.clock), self.fleet.bus, self.spawn, None
        )
        self.lifecycle.memory_wait_s = 0.3
        self.leases: list[Lease] = []
        self.waiting: Counter[str] = Counter()
        self._wrap()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        return task

    # -- the checks, wrapped around cortex's own decisions ----------------------------------------------

    def _protected(self, node: NodeRec, model: str, *, young_ok: bool) -> str | None:
        fleet = self.fleet
        slot = node.slots.get(model)
        if slot is None:
            return None
        if fleet.is_pinned(node.name, model):
            return "pinned"
        if slot.in_flight:
            return f"busy ({slot.in_flight} in flight)"
        if fleet.queued.get(model, 0):
            return f"queued ({fleet.queued[model]} waiting)"
        if not young_ok and slot.loaded_at is not None and fleet.clock() - slot.loaded_at < MIN_RESIDENT_S:
            return f"too young ({fleet.clock() - slot.loaded_at:.0f} s)"
        return None

    def _wrap(self) -> None:
        lc = self.lifecycle
        load_on, unload_on = lc.load_on, lc.unload_on

        async def checked_load_on(
            node: NodeRec, model: str, victims: tuple[str, ...] = (), reason: str = "evict"
        ) -> str | None:
            for victim in victims:
                slot = node.slots.get(victim)
                if slot is None or slot.state is not SlotState.LOADED:
                    self.found.add(f"victim {victim} on {node.name} is not loaded")
                why = self._protected(node, victim, young_ok=False)
                if why:
                    self.found.add(f"victim {victim} on {node.name} chosen to load {model}: {why}")
            # The budget holds only for what cortex can count: this model's footprint, and no load of a
            # model of unknown footprint in progress on the node (its memory appears only later).
            blind = any(
                s.state is SlotState.LOADING and self.fleet.footprint(s.model_id) is None for s in node.slots.values()
            )
            self.fakes[node.name].known[model] = self.fleet.footprint(model) is not None and not blind
            self.fakes[node.name].guessed[model] = self.fleet.footprint(model) is None
            return await load_on(node, model, victims, reason)

        async def checked_unload_on(node: NodeRec, model: str, reason: str, *, marked: bool = False) -> str | None:
            if reason in ("ttl", "reconcile", "defrag"):
                why = self._protected(node, model, young_ok=True)
                if why:
                    self.found.add(f"{reason} unloaded {model} on {node.name}: {why}")
            return await unload_on(node, model, reason, marked=marked)

        lc.load_on = checked_load_on  # type: ignore[method-assign]
        lc.unload_on = checked_unload_on  # type: ignore[method-assign]

    # -- events -----------------------------------------------------------------------------------------

    async def poll(self, name: str) -> None:
        node, fake = self.fleet.nodes[name], self.fakes[name]
        try:
            models, info = await fake.models(), await fake.system_info()
        except NodeError as exc:
            self.fleet.poll_failed(node, str(exc))
            return
        if self.fleet.poll_ok(node, models, info):
            await self.lifecycle.reconcile(node)

    async def request(self, model: str, hold: bool) -> None:
        """What ``Lifecycle.acquire`` and its placer do, one placement attempt at a time.

        ``hold``: the request stays in flight until a ``complete``; else it ends at once.
        """
        lc, fleet = self.lifecycle, self.fleet
        node = lc.route(model)
        if node is not None:
            lease = Lease(fleet, node, model, 0.0)
            if hold:
                self.leases.append(lease)
            else:
                self.clock.now += 0.5
                lease.release()
            return
        self.enqueue(model)
        if model not in fleet.loading:
            placement = lc.plan(model, set())
            if placement is not None:
                await lc.load_on(fleet.nodes[placement.node], model, placement.victims)
        node = lc.route(model)
        if node is not None:
            for _ in range(self.waiting[model]):
                lease = Lease(fleet, node, model, 0.0)
                if hold:
                    self.leases.append(lease)
                else:
                    lease.release()
            self.waiting[model] = 0
            fleet.queued.pop(model, None)
        else:  # it stays queued only until its timeout: here, at once
            self.dequeue(model)

    def enqueue(self, model: str) -> None:
        self.waiting[model] += 1
        self.fleet.queued[model] = self.waiting[model]

    def dequeue(self, model: str) -> None:
        if self.waiting[model] > 0:
            self.waiting[model] -= 1
        if self.waiting[model]:
            self.fleet.queued[model] = self.waiting[model]
        else:
            self.fleet.queued.pop(model, None)
        self.lifecycle.changed()

    def complete(self, index: int) -> None:
        """End one request (index < 48) or all of them."""
        if index >= 48:
            while self.leases:
                self.leases.pop().release()
        elif self.leases:
            self.leases.pop(index % len(self.leases)).release()
        self.lifecycle.changed()

    async def pin(self, name: str, model: str, pinned: bool) -> None:
        node = self.fleet.nodes[name]
        if model not in node.slots:
            return
        self.fleet.set_pin(name, model, pinned)
        if pinned and node.status is NodeStatus.UP:
            await self.lifecycle.load_pins(node)

    def fail(self, name: str, restart: bool) -> None:
        fake = self.fakes[name]
        fake.down = True
        if restart:  # a restarted mistralrs loads every configured model, budget or not
            fake.loaded = set(fake.catalogue)
        node = self.fleet.nodes[name]
        if node.health is not NodeStatus.DOWN:
            self.fleet.mark_down(node, "test: node failed")

    async def recover(self, name: str) -> None:
        self.fakes[name].down = False
        await self.poll(name)

    async def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        models = sorted(MODELS)
        names = sorted(NODES)
        if kind == "request":
            await self.request(models[op[1]], op[2])
        elif kind == "complete":
            self.complete(op[1])
        elif kind == "enqueue":
            self.enqueue(models[op[1]])
        elif kind == "dequeue":
            self.dequeue(models[op[1]])
        elif kind in ("pin", "unpin"):
            await self.pin(names[op[1]], models[op[2]], kind == "pin")
        elif kind == "fail":
            self.fail(names[op[1]], op[2])
        elif kind == "recover":
            await self.recover(names[op[1]])
        elif kind == "poll":
            await self.poll(names[op[1]])
        elif kind == "tick":
            self.clock.now += op[1]
        elif kind == "ttl":
            await self.lifecycle.ttl_sweep()
        else:  # pragma: no cover
            raise AssertionError(kind)

    async def close(self) -> None:
        for _ in range(3):
            pending = [t for t in self.tasks if not t.done()]
            if not pending:
                break
            await asyncio.wait(pending, timeout=2.0)
        for task in self.tasks:
            if not task.done():
                task.cancel()
                self.found.add("a background task (defrag) did not finish")
            with contextlib.suppress(BaseException):
                await task


model_i = st.integers(0, len(MODELS) - 1)
node_i = st.integers(0, len(NODES) - 1)
OPS = st.one_of(
    st.tuples(st.just("request"), model_i, st.just(False)),
    st.tuples(st.just("request"), model_i, st.just(False)),
    st.tuples(st.just("request"), model_i, st.booleans()),
    st.tuples(st.just("complete"), st.integers(0, 63)),
    st.tuples(st.just("complete"), st.integers(0, 63)),
    st.tuples(st.just("tick"), st.sampled_from([31, 200])),
    st.tuples(st.just("enqueue"), model_i),
    st.tuples(st.just("dequeue"), model_i),
    st.tuples(st.just("pin"), node_i, model_i),
    st.tuples(st.just("unpin"), node_i, model_i),
    st.tuples(st.just("fail"), node_i, st.booleans()),
    st.tuples(st.just("recover"), node_i),
    st.tuples(st.just("poll"), node_i),
    st.tuples(st.just("tick"), st.sampled_from([1, 10, 31, 200])),
    st.tuples(st.just("ttl")),
)
BATCHES = st.lists(st.lists(OPS, min_size=1, max_size=3), min_size=1, max_size=30)
INITIAL = st.fixed_dictionaries({name: st.sets(st.sampled_from(cat)) for name, (_, cat) in NODES.items()})


async def scenario(strategy: str, initial: dict[str, set[str]], batches: list[list[tuple[Any, ...]]]) -> list[str]:
    world = World(strategy)
    for name, loaded in initial.items():
        world.fakes[name].loaded = set(loaded)
    try:
        async with asyncio.timeout(20):
            for name in NODES:
                await world.poll(name)
            for batch in batches:
                await asyncio.gather(*(world.run(op) for op in batch))
    finally:
        await world.close()
    return list(world.found)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy=st.sampled_from(["lru", "priority"]), initial=INITIAL, batches=BATCHES)
def test_lifecycle_never_breaks_its_rules(
    strategy: str, initial: dict[str, set[str]], batches: list[list[tuple[Any, ...]]]
) -> None:
    found = asyncio.run(scenario(strategy, initial, batches))
    assert found == []


def test_scenario_exercises_evictions() -> None:
    """A fixed sequence that must evict, so the property above is not vacuous."""
    batches: list[list[tuple[Any, ...]]] = [
        [("tick", 200)],
        [("request", 0, True)],
        [("request", 1, True)],
        [("request", 3, True)],
        [("complete", 0)],
        [("complete", 0)],
        [("complete", 0)],
        [("tick", 200)],
        [("request", 2, False)],
        [("request", 5, False)],
        [("request", 4, False)],
    ]

    async def run() -> tuple[list[str], int]:
        world = World("lru")
        world.fakes["a"].loaded = {"m0", "m1", "m3"}
        world.fakes["b"].loaded = {"m0", "m1", "m4"}
        for name in NODES:
            await world.poll(name)
        cycles = 0
        for batch in batches:
            for op in batch:
                await world.run(op)
            cycles = max(cycles, sum(n.cycles for n in world.fleet.nodes.values()))
        await world.close()
        return list(world.found), cycles

    found, cycles = asyncio.run(run())
    assert found == []
    assert cycles >= 1
