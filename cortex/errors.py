"""The errors cortex raises on purpose, each knowing how a client should see it.

Handlers turn these into the client's dialect (OpenAI or Anthropic envelope) using ``status``, ``kind``
and ``retry_after``; nothing else in the code decides statuses, so the two dialects cannot drift.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "CortexError",
    "ListenError",
    "LoadFailed",
    "ModelTooLarge",
    "NoNodeAvailable",
    "PayloadTooLarge",
    "QueueFull",
    "QueueTimeout",
    "Unauthorized",
    "UnknownModel",
    "UpstreamError",
]


class CortexError(Exception):
    """Base: a failure with an HTTP status and an error kind."""

    status = 500
    kind = "server_error"
    """OpenAI error type; the Anthropic mapping derives from ``status``."""
    retry_after: float | None = None
    retryable = True
    """False when asking again cannot help (clients are told ``x-should-retry: false``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(CortexError):
    """No node lists the model (after alias resolution)."""

    status = 404
    kind = "invalid_request_error"


class NoNodeAvailable(CortexError):
    """Every node that lists the model is down or drained."""

    status = 503
    kind = "server_error"
    retry_after = 5.0


class QueueFull(CortexError):
    """Too many requests already wait for this model."""

    status = 503
    kind = "server_error"
    retry_after = 5.0


class QueueTimeout(CortexError):
    """The model was not placed and loaded within ``queue_timeout_s``."""

    status = 503
    kind = "server_error"
    retry_after = 10.0


class LoadFailed(CortexError):
    """Every node that could load the model failed to."""

    status = 503
    kind = "server_error"
    retry_after = 30.0


class ModelTooLarge(CortexError):
    """The model's footprint exceeds the usable VRAM of every node that lists it: it can never be placed."""

    status = 503
    kind = "server_error"
    retryable = False


class UpstreamError(CortexError):
    """The node could not be reached or broke the connection."""

    status = 502
    kind = "server_error"


class ListenError(OSError):
    """A listen address could not be bound; names the config key."""

    def __init__(self, key: str, address: str, reason: str) -> None:
        super().__init__(f"{key}: cannot listen on {address}: {reason}")
        self.key = key
        self.address = address
        self.reason = reason


class BadRequest(CortexError):
    """The client's request is malformed (bad JSON, a wrong type, a missing field)."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PayloadTooLarge(CortexError):
    """The body is larger than ``gateway.max_body_mb``."""

    status = 413
    kind = "invalid_request_error"


class Unauthorized(CortexError):
    """No API key, or a wrong one."""

    status = 401
    kind = "invalid_request_error"
