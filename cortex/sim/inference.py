"""``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` of the simulated node.

The three routes share mistral.rs's dispatch path: parse (400/415/422 plain text), validate the model
(unknown → 500 on chat and completions, 422 on embeddings), lazily load an unloaded model (blocking; a
concurrent request gets 500 "being reloaded"), then the engine's own checks (prompt longer than the context
→ 422, or an error frame when streaming). Generation is planned up front by :mod:`cortex.sim.textgen` and
paced by :mod:`cortex.sim.streaming`; this module only wires those steps together and builds the frames.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cortex.sim import frames
from cortex.sim.bodies import BODY_KEY, parse_chat, parse_completion, parse_embedding
from cortex.sim.models import Engine, SimError
from cortex.sim.streaming import Pacer, burst_body, open_stream, sse_response
from cortex.sim.textgen import (
    Plan,
    ToolCall,
    chat_prompt_text,
    choose_tool,
    count_tokens,
    embedding_base64,
    embedding_vector,
    plan_generation,
)

if TYPE_CHECKING:
    from cortex.sim.node import SimNode

MAX_TOKENS_ZERO = "`max_tokens` must be at least 1."
NO_RESPONSE = "No response received from the model."


def too_long(max_seq_len: int) -> str:
    """The engine's validation error for an over-long prompt (mistral.rs wording)."""
    return f"Prompt sequence length is greater than {max_seq_len}, perhaps consider using `truncate_sequence`?"


def _fragments(arguments: str, parts: int = 3) -> list[str]:
    """Split an arguments string into about ``parts`` non-empty pieces, OpenAI-stream style."""
    size = max(1, -(-len(arguments) // parts))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


class InferenceHandlers:
    """The generation routes, bound to one node.

    Args:
        node: The node whose models, knobs and script they use.
    """

    def __init__(self, node: SimNode) -> None:
        self.node = node

    async def _engine_for(self, requested: str | None, unknown_status: int) -> tuple[str, Engine]:
        models = self.node.models
        model_id = models.resolve(requested, unknown_status)
        return model_id, await models.acquire(model_id, self.node.load_s)

    def _prompt_tokens(self, text: str, truncate: bool) -> int:
        """Count the prompt; over ``max_seq_len`` is a validation error unless truncation was asked for."""
        tokens = count_tokens(text)
        limit = self.node.max_seq_len
        if tokens > limit:
            if not truncate:
                raise SimError(422, too_long(limit))
            tokens = limit
        return tokens

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        req = parse_chat(request[BODY_KEY])
        if req.max_tokens == 0:
            raise SimError(500, MAX_TOKENS_ZERO)
        model_id, engine = await self._engine_for(req.model, 500)
        tool: ToolCall | None = None
        if req.tools:
            tool = self.node.script.take_tool_call() or choose_tool(req.tools, req.tool_choice, req.messages)
        plan = plan_generation(
            max_tokens=req.max_tokens,
            reply=self.node.script.reply,
            stop=req.stop,
            thinking=req.thinking,
            tool_call=tool,
        )
        text = chat_prompt_text(req.messages, req.tools)
        return await self._generate(request, "chat", model_id, engine, plan, text, req.truncate_sequence, req.stream)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``."""
        req = parse_completion(request[BODY_KEY])
        if req.max_tokens == 0:
            raise SimError(500, MAX_TOKENS_ZERO)
        model_id, engine = await self._engine_for(req.model, 500)
        plan = plan_generation(max_tokens=req.max_tokens, reply=self.node.script.reply, stop=req.stop)
        return await self._generate(
            request, "completion", model_id, engine, plan, req.prompt, req.truncate_sequence, req.stream
        )

    async def _generate(
        self,
        request: web.Request,
        kind: str,
        model_id: str,
        engine: Engine,
        plan: Plan,
        prompt_text: str,
        truncate: bool,
        stream: bool,
    ) -> web.StreamResponse:
        node = self.node
        try:
            prompt_tokens = self._prompt_tokens(prompt_text, truncate)
        except SimError as exc:
            if not stream:
                raise
            return sse_response(frames.error_frame(exc.message, "invalid_request_error") + frames.DONE)
        rid = engine.next_request_id()
        created = int(time.time())
        prefill = node.script.first_byte_delay
        node.running += 1
        try:
            if prefill > 0:
                await asyncio.sleep(prefill)
            node.metrics.tokens.inc(prompt_tokens + plan.completion_tokens)
            if stream:
                return await self._stream(request, kind, model_id, engine, plan, rid, created, prompt_tokens)
            return await self._respond(kind, model_id, engine, plan, rid, created, prompt_tokens)
        finally:
            node.running -= 1

    async def _respond(
        self, kind: str, model_id: str, engine: Engine, plan: Plan, rid: str, created: int, prompt_tokens: int
    ) -> web.Response:
        """A non-streaming answer after the whole generation time (aborted by an unload)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        tok_s = self.node.tok_s
        if tok_s > 0:
            with suppress(TimeoutError):
                await asyncio.wait_for(engine.terminated.wait(), plan.completion_tokens / tok_s)
        if engine.terminated.is_set():
            raise SimError(500, NO_RESPONSE)
        use = frames.usage(
            prompt_tokens, plan.completion_tokens, self.node.script.first_byte_delay, loop.time() - start
        )
        body: dict[str, Any]
        if kind == "chat":
            body = frames.chat_response(
                rid,
                created,
                model_id,
                content=None if plan.tool_call else plan.text,
                finish_reason=plan.finish_reason,
                usage_obj=use,
                reasoning="".join(plan.reasoning) or None,
                tool_call=plan.tool_call,
            )
        else:
            body = frames.completion_response(
                rid, created, model_id, text=plan.text, finish_reason=plan.finish_reason, usage_obj=use
            )
        return web.Response(text=frames.dumps(body), content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        kind: str,
        model_id: str,
        engine: Engine,
        plan: Plan,
        rid: str,
        created: int,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        node = self.node
        enc = frames.ChunkEncoder(kind, rid, created, model_id)
        steps, finish = self._steps(enc, plan, prompt_tokens)
        fault = node.script.take_stream_fault()
        prefill = node.script.first_byte_delay
        ttft = node.metrics.ttft.labels("POST", request.path, model_id, "200")
        if node.tok_s <= 0 and (fault is None or fault.kind != "abort"):
            # The benchmark path: one joined body, one socket write.
            body = b"" if engine.terminated.is_set() else burst_body(steps, finish, fault)[0]
            ttft.observe(prefill)
            return sse_response(body)
        resp = await open_stream(request)
        pacer = Pacer(request, resp, tok_s=node.tok_s, keepalive_s=node.keepalive_s, engine=engine, fault=fault)
        started = asyncio.get_running_loop().time()
        await pacer.run(steps, finish)
        if pacer.first_frame_at is not None:
            ttft.observe(pacer.first_frame_at - started + prefill)
        return resp

    def _steps(
        self, enc: frames.ChunkEncoder, plan: Plan, prompt_tokens: int
    ) -> tuple[list[bytes], Callable[[float], bytes]]:
        """The frames of a stream, one per token step, and the finish-frame builder."""
        prefill = self.node.script.first_byte_delay

        def use(decode_s: float) -> dict[str, Any]:
            return frames.usage(prompt_tokens, plan.completion_tokens, prefill, decode_s)

        if enc.kind != "chat":
            last = plan.content[-1] if plan.finish_reason == "length" and plan.content else ""
            body = plan.content[:-1] if last else plan.content
            return [enc.content(p) for p in body], lambda _s: enc.completion_finish(last, plan.finish_reason)
        steps = [enc.chat_chunk(frames.delta(None, reasoning=r)) for r in plan.reasoning]
        call = plan.tool_call
        if call is None:
            last = plan.content[-1] if plan.finish_reason == "length" and plan.content else ""
            steps += [enc.content(p) for p in (plan.content[:-1] if last else plan.content)]
            return steps, lambda s: enc.chat_chunk(frames.delta(last), plan.finish_reason, use(s))
        if self.node.tool_style == "mistralrs":
            # mistral.rs buffers the call and sends it whole, with finish_reason and usage, in one chunk.
            steps += [b""] * max(0, plan.tool_tokens - 1)
            tool_delta = frames.delta(None, tool_calls=[call.as_json()])
            return steps, lambda s: enc.chat_chunk(tool_delta, "tool_calls", use(s))
        head = {
            "index": 0,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        steps.append(enc.chat_chunk(frames.delta(None, tool_calls=[head])))
        for piece in _fragments(call.arguments):
            steps.append(
                enc.chat_chunk(frames.delta(None, tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
            )
        return steps, lambda s: enc.chat_chunk(frames.delta(None), "tool_calls", use(s))

    async def embeddings(self, request: web.Request) -> web.Response:
        """``POST /v1/embeddings``: deterministic vectors; ``model`` echoed as requested."""
        req = parse_embedding(request[BODY_KEY])
        if req.dimensions is not None:
            raise SimError(422, "The `dimensions` parameter is not supported.")
        items = req.items
        if not items or any(len(item) == 0 for item in items):
            raise SimError(422, "Embedding input must not be empty.")
        await self._engine_for(req.model, 422)
        data: list[dict[str, Any]] = []
        tokens = 0
        for index, item in enumerate(items):
            n = count_tokens(item) if isinstance(item, str) else len(item)
            if n > self.node.max_seq_len and not req.truncate_sequence:
                raise SimError(422, too_long(self.node.max_seq_len))
            tokens += n
            vector = embedding_vector(item)
            data.append(
                {
                    "object": "embedding",
                    "embedding": embedding_base64(vector) if req.base64 else vector,
                    "index": index,
                }
            )
        body = {
            "object": "list",
            "data": data,
            "model": req.model if req.model is not None else "default",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.Response(text=frames.dumps(body), content_type="application/json")
