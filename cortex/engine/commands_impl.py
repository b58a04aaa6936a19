"""What each command does. One function per command, all going through the lifecycle actor.

Kept apart from :mod:`cortex.engine.engine` so the engine module stays about resources and the request
path, and so every front end (console, admin API, CLI through the admin API) shares these exact rules:
an unload of a pinned model needs ``force``; a manual unload first stops routing to the model and lets its
in-flight requests finish (bounded by ``gateway.drain_s``); a load obeys the same placement and eviction
rules as a request.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from cortex.engine import commands as cmd
from cortex.engine.fleet import NodeRec
from cortex.engine.state import NodeStatus, SlotState

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["execute"]

Result = cmd.CommandResult


def _node(engine: Engine, name: str) -> NodeRec | None:
    return engine.fleet.nodes.get(name)


def _unknown_node(name: str) -> Result:
    return Result(False, f"no node named {name!r}")


def _model_id(engine: Engine, name: str) -> str | None:
    return engine.resolve(name)


async def execute(engine: Engine, command: cmd.Command) -> Result:
    """Carry out one command."""
    handler = _HANDLERS.get(type(command))
    if handler is None:
        return Result(False, f"unknown command {type(command).__name__}")
    return await handler(engine, command)


async def _pin(engine: Engine, c: cmd.Command) -> Result:
    assert isinstance(c, cmd.PinModel)
    model = _model_id(engine, c.model)
    if model is None:
        return Result(False, f"no node serves {c.model!r}")
    fleet = engine.fleet
    if c.node is not None:
        node = _node(engine, c.node)
        if node is None:
            return _unknown_node(c.node)
        if model not in node.slots:
            return Result(False, f"{c.node} does not list {model}")
    else:
        loaded = [n for n in fleet.listed(model) if n.slots[model].state is SlotState.LOADED]
        loading = fleet.loading.get(model)
        if loaded:
            node = loaded[0]
        elif loading is not None:
            node = fleet.nodes[loading[0]]  # pin where it is landing, not where a fresh plan would put it
        else:
            placement = engine.lifecycle.plan(model, set())
            if placement is None:
                return Result(False, f"no node has room for {model} without breaking the eviction rules")
            node = fleet.nodes[placement.node]
    fleet.set_pin(node.name, model, True)
    engine.pin_changed(model, node.name, True)
    if fleet.loading.get(model, ("",))[0] == node.name:
        # the load under way ends it; should it fail, the pin is enforced on the node's next poll
        return Result(True, f"pinned {model} on {node.name} (loading)", {"node": node.name, "model": model})
    if node.slots[model].state is not SlotState.LOADED:
        result = await _load_on_node(engine, model, node)
        if not result.ok:
            return Result(False, f"pinned {model} on {node.name}, but loading failed: {result.message}")
    return Result(True, f"pinned {model} on {node.name}", {"node": node.name, "model": model})


async def _unpin(engine: Engine, c: cmd.Command) -> Result:
    assert isinstance(c, cmd.UnpinModel)
    model = _model_id(engine, c.model) or c.model
    fleet = engine.fleet
    names = [c.node] if c.node is not None else [n for n, pins in fleet.pins.items() if model in pins]
    if c.node is not None and c.node not in fleet.nodes:
        return _unknown_node(c.node)
    names = [n for n in names if fleet.is_pinned(n, model)]
    if not names:
        return Result(False, f"{model} is not pinned" + (f" on {c.node}" if c.node else ""))
    for name in names:
        fleet.set_pin(name, model, False)
        engine.pin_changed(model, name, False)
    return Result(True, f"unpinned {model} on {', '.join(names)}", {"nodes": names, "model": model})


async def _load_on_node(engine: Engine, model: str, node: NodeRec) -> Result:
    lifecycle = engine.lifecycle
    slot = node.slots.get(model)
    if slot is None:
        return Result(False, f"{node.name} does not list {model}")
    if slot.state is SlotState.LOADED:
        return Result(True, f"{model} is already loaded on {node.name}")
    if model in engine.fleet.loading:
        return Result(False, f"{model} is already loading on {engine.fleet.loading[model][0]}")
    if node.status is not NodeStatus.UP:
        return Result(False, f"{node.name} is {node.status.value}")
    placement = lifecycle.plan(model, set(), node=node.name)
    if placement is None:
        return Result(False, f"no room for {model} on {node.name} without evicting pinned, busy or young models")
    error = await lifecycle.load_on(node, model, placement.victims)
    if error is not None:
        return Result(False, f"loading {model} on {node.name} failed: {error}")
    evicted = f" (evicted {', '.join(placement.victims)})" if placement.victims else ""
    return Result(
        True, f"loaded {model} on {node.name}{evicted}", {"node": node.name, "evicted": list(placement.victims)}
    )


async def _load(engine: Engine, c: cmd.Command) -> Result:
    assert isinstance(c, cmd.LoadModel)
    model = _model_id(engine, c.model)
    if model is None:
        return Result(False, f"no node serves {c.model!r}")
    if c.node is not None:
        node = _node(engine, c.node)
        return _unknown_node(c.node) if node is None else await _load_on_node(engine, model, node)
    loaded = [n.name for n in engine.fleet.listed(model) if n.slots[model].state is SlotState.LOADED]
    if loaded:
        return Result(True, f"{model} is already loaded on {', '.join(loaded)}")
    placement = engine.lifecycle.plan(model, set())
    if placement is None:
        return Result(False, f"no node has room for {model} without breaking the eviction rules")
    return await _load_on_node(engine, model, engine.fleet.nodes[placement.node])


async def _unload(engine: Engine, c: cmd.Command) -> Result:
    assert isinstance(c, cmd.UnloadModel)
    model = _model_id(engine, c.model) or c.model
    fleet = engine.fleet
    if c.node is not None and c.node not in fleet.nodes:
        return _unknown_node(c.node)
    targets = [
        n
        for n in fleet.listed(model)
        if (c.node is None or n.name == c.node) and n.slots[model].state is SlotState.LOADED
    ]
    if not targets:
        return Result(False, f"{model} is not loaded" + (f" on {c.node}" if c.node else ""))
    pinned = [n.name for n in targets if fleet.is_pinned(n.name, model)]
    if pinned and not c.force:
        return Result(False, f"{model} is pinned on {', '.join(pinned)}: unload with force to unpin and unload it")
    done: list[str] = []
    errors: list[str] = []
    for node in targets:
        if fleet.is_pinned(node.name, model):
            fleet.set_pin(node.name, model, False)
            engine.pin_changed(model, node.name, False)
        slot = node.slots[model]
        fleet.set_slot(node, model, SlotState.UNLOADING)
        deadline = time.monotonic() + engine.settings.gateway.drain_s
        while slot.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        error = await engine.lifecycle.unload_on(node, model, "manual", marked=True)
        (errors.append(f"{node.name}: {error}") if error else done.append(node.name))
    if errors:
        return Result(False, f"unloading {model} failed: {'; '.join(errors)}", {"unloaded": done})
    return Result(True, f"unloaded {model} from {', '.join(done)}", {"unloaded": done})


async def _drain(engine: Engine, c: cmd.Command) -> Result:
    assert isinstance(c, cmd.DrainNode | cmd.UndrainNode)
    node = _node(engine, c.node)
    if node is None:
        return _unknown_node(c.node)
    drain = isinstance(c, cmd.DrainNode)
    old = node.status.value
    node.drained = drain
    engine.fleet.touch()
    engine.node_status_changed(node, old)
    engine.lifecycle.changed()
    verb = "drained" if drain else "undrained"
    return Result(True, f"{verb} {node.name} ({node.in_flight} in flight)", {"status": node.status.value})


async def _restart(engine: Engine, c: cmd.Command) -> Result:
    assert isinstance(c, cmd.RestartNode)
    node = _node(engine, c.node)
    if node is None:
        return _unknown_node(c.node)
    result = await engine.lifecycle.defrag(node, reason="defrag")
    if not result.ran:
        return Result(False, result.message)
    if not result.ok:
        return Result(False, result.message)
    return Result(True, f"restarted {node.name}", {"message": result.message})


_HANDLERS = {
    cmd.PinModel: _pin,
    cmd.UnpinModel: _unpin,
    cmd.LoadModel: _load,
    cmd.UnloadModel: _unload,
    cmd.DrainNode: _drain,
    cmd.UndrainNode: _drain,
    cmd.RestartNode: _restart,
}
