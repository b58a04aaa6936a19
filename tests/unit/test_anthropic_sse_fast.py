"""The SSE fast paths write and read exactly what the general ones do (issue 18: translator CPU per chunk).

``encode_event`` writes text and thinking deltas and pings from a template, and ``parse_data`` calls the
JSON scanner without ``json.loads``'s wrappers; both must agree with the plain ``json.dumps``/``json.loads``
forms on every input, including the shapes the fast paths must refuse.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.proxy.anthropic import DONE, SSEDecoder, encode_event, encode_sse, parse_data, parse_data_bytes
from cortex.proxy.anthropic.stream import StreamTranslator

ANY_CHAR = st.characters(codec=None, exclude_categories=())
"""Every code point, lone surrogates and control characters included."""
TEXT = st.text(ANY_CHAR, max_size=40)


def _general(event: Mapping[str, Any]) -> bytes | type[Exception]:
    """The general encoder's bytes, or the type of its failure (the fast path must fail alike)."""
    try:
        return encode_sse(event["type"], event)
    except Exception as exc:
        return type(exc)


def _fast(event: Mapping[str, Any]) -> bytes | type[Exception]:
    try:
        return encode_event(event)
    except Exception as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(["text_delta", "thinking_delta", "input_json_delta", "signature_delta"]),
    field=st.sampled_from(["text", "thinking", "partial_json"]),
    index=st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False), st.none(), TEXT),
    text=st.one_of(TEXT, st.integers(), st.none()),
    extra=st.booleans(),
    swap=st.booleans(),
)
def test_delta_events_encode_as_json_dumps_does(
    kind: str, field: str, index: object, text: object, extra: bool, swap: bool
) -> None:
    delta: dict[str, Any] = {field: text, "type": kind} if swap else {"type": kind, field: text}
    event: dict[str, Any] = {"type": "content_block_delta", "index": index, "delta": delta}
    if extra:
        event["extra"] = 1
    assert _fast(event) == _general(event)
    reordered = {"index": index, "type": "content_block_delta", "delta": delta}
    assert _fast(reordered) == _general(reordered)


def test_the_common_events_take_the_template_and_match() -> None:
    for event in (
        {"type": "ping"},
        {"type": "ping", "x": 1},
        {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": 'a"\\\n\x00\x7f é 🙂'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
        {"type": "message_stop"},
    ):
        assert encode_event(event) == _general(event)
    assert encode_event({"type": "ping"}).startswith(b"event: ping\ndata: ")


def _reference(event: str | None, data: str) -> Mapping[str, Any] | str | None:
    """``parse_data`` as it was, with ``json.loads``."""
    if event not in (None, "message"):
        return None
    data = data.strip()
    if data == DONE:
        return DONE
    if not data:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, Mapping) else None


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    value=JSON,
    before=st.sampled_from(["", " ", "\t", "\n", "\r\n", "\u00a0", "\ufeff", "x", "[DONE]"]),
    after=st.sampled_from(["", " ", "\n", "\u2028", "x", "}", "{}", " 1", "[DONE]"]),
    indent=st.sampled_from([None, 1]),
    event=st.sampled_from([None, "message", "progress"]),
)
def test_parse_data_reads_what_json_loads_reads(
    value: object, before: str, after: str, indent: int | None, event: str | None
) -> None:
    data = before + json.dumps(value, indent=indent, ensure_ascii=False) + after
    assert parse_data(event, data) == _reference(event, data)


@settings(max_examples=300, deadline=None)
@given(data=st.text(st.sampled_from('{}[]":,0123456789.eE+-truefalsn \t\r\n\\u\ud800é'), max_size=30))
def test_parse_data_refuses_what_json_loads_refuses(data: str) -> None:
    assert parse_data(None, data) == _reference(None, data)


@settings(max_examples=300, deadline=None)
@given(
    value=JSON,
    raw=st.binary(max_size=12),
    before=st.sampled_from([b"", b" ", b"\xef\xbb\xbf", b"\xff"]),
    after=st.sampled_from([b"", b" ", b"x", b"\xc3"]),
)
def test_parse_data_bytes_reads_what_parse_data_reads_after_decoding(
    value: object, raw: bytes, before: bytes, after: bytes
) -> None:
    for data in (
        before + json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass") + after,
        raw,
        b"[DONE]",
    ):
        assert parse_data_bytes(data) == parse_data(None, data.decode("utf-8", "replace"))


LINE = st.sampled_from(
    ["data: {}", "data:{}", "data: [DONE]", "event: ping", "event: message", ": keep-alive", "id: 7", "", "é", "data"]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(LINE, max_size=12),
    ends=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=12, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_the_decoder_splits_lines_alike_whatever_the_line_ends_and_the_reads(
    lines: list[str], ends: list[str], cuts: list[int]
) -> None:
    raw = "".join(line + end for line, end in zip(lines, ends, strict=False)).encode()
    reads = [raw[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(raw)], strict=True)]
    decoder = SSEDecoder()
    got = [event for read in reads for event in decoder.feed(read)] + decoder.close()
    # The same stream with every line end made a LF, in one read: the line ends alone must not matter.
    reference = SSEDecoder()
    lf = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    assert got == reference.feed(lf) + reference.close()


READS = st.sampled_from(
    [
        b"data:{}\n\n",
        b"data: {}\n\n",
        b"data:\n\n",
        b"event: progress\n",
        b"event: message\n",
        b": ka\n\n",
        b"data: x",
        b"\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(reads=st.lists(READS, max_size=10))
def test_a_read_that_is_one_whole_data_event_decodes_as_byte_by_byte(reads: list[bytes]) -> None:
    """A read of exactly ``data:…\\n\\n`` skips the line search: it must still see the event name, the
    partial line or the data lines that earlier reads left."""
    decoder = SSEDecoder()
    got = [event for read in reads for event in decoder.feed(read)] + decoder.close()
    reference = SSEDecoder()
    raw = b"".join(reads)
    expected = [event for i in range(len(raw)) for event in reference.feed(raw[i : i + 1])] + reference.close()
    assert got == expected


def _mistralrs_chunk(content: bytes, *, model: bytes = b"Qwen/Qwen3-4B", tail: bytes = b',"usage":null}') -> bytes:
    """A streamed chunk as mistral.rs writes it (docs/mistralrs-api.md), ``content`` the JSON of the text."""
    return (
        b'{"id":"7","choices":[{"finish_reason":null,"index":0,"delta":{"content":'
        + content
        + b',"role":"assistant","tool_calls":null},"logprobs":null}],"created":1760000000,"model":"'
        + model
        + b'","system_fingerprint":"local","object":"chat.completion.chunk"'
        + tail
    )


def _opened() -> StreamTranslator:
    tr = StreamTranslator(model="m")
    tr.feed(json.loads(_mistralrs_chunk(b'"Hi"')))  # message_start and an open text block
    return tr


def _both_ways(data: bytes) -> tuple[bytes | None, int, bytes | list[bytes] | None, int]:
    """(the bytes path's event, its output count) and (the parsed path's event(s), its output count)."""
    fast, slow = _opened(), _opened()
    got = fast.text_delta_bytes(data)
    chunk = parse_data_bytes(data)
    want: bytes | list[bytes] | None = None
    if isinstance(chunk, Mapping):
        want = slow.text_delta(chunk)
        if want is None:
            want = [encode_event(e) for e in slow.feed(chunk)]
    return got, fast._out_bytes, want, slow._out_bytes


def test_mistralrs_text_chunks_take_the_bytes_path() -> None:
    for text in ("Hel", " brown", "é 🙂 中文", "\x7f", "a/b"):
        got, got_n, want, want_n = _both_ways(_mistralrs_chunk(json.dumps(text, ensure_ascii=False).encode()))
        assert got is not None, text
        assert got == want
        assert got_n == want_n


@settings(max_examples=400, deadline=None)
@given(
    text=TEXT,
    ascii_only=st.booleans(),
    raw=st.one_of(st.none(), st.binary(max_size=6)),
    model=st.sampled_from([b"m", b'a\\"b', b"\xc3\xa9"]),
    tail=st.sampled_from([b',"usage":null}', b"}", b',"usage":{"prompt_tokens":1}}', b',"usage":null} ']),
)
def test_the_bytes_path_gives_what_parsing_gives_or_steps_aside(
    text: str, ascii_only: bool, raw: bytes | None, model: bytes, tail: bytes
) -> None:
    """Any content (escapes, control characters, lone surrogates, invalid UTF-8) and any variant of the shape:
    the bytes path gives exactly the parsed path's event and output count, or None (the parsed path then
    decides, and may differ only because it is the one that runs)."""
    content = (
        b'"' + raw + b'"'
        if raw is not None
        else json.dumps(text, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    )
    got, got_n, want, want_n = _both_ways(_mistralrs_chunk(content, model=model, tail=tail))
    if got is not None:
        assert got == want
        assert got_n == want_n
