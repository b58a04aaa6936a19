"""Messages the console posts to itself: small dataclasses named as past-tense facts.

The engine-events worker and the command workers never touch a widget; they post one of these and the app
reacts in a handler. Tests watch them through ``run_test(message_hook=...)`` (harlequin's pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from cortex.engine import Command, CommandResult, Event
from cortex.engine.facade import WhatIf

__all__ = ["CommandFinished", "CommandSubmitted", "EngineEventReceived", "WhatIfFinished"]


@dataclass
class EngineEventReceived(Message):
    """The engine published an event."""

    event: Event


@dataclass
class CommandSubmitted(Message):
    """The operator's command went to the engine."""

    command: Command


@dataclass
class CommandFinished(Message):
    """The engine answered a command (``result`` is None when the submission itself raised)."""

    command: Command
    result: CommandResult | None
    error: str = ""


@dataclass
class WhatIfFinished(Message):
    """The engine answered a what-if (the comparison, or in ``result.error`` why there is none)."""

    result: WhatIf
