"""One rule for which node errors are the client's fault, shared by the OpenAI and Anthropic sides."""

from __future__ import annotations

import pytest

from cortex.proxy.anthropic import classify_upstream_error
from cortex.proxy.errors import read_node_error
from cortex.proxy.faults import is_client_fault

CASES = [
    ("max_tokens must be at least 1", True),
    ("Failed to deserialize the JSON body into the target type: unknown field `foo`", True),
    ("Requested model 'x' is not available. Available models: a, b.", True),
    ("Prompt sequence length is greater than 64, perhaps consider using `truncate_sequence`?", True),
    ("model `m` is being reloaded", False),
    ("CUDA error: invalid device ordinal", False),
    ("engine state lock is poisoned", False),
    ("No response received from the model.", False),
]


@pytest.mark.parametrize(("message", "client"), CASES, ids=[c[0][:30] for c in CASES])
def test_both_dialects_agree_on_a_node_500(message: str, client: bool) -> None:
    assert is_client_fault(message) is client
    openai = read_node_error(500, f'{{"message": "{message}"}}'.encode())
    anthropic = classify_upstream_error(500, {"message": message})
    assert (openai.status < 500) is client
    assert (anthropic.status < 500) is client
