r"""OpenAI chunk stream → Anthropic SSE events, one chunk at a time (translation.md §3.4).

The Anthropic stream grammar is strict where the OpenAI one is loose: blocks are contiguous
from index 0 and strictly one at a time (the SDK accumulator indexes ``content[i]``), a tool's
``partial_json`` must concatenate to one JSON object, ``message_delta`` must carry usage, and
nothing may follow an ``error``. Upstreams, meanwhile, interleave parallel tool-call fragments,
reuse index 0 for different calls, resend cumulative arguments, or (mistral.rs) deliver each
call whole in the final chunk together with ``finish_reason`` and ``usage``. So the translator
streams text and thinking live but *buffers* tool calls per call and emits each as one block
with one ``input_json_delta`` of normalized JSON when the upstream finishes: this survives
every upstream style above, at the cost of not streaming arguments live.

Within a chunk the parts are handled in the order reasoning → content → tool_calls →
finish_reason → usage, so a final chunk that packs all of them loses nothing. Text that is only
whitespace is held until visible text follows, so no whitespace-only block ever appears (a
lone ``"\n\n"`` before a tool call is dropped).

Stop sequences are matched here, since mistral.rs would hide which one matched. The last
``len(longest) - 1`` characters of text are held back, so a sequence split across chunks is
still found and never partly emitted; matching runs over the text of one text block only (a
sequence interrupted by reasoning or a tool call is not seen). On a match the text before it is
emitted, the message ends with ``stop_reason:"stop_sequence"`` and :attr:`done` turns true:
the caller should close the upstream request. Buffered tool calls are dropped then, since
generation logically ended at the sequence.

The translator does no I/O: the gateway feeds parsed chunks, calls :meth:`finish` on
``[DONE]``/EOF and :meth:`ping` on idle timers, and writes the events it gets back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

from ._common import (
    anthropic_usage,
    dumps,
    find_stop,
    new_id,
    normalize_arguments,
    stop_reason,
    tokens_for_bytes,
    utf8_len,
)
from .errors import upstream_chunk_error
from .sse import encode_delta, encode_text_literal

_MISTRALRS_TEXT = re.compile(
    rb'\{"id":"[^"\\]*","choices":\[\{"finish_reason":null,"index":0,"delta":\{"content":"([^"\\\x00-\x1f]+)",'
    rb'"role":"assistant","tool_calls":null\},"logprobs":null\}\],"created":\d+,"model":"[^"\\]*",'
    rb'"system_fingerprint":"[^"\\]*","object":"chat\.completion\.chunk","usage":null\}'
)
"""mistral.rs's streamed chunk that only adds text (the text's literal captured, with no escape in it)."""

__all__ = ["Event", "StreamTranslator"]

Event: TypeAlias = dict[str, Any]
"""One Anthropic stream event: a JSON-ready dict whose ``type`` is also its SSE event name."""


class _Call:
    """One buffered tool call: its id, name, and argument fragments."""

    __slots__ = ("chain", "id", "last", "name", "parts")

    def __init__(self) -> None:
        self.id = ""
        self.name = ""
        self.parts: list[str] = []
        self.chain = True  # every fragment so far extends the previous one: maybe cumulative resends
        self.last = ""

    def add(self, fragment: str) -> None:
        if self.chain:
            if len(fragment) >= len(self.last) and fragment.startswith(self.last):
                self.last = fragment
            else:
                self.chain = False
                self.last = ""
        self.parts.append(fragment)

    def input(self) -> dict[str, Any]:
        """Return the arguments as an object, trying the cumulative reading when appending fails."""
        text = "".join(self.parts)
        where = f"{self.name}/{self.id}"
        if self.chain and len(self.parts) > 1:
            try:
                value = json.loads(text)
            except ValueError:
                return normalize_arguments(self.last, where=where)
            if isinstance(value, dict):
                return value
        return normalize_arguments(text, where=where)


class StreamTranslator:
    """Incremental OpenAI → Anthropic stream translation for one response.

    Args:
        model: The model name the client asked for (echoed in ``message_start``).
        stop_sequences: The client's stop sequences, matched here (see the module docstring).
        input_tokens_estimate: The prompt-size estimate for ``message_start`` (and for
            ``message_delta`` if the node never reports usage).
        thinking: Whether reasoning becomes thinking blocks; otherwise it is dropped.
        tool_aliases: Upstream tool name → client tool name.
        message_id: The message ``id``; a random ``msg_…`` by default.
    """

    def __init__(
        self,
        *,
        model: str,
        stop_sequences: Sequence[str] = (),
        input_tokens_estimate: int = 1,
        thinking: bool = True,
        tool_aliases: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> None:
        self._model = model
        self._stops = tuple(s for s in stop_sequences if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._input_estimate = max(1, input_tokens_estimate)
        self._thinking = thinking
        self._aliases = tool_aliases or {}
        self.message_id = message_id or new_id("msg_")
        self._started = False
        self._done = False
        self._finished = False
        self._finish: str | None = None
        self._usage: Mapping[str, Any] | None = None
        self._next_index = 0
        self._open: str | None = None  # "text" or "thinking"
        self._pending = ""  # text received but not yet emitted (whitespace, or held for stop sequences)
        self._calls: list[_Call] = []
        self._by_index: dict[int, _Call] = {}
        self._tool_blocks = 0
        self._out_bytes = 0
        self.stop_sequence: str | None = None
        """The stop sequence that ended the message, once matched."""

    @property
    def started(self) -> bool:
        """Whether ``message_start`` has been emitted."""
        return self._started

    @property
    def finished(self) -> bool:
        """Whether the upstream sent its ``finish_reason`` (a grace timer may then call :meth:`finish`)."""
        return self._finished

    @property
    def done(self) -> bool:
        """Whether the stream is over (``message_stop`` or ``error`` emitted): stop reading upstream."""
        return self._done

    def start(self) -> list[Event]:
        """Return ``message_start`` and a ``ping`` if not sent yet (for an early first byte)."""
        if self._started or self._done:
            return []
        self._started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_estimate, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def ping(self) -> list[Event]:
        """Return a keep-alive ``ping`` (preceded by ``message_start`` if the stream has not started)."""
        if self._done:
            return []
        return self.start() if not self._started else [{"type": "ping"}]

    def error(self, message: str, error_type: str = "api_error") -> list[Event]:
        """End the stream with an ``error`` event (nothing may follow it)."""
        if self._done:
            return []
        self._done = True
        return [{"type": "error", "error": {"type": error_type, "message": message}}]

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        """Translate one parsed upstream chunk.

        Args:
            chunk: A ``chat.completion.chunk`` object, or an ``{"error": {...}}`` chunk.

        Returns:
            The events to send, possibly none.
        """
        if self._done:
            return []
        if chunk.get("error"):
            err = upstream_chunk_error(chunk, prompt_tokens_estimate=self._input_estimate)
            return self.error(err.message if err else "upstream error", err.type if err else "api_error")
        events = self.start() if not self._started else []
        usage = chunk.get("usage")
        if usage:
            self._usage = usage
        choice = self._choice(chunk.get("choices"))
        if choice is not None and not self._finished:
            delta = choice.get("delta")
            if delta:
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning and self._thinking and isinstance(reasoning, str):
                    self._reasoning(reasoning, events)
                content = delta.get("content")
                if content and isinstance(content, str):
                    self._text(content, events)
                    if self._done:
                        return events
                tool_calls = delta.get("tool_calls")
                if tool_calls:
                    self._tool_fragments(tool_calls)
            finish = choice.get("finish_reason")
            if finish:
                self._finish = finish
                self._finished = True
                self._flush_pending(events)
                self._close_block(events)
                self._flush_tools(events)
        if self._finished and self._usage is not None:
            events.extend(self._complete())
        return events

    def text_delta(self, chunk: Mapping[str, Any]) -> bytes | None:
        """The encoded event of a chunk that only adds text to the open text block, else None.

        Nearly every chunk of a stream is one: a single choice whose delta carries ``content`` and nothing
        else that matters (no reasoning, tool calls, finish or usage). That chunk becomes one
        ``content_block_delta``, written here straight to bytes (what :meth:`feed` and ``encode_event``
        would give, without the event dicts). With stop sequences text is held back, so those go through
        :meth:`feed`, as does every other chunk (give it to :meth:`feed` when this returns None).
        """
        if self._open != "text" or self._pending or self._stops or self._done or self._finished:
            return None
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("usage") or chunk.get("error"):
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("index", 0) != 0 or choice.get("finish_reason"):
            return None
        delta = choice.get("delta")
        if type(delta) is not dict:
            return None
        text = delta.get("content")
        if (
            type(text) is not str
            or not text
            or delta.get("tool_calls")
            or delta.get("reasoning_content")
            or delta.get("reasoning")
        ):
            return None
        self._out_bytes += utf8_len(text)
        return encode_delta(self._next_index - 1, "text_delta", "text", text)

    def text_delta_bytes(self, data: bytes) -> bytes | None:
        """:meth:`text_delta` of a chunk still in bytes, when it is mistral.rs's plain text chunk to the byte.

        A node sends nearly every chunk of a stream in exactly one shape (``docs/mistralrs-api.md``): one
        pattern recognises it and takes the text's literal without parsing the JSON, and the event is
        written around that literal. A literal with an escape, a control character or invalid UTF-8, and
        any other shape or field, returns None: then parse the chunk and use :meth:`text_delta` or
        :meth:`feed` (the two give the same bytes for the same chunk).
        """
        if self._open != "text" or self._pending or self._stops or self._done or self._finished:
            return None
        match = _MISTRALRS_TEXT.fullmatch(data)
        if match is None:
            return None
        literal = match[1]
        if not literal.isascii():
            try:
                literal.decode("utf-8")
            except UnicodeDecodeError:
                return None  # orjson refuses the chunk: the general way decides what becomes of it
        self._out_bytes += len(literal)
        return encode_text_literal(self._next_index - 1, literal)

    def finish(self, *, saw_done: bool = False) -> list[Event]:
        """End the stream on upstream ``[DONE]`` or EOF.

        Args:
            saw_done: Whether the upstream sent ``[DONE]``. A stream that ends without a
                ``finish_reason`` and without ``[DONE]`` died (a node crash, a model unloaded)
                and ends with an ``error`` event, never a fake success; with ``[DONE]`` it
                reads ``end_turn``.

        Returns:
            The closing events, or none if the stream was already over.
        """
        if self._done:
            return []
        if not (self._finished or saw_done):
            return self.error("upstream stream ended unexpectedly")
        return [*self.start(), *self._complete()]

    @staticmethod
    def _choice(choices: Any) -> Mapping[str, Any] | None:
        if not choices:
            return None
        for choice in choices:
            if (type(choice) is dict or isinstance(choice, Mapping)) and choice.get("index", 0) == 0:
                return choice
        return None

    def _start_block(self, block: dict[str, Any], kind: str | None, events: list[Event]) -> int:
        index = self._next_index
        self._next_index += 1
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        self._open = kind
        return index

    def _close_block(self, events: list[Event]) -> None:
        if self._open is not None:
            events.append({"type": "content_block_stop", "index": self._next_index - 1})
            self._open = None

    def _emit_text(self, text: str, events: list[Event]) -> None:
        if self._open != "text":
            self._close_block(events)
            self._start_block({"type": "text", "text": ""}, "text", events)
        events.append(
            {
                "type": "content_block_delta",
                "index": self._next_index - 1,
                "delta": {"type": "text_delta", "text": text},
            }
        )
        self._out_bytes += utf8_len(text)

    def _flush_pending(self, events: list[Event]) -> None:
        """Emit held text; whitespace-only text outside an open text block is dropped."""
        pending, self._pending = self._pending, ""
        if pending and (self._open == "text" or not pending.isspace()):
            self._emit_text(pending, events)

    def _reasoning(self, text: str, events: list[Event]) -> None:
        if self._pending:
            self._flush_pending(events)
        if self._open != "thinking":
            self._close_block(events)
            self._start_block({"type": "thinking", "thinking": "", "signature": ""}, "thinking", events)
        delta = {"type": "thinking_delta", "thinking": text}
        events.append({"type": "content_block_delta", "index": self._next_index - 1, "delta": delta})
        self._out_bytes += utf8_len(text)

    def _text(self, text: str, events: list[Event]) -> None:
        pending = self._pending + text if self._pending else text
        if self._stops:
            hit = find_stop(pending, self._stops)
            if hit is not None:
                self._pending = pending[: hit[0]]
                self.stop_sequence = hit[1]
                self._finish = "stop"
                self._calls.clear()
                events.extend(self._complete())
                return
        cut = len(pending) - self._hold
        if cut <= 0 or (self._open != "text" and pending[:cut].isspace()):
            self._pending = pending
            return
        self._pending = pending[cut:]
        self._emit_text(pending[:cut], events)

    def _tool_fragments(self, fragments: Any) -> None:
        for position, fragment in enumerate(fragments):
            if not isinstance(fragment, Mapping):
                continue
            index = fragment.get("index")
            if not isinstance(index, int):
                index = position
            call_id = fragment.get("id") or ""
            function = fragment.get("function") or {}
            call = self._by_index.get(index)
            # A different id on a known index is a new call (Ollama and dynamo reuse index 0).
            if call is None or (call_id and call.id and call_id != call.id):
                call = _Call()
                self._calls.append(call)
                self._by_index[index] = call
            if call_id and not call.id:
                call.id = call_id
            name = function.get("name")
            if name and not call.name:
                call.name = name
            arguments = function.get("arguments")
            if arguments:
                call.add(arguments if isinstance(arguments, str) else dumps(arguments))

    def _flush_tools(self, events: list[Event]) -> None:
        for call in self._calls:
            block = {
                "type": "tool_use",
                "id": call.id or new_id("toolu_"),
                "name": self._aliases.get(call.name, call.name),
                "input": {},
            }
            index = self._start_block(block, None, events)
            partial = dumps(call.input())
            delta = {"type": "input_json_delta", "partial_json": partial}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
            events.append({"type": "content_block_stop", "index": index})
            self._tool_blocks += 1
            self._out_bytes += utf8_len(partial)
        self._calls = []
        self._by_index = {}

    def _complete(self) -> list[Event]:
        events: list[Event] = []
        self._flush_pending(events)
        self._close_block(events)
        self._flush_tools(events)
        usage = anthropic_usage(
            self._usage,
            input_estimate=self._input_estimate,
            output_estimate=max(1, tokens_for_bytes(self._out_bytes)),
        )
        reason = stop_reason(self._finish, tool_blocks=self._tool_blocks > 0, stop_sequence=self.stop_sequence)
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": self.stop_sequence},
                "usage": usage,
            }
        )
        events.append({"type": "message_stop"})
        self._done = True
        return events
