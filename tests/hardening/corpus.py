"""The client-side fuzz corpus: malformed requests for both dialects, each with the answer it deserves.

Every case is a request cortex must refuse with a 4xx in the client's dialect (OpenAI's ``{"error": ...}``
on ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``; Anthropic's ``{"type": "error"}`` on
``/v1/messages`` and ``/v1/messages/count_tokens``): broken JSON, wrong types, out-of-range values, bodies
too large or badly encoded, and credentials in encodings a header cannot carry. The gateway under test
has ``api_keys = ["k1"]`` and ``max_body_mb = 1``; a case sends ``Authorization: Bearer k1`` unless it
is about the key.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ANTHROPIC_PATHS", "CASES", "KEY", "OPENAI_PATHS", "Case"]

KEY = b"k1"
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = field(default=((b"Authorization", b"Bearer " + KEY),))
    status: tuple[int, ...] = (400,)
    """The statuses that are right for it (all 4xx)."""

    @property
    def anthropic(self) -> bool:
        return self.path in ANTHROPIC_PATHS


def _j(obj: Any) -> bytes:
    return json.dumps(obj).encode()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 4}
EMBEDDING = {"model": "m", "input": "hi"}
MESSAGES = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
COUNT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETION,
    "/v1/embeddings": EMBEDDING,
    "/v1/messages": MESSAGES,
    "/v1/messages/count_tokens": COUNT,
}

# -- not JSON, or not a JSON object: every path ----------------------------------------------------------------

_NOT_JSON: dict[str, bytes] = {
    "empty": b"",
    "space": b"   ",
    "open-brace": b"{",
    "truncated": b'{"model": "m", "messages": [',
    "trailing-comma": b'{"model": "m",}',
    "trailing-garbage": b'{"model": "m"} xyz',
    "two-objects": b'{"model": "m"}{"model": "m"}',
    "single-quotes": b"{'model': 'm'}",
    "nan": b'{"model": "m", "temperature": NaN}',
    "infinity": b'{"model": "m", "temperature": 1e400}',
    "bom": b'\xef\xbb\xbf{"model": "m"}',
    "utf16": '{"model": "m"}'.encode("utf-16"),
    "latin1-byte": b'{"model": "m\xe9"}',
    "raw-ff": b'{"model": "\xff\xfe"}',
    "lone-surrogate": b'{"model": "\\ud800"}',
    "control-char": b'{"model": "m\x01"}',
    "deep-array": b"[" * 5000 + b"]" * 5000,
    "deep-object": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "array": b"[]",
    "array-of-objects": b'[{"model": "m"}]',
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "comment": b'{"model": "m" /* c */}',
    "unquoted-key": b'{model: "m"}',
}


def _not_json() -> Iterator[Case]:
    for path in OPENAI_PATHS + ANTHROPIC_PATHS:
        for name, body in _NOT_JSON.items():
            yield Case(f"{path}:not-json:{name}", path, body)


# -- wrong types and values --------------------------------------------------------------------------------


def _variants(
    path: str, base: dict[str, Any], key: str, values: list[Any], status: tuple[int, ...] = (400,)
) -> Iterator[Case]:
    for i, value in enumerate(values):
        body = {**base, key: value}
        yield Case(f"{path}:{key}#{i}={json.dumps(value)[:24]}", path, _j(body), status=status)


def _without(path: str, base: dict[str, Any], key: str) -> Case:
    return Case(f"{path}:no-{key}", path, _j({k: v for k, v in base.items() if k != key}))


_BAD_MODELS: list[Any] = [5, 1.5, True, [], ["m"], {}, {"id": "m"}, ""]
_UNKNOWN_MODELS: list[Any] = ["no-such-model", "m\n", "m\u0000", "x" * 100_000, "\u20ac" * 50, "../../etc/passwd"]


def _types() -> Iterator[Case]:
    chat = "/v1/chat/completions"
    for path in OPENAI_PATHS:
        base = VALID[path]
        yield from _variants(path, base, "model", _BAD_MODELS)
        yield from _variants(path, base, "model", _UNKNOWN_MODELS, status=(404,))
        yield from _variants(path, base, "stream", ["yes", 1, [], {}])
        yield from _variants(path, base, "max_tokens", [0, -1, "10", 1.5, True, [], {}, 1e30])
        yield from _variants(path, base, "temperature", ["hot", [], {}, True])
        yield from _variants(path, base, "top_p", ["x", [1]])
        yield from _variants(path, base, "n", [0, -5, "2"])
        yield from _variants(path, base, "stop", [5, {}, True])
        yield from _variants(path, base, "stream_options", [[], "x", 5])
    yield _without(chat, CHAT, "messages")
    yield from _variants(
        chat,
        CHAT,
        "messages",
        [None, "", [], {}, 5, [5], ["hi"], [{}], [{"role": 5}], [{"role": None, "content": "x"}], [[]]],
    )
    yield from _variants(chat, CHAT, "tools", [{}, "x", 5])
    yield _without("/v1/completions", COMPLETION, "prompt")
    yield from _variants("/v1/completions", COMPLETION, "prompt", [None, 5, {}, True])
    yield _without("/v1/embeddings", EMBEDDING, "input")
    yield from _variants("/v1/embeddings", EMBEDDING, "input", [None, "", [], 5, {}, True])

    msgs = "/v1/messages"
    yield _without(msgs, MESSAGES, "model")
    yield from _variants(msgs, MESSAGES, "model", _BAD_MODELS)
    yield from _variants(msgs, MESSAGES, "model", _UNKNOWN_MODELS, status=(404,))
    yield _without(msgs, MESSAGES, "max_tokens")
    yield from _variants(msgs, MESSAGES, "max_tokens", [0, -1, "10", 1.5, True, None, [], {}])
    yield _without(msgs, MESSAGES, "messages")
    yield from _variants(
        msgs,
        MESSAGES,
        "messages",
        [
            None,
            "",
            [],
            {},
            5,
            [5],
            ["hi"],
            [{"role": "robot", "content": "x"}],
            [{"role": "user", "content": 5}],
            [{"role": "user", "content": {"type": "text"}}],
            [{"role": "user", "content": None}],
            [{"role": "assistant", "content": [{"type": "tool_use", "name": "t", "input": {}}]}],
            [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "t", "input": "x"}]}],
            [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}],
            [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/bmp"}}]}],
            [{"role": "user", "content": [{"type": "image", "source": "x"}]}],
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": "AA=="},
                        }
                    ],
                }
            ],
        ],
    )
    yield from _variants(msgs, MESSAGES, "stop_sequences", ["stop", [5], {}])
    yield from _variants(msgs, MESSAGES, "temperature", ["hot", [], {}, True])
    yield from _variants(msgs, MESSAGES, "top_p", ["x"])
    yield from _variants(msgs, MESSAGES, "tools", [{}, "x", [5], [{"name": 5}], [{"input_schema": {}}]])
    yield from _variants(
        msgs,
        {**MESSAGES, "tools": [{"name": "t", "input_schema": {"type": "object"}}]},
        "tool_choice",
        ["auto", 5, {"type": "bogus"}, {"type": "tool"}],
    )
    yield from _variants(msgs, MESSAGES, "thinking", [{"type": "bogus"}])
    yield from _variants(msgs, MESSAGES, "safeguards", [{"x": 1}])

    count = "/v1/messages/count_tokens"
    yield _without(count, COUNT, "model")
    yield from _variants(count, COUNT, "model", _BAD_MODELS)
    yield from _variants(count, COUNT, "model", _UNKNOWN_MODELS[:3], status=(404,))
    yield _without(count, COUNT, "messages")
    yield from _variants(count, COUNT, "messages", [None, "x", 5, {}])


# -- sizes and encodings -------------------------------------------------------------------------------------


def _sizes() -> Iterator[Case]:
    big = b'{"model": "m", "pad": "' + b"x" * (MAX_BODY + 10) + b'"}'
    bomb = gzip.compress(b'{"model": "m", "pad": "' + b"0" * (8 * MAX_BODY) + b'"}')
    auth = (b"Authorization", b"Bearer " + KEY)
    for path in OPENAI_PATHS + ANTHROPIC_PATHS:
        yield Case(f"{path}:too-large", path, big, status=(413,))
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (big[:600_000], big[600_000:])) + b"0\r\n\r\n"
        yield Case(
            f"{path}:too-large-chunked",
            path,
            chunked,
            headers=(auth, (b"Transfer-Encoding", b"chunked")),
            status=(413,),
        )
        yield Case(f"{path}:gzip-bomb", path, bomb, headers=(auth, (b"Content-Encoding", b"gzip")), status=(413,))
        yield Case(
            f"{path}:gzip-garbage",
            path,
            b"this is not gzip at all",
            headers=(auth, (b"Content-Encoding", b"gzip")),
        )
        yield Case(
            f"{path}:gzip-of-garbage",
            path,
            gzip.compress(b"{{{ not json"),
            headers=(auth, (b"Content-Encoding", b"gzip")),
        )


# -- credentials the headers cannot carry, and ids that must be replaced -------------------------------------------


_BAD_KEYS: dict[str, tuple[bytes, bytes]] = {
    "no-key": (b"X-Nothing", b"1"),
    "wrong-key": (b"Authorization", b"Bearer nope"),
    "latin1-key": (b"Authorization", b"Bearer k\xe9"),
    "raw-ff-key": (b"Authorization", b"Bearer \xff\xfe"),
    "utf8-key": (b"Authorization", "Bearer k€".encode()),
    "ff-x-api-key": (b"x-api-key", b"\xff"),
    "utf8-x-api-key": (b"x-api-key", "€".encode()),
    "basic-scheme": (b"Authorization", b"Basic azE6"),
    "bearer-only": (b"Authorization", b"Bearer"),
    "long-key": (b"Authorization", b"Bearer " + b"k" * 30_000),
}


def _keys() -> Iterator[Case]:
    for path in OPENAI_PATHS + ANTHROPIC_PATHS:
        for name, header in _BAD_KEYS.items():
            yield Case(f"{path}:{name}", path, _j(VALID[path]), headers=(header,), status=(401,))


_BAD_IDS: dict[str, bytes] = {
    "euro": "req-€".encode(),
    "raw-ff": b"req-\xff",
    "tab": b"a\tb",
    "long": b"r" * 10_000,
}


def _ids() -> Iterator[Case]:
    """A bad ``x-request-id`` on a request that is also malformed: still a clean 4xx (never a 500)."""
    auth = (b"Authorization", b"Bearer " + KEY)
    for path in OPENAI_PATHS + ANTHROPIC_PATHS:
        for name, value in _BAD_IDS.items():
            yield Case(f"{path}:bad-id-{name}", path, b"{", headers=(auth, (b"x-request-id", value)))


CASES: tuple[Case, ...] = (*_not_json(), *_types(), *_sizes(), *_keys(), *_ids())
BAD_IDS = _BAD_IDS
