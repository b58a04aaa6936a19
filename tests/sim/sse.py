"""Small helpers to read raw SSE bodies and talk to a node in tests."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from cortex.sim import SimNode

USAGE_FIELDS = [
    "completion_tokens",
    "prompt_tokens",
    "total_tokens",
    "avg_tok_per_sec",
    "avg_prompt_tok_per_sec",
    "avg_compl_tok_per_sec",
    "total_time_sec",
    "total_prompt_time_sec",
    "total_completion_time_sec",
]

USER_HI: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]


def frames(raw: str) -> list[str]:
    """Split a raw SSE body into its frames (without the blank-line separators)."""
    return [f for f in raw.split("\n\n") if f]


def data_frames(raw: str) -> list[str]:
    """The payload of every ``data:`` frame, asserting mistral.rs's no-space framing."""
    out = []
    for frame in frames(raw):
        if frame.startswith(":"):
            continue
        assert frame.startswith("data:"), frame
        assert not frame.startswith("data: "), frame
        out.append(frame[len("data:") :])
    return out


def chunks(raw: str) -> list[dict[str, Any]]:
    """The JSON chunks of a stream (everything but ``[DONE]``)."""
    return [json.loads(d) for d in data_frames(raw) if d != "[DONE]"]


async def post(http: aiohttp.ClientSession, node: SimNode, path: str, body: object, **kwargs: Any) -> tuple[int, Any]:
    """POST JSON; return the status and the decoded JSON body (or the text when not JSON)."""
    async with http.post(node.url + path, json=body, **kwargs) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def stream_text(http: aiohttp.ClientSession, node: SimNode, path: str, body: dict[str, Any]) -> str:
    """POST a streaming request and return the raw body."""
    async with http.post(node.url + path, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await resp.text()


async def get_json(http: aiohttp.ClientSession, node: SimNode, path: str) -> Any:
    async with http.get(node.url + path) as resp:
        assert resp.status == 200
        return await resp.json()
