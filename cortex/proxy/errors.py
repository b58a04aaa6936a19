"""Errors in the OpenAI dialect, and the reading of a node's error bodies.

mistral.rs answers inference errors as ``{"message": ...}`` with 422 or 500, and reports many *client*
mistakes (``max_tokens: 0``, an unknown model, a bad parameter) as 500 because they are raised inside its
request parser. :func:`read_node_error` turns such a body into the status the client deserves, so that a
client's mistake is a 400 it will not retry and a real node failure stays a 5xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cortex.errors import CortexError
from cortex.proxy.faults import is_client_fault

__all__ = ["NodeErrorInfo", "openai_error", "openai_error_for", "read_node_error"]


def openai_error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


def openai_error_for(exc: CortexError, headers: dict[str, str] | None = None) -> web.Response:
    """The OpenAI response for one of cortex's own errors (with ``Retry-After`` where it helps)."""
    extra = dict(headers or {})
    if exc.retry_after is not None:
        extra["Retry-After"] = str(int(exc.retry_after))
    if not exc.retryable:
        extra["x-should-retry"] = "false"
    code = {404: "model_not_found", 503: "unavailable", 502: "upstream_error"}.get(exc.status)
    param: str | None = getattr(exc, "param", None)  # BadRequest names the offending field
    if param is None and exc.status == 404:
        param = "model"
    return openai_error(exc.status, exc.message, exc.kind, param=param, code=code, headers=extra)


@dataclass(frozen=True, slots=True)
class NodeErrorInfo:
    """A node's error, classified."""

    status: int
    """The status cortex answers with."""
    kind: str
    """OpenAI error type."""
    message: str
    node_status: int


def _message_of(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        return text[:2000] or "(empty error body)"
    if isinstance(data, dict):
        if isinstance(data.get("message"), str):
            return str(data["message"])
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return text[:2000]


def read_node_error(status: int, body: bytes) -> NodeErrorInfo:
    """Classify a node's non-2xx answer (mistral.rs: 400/413/415/422 plain text, 422/500 ``{"message"}``)."""
    message = _message_of(body)
    if status in (400, 413, 415, 422) or (status >= 500 and is_client_fault(message)):
        out = 413 if status == 413 else 400
        return NodeErrorInfo(out, "invalid_request_error", message, status)
    if status == 404:
        return NodeErrorInfo(404, "invalid_request_error", message, status)
    if status >= 500:
        return NodeErrorInfo(status, "server_error", message, status)
    return NodeErrorInfo(status, "invalid_request_error", message, status)
