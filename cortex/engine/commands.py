"""Commands a front end may submit to the engine, and their results.

Commands are imperative frozen dataclasses. The console, the admin API and the CLI (through the admin API)
all go through :meth:`cortex.engine.Engine.submit`, so an action behaves the same from every front end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Command",
    "CommandResult",
    "DrainNode",
    "LoadModel",
    "PinModel",
    "RestartNode",
    "UndrainNode",
    "UnloadModel",
    "UnpinModel",
]


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every command."""


@dataclass(frozen=True, slots=True)
class PinModel(Command):
    """Pin a model (on `node`, else where it is loaded, else where it fits) and load it there."""

    model: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class UnpinModel(Command):
    """Remove a live or configured pin (on `node`, else everywhere)."""

    model: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class LoadModel(Command):
    """Load a model (on `node`, else where the placement rules say)."""

    model: str
    node: str | None = None


@dataclass(frozen=True, slots=True)
class UnloadModel(Command):
    """Unload a model (from `node`, else from every node). A pinned model needs `force`."""

    model: str
    node: str | None = None
    force: bool = False


@dataclass(frozen=True, slots=True)
class DrainNode(Command):
    """Stop routing new requests to a node."""

    node: str


@dataclass(frozen=True, slots=True)
class UndrainNode(Command):
    """Route to a drained node again."""

    node: str


@dataclass(frozen=True, slots=True)
class RestartNode(Command):
    """Drain a node, restart its mistralrs through its agent, restore its pins, undrain."""

    node: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What became of a command."""

    ok: bool
    message: str
    detail: dict[str, Any] = field(default_factory=dict)
