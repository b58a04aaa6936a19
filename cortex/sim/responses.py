"""``/v1/responses`` of the simulated node: create (stream or not, background), retrieve, delete, cancel.

mistral.rs (``mistralrs-server-core/src/responses.rs``) turns a Responses request into a chat request and
keeps what it made in **process memory**: a global map of response objects and one of conversation
histories, neither bounded nor persisted. That is what makes a gateway's routing matter, so the simulator
keeps the same two maps per node (on the handler object, which a restart builds afresh, so a restarted
node has forgotten everything, as a real one has). The quirks copied from the code:

* ids are ``resp_<uuid4>``; ``store`` defaults to true; ``model`` in the answer is the name as requested;
* ``previous_response_id`` naming an id this node does not hold is **not** an error: the history is simply
  missing, and the model answers without it (a follow-up sent to the wrong node silently loses the
  conversation);
* a non-streamed response is stored whole (``GET`` returns it) with its history; a streamed one stores only
  the history, once the stream is done, so ``GET`` on a streamed id answers 404 while a follow-up works;
* the stream is ``event:<type>`` + ``data:<json>`` frames: ``response.created`` at once, then on the first
  token ``response.in_progress``, ``response.output_item.added``, ``response.content_part.added`` and the
  ``response.output_text.delta`` events (no ``item_id``, no ``logprobs``), then ``content_part.done``,
  ``output_item.done``, ``response.completed`` (usage ``{input_tokens, output_tokens, total_tokens}``) and
  ``data:[DONE]``;
* ``background: true`` answers a ``queued`` object at once and generates in a task; ``cancel`` works only on
  such a task (else 404 ``... not found or cannot be cancelled``), and a cancelled task that finishes later
  is marked completed anyway (the task never checks the flag);
* errors are ``{"message"}`` bodies: 404 for unknown ids, 500 for request problems found while parsing
  (unknown model, ``max_output_tokens: 0``, ``max_tool_calls``), 422 for an over-long prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from cortex.sim import frames
from cortex.sim.bodies import (
    BODY_KEY,
    ParsedBody,
    _bad,
    _object,
    _opt_bool,
    _opt_str,
    _opt_uint,
    _required,
    _stop,
)
from cortex.sim.inference import NO_RESPONSE, too_long
from cortex.sim.models import Engine, SimError
from cortex.sim.streaming import Pacer, burst_body, open_stream, sse_response
from cortex.sim.textgen import Plan, count_tokens, plan_generation

if TYPE_CHECKING:
    from cortex.sim.node import SimNode

__all__ = ["ResponsesHandlers", "ResponsesRequest", "parse_responses"]

_ECHOED = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "max_output_tokens",
    "max_tool_calls",
    "store",
    "background",
)
"""The request fields mistral.rs echoes into the response object (``RequestContext``), in struct order."""


@dataclass(frozen=True)
class ResponsesRequest:
    """A checked ``/v1/responses`` body."""

    model: str
    """As requested (``default`` when absent); echoed in the answer."""
    input: str | list[dict[str, Any]]
    instructions: str | None
    previous_response_id: str | None
    stream: bool
    store: bool
    background: bool
    max_output_tokens: int | None
    max_tool_calls: int | None
    stop: tuple[str, ...]
    truncate: bool
    metadata: Any
    echo: dict[str, Any]
    """The echoed request fields that were present, in the response object's order."""


def parse_responses(body: ParsedBody) -> ResponsesRequest:
    """Check a Responses body as serde would.

    Raises:
        BodyRejected: As axum would (422 for a missing ``input`` or a wrong type).
    """
    obj = _object(body)
    value = _required(obj, "input")
    if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(i, dict) for i in value)):
        raise _bad("input", value, "a string or a sequence of input items")
    model = obj.get("model", "default")
    if not isinstance(model, str):
        raise _bad("model", model, "a string")
    max_tokens = _opt_uint(obj, "max_output_tokens", "max_tokens", "max_completion_tokens")
    store = obj.get("store")
    if store is not None and not isinstance(store, bool):
        raise _bad("store", store, "a boolean")
    echo = {key: obj[key] for key in _ECHOED if obj.get(key) is not None}
    if max_tokens is not None:
        echo["max_output_tokens"] = max_tokens
    return ResponsesRequest(
        model=model,
        input=value,
        instructions=_opt_str(obj, "instructions"),
        previous_response_id=_opt_str(obj, "previous_response_id"),
        stream=_opt_bool(obj, "stream"),
        store=store is not False,
        background=_opt_bool(obj, "background"),
        max_output_tokens=max_tokens,
        max_tool_calls=_opt_uint(obj, "max_tool_calls"),
        stop=_stop(obj),
        truncate=obj.get("truncation") == "auto",
        metadata=obj.get("metadata"),
        echo=echo,
    )


def _content_text(content: object) -> str:
    """The text of an input item's content: a string, or its ``input_text``/``output_text``/``text`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text")
        )
    return ""


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages (mistral.rs ``convert_input_items_to_messages``, text only)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    out: list[dict[str, Any]] = []
    for item in value:
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": str(item.get("role", "user")), "content": _content_text(item.get("content"))})
        elif kind == "function_call":
            out.append({"role": "assistant", "content": str(item.get("arguments", ""))})
        elif kind == "function_call_output":
            out.append({"role": "tool", "content": str(item.get("output", ""))})
    return out


def _now() -> int:
    return int(time.time())


class _Response:
    """Builds one response object (``ResponseResource``), keys in the struct's order, ``None`` omitted."""

    def __init__(self, rid: str, req: ResponsesRequest) -> None:
        self.id = rid
        self.req = req
        self.created_at = _now()
        self.message_id = f"msg_{uuid.uuid4()}"

    def body(
        self,
        status: str,
        *,
        text: str | None = None,
        item_status: str = "completed",
        usage: dict[str, int] | None = None,
        error: dict[str, str] | None = None,
        completed: bool = False,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": "response", "created_at": self.created_at}
        if completed:
            out["completed_at"] = _now()
        out["model"] = self.req.model
        out["status"] = status
        out["output"] = [] if text is None else [self.item(text, item_status)]
        if text is not None:
            out["output_text"] = text
        if usage is not None:
            out["usage"] = usage
        if error is not None:
            out["error"] = error
        if self.req.metadata is not None:
            out["metadata"] = self.req.metadata
        out.update(self.req.echo)
        return out

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text}]
        return {"type": "message", "id": self.message_id, "role": "assistant", "content": content, "status": status}


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    """``ResponseUsage::new``: no details, no timing."""
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """One named SSE event as axum writes it: ``event:<type>``, ``data:<json>`` (no spaces), a blank line."""
    return b"event:" + kind.encode() + b"\ndata:" + frames.dumps({"type": kind, **payload}).encode() + b"\n\n"


class _Task:
    """A ``background: true`` request (mistral.rs ``BackgroundTask``)."""

    def __init__(self, shell: _Response) -> None:
        self.shell = shell
        self.state = "queued"
        self.result: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None
        self.cancel_requested = False

    def resource(self) -> dict[str, Any]:
        if self.state == "completed" and self.result is not None:
            return self.result
        return self.shell.body(self.state, error=self.error if self.state == "failed" else None)


class ResponsesHandlers:
    """The Responses routes of one node, and the node's response store (lost when the process restarts).

    Args:
        node: The node whose models, knobs and script they use.
    """

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.responses: dict[str, dict[str, Any]] = {}
        """Stored response objects (non-streamed requests with ``store``)."""
        self.histories: dict[str, list[dict[str, Any]]] = {}
        """Conversation histories by response id: what ``previous_response_id`` continues."""
        self.tasks: dict[str, _Task] = {}
        self._running: set[asyncio.Task[None]] = set()

    async def close(self, _app: web.Application) -> None:
        """Stop background generations (the process is going away)."""
        running = list(self._running)
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- create ------------------------------------------------------------------------------------------

    def _messages(self, req: ResponsesRequest) -> list[dict[str, Any]]:
        history = self.histories.get(req.previous_response_id or "", []) if req.previous_response_id else []
        messages = [*history, *input_messages(req.input)]
        if req.instructions is not None:
            messages.insert(0, {"role": "system", "content": req.instructions})
        return messages

    def _check(self, req: ResponsesRequest) -> str:
        """Parse-time checks (500 on failure, as errors of the request parser are); returns the model id."""
        if req.max_tool_calls is not None:
            raise SimError(
                500,
                "max_tool_calls is not supported. mistral.rs does not currently support limiting the number of "
                "tool calls.",
            )
        if req.max_output_tokens == 0:
            raise SimError(500, "max_output_tokens must be at least 1.")
        return self.node.models.resolve(None if req.model == "default" else req.model, 500)

    def _prompt_tokens(self, messages: list[dict[str, Any]], req: ResponsesRequest) -> int:
        text = "".join(str(m.get("content", "")) for m in messages)
        if req.echo.get("tools"):
            text += frames.dumps(req.echo["tools"])
        tokens = count_tokens(text)
        limit = self.node.max_seq_len
        if tokens > limit:
            if not req.truncate:
                raise SimError(422, too_long(limit))
            tokens = limit
        return tokens

    def _remember(self, rid: str, req: ResponsesRequest, messages: list[dict[str, Any]], text: str) -> None:
        if req.store:
            history = [*messages, {"role": "assistant", "content": text}] if text else list(messages)
            self.histories[rid] = history

    async def create(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``."""
        req = parse_responses(request[BODY_KEY])
        rid = f"resp_{uuid.uuid4()}"
        shell = _Response(rid, req)
        if req.background:
            task = _Task(shell)
            self.tasks[rid] = task
            job = asyncio.ensure_future(self._background(task, req))
            self._running.add(job)
            job.add_done_callback(self._running.discard)
            return _json(shell.body("queued"))
        model_id = self._check(req)
        messages = self._messages(req)
        engine = await self.node.models.acquire(model_id, self.node.load_s)
        plan = plan_generation(max_tokens=req.max_output_tokens, reply=self.node.script.reply, stop=req.stop)
        try:
            prompt_tokens = self._prompt_tokens(messages, req)
        except SimError as exc:
            if not req.stream:
                raise
            detail = {"type": "validation_error", "message": exc.message}
            error = event("error", {"sequence_number": 1, "error": detail})
            return sse_response(shell_created(shell) + error + frames.DONE)
        node = self.node
        node.running += 1
        try:
            if node.script.first_byte_delay > 0:
                await asyncio.sleep(node.script.first_byte_delay)
            node.metrics.tokens.inc(prompt_tokens + plan.completion_tokens)
            if req.stream:
                return await self._stream(request, shell, engine, plan, messages, prompt_tokens)
            body = await self._generate(shell, engine, plan, messages, prompt_tokens)
            return _json(body)
        finally:
            node.running -= 1

    async def _generate(
        self, shell: _Response, engine: Engine, plan: Plan, messages: list[dict[str, Any]], prompt_tokens: int
    ) -> dict[str, Any]:
        """A whole (non-streamed) answer after the generation time; stored with its history."""
        tok_s = self.node.tok_s
        if tok_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.terminated.wait(), plan.completion_tokens / tok_s)
        if engine.terminated.is_set():
            raise SimError(500, NO_RESPONSE)
        text = plan.text
        body = shell.body(
            "completed",
            text=text or None,
            usage=response_usage(prompt_tokens, plan.completion_tokens),
            completed=True,
        )
        if shell.req.store:
            self.responses[shell.id] = body
        self._remember(shell.id, shell.req, messages, text)
        return body

    async def _stream(
        self,
        request: web.Request,
        shell: _Response,
        engine: Engine,
        plan: Plan,
        messages: list[dict[str, Any]],
        prompt_tokens: int,
    ) -> web.StreamResponse:
        steps, finish = self._events(shell, plan, messages, prompt_tokens)
        node = self.node
        fault = node.script.take_stream_fault()
        created = shell_created(shell)
        if node.tok_s <= 0 and (fault is None or fault.kind != "abort"):
            body = b"" if engine.terminated.is_set() else burst_body(steps, finish, fault)[0]
            return sse_response(created + body)
        resp = await open_stream(request)
        await resp.write(created)
        pacer = Pacer(request, resp, tok_s=node.tok_s, keepalive_s=node.keepalive_s, engine=engine, fault=fault)
        await pacer.run(steps, finish)
        return resp

    def _events(
        self, shell: _Response, plan: Plan, messages: list[dict[str, Any]], prompt_tokens: int
    ) -> tuple[list[bytes], Callable[[float], bytes]]:
        """One frame group per token, and the closing events (built when the stream gets there)."""
        pieces = plan.content
        in_progress = shell.body("in_progress")
        steps: list[bytes] = []
        seq = 1
        for i, piece in enumerate(pieces):
            frame = b""
            if i == 0:
                frame += event("response.in_progress", {"sequence_number": seq, "response": in_progress})
                frame += event(
                    "response.output_item.added",
                    {"sequence_number": seq + 1, "output_index": 0, "item": shell.item(None, "in_progress")},
                )
                frame += event(
                    "response.content_part.added",
                    {
                        "sequence_number": seq + 2,
                        "output_index": 0,
                        "content_index": 0,
                        "part": {"type": "output_text", "text": ""},
                    },
                )
                seq += 3
            frame += event(
                "response.output_text.delta",
                {"sequence_number": seq, "output_index": 0, "content_index": 0, "delta": piece},
            )
            seq += 1
            steps.append(frame)
        text = plan.text

        def finish(_decode_s: float) -> bytes:
            n = seq
            out = b""
            if not pieces:
                out += event("response.in_progress", {"sequence_number": n, "response": in_progress})
                n += 1
            else:
                part = {"type": "output_text", "text": text}
                out += event(
                    "response.content_part.done",
                    {"sequence_number": n, "output_index": 0, "content_index": 0, "part": part},
                )
                out += event(
                    "response.output_item.done",
                    {"sequence_number": n + 1, "output_index": 0, "item": shell.item(text, "completed")},
                )
                n += 2
            usage = response_usage(prompt_tokens, plan.completion_tokens)
            done = shell.body("completed", text=text or None, usage=usage, completed=True)
            self._remember(shell.id, shell.req, messages, text)
            return out + event("response.completed", {"sequence_number": n, "response": done})

        return steps, finish

    async def _background(self, task: _Task, req: ResponsesRequest) -> None:
        """Generate a background request; the outcome lands in the task (and the store, when ``store``)."""
        try:
            model_id = self._check(req)
            messages = self._messages(req)
            task.state = "in_progress"
            engine = await self.node.models.acquire(model_id, self.node.load_s)
            plan = plan_generation(max_tokens=req.max_output_tokens, reply=self.node.script.reply, stop=req.stop)
            prompt_tokens = self._prompt_tokens(messages, req)
            body = await self._generate(task.shell, engine, plan, messages, prompt_tokens)
        except SimError as exc:
            task.state = "failed"
            task.error = {"type": "model_error", "message": exc.message}
            return
        task.result = body
        task.state = "completed"  # even when cancelled meanwhile: mistral.rs never checks the flag

    # -- retrieve, delete, cancel ------------------------------------------------------------------------

    async def retrieve(self, request: web.Request) -> web.Response:
        """``GET /v1/responses/{id}``: background tasks first, then the store."""
        rid = request.match_info["response_id"]
        task = self.tasks.get(rid)
        if task is not None:
            return _json(task.resource())
        body = self.responses.get(rid)
        if body is None:
            raise SimError(404, f"Response with ID '{rid}' not found")
        return _json(body)

    async def delete(self, request: web.Request) -> web.Response:
        """``DELETE /v1/responses/{id}``: the task, the object and the history go."""
        rid = request.match_info["response_id"]
        found = self.tasks.pop(rid, None) is not None
        found = self.responses.pop(rid, None) is not None or found
        found = self.histories.pop(rid, None) is not None or found
        if not found:
            raise SimError(404, f"Response with ID '{rid}' not found")
        return _json({"deleted": True, "id": rid, "object": "response.deleted"})

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /v1/responses/{id}/cancel``: only a queued or running background task can be cancelled."""
        rid = request.match_info["response_id"]
        task = self.tasks.get(rid)
        if task is not None and task.state in ("queued", "in_progress"):
            task.cancel_requested = True
            task.state = "cancelled"
            return _json(task.resource())
        raise SimError(404, f"Response with ID '{rid}' not found or cannot be cancelled")


def shell_created(shell: _Response) -> bytes:
    """The ``response.created`` event (sequence 0, status ``queued``), sent before any token."""
    return event("response.created", {"sequence_number": 0, "response": shell.body("queued")})


def _json(obj: object) -> web.Response:
    return web.Response(text=frames.dumps(obj), content_type="application/json")
