"""``/v1/images/generations`` and ``/v1/audio/speech`` of the simulated node, and the models' ``kind``.

mistral.rs serves diffusion models (FLUX) through the images route and speech models (Dia) through the
speech route (``image_generation.rs``, ``speech_generation.rs``). The shapes copied from the code:

* images: ``{"created", "data": [{"url", "b64_json"}]}`` with both keys always present (one of them null);
  ``response_format`` is ``"Url"`` (default: a server-side file name in ``url``) or ``"B64Json"`` (a
  ``data:image/png;base64,...`` string), spelled as the Rust enum, so OpenAI's ``"b64_json"`` is a 422;
  ``height``/``width`` (default 720 by 1280) instead of ``size``;
* speech: ``response_format`` is required and only ``wav`` or ``pcm`` pass (``mp3``... are a 422 "Only
  support wav/pcm response format."); the answer is raw audio with
  ``Content-Type: audio/wav; rate=R; channels=C`` (``audio/pcm; codecs=1; format=s16le; ...`` for pcm);
* an unknown model is a 500 (validation inside the request parser). Asking a model of another kind is also
  a 500 here; the wording of that message is the simulator's own.

The node's configured kinds (``SimNode(kinds=...)``) also go into ``/v1/models`` as a ``kind`` field: a
simulated node that *says* what each model is, so the gateway can show it. Real nodes at the spec's commit
do not say it, and cortex then shows no kind.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from cortex.sim import frames
from cortex.sim.bodies import BODY_KEY, DESERIALIZE, BodyRejected, ParsedBody, _bad, _object, _opt_uint, _required
from cortex.sim.models import SimError

if TYPE_CHECKING:
    from cortex.sim.node import SimNode

__all__ = ["MediaHandlers", "models_with_kinds", "png_bytes", "speech_bytes"]

SPEECH_RATE = 24000
"""Samples per second of simulated speech (mono, 16-bit)."""
SECONDS_PER_WORD = 0.3
_WRITE_PIECE = 64 * 1024


@dataclass(frozen=True)
class ImageRequest:
    """A checked ``/v1/images/generations`` body."""

    model: str
    prompt: str
    n: int
    b64: bool
    height: int
    width: int


@dataclass(frozen=True)
class SpeechRequest:
    """A checked ``/v1/audio/speech`` body."""

    model: str
    input: str
    response_format: str


def _model(obj: dict[str, Any]) -> str:
    model = obj.get("model", "default")
    if not isinstance(model, str):
        raise _bad("model", model, "a string")
    return model


def parse_image(body: ParsedBody) -> ImageRequest:
    """Check an images body as serde would (the enum spelling included)."""
    obj = _object(body)
    prompt = _required(obj, "prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt", prompt, "a string")
    fmt = obj.get("response_format", "Url")
    if fmt not in ("Url", "B64Json"):
        raise BodyRejected(422, f"{DESERIALIZE}response_format: unknown variant `{fmt}`, expected `Url` or `B64Json`")
    return ImageRequest(
        model=_model(obj),
        prompt=prompt,
        n=_opt_uint(obj, "n") or 1,
        b64=fmt == "B64Json",
        height=_opt_uint(obj, "height") or 720,
        width=_opt_uint(obj, "width") or 1280,
    )


_AUDIO_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


def parse_speech(body: ParsedBody) -> SpeechRequest:
    """Check a speech body as serde would (``response_format`` is required)."""
    obj = _object(body)
    text = _required(obj, "input")
    if not isinstance(text, str):
        raise _bad("input", text, "a string")
    fmt = _required(obj, "response_format")
    if fmt not in _AUDIO_FORMATS:
        raise BodyRejected(422, f"{DESERIALIZE}response_format: unknown variant `{fmt}`")
    return SpeechRequest(model=_model(obj), input=text, response_format=str(fmt))


def png_bytes(prompt: str, size: int = 16) -> bytes:
    """A small, valid, deterministic PNG whose colour comes from the prompt."""
    r, g, b = hashlib.sha256(prompt.encode()).digest()[:3]
    row = b"\x00" + bytes((r, g, b)) * size
    raw = row * size

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def speech_bytes(text: str, fmt: str) -> bytes:
    """Deterministic speech: a 440 Hz tone, ``SECONDS_PER_WORD`` per word, as WAV or raw s16le PCM."""
    seconds = max(0.5, SECONDS_PER_WORD * len(text.split()))
    n = int(SPEECH_RATE * seconds)
    step = 2 * math.pi * 440 / SPEECH_RATE
    samples = array.array("h", (int(8000 * math.sin(i * step)) for i in range(n)))
    pcm = samples.tobytes()
    if fmt == "pcm":
        return pcm
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(pcm),
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        SPEECH_RATE,
        SPEECH_RATE * 2,
        2,
        16,
        b"data",
        len(pcm),
    )
    return header + pcm


def speech_content_type(fmt: str) -> str:
    """``AudioResponseFormat::audio_content_type`` for the formats the route accepts."""
    base = "audio/pcm; codecs=1; format=s16le" if fmt == "pcm" else "audio/wav"
    return f"{base}; rate={SPEECH_RATE}; channels=1"


class MediaHandlers:
    """The image and speech routes of one node.

    Args:
        node: The node whose models and knobs they use.
    """

    def __init__(self, node: SimNode) -> None:
        self.node = node

    def _model_of_kind(self, requested: str, kind: str, what: str) -> str:
        model_id = self.node.models.resolve(None if requested == "default" else requested, 500)
        if self.node.kinds.get(model_id) != kind:
            raise SimError(500, f"Model `{model_id}` cannot {what}: it is not a {kind} model.")
        return model_id

    async def _send(self, request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
        """Write an answer with its length, in pieces; with ``node.media_hold`` set, pause half-way on it."""
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        resp.content_length = len(body)
        await resp.prepare(request)
        half = len(body) // 2
        hold = self.node.media_hold
        for start in range(0, len(body), _WRITE_PIECE):
            piece = body[start : start + _WRITE_PIECE]
            if hold is not None and start <= half < start + len(piece):
                cut = half - start
                await resp.write(piece[:cut])
                await hold.wait()
                piece = piece[cut:]
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def images(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/images/generations``."""
        req = parse_image(request[BODY_KEY])
        model_id = self._model_of_kind(req.model, "diffusion", "generate images")
        await self.node.models.acquire(model_id, self.node.load_s)
        self.node.running += 1
        try:
            png = png_bytes(req.prompt)
            data: list[dict[str, Any]] = []
            for _ in range(req.n):
                if req.b64:
                    data.append({"url": None, "b64_json": "data:image/png;base64," + base64.b64encode(png).decode()})
                else:
                    data.append({"url": f"image-generation-{uuid.uuid4()}.png", "b64_json": None})
            body = frames.dumps({"created": int(time.time()), "data": data}).encode()
            return await self._send(request, body, "application/json")
        finally:
            self.node.running -= 1

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/speech``."""
        req = parse_speech(request[BODY_KEY])
        model_id = self._model_of_kind(req.model, "speech", "generate speech")
        if req.response_format not in ("wav", "pcm"):
            raise SimError(422, "Only support wav/pcm response format.")
        await self.node.models.acquire(model_id, self.node.load_s)
        self.node.running += 1
        try:
            audio = speech_bytes(req.input, req.response_format)
            return await self._send(request, audio, speech_content_type(req.response_format))
        finally:
            self.node.running -= 1


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def models_with_kinds(node: SimNode, listing: Handler) -> Handler:
    """Wrap ``GET /v1/models`` so each entry of a model with a configured kind carries ``kind``."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = await listing(request)
        if not node.kinds or not isinstance(resp, web.Response) or resp.body is None:
            return resp
        payload = orjson.loads(bytes(resp.body))  # type: ignore[arg-type]
        for entry in payload.get("data", ()):
            kind = node.kinds.get(entry.get("id"))
            if kind is not None and "status" in entry:
                entry["kind"] = kind
        return web.Response(text=frames.dumps(payload), content_type="application/json")

    return handler
