"""Error shapes, embeddings, request ids, injected failures, recording and metrics of the simulated node."""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any

import aiohttp
import pytest

from cortex.sim import SimNode
from tests.sim.conftest import ALPHA, BETA
from tests.sim.sse import USER_HI, post

NOT_AVAILABLE = (
    "Requested model 'nope' is not available. Available models: org/alpha. Use 'default' to use the default model."
)
DESERIALIZE = "Failed to deserialize the JSON body"


@pytest.mark.parametrize(
    ("path", "body", "status", "expected"),
    [
        ("/v1/chat/completions", {"model": "nope", "messages": USER_HI}, 500, {"message": NOT_AVAILABLE}),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 500, {"message": NOT_AVAILABLE}),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": USER_HI, "stream": True},
            500,
            {"message": NOT_AVAILABLE},
        ),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 422, {"message": NOT_AVAILABLE}),
        ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": 0}, 500, None),
        ("/v1/chat/completions", {"model": ALPHA}, 422, DESERIALIZE),
        ("/v1/chat/completions", {"messages": USER_HI, "max_tokens": "ten"}, 422, DESERIALIZE),
        ("/v1/chat/completions", [1, 2], 422, DESERIALIZE),
        ("/v1/completions", {"prompt": 5}, 422, DESERIALIZE),
        ("/v1/embeddings", {"input": "x", "dimensions": 4}, 422, None),
        ("/v1/embeddings", {"input": ""}, 422, None),
        ("/v1/embeddings", {"input": []}, 422, None),
        ("/v1/embeddings", {"model": ALPHA}, 422, DESERIALIZE),
    ],
    ids=[
        "chat-unknown-model",
        "completions-unknown-model",
        "stream-unknown-model-is-json",
        "embeddings-unknown-model",
        "max-tokens-zero",
        "missing-messages",
        "wrong-type",
        "not-an-object",
        "completions-prompt-type",
        "embeddings-dimensions",
        "embeddings-empty-string",
        "embeddings-empty-list",
        "embeddings-missing-input",
    ],
)
async def test_error_table(
    http: aiohttp.ClientSession, node: SimNode, path: str, body: object, status: int, expected: object
) -> None:
    got_status, got = await post(http, node, path, body)
    assert got_status == status
    if expected is None:  # an OpenAI-surface error: {"message": ...} only
        assert isinstance(got, dict)
        assert list(got) == ["message"]
        assert got["message"]
    elif isinstance(expected, str):  # an axum extractor rejection: plain text
        assert isinstance(got, str)
        assert got.startswith(expected)
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("data", "content_type", "status", "prefix"),
    [
        (b"{not json", "application/json", 400, "Failed to parse the request body as JSON"),
        (b'{"messages":"hi"}', "text/plain", 415, "Expected request with `Content-Type: application/json`"),
    ],
    ids=["malformed", "wrong-content-type"],
)
async def test_body_rejections_are_plain_text(
    http: aiohttp.ClientSession, node: SimNode, data: bytes, content_type: str, status: int, prefix: str
) -> None:
    headers = {"Content-Type": content_type}
    async with http.post(node.url + "/v1/chat/completions", data=data, headers=headers) as resp:
        assert resp.status == status
        assert (await resp.text()).startswith(prefix)


async def test_oversized_body_is_413(http: aiohttp.ClientSession) -> None:
    node = SimNode([])
    node.max_body_bytes = 1024
    await node.start()
    try:
        body = {"messages": [{"role": "user", "content": "x" * 4096}]}
        assert await post(http, node, "/v1/chat/completions", body) == (413, "request body too large")
    finally:
        await node.stop()


async def test_unknown_path_is_empty_404(http: aiohttp.ClientSession, node: SimNode) -> None:
    async with http.get(node.url + "/v1/nothing") as resp:
        assert (resp.status, await resp.read()) == (404, b"")


async def test_embeddings_are_deterministic_and_echo_model(http: aiohttp.ClientSession, node: SimNode) -> None:
    status, first = await post(http, node, "/v1/embeddings", {"input": ["alpha", "beta"], "model": "default"})
    assert status == 200
    assert first["object"] == "list"
    assert first["model"] == "default"
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # ceil(5/4) + ceil(4/4)
    vectors = [d["embedding"] for d in first["data"]]
    assert [d["index"] for d in first["data"]] == [0, 1]
    assert vectors[0] != vectors[1]
    assert all(len(v) == 8 and all(isinstance(x, float) for x in v) for v in vectors)
    _, again = await post(http, node, "/v1/embeddings", {"input": "alpha", "model": ALPHA})
    assert again["model"] == ALPHA
    assert again["data"][0]["embedding"] == vectors[0]
    _, encoded = await post(http, node, "/v1/embeddings", {"input": "alpha", "encoding_format": "base64"})
    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vectors[0], abs=1e-6)
    _, tokens = await post(http, node, "/v1/embeddings", {"input": [[1, 2, 3], [4]]})
    assert tokens["usage"]["prompt_tokens"] == 4
    assert len(tokens["data"]) == 2


async def test_embeddings_lazy_load_an_unloaded_model(http: aiohttp.ClientSession, node: SimNode) -> None:
    status, body = await post(http, node, "/v1/embeddings", {"input": "x", "model": BETA})
    assert (status, body["model"]) == (200, BETA)
    assert node.model_status(BETA) == "loaded"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/missing")],
)
async def test_request_id_is_echoed_or_generated(
    http: aiohttp.ClientSession, node: SimNode, method: str, path: str
) -> None:
    body: Any = {"messages": USER_HI, "stream": True} if method == "POST" else None
    async with http.request(method, node.url + path, json=body, headers={"x-request-id": "abc-123"}) as resp:
        assert resp.headers["x-request-id"] == "abc-123"
    async with http.request(method, node.url + path, json=body) as resp:
        generated = resp.headers["x-request-id"]
    assert generated.startswith("req_")
    assert uuid.UUID(generated[4:]).version == 4
    assert len(generated) == 36


async def test_fail_next_injects_errors_then_recovers(http: aiohttp.ClientSession, node: SimNode) -> None:
    node.fail_next("/v1/chat/completions", 503, {"message": "busy"}, count=2)
    node.fail_next("/health", 500, "down")
    results = [await post(http, node, "/v1/chat/completions", {"messages": USER_HI}) for _ in range(3)]
    assert [r[0] for r in results] == [503, 503, 200]
    assert results[0][1] == {"message": "busy"}
    async with http.get(node.url + "/health") as resp:
        assert (resp.status, await resp.text()) == (500, "down")


async def test_requests_are_recorded(http: aiohttp.ClientSession, node: SimNode) -> None:
    await post(http, node, "/v1/chat/completions", {"messages": USER_HI}, headers={"X-Trace": "t1"})
    async with http.get(node.url + "/health"):
        pass
    first, second = node.requests
    assert (first.method, first.path, first.json) == ("POST", "/v1/chat/completions", {"messages": USER_HI})
    assert first.headers["x-trace"] == "t1"
    assert (second.method, second.path, second.json) == ("GET", "/health", None)
    assert second.at >= first.at


async def test_metrics_count_requests_with_model_labels(http: aiohttp.ClientSession, node: SimNode) -> None:
    await post(http, node, "/v1/chat/completions", {"messages": USER_HI})
    await post(http, node, "/v1/chat/completions", {"model": "nope", "messages": USER_HI})
    await post(http, node, "/v1/models/status", {"model_id": BETA})
    async with http.get(node.url + "/health"):
        pass
    async with http.get(node.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert 'http_requests_total{method="POST",model="org/alpha",path="/v1/chat/completions",status="200"} 1.0' in text
    assert 'http_requests_total{method="POST",model="unknown",path="/v1/chat/completions",status="500"} 1.0' in text
    assert 'http_requests_total{method="POST",model="org/beta",path="/v1/models/status",status="200"} 1.0' in text
    assert 'path="/health"' not in text
    assert "\nmistralrs_sequences_running 0.0\n" in text
    assert "\nmistralrs_sequences_waiting 0.0\n" in text
