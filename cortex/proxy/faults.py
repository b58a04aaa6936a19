"""Which of a mistral.rs node's error messages are the client's fault: one rule for both dialects.

mistral.rs raises many client mistakes (``max_tokens: 0``, an unknown field, a bad value, an unknown model)
inside its request parser, so they arrive as HTTP 500. Both the OpenAI and the Anthropic side turn them
into a 400 that clients do not retry; they read the wording here so that they cannot disagree.
"""

from __future__ import annotations

import re

__all__ = ["CONTEXT_OVERFLOW", "MODEL_UNAVAILABLE", "NODE_NOT_READY", "is_client_fault"]

CONTEXT_OVERFLOW = re.compile(
    r"context length|context window|maximum context|sequence length is greater than"
    r"|too many tokens|prompt is too long|exceeds the model's max",
    re.IGNORECASE,
)
"""The prompt does not fit the model (mistral.rs: "Prompt sequence length is greater than N")."""
MODEL_UNAVAILABLE = re.compile(r"requested model .* is not available|model not found", re.IGNORECASE)
"""The node does not serve the model asked for."""
NODE_NOT_READY = re.compile(r"is being reloaded|failed to reload model", re.IGNORECASE)
"""The node lazily loads (or failed to lazily load) a model cortex believed loaded: the request is re-queued."""
_CLIENT_FAULT = re.compile(
    r"deserializ|invalid|must be|must not|expected|unknown (?:field|variant)|missing field|out of range"
    r"|not supported|unsupported|cannot be|can't be|at least|at most|greater than or equal|less than"
    r"|max_tokens|max_completion_tokens|grammar|response_format|logit_bias|dimensions",
    re.IGNORECASE,
)
# ...but an engine or device failure that happens to say "invalid" is still a server fault.
_SERVER_FAULT = re.compile(
    r"cuda|out of memory|\boom\b|device|panick|poison|no response received|being reloaded|failed to reload",
    re.IGNORECASE,
)


def is_client_fault(message: str) -> bool:
    """Whether a node's error message describes a mistake in the request."""
    if _SERVER_FAULT.search(message):
        return False
    return bool(_CLIENT_FAULT.search(message) or CONTEXT_OVERFLOW.search(message) or MODEL_UNAVAILABLE.search(message))
