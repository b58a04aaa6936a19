"""Anthropic ``system`` + ``messages`` → one OpenAI message list (translation.md §3.2).

The two APIs model a conversation differently: Anthropic packs tool results into user messages
as blocks, in any order, next to text and images, allows ``role:"system"`` entries anywhere
(Claude Code sends them mid-array and last) and keeps images inside tool results; OpenAI wants
one leading system message, ``tool`` messages that answer an assistant's ``tool_calls`` one by
one, text-only tool messages, and (for strict chat templates) strictly alternating roles. The
converter walks the messages once, keeping just enough state (the calls of the assistant turn
still waiting for results) to reorder results, repair missing or orphan ones and merge
neighbours as it goes. Output dicts reference the input's strings; nothing is deep-copied.

Merged neighbours keep their pieces in lists and are joined once, at the end: joining at every merge
made a run of N consecutive user turns (orphan tool results, say) cost N² (10 s for a 30 MB body).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from ._common import dumps
from .errors import AnthropicError

_VALID_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_BILLING_PREFIX = "x-anthropic-billing-header:"


def bad_request(message: str) -> AnthropicError:
    """Return the 400 ``invalid_request_error`` for a malformed request."""
    return AnthropicError(400, "invalid_request_error", message, should_retry=False)


def mistral_id(tool_id: str) -> str:
    """Map a tool-call id to the 9 alphanumeric characters Mistral chat templates demand.

    Conforming ids are kept, so ids the node generated itself round-trip unchanged; others map
    deterministically (sha256 in base62), so a call and its result always get the same id.
    """
    if _MISTRAL_ID.fullmatch(tool_id):
        return tool_id
    n = int.from_bytes(hashlib.sha256(tool_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        n, r = divmod(n, 62)
        chars.append(_BASE62[r])
    return "".join(chars)


class ToolNames:
    """A reversible per-request alias table for tool names OpenAI backends reject.

    OpenAI requires ``^[A-Za-z0-9_-]{1,64}$``; other names (dots, spaces, >64 characters) get
    a sanitized alias with a hash suffix. :attr:`to_client` maps aliases back for responses.
    """

    def __init__(self) -> None:
        self.to_upstream: dict[str, str] = {}
        self.to_client: dict[str, str] = {}

    def upstream(self, name: str) -> str:
        """Return the name to send upstream for the client's tool ``name``."""
        if _VALID_TOOL_NAME.fullmatch(name):
            return name
        alias = self.to_upstream.get(name)
        if alias is None:
            digest = hashlib.sha256(name.encode()).hexdigest()[:8]
            alias = f"{_BAD_NAME_CHARS.sub('_', name)[:55]}_{digest}"
            self.to_upstream[name] = alias
            self.to_client[alias] = name
        return alias


def system_text(system: Any, *, drop_billing_header: bool) -> list[str]:
    """Return the text parts of a ``system`` value (a string or text blocks), ``cache_control`` dropped."""
    if system is None:
        return []
    if isinstance(system, str):
        return [system] if system else []
    if not isinstance(system, list):
        raise bad_request("system: Input should be a string or an array of text blocks")
    parts = []
    for block in system:
        text = block.get("text") if isinstance(block, Mapping) else None
        if isinstance(text, str) and text:
            if drop_billing_header and text.startswith(_BILLING_PREFIX):
                continue
            parts.append(text)
    return parts


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise bad_request(f"{where}.source: Field required")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in _IMAGE_TYPES:
            raise bad_request(f"{where}.source.media_type: unsupported image type {media_type!r}")
        if not isinstance(data, str):
            raise bad_request(f"{where}.source.data: Field required")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise bad_request(f"{where}.source: image source type {kind!r} is not supported by this gateway")


def _document_text(block: Mapping[str, Any], where: str) -> str:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    text: str | None = None
    if isinstance(source, Mapping) and kind == "text" and isinstance(source.get("data"), str):
        text = source["data"]
    elif isinstance(source, Mapping) and kind == "content":
        content = source.get("content")
        text = content if isinstance(content, str) else _joined_text(content)
    if text is None:
        media = source.get("media_type", kind) if isinstance(source, Mapping) else kind
        raise bad_request(f"{where}: documents of type {media!r} (e.g. PDF) are not supported by this backend")
    title = block.get("title")
    return f"{title}\n{text}" if isinstance(title, str) and title else text


def _joined_text(blocks: Any) -> str:
    if not isinstance(blocks, list):
        return ""
    return "\n".join(b["text"] for b in blocks if isinstance(b, Mapping) and isinstance(b.get("text"), str))


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only parts collapse to one string (strict templates want strings); else the parts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


class _UserTurn:
    """The content of one user message while neighbours merge into it; :meth:`content` at the end.

    While every part is text, the texts are kept (joined once, at the end); the first other part turns
    them into one text part followed by the parts, which is what joining at every merge produced.
    """

    __slots__ = ("parts", "texts")

    def __init__(self, parts: list[dict[str, Any]]) -> None:
        self.texts: list[str] | None = None
        self.parts: list[dict[str, Any]] = []
        if all(p["type"] == "text" for p in parts):
            self.texts = [p["text"] for p in parts]
        else:
            self.parts = list(parts)

    def merge(self, parts: list[dict[str, Any]]) -> None:
        if self.texts is None:
            self.parts.extend(parts)
        elif all(p["type"] == "text" for p in parts):
            self.texts.extend(p["text"] for p in parts)
        else:
            self.parts = [{"type": "text", "text": "\n".join(self.texts)}] if self.texts else []
            self.parts.extend(parts)
            self.texts = None

    def content(self) -> str | list[dict[str, Any]]:
        return "\n".join(self.texts) if self.texts is not None else self.parts


class _AssistantTurn:
    """The texts and reasoning of one assistant message while neighbours merge into it."""

    __slots__ = ("reasoning", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.reasoning: list[str] = []


class MessageConverter:
    """Converts a messages array in one pass; see the module docstring for the rules."""

    def __init__(self, names: ToolNames, map_id: Callable[[str], str], *, reasoning_history: bool) -> None:
        self.names = names
        self.map_id = map_id
        self.reasoning_history = reasoning_history
        self.system: list[str] = []
        self.out: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self._open_calls: list[str] = []
        self._users: list[tuple[dict[str, Any], _UserTurn]] = []
        self._assistants: list[tuple[dict[str, Any], _AssistantTurn]] = []
        self._last_turn: _UserTurn | _AssistantTurn | None = None
        """The turn of ``out[-1]`` when that is a user or assistant message (merges go there)."""

    def convert(self, messages: list[Any], *, drop_billing_header: bool) -> None:
        """Convert ``messages`` into :attr:`out`, collecting hoisted system text in :attr:`system`."""
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise bad_request(f"messages.{i}: Input should be an object")
            role, content = msg.get("role"), msg.get("content")
            if not isinstance(content, (str, list)):
                raise bad_request(f"messages.{i}.content: Input should be a string or an array of blocks")
            if role == "system":
                self.system.extend(system_text(content, drop_billing_header=drop_billing_header))
            elif role == "assistant":
                self._assistant(content, f"messages.{i}")
            elif role == "user":
                self._user(content, f"messages.{i}")
            else:
                raise bad_request(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        self._close_calls()
        self._finish()

    def _finish(self) -> None:
        """Join what merged into each message, once."""
        for msg, user in self._users:
            msg["content"] = user.content()
        for msg, turn in self._assistants:
            msg["content"] = "\n".join(turn.texts) if turn.texts else (None if msg.get("tool_calls") else "")
            if turn.reasoning and self.reasoning_history:
                msg["reasoning_content"] = "\n".join(turn.reasoning)
        self._users = []
        self._assistants = []
        self._last_turn = None

    def _close_calls(self) -> None:
        """Give every call still waiting a synthetic result, so each call has its tool message."""
        for call_id in self._open_calls:
            self.out.append({"role": "tool", "tool_call_id": call_id, "content": "(no result)"})
            self._last_turn = None
        self._open_calls = []

    def _assistant(self, content: str | list[Any], where: str) -> None:
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        if isinstance(content, str):
            if content:
                texts.append(content)
        else:
            for j, block in enumerate(content):
                kind = block.get("type") if isinstance(block, Mapping) else None
                if kind == "text":
                    if block.get("text"):
                        texts.append(block["text"])
                elif kind == "tool_use":
                    calls.append(self._tool_call(block, f"{where}.content.{j}"))
                elif kind == "thinking":
                    if isinstance(block.get("thinking"), str) and block["thinking"]:
                        reasoning.append(block["thinking"])
                elif kind != "redacted_thinking":
                    self.warnings.append(f"{where}.content.{j}: dropped assistant block of type {kind!r}")
        turn = self._last_turn
        if isinstance(turn, _AssistantTurn):  # merge: strict templates need alternation
            prev = self.out[-1]
            if calls:
                prev.setdefault("tool_calls", []).extend(calls)
        else:
            self._close_calls()
            msg: dict[str, Any] = {"role": "assistant", "content": None}
            if calls:
                msg["tool_calls"] = calls
            turn = _AssistantTurn()
            self._assistants.append((msg, turn))
            self.out.append(msg)
            self._last_turn = turn
        turn.texts.extend(texts)
        turn.reasoning.extend(reasoning)
        self._open_calls.extend(c["id"] for c in calls)

    def _tool_call(self, block: Mapping[str, Any], where: str) -> dict[str, Any]:
        call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad_request(f"{where}: tool_use blocks need a string id and name")
        if not isinstance(args, Mapping):
            raise bad_request(f"{where}.input: Input should be an object")
        return {
            "id": self.map_id(call_id),
            "type": "function",
            "function": {"name": self.names.upstream(name), "arguments": dumps(args)},
        }

    def _user(self, content: str | list[Any], where: str) -> None:
        if isinstance(content, str):
            self._close_calls()
            self._append_user([{"type": "text", "text": content}] if content else [], keep_empty=True)
            return
        parts: list[dict[str, Any]] = []
        results: dict[str, str] = {}
        result_parts: list[dict[str, Any]] = []  # images from tool results, with their caption
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, Mapping) else None
            if kind == "text":
                if isinstance(block.get("text"), str) and block["text"]:
                    parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                parts.append(_image_part(block, at))
            elif kind == "document":
                parts.append({"type": "text", "text": _document_text(block, at)})
            elif kind == "tool_result":
                self._tool_result(block, at, results, result_parts)
            else:
                self.warnings.append(f"{at}: dropped user block of type {kind!r}")
        orphans: list[dict[str, Any]] = []
        calls, self._open_calls = self._open_calls, []
        for call_id in calls:  # results in the order of the calls, not the order sent
            text = results.pop(call_id, "(no result)")
            self.out.append({"role": "tool", "tool_call_id": call_id, "content": text})
            self._last_turn = None
        for call_id, text in results.items():
            orphans.append({"type": "text", "text": f"Tool result {call_id}: {text}"})
        self._append_user([*orphans, *result_parts, *parts], keep_empty=False)

    def _tool_result(
        self, block: Mapping[str, Any], where: str, results: dict[str, str], images: list[dict[str, Any]]
    ) -> None:
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str):
            raise bad_request(f"{where}.tool_use_id: Field required")
        call_id = self.map_id(call_id)
        content = block.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            own_images: list[dict[str, Any]] = []
            for k, item in enumerate(content):
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "text" and isinstance(item.get("text"), str):
                    texts.append(item["text"])
                elif kind == "image":
                    own_images.append(_image_part(item, f"{where}.content.{k}"))
                elif kind == "document":
                    texts.append(_document_text(item, f"{where}.content.{k}"))
            if own_images:  # tool messages are text-only: the images go to the next user message
                images.append({"type": "text", "text": f"(images returned by tool {call_id})"})
                images.extend(own_images)
        text = "\n".join(texts)
        results[call_id] = f"[tool error] {text}" if block.get("is_error") is True else text

    def _append_user(self, parts: list[dict[str, Any]], *, keep_empty: bool) -> None:
        turn = self._last_turn
        if isinstance(turn, _UserTurn):  # merge: strict templates need alternation
            if parts:
                turn.merge(parts)
            return
        if parts or keep_empty:
            msg: dict[str, Any] = {"role": "user", "content": ""}
            turn = _UserTurn(parts)
            self._users.append((msg, turn))
            self.out.append(msg)
            self._last_turn = turn
