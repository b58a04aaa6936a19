"""The wire format between a node's agent and the gateway, defined once for both ends.

The agent builds its report from these models and the gateway validates the report against the same
models, so the two cannot drift apart. Unknown fields are ignored rather than refused: a newer agent may
report to an older gateway during a rolling upgrade. Every string and list has a bound, because the
gateway keeps the last report of every node in memory.

Report (agent → ``POST {gateway}/admin/agents/{node}/report``, ``Authorization: Bearer {token}``)::

    {"node": "gpu-large", "agent_version": "0.1.0", "time": 1760000000.0, "interval_s": 2.0,
     "nvml": true, "gpus": [{"index": 0, "name": "NVIDIA H200", "total_mb": 143771, "used_mb": 512,
                             "util_pct": 3.0}],
     "gpu_error": "",
     "mistralrs": {"up": true, "models": [{"id": "org/model", "status": "loaded"}], "error": ""},
     "results": [{"id": "…", "kind": "restart", "exit_code": 0, "output_tail": "…", "error": "",
                  "started_at": 1760000000.0, "finished_at": 1760000003.5}]}

Reply (gateway → agent, HTTP 200)::

    {"commands": [{"id": "…", "kind": "restart"}]}
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "COMMAND_KINDS",
    "OUTPUT_TAIL_CHARS",
    "AgentCommand",
    "CommandReport",
    "GpuReport",
    "MistralrsReport",
    "ModelReport",
    "Reply",
    "Report",
]

COMMAND_KINDS = frozenset({"restart"})
"""The command kinds an agent knows how to run."""

OUTPUT_TAIL_CHARS = 2000
"""How much of a command's combined stdout and stderr the agent reports (the end of it)."""

_Short = Annotated[str, StringConstraints(max_length=512)]
_Message = Annotated[str, StringConstraints(max_length=4096)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GpuReport(_Wire):
    """One GPU as NVML reads it."""

    index: int = Field(ge=0)
    """NVML device index."""
    name: _Short = ""
    """Product name (``NVIDIA H200``)."""
    total_mb: int = Field(ge=0)
    """Total memory in MiB."""
    used_mb: int = Field(ge=0)
    """Used memory in MiB (every process, not only mistralrs)."""
    util_pct: float | None = Field(default=None, ge=0, le=100)
    """GPU utilisation in percent; None when the device does not report it."""


class ModelReport(_Wire):
    """One model as the local mistralrs lists it."""

    id: _Short
    status: _Short
    """``loaded``, ``unloaded`` or ``reloading`` (mistralrs-api.md §4)."""


class MistralrsReport(_Wire):
    """What the agent saw of the local mistralrs."""

    up: bool
    """``GET /health`` answered 200."""
    models: list[ModelReport] = Field(default_factory=list, max_length=4096)
    """Every entry of ``GET /v1/models`` but the synthetic ``default``."""
    error: _Message = ""
    """Why ``up`` is false or the model list is missing; empty otherwise."""


class CommandReport(_Wire):
    """The result of one command the agent ran (or refused to run)."""

    id: _Short
    kind: _Short
    exit_code: int | None = None
    """The command's exit status; None when it did not run or was killed."""
    output_tail: Annotated[str, StringConstraints(max_length=4 * OUTPUT_TAIL_CHARS)] = ""
    """The last characters of the command's combined stdout and stderr."""
    error: _Message = ""
    """Why the command did not run or did not finish (unknown kind, timeout, spawn failure)."""
    started_at: float
    finished_at: float

    @property
    def ok(self) -> bool:
        """Whether the command ran and exited 0."""
        return self.exit_code == 0 and not self.error


class Report(_Wire):
    """One report of an agent."""

    node: _Short
    agent_version: _Short = ""
    time: float
    """The agent's wall clock when it started reading (informational; the gateway uses its own)."""
    interval_s: float = Field(gt=0, le=3600)
    """Seconds between reports; the gateway calls a report stale after three of them."""
    nvml: bool
    """Whether NVML works on the node; without it `gpus` is empty."""
    gpus: list[GpuReport] = Field(default_factory=list, max_length=64)
    gpu_error: _Message = ""
    """Why some or all GPU figures are missing; empty when every GPU was read."""
    mistralrs: MistralrsReport
    results: list[CommandReport] = Field(default_factory=list, max_length=64)
    """Results of commands finished since the last accepted report."""


class AgentCommand(_Wire):
    """A command for the agent. It names a kind only: what runs is the agent's own configuration."""

    id: _Short
    kind: _Short


class Reply(_Wire):
    """The gateway's answer to a report."""

    commands: list[AgentCommand] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return self.model_dump(mode="json")
