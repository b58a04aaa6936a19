"""A typed async client for one mistral.rs node's control surface.

It speaks the node's quirks so that nobody else has to: every lifecycle answer is HTTP 200 and the real
outcome is in ``status``; ``/v1/models`` starts with a synthetic ``default`` entry and may list one id twice
(the stuck-``reloading`` bug); ``/v1/system/info`` is the only VRAM signal and may be absent on old
servers. Inference traffic does not go through here: the gateway streams it with the same
``ClientSession`` and no parsing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = [
    "LIFECYCLE_STATUSES",
    "LifecycleReply",
    "MistralRsClient",
    "NodeError",
    "SystemInfo",
    "parse_created",
    "parse_models",
]

LIFECYCLE_STATUSES = frozenset({"loaded", "unloaded", "reloading", "not_found", "no_loader_config", "internal_error"})
_MIB = 1024 * 1024
_RANK = {"unloaded": 0, "reloading": 1, "loaded": 2}
"""Which status wins when the stuck-reload bug lists an id twice."""


class NodeError(Exception):
    """The node could not be reached or answered something unusable."""


@dataclass(frozen=True, slots=True)
class LifecycleReply:
    """The answer of ``/v1/models/{reload,unload,status}``."""

    status: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """Device memory summed over the node's GPUs, in MiB, and the server version."""

    total_mb: int | None
    used_mb: int | None
    version: str


def parse_models(payload: Any) -> dict[str, str]:
    """Map model id → status from a ``/v1/models`` body.

    The ``default`` entry is dropped. When the stuck-reload bug lists an id twice, ``loaded`` wins (the
    engine keeps serving until it is unloaded), and ``reloading`` beats ``unloaded`` (what
    ``/v1/models/status`` says, and a reload would never finish). Entries without a status
    (servers before v0.7.0) count as loaded. LoRA adapter cards (with a ``parent``) are skipped.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise NodeError("GET /v1/models: unexpected body")
    out: dict[str, str] = {}
    for entry in payload["data"]:
        if not isinstance(entry, dict):
            continue
        model_id = entry.get("id")
        if not isinstance(model_id, str) or model_id == "default" or "parent" in entry:
            continue
        status = entry.get("status", "loaded")
        if not isinstance(status, str):
            continue
        if _RANK.get(out.get(model_id, ""), -1) >= _RANK.get(status, 0):
            continue
        out[model_id] = status
    return out


def parse_created(payload: Any) -> int | None:
    """The ``created`` stamp of a model list (the server's start time, the same on every entry)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    for entry in data if isinstance(data, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("created"), int):
            return int(entry["created"])
    return None


def _parse_system_info(payload: Any) -> SystemInfo:
    total = used = 0
    seen = False
    devices = payload.get("devices") if isinstance(payload, dict) else None
    for dev in devices if isinstance(devices, list) else ():
        if not isinstance(dev, dict) or dev.get("kind") not in ("cuda", "metal"):
            continue
        t, a = dev.get("total_memory_bytes"), dev.get("available_memory_bytes")
        if isinstance(t, int | float) and isinstance(a, int | float):
            total += int(t)
            used += int(t - a)
            seen = True
    build = payload.get("build") if isinstance(payload, dict) else None
    version = build.get("version", "") if isinstance(build, dict) else ""
    if not seen:
        return SystemInfo(None, None, str(version))
    return SystemInfo(total // _MIB, max(0, used) // _MIB, str(version))


class MistralRsClient:
    """Control calls to one node through a shared session."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: str, *, timeout_s: float) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.created: int | None = None
        """``created`` of the last model list read: the server's start time (a change means a restart)."""

    async def _get_json(self, path: str) -> Any:
        try:
            async with self._session.get(self.endpoint + path, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise NodeError(f"GET {path}: HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise NodeError(f"GET {path}: {_describe(exc)}") from None

    async def health(self) -> None:
        """Raise :class:`NodeError` unless ``/health`` answers 200."""
        try:
            async with self._session.get(self.endpoint + "/health", timeout=self._timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    raise NodeError(f"GET /health: HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise NodeError(f"GET /health: {_describe(exc)}") from None

    async def models(self) -> dict[str, str]:
        """Model id → status (``loaded``, ``unloaded``, ``reloading``)."""
        payload = await self._get_json("/v1/models")
        models = parse_models(payload)
        self.created = parse_created(payload)
        return models

    async def system_info(self) -> SystemInfo | None:
        """Device memory from ``/v1/system/info``; None when the server has no such route."""
        try:
            return _parse_system_info(await self._get_json("/v1/system/info"))
        except NodeError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    async def lifecycle(self, action: str, model_id: str, *, timeout_s: float | None = None) -> LifecycleReply:
        """POST ``/v1/models/{action}``; the HTTP status is always 200, so read ``status``."""
        timeout = self._timeout if timeout_s is None else aiohttp.ClientTimeout(total=timeout_s)
        path = f"/v1/models/{action}"
        try:
            async with self._session.post(self.endpoint + path, json={"model_id": model_id}, timeout=timeout) as resp:
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise NodeError(f"POST {path}: {_describe(exc)}") from None
        if not isinstance(body, dict) or body.get("status") not in LIFECYCLE_STATUSES:
            raise NodeError(f"POST {path}: unexpected answer {str(body)[:200]}")
        return LifecycleReply(str(body["status"]), str(body.get("error", "")))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]
