r"""Server-sent events: encoding Anthropic events, and leniently decoding an upstream stream.

Outbound, every event needs its ``event:`` line: the SDKs silently drop data-only events
(translation.md §1.4, §7). Inbound, upstreams differ in small ways that must all be accepted
(§3.4 step 2): mistral.rs writes ``data:`` without a space and sends ``:`` comment keep-alives
and, on agentic runs, named events that are not chunks; others use CRLF line ends. The decoder
works on bytes and keeps partial lines (and a trailing ``\r`` that may start a CRLF) between
calls, so it can be fed whatever the socket delivers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring
from typing import Any, Final

import orjson

__all__ = ["DONE", "SSEDecoder", "encode_delta", "encode_event", "encode_sse", "parse_data", "parse_data_bytes"]

DONE: Final = "[DONE]"
"""What :func:`parse_data` returns for the ``data: [DONE]`` end marker."""

_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def encode_sse(event_name: str, data: Mapping[str, Any]) -> bytes:
    """Encode one event as ``event: NAME``, ``data: {json}`` and a blank line."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event_name}\ndata: {payload}\n\n".encode()


_DELTA_FIELDS: Final = {"text_delta": "text", "thinking_delta": "thinking"}
_DELTA_KEYS: Final = ("type", "index", "delta")
_DELTA_HEAD: Final = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"%s","%s":'
)
_PING: Final = encode_sse("ping", {"type": "ping"})


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Encode an Anthropic event, whose ``type`` is its event name.

    Nearly every event of a stream is a text or thinking delta, one per upstream chunk: those (and pings)
    are written from a template around the string encoder ``json.dumps`` itself uses, byte for byte what
    :func:`encode_sse` writes, at a tenth of its cost. Anything of another shape goes through
    :func:`encode_sse`.
    """
    kind = event["type"]
    if kind == "content_block_delta" and len(event) == 3:
        delta = event["delta"]
        index = event.get("index")
        if type(index) is int and isinstance(delta, dict) and len(delta) == 2:
            delta_type = delta.get("type")
            if isinstance(delta_type, str) and (field := _DELTA_FIELDS.get(delta_type)) is not None:
                text = delta.get(field)
                if type(text) is str and tuple(event) == _DELTA_KEYS and next(iter(delta)) == "type":
                    return encode_delta(index, delta_type, field, text)
    elif kind == "ping" and len(event) == 1:
        return _PING
    return encode_sse(kind, event)


def encode_delta(index: int, delta_type: str, field: str, text: str) -> bytes:
    """A ``content_block_delta`` event of one text or thinking fragment, as :func:`encode_sse` writes it."""
    return (_DELTA_HEAD % (index, delta_type, field) + encode_basestring(text) + "}}\n\n").encode()


_TEXT_DELTA_BYTES: Final = (_DELTA_HEAD.replace('"%s","%s":', '"text_delta","text":') + '"%s"}}\n\n').encode()


def encode_text_literal(index: int, literal: bytes) -> bytes:
    """:func:`encode_delta` of a text fragment given as the UTF-8 of a JSON string literal's inside.

    The literal must need no escape in JSON (no quote, backslash or control character) and be valid UTF-8:
    then it is what ``encode_basestring`` writes for its text, and it is copied as it is.
    """
    return _TEXT_DELTA_BYTES % (index, literal)


class SSEDecoder:
    r"""Incremental SSE parser yielding ``(event name or None, data)`` for each dispatched event.

    Comment lines and ``id:``/``retry:`` fields are ignored; multi-line ``data`` is joined
    with ``\n``; ``data:`` with or without a space is accepted.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[str] = []

    def feed(self, raw: bytes) -> list[tuple[str | None, str]]:
        """Consume bytes from the upstream; return the events they complete."""
        data = self.one_data(raw)
        if data is not None:
            return [(None, data.decode("utf-8", "replace"))]
        buffer = self._buffer + raw if self._buffer else raw
        out: list[tuple[str | None, str]] = []
        if b"\r" not in buffer:
            # LF line ends only (mistral.rs, and nearly every upstream): one split instead of a search per line.
            lines = buffer.split(b"\n")
            self._buffer = lines.pop()
            for line in lines:
                self._line(line.decode("utf-8", "replace"), out)
            return out
        start = 0
        size = len(buffer)
        while start < size:
            lf = buffer.find(b"\n", start)
            cr = buffer.find(b"\r", start, lf if lf >= 0 else size)
            if cr >= 0:
                if cr == size - 1:  # maybe the first half of a CRLF: wait for more
                    break
                end, next_start = cr, cr + 2 if buffer[cr + 1 : cr + 2] == b"\n" else cr + 1
            elif lf >= 0:
                end, next_start = lf, lf + 1
            else:
                break
            self._line(buffer[start:end].decode("utf-8", "replace"), out)
            start = next_start
        self._buffer = buffer[start:]
        return out

    def one_data(self, raw: bytes) -> bytes | None:
        """The data of ``raw`` when it is one whole unnamed event, else None (and nothing is consumed).

        That is exactly one ``data:`` line and its blank line with nothing pending from earlier reads, as a
        node sends each chunk. The caller then takes that one unnamed event without a line search (:meth:`feed` does).
        """
        if (
            raw[:5] == b"data:"
            and raw[-2:] == b"\n\n"
            and raw.count(b"\n") == 2
            and not self._buffer
            and not self._data
            and self._event is None
            and b"\r" not in raw
        ):
            return raw[6:-2] if raw[5:6] == b" " else raw[5:-2]
        return None

    def close(self) -> list[tuple[str | None, str]]:
        """Flush at EOF: a final event without its blank line is still dispatched."""
        out: list[tuple[str | None, str]] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r").decode("utf-8", "replace"), out)
            self._buffer = b""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[tuple[str | None, str]]) -> None:
        if not line:
            if self._data:
                out.append((self._event, "\n".join(self._data)))
            self._event, self._data = None, []
            return
        if line[0] == ":":
            return
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value


def parse_data_bytes(data: bytes) -> Mapping[str, Any] | str | None:
    """:func:`parse_data` of an unnamed event whose data is still bytes (:meth:`SSEDecoder.one_data`).

    A JSON object is parsed straight from the bytes; anything else is decoded and read as before.
    """
    try:
        value = orjson.loads(data)
    except ValueError:  # [DONE], invalid UTF-8, what orjson refuses: the general way
        return parse_data(None, data.decode("utf-8", "replace"))
    return value if type(value) is dict else None


def parse_data(event: str | None, data: str) -> Mapping[str, Any] | str | None:
    """Interpret one decoded upstream event as an OpenAI stream item.

    Returns:
        The parsed chunk object; :data:`DONE` for the end marker; ``None`` for anything to
        ignore (named non-chunk events such as mistral.rs's agentic progress, empty or
        non-object data).
    """
    if event not in (None, "message"):
        return None
    data = data.strip()
    if data == DONE:
        return DONE
    if not data:
        return None
    try:
        value = orjson.loads(data)  # a third of the scanner's cost; what it refuses (NaN, a lone surrogate,
    except ValueError:  # an integer over 64 bits) goes to the scanner, as before (orjson.JSONDecodeError is one)
        pass
    else:
        return value if type(value) is dict else None
    # ``json.loads`` less its wrappers: ``data`` is stripped already, so the value must start at 0 and
    # end at the last character (what ``loads`` checks with its whitespace matches around the scan).
    try:
        value, end = _scan(data, 0)
    except (StopIteration, ValueError):
        return None
    if end != len(data):
        return None
    return value if type(value) is dict or isinstance(value, Mapping) else None
