"""The Anthropic shape of ``GET /v1/models`` and ``GET /v1/models/{id}`` (translation.md §1.1, §3.8).

The same route answers OpenAI clients with ``{"object":"list"}``; clients that send
``anthropic-version`` (or ``x-api-key``) get this shape instead. The SDK pages with
``after_id``/``before_id``/``limit`` while ``has_more`` is true, so paging is implemented over the
given order even though a gateway's list is short. The 2.x SDK's ``ModelInfo`` also expects
``lifecycle``, sent as ``active``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import AnthropicError

__all__ = ["DEFAULT_CREATED_AT", "model_info", "models_list"]

DEFAULT_CREATED_AT = "2025-01-01T00:00:00Z"
"""The ``created_at`` used when the caller knows none (nodes do not report one that means anything)."""


def model_info(
    model_id: str, *, created_at: str = DEFAULT_CREATED_AT, display_name: str | None = None
) -> dict[str, Any]:
    """Return one model entry (``anthropic.types.ModelInfo``)."""
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name or model_id,
        "created_at": created_at,
        "lifecycle": "active",
    }


def models_list(
    model_ids: Sequence[str],
    *,
    created_at: str = DEFAULT_CREATED_AT,
    after_id: str | None = None,
    before_id: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Return one page of the Anthropic models list.

    Args:
        model_ids: The client-facing model names, in list order.
        created_at: The RFC 3339 timestamp for every entry.
        after_id: Return the entries after this id (the SDK's forward paging).
        before_id: Return the entries before this id.
        limit: The page size (1-1000; default 20, as the real API).

    Returns:
        ``{"data", "has_more", "first_id", "last_id"}``.

    Raises:
        AnthropicError: 400 for a limit out of range.
    """
    size = 20 if limit is None else limit
    if not 1 <= size <= 1000:
        raise AnthropicError(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
    ids = list(model_ids)
    lo, hi = 0, len(ids)
    if after_id is not None:
        lo = ids.index(after_id) + 1 if after_id in ids else len(ids)
    if before_id is not None:
        hi = ids.index(before_id) if before_id in ids else 0
    if before_id is not None and after_id is None:
        window = ids[max(lo, hi - size) : hi]
        has_more = hi - size > lo
    else:
        window = ids[lo:hi][:size]
        has_more = hi - lo > size
    return {
        "data": [model_info(m, created_at=created_at) for m in window],
        "has_more": has_more,
        "first_id": window[0] if window else None,
        "last_id": window[-1] if window else None,
    }
