"""Scripted faults and canned answers that tests arm on a simulated node.

They sit apart from the node so the handlers can consume them (``take_*``) without reaching into the
node's public API, and so that arming a fault is a plain data change: nothing here touches the network.
One-shot hooks are queues: each arming affects exactly one later request or stream, in order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from cortex.sim.textgen import ToolCall, new_tool_call

StreamFaultKind = Literal["end", "abort", "error"]


@dataclass
class InjectedFailure:
    """An error response that replaces the next ``remaining`` requests to one path."""

    status: int
    """HTTP status."""
    body: object
    """JSON-serializable body; a ``str`` is sent as text/plain, None as an empty body."""
    remaining: int
    """How many more requests it answers."""


@dataclass(frozen=True)
class StreamFault:
    """What goes wrong in the next stream, after ``after`` data chunks were sent."""

    after: int
    """Data chunks sent before the fault."""
    kind: StreamFaultKind
    """``end``: the body ends cleanly without ``[DONE]``; ``abort``: the TCP connection is cut;
    ``error``: a ``data:{"error":...}`` frame, then ``data:[DONE]``."""
    message: str = ""
    """The error message (``error`` only)."""


@dataclass
class Script:
    """All scripted behaviour of one node."""

    reply: str | None = None
    """Fixed generated text (None: the cycling words)."""
    first_byte_delay: float = 0.0
    """Seconds before any response byte (headers included) of chat and completions; counted as prefill."""
    failures: dict[str, deque[InjectedFailure]] = field(default_factory=dict)
    stream_faults: deque[StreamFault] = field(default_factory=deque)
    tool_calls: deque[tuple[str, str]] = field(default_factory=deque)

    def take_failure(self, path: str) -> InjectedFailure | None:
        """Consume one injected failure for ``path``, if armed."""
        queue = self.failures.get(path)
        if not queue:
            return None
        failure = queue[0]
        failure.remaining -= 1
        if failure.remaining <= 0:
            queue.popleft()
        return failure

    def take_stream_fault(self) -> StreamFault | None:
        """Consume the next stream fault, if armed."""
        return self.stream_faults.popleft() if self.stream_faults else None

    def take_tool_call(self) -> ToolCall | None:
        """Consume the next scripted tool call, if armed."""
        if not self.tool_calls:
            return None
        name, arguments = self.tool_calls.popleft()
        return new_tool_call(name, arguments)
