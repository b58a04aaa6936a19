"""The headless core: fleet state, polling, routing, lifecycle and metrics. Never imports the console.

Front ends use the facade (:class:`EngineFacade`: ``snapshot()``, ``subscribe()``, ``submit()``) and the
value types re-exported here; the gateway additionally uses :class:`Engine`'s request-path methods.
"""

from cortex.engine import commands, events
from cortex.engine.commands import Command, CommandResult
from cortex.engine.events import Event
from cortex.engine.facade import EngineFacade
from cortex.engine.state import (
    AgentInfo,
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

__all__ = [
    "AgentInfo",
    "Command",
    "CommandResult",
    "EngineFacade",
    "Event",
    "FleetSnapshot",
    "FleetTotals",
    "GpuInfo",
    "ModelSlot",
    "ModelView",
    "NodeSnapshot",
    "NodeStatus",
    "RequestRecord",
    "SlotState",
    "WindowStats",
    "commands",
    "events",
]
