"""The non-generation routes of the simulated node: health, metrics, model list, lifecycle and system info.

These are the endpoints a gateway polls and drives, so their quirks matter more than their content:
``/v1/models`` puts a status-less ``default`` entry first; the lifecycle routes answer HTTP 200 whatever
happens and carry the outcome in ``status``; ``/v1/system/info`` is the only VRAM signal and reports the
whole device, which the node derives from the weights its :class:`~cortex.sim.models.ModelTable` holds.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cortex.sim import frames
from cortex.sim.bodies import BODY_KEY, parse_model_id
from cortex.sim.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from cortex.sim.node import SimNode

MIB = 1024 * 1024
SERVER_VERSION = "0.9.2"
"""The mistral.rs version the simulator imitates (``build.version``)."""
HOST_MEMORY_BYTES = 64 * 1024 * MIB
HOST_AVAILABLE_BYTES = 48 * 1024 * MIB


def _json(obj: object) -> web.Response:
    return web.Response(text=frames.dumps(obj), content_type="application/json")


class AdminHandlers:
    """Health, metrics, listing, lifecycle and system-info routes, bound to one node.

    Args:
        node: The node they describe and drive.
    """

    def __init__(self, node: SimNode) -> None:
        self.node = node

    async def health(self, request: web.Request) -> web.Response:
        """``GET /`` and ``/health``: 200 ``OK``, whatever the models' state."""
        return web.Response(text="OK")

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus text."""
        return web.Response(body=self.node.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: ``default`` first (no status), then reloading, loaded, unloaded."""
        models = self.node.models
        created = models.created
        data: list[dict[str, Any]] = [
            {"id": "default", "object": "model", "created": created, "owned_by": "local", "root": "default"}
        ]
        data += [
            {
                "id": mid,
                "object": "model",
                "created": created,
                "owned_by": "local",
                "root": mid,
                "status": status,
            }
            for mid, status in models.listing()
        ]
        return _json({"object": "list", "data": data})

    async def unload(self, request: web.Request) -> web.Response:
        """``POST /v1/models/unload``: immediate; in-flight work on the model is aborted."""
        model_id = parse_model_id(request[BODY_KEY])
        status = self.node.models.unload(model_id, self.node.unload_free_s)
        return _json({"model_id": model_id, "status": status})

    async def reload(self, request: web.Request) -> web.Response:
        """``POST /v1/models/reload``: blocks for the whole load."""
        model_id = parse_model_id(request[BODY_KEY])
        status, error = await self.node.models.reload(model_id, self.node.load_s, bug=self.node.reload_bug)
        body = {"model_id": model_id, "status": status}
        if error is not None:
            body["error"] = error
        return _json(body)

    async def status(self, request: web.Request) -> web.Response:
        """``POST /v1/models/status``."""
        model_id = parse_model_id(request[BODY_KEY])
        return _json({"model_id": model_id, "status": self.node.models.status(model_id)})

    async def system_info(self, request: web.Request) -> web.Response:
        """``GET /v1/system/info``: one CUDA device whose free memory follows the loaded weights."""
        node = self.node
        total = node.vram_mb * MIB
        used = (node.base_vram_mb + node.models.used_vram_mb()) * MIB
        cores = os.cpu_count() or 1
        return _json(
            {
                "os": platform.system() or "Linux",
                "kernel": platform.release(),
                "cpu": {
                    "brand": "Simulated CPU",
                    "logical_cores": cores,
                    "physical_cores": max(1, cores // 2),
                    "avx": True,
                    "avx2": True,
                    "avx512": False,
                    "fma": True,
                },
                "memory": {"total_bytes": HOST_MEMORY_BYTES, "available_bytes": HOST_AVAILABLE_BYTES},
                "devices": [
                    {
                        "kind": "cuda",
                        "ordinal": 0,
                        "name": f"Simulated GPU ({node.name})",
                        "total_memory_bytes": total,
                        "available_memory_bytes": max(0, total - used),
                        "compute_capability": [8, 9],
                        "flash_attn_compatible": True,
                        "flash_attn_v3_compatible": False,
                    }
                ],
                "build": {
                    "version": SERVER_VERSION,
                    "cuda": True,
                    "metal": False,
                    "cudnn": False,
                    "nccl": False,
                    "flash_attn": True,
                    "flash_attn_v3": False,
                    "accelerate": False,
                    "mkl": False,
                    "git_revision": "9e922623f",
                },
                "hf_cache_path": "/root/.cache/huggingface/hub",
            }
        )
