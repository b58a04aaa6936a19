"""Upstream failures → Anthropic errors (§8 cases 27, 32, 33), count_tokens and models (case 36).

The SDK checks run the real ``anthropic`` client against an in-process ``httpx.MockTransport``
(no sockets), so they prove the exception class and the retry behaviour a client will see.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2 as httpx
import pydantic
import pytest

from cortex.proxy.anthropic import (
    AnthropicError,
    classify_upstream_error,
    count_tokens,
    envelope,
    estimate_input_tokens,
    model_info,
    models_list,
    not_supported,
    overloaded,
    unreachable,
    upstream_chunk_error,
    upstream_timeout,
)
from cortex.proxy.anthropic.count_tokens import IMAGE_TOKENS

ERRORS: list[tuple[str, int, Any, int, str, str | None]] = [
    ("c32-422-message", 422, b'{"message":"x"}', 400, "invalid_request_error", "x"),
    ("500-max-tokens-zero", 500, {"message": "`max_tokens` must be at least 1"}, 400, "invalid_request_error", None),
    (
        "500-unknown-variant",
        500,
        b'{"message":"unknown variant `foo`, expected one of `a`"}',
        400,
        "invalid_request_error",
        None,
    ),
    (
        "axum-plain-text-422",
        422,
        b"Failed to deserialize the JSON body into the target type: missing field `messages`",
        400,
        "invalid_request_error",
        None,
    ),
    ("axum-415", 415, b"Expected request with `Content-Type: application/json`", 400, "invalid_request_error", None),
    (
        "500-unknown-model",
        500,
        b'{"message":"Requested model \'x\' is not available. Available models: a."}',
        404,
        "not_found_error",
        None,
    ),
    ("500-reloading", 500, b'{"message":"model `m` is being reloaded"}', 529, "overloaded_error", None),
    ("c33-503", 503, b"", 529, "overloaded_error", "upstream returned HTTP 503"),
    ("500-engine", 500, b'{"message":"No response received from the model."}', 500, "api_error", None),
    ("500-cuda-invalid", 500, b'{"message":"CUDA error: invalid argument"}', 500, "api_error", None),
    (
        "openai-shape-429",
        429,
        b'{"error":{"message":"slow down","type":"rate_limit"}}',
        429,
        "rate_limit_error",
        "slow down",
    ),
    ("401", 401, b'{"detail":"bad key"}', 401, "authentication_error", "bad key"),
    ("413", 413, b"request body too large", 413, "request_too_large", None),
    ("504", 504, b"", 504, "timeout_error", None),
    ("502-from-a-proxy", 502, b"<html>bad gateway</html>", 502, "api_error", "<html>bad gateway</html>"),
    (
        "openai-context-length",
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens."
            }
        },
        400,
        "invalid_request_error",
        "prompt is too long: 9000 tokens > 8192 maximum",
    ),
]


@pytest.mark.parametrize(
    ("status", "raw", "want_status", "want_type", "want_message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_classify_upstream_error(
    status: int, raw: Any, want_status: int, want_type: str, want_message: str | None
) -> None:
    err = classify_upstream_error(status, raw)
    assert (err.status, err.type) == (want_status, want_type)
    if want_message is not None:
        assert err.message == want_message
    assert err.message
    body = envelope(err)
    assert body == {"type": "error", "error": {"type": want_type, "message": err.message}}
    if want_type not in ("request_too_large",):
        anthropic.types.ErrorResponse.model_validate(body, strict=True)


def test_c27_prompt_too_long_first_stream_event() -> None:
    chunk = {
        "error": {
            "message": "Prompt sequence length is greater than 4096, perhaps consider truncating",
            "type": "server_error",
        }
    }
    err = upstream_chunk_error(chunk, prompt_tokens_estimate=5000)
    assert err is not None
    assert (err.status, err.type) == (400, "invalid_request_error")
    assert err.message == "prompt is too long: 5000 tokens > 4096 maximum"
    low = upstream_chunk_error(chunk, prompt_tokens_estimate=100)  # N is always above M
    assert low is not None
    assert low.message == "prompt is too long: 4097 tokens > 4096 maximum"
    assert upstream_chunk_error({"choices": []}) is None
    mid = upstream_chunk_error({"error": {"message": "boom", "type": "server_error"}})
    assert mid is not None
    assert (mid.status, mid.type) == (500, "api_error")


def test_own_errors_and_retry_headers() -> None:
    assert (overloaded().status, overloaded().type) == (529, "overloaded_error")
    assert overloaded(retry_after="3").headers() == {"x-should-retry": "true", "retry-after": "3"}
    assert (unreachable().status, unreachable().type, unreachable().headers()) == (
        502,
        "api_error",
        {"x-should-retry": "true"},
    )
    assert (upstream_timeout().status, upstream_timeout().type) == (504, "timeout_error")
    assert (not_supported().status, not_supported().headers()) == (501, {"x-should-retry": "false"})
    assert classify_upstream_error(500, b"engine exploded").headers() == {}
    assert classify_upstream_error(429, b"", retry_after="7").retry_after == "7"
    err = AnthropicError(400, "invalid_request_error", "m")
    assert "invalid_request_error" in str(err)
    assert "AnthropicError(" in repr(err)


# --- the real SDK against these answers ------------------------------------------------------------


def sdk_client(handler: Any, *, max_retries: int = 2) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="k",
        base_url="http://cortex.test",
        max_retries=max_retries,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )


@pytest.mark.parametrize(
    ("err", "exc", "attempts"),
    [
        (classify_upstream_error(422, b'{"message":"x"}'), anthropic.BadRequestError, 1),
        (classify_upstream_error(503, b""), anthropic.OverloadedError, 3),
        (unreachable(), anthropic.InternalServerError, 3),
        (classify_upstream_error(500, b'{"message":"unknown field `zz`"}'), anthropic.BadRequestError, 1),
        (AnthropicError(500, "api_error", "final", should_retry=False), anthropic.InternalServerError, 1),
    ],
    ids=[
        "c32-bad-request",
        "c33-overloaded-retried",
        "c33-unreachable-retried",
        "client-fault-500",
        "should-retry-false",
    ],
)
def test_sdk_sees_error_class_and_retries(err: AnthropicError, exc: type[Exception], attempts: int) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        headers = {**err.headers(), "retry-after-ms": "1"}
        return httpx.Response(err.status, json=envelope(err), headers=headers)

    with pytest.raises(exc) as info:
        sdk_client(handler).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "q"}])
    assert len(calls) == attempts
    assert isinstance(info.value, anthropic.APIStatusError)
    assert info.value.body == envelope(err)


# --- count_tokens and models -----------------------------------------------------------------------


def test_c36_count_tokens() -> None:
    b: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    assert count_tokens(b)["input_tokens"] > 0
    assert count_tokens({"messages": []}) == {"input_tokens": 1}
    big = {**b, "system": "s" * 3500, "tools": [{"name": "T", "input_schema": {"type": "object"}}]}
    assert count_tokens(big)["input_tokens"] > 1000
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 1_000_000}}
    with_image = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]}
    assert IMAGE_TOKENS < estimate_input_tokens(with_image) < IMAGE_TOKENS + 100
    bad: Any
    for bad in ([], {"messages": "x"}):
        with pytest.raises(AnthropicError):
            count_tokens(bad)


def test_c36_models_list_shape_and_paging() -> None:
    ids = [f"model-{i}" for i in range(5)]
    page = models_list(ids, limit=2)
    assert page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == ("model-0", "model-1")
    for entry in page["data"]:
        info = anthropic.types.ModelInfo.model_validate(entry)
        assert info.id == entry["id"]
        assert info.created_at.year >= 2025
    assert [m["id"] for m in models_list(ids, after_id="model-1", limit=2)["data"]] == ["model-2", "model-3"]
    last = models_list(ids, after_id="model-3", limit=2)
    assert [m["id"] for m in last["data"]] == ["model-4"]
    assert last["has_more"] is False
    back = models_list(ids, before_id="model-4", limit=2)
    assert [m["id"] for m in back["data"]] == ["model-2", "model-3"]
    assert back["has_more"] is True
    assert models_list([], limit=3) == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    assert model_info("x")["display_name"] == "x"
    with pytest.raises(AnthropicError):
        models_list(ids, limit=0)


def test_c36_sdk_pages_through_models() -> None:
    ids = [f"claude-{i}" for i in range(7)]

    def handler(request: httpx.Request) -> httpx.Response:
        q = request.url.params
        page = models_list(ids, after_id=q.get("after_id"), limit=int(q["limit"]) if "limit" in q else None)
        return httpx.Response(200, content=json.dumps(page).encode(), headers={"content-type": "application/json"})

    got = [m.id for m in sdk_client(handler).models.list(limit=3)]
    assert got == ids
    assert pydantic.TypeAdapter(list[anthropic.types.ModelInfo]).validate_python(models_list(ids)["data"])
