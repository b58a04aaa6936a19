"""``cortex replay``: what the engine would do with recorded or generated traffic, on virtual time.

:mod:`~cortex.replay.spec` reads traces and fleets, :mod:`~cortex.replay.run` drives the real lifecycle on a
:class:`~cortex.replay.vclock.VirtualLoop` against in-memory nodes, :mod:`~cortex.replay.bound` computes the
offline bound, and :mod:`~cortex.replay.report` (the only part that imports rich) prints the comparison.
"""

from cortex.replay.run import STRATEGIES, ReplayResult, replay, replay_all
from cortex.replay.spec import FleetSpec, ModelSpec, NodeSpec, Request, SpecError, read_fleet, read_trace

__all__ = [
    "STRATEGIES",
    "FleetSpec",
    "ModelSpec",
    "NodeSpec",
    "ReplayResult",
    "Request",
    "SpecError",
    "read_fleet",
    "read_trace",
    "replay",
    "replay_all",
]
