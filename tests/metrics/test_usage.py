"""Finding the usage in a stream (``UsageTail``) and turning usage into tokens and decode speed."""

from __future__ import annotations

import types
from typing import Any

import orjson
import pytest

from cortex.engine.metrics import RequestOutcome, usage_figures
from cortex.proxy import forward
from cortex.proxy.forward import UsageTail
from cortex.sim import SimModel, frames
from tests.conftest import FleetFactory, NodeSpec
from tests.metrics.helpers import scrape, wait_until

USAGE = frames.usage(17, 256, 0.012, 1.5)
ENC = frames.ChunkEncoder("chat", "7", 1760000000, "Qwen/Qwen3-4B")


def mistralrs_stream(tokens: int = 40, usage: dict[str, Any] | None = USAGE) -> bytes:
    """A chat stream as mistral.rs sends it: `usage: null` on every chunk but the finish chunk."""
    body = [ENC.content(f" w{i}") for i in range(tokens)]
    body.append(ENC.chat_chunk(frames.delta(""), "length", usage))
    return b"".join(body) + frames.DONE


def feed(chunks: list[bytes]) -> UsageTail:
    tail = UsageTail()
    for chunk in chunks:
        tail.add(chunk)
    return tail


def test_usage_on_the_finish_chunk() -> None:
    body = mistralrs_stream()
    assert feed([body]).usage() == USAGE
    assert feed([body[i : i + 7] for i in range(0, len(body), 7)]).usage() == USAGE


def test_usage_straddling_two_reads_at_every_split_point() -> None:
    body = mistralrs_stream()
    start = body.rindex(b'"usage"')
    end = body.rindex(b"}}") + 2
    for cut in range(start - 3, end + 1):
        assert feed([body[:cut], body[cut:]]).usage() == USAGE, cut


def test_stream_without_usage_openai_style() -> None:
    """OpenAI-style backends: no usage unless asked, `data: ` with a space, or no `usage` key at all."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
    plain = b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for _ in range(30)) + b"data: [DONE]\n\n"
    assert feed([plain]).usage() is None
    nulls = mistralrs_stream(usage=None)
    assert b'"usage":{' not in nulls
    assert feed([nulls]).usage() is None
    # Asked with include_usage: a last `choices: []` chunk, JSON with spaces, nested details.
    last = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9, "details": {"cached": 0}}}
    spaced = plain[: -len(b"data: [DONE]\n\n")] + b"data: " + orjson.dumps(last).replace(b":", b": ") + b"\n\n"
    assert feed([spaced, b"data: [DONE]\n\n"]).usage() == last["usage"]


def test_usage_like_text_and_errors_are_not_taken_for_usage() -> None:
    content = ENC.content('see "usage":{"prompt_tokens":999} here')
    assert feed([content, ENC.chat_chunk(frames.delta(""), "stop", None), frames.DONE]).usage() is None
    errored = mistralrs_stream(5, usage=None)[: -len(frames.DONE)] + frames.error_frame("boom") + frames.DONE
    assert feed([errored]).usage() is None
    assert feed([]).usage() is None
    assert feed([b'data:{"usage":{"prompt_tokens":']).usage() is None  # cut short


def test_huge_final_tool_call_chunk() -> None:
    """mistral.rs sends a buffered tool call whole in the finish chunk, usage last: 300 KB in 16 KiB reads."""
    args = orjson.dumps({"text": "x" * 300_000}).decode()
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "write", "arguments": args}}
    finish = ENC.chat_chunk(frames.delta(None, tool_calls=[call]), "tool_calls", USAGE)
    body = mistralrs_stream(10)[: -len(frames.DONE) - len(ENC.chat_chunk(frames.delta(""), "length", USAGE))]
    body += finish + frames.DONE
    reads = [body[i : i + 16384] for i in range(0, len(body), 16384)]
    tail = feed(reads)
    assert tail.usage() == USAGE
    assert tail._size < UsageTail.LIMIT + 16384  # bounded, though the event is far larger
    assert feed([body]).usage() == USAGE  # one huge read is kept whole


def test_the_tail_is_parsed_once_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan parses one small object, not every chunk, not the whole finish event."""
    parsed: list[int] = []

    def loads(data: bytes) -> Any:
        parsed.append(len(data))
        return orjson.loads(data)

    monkeypatch.setattr(forward, "orjson", types.SimpleNamespace(loads=loads, JSONDecodeError=orjson.JSONDecodeError))
    body = mistralrs_stream(500)
    assert feed([body[i : i + 100] for i in range(0, len(body), 100)]).usage() == USAGE
    assert parsed == [len(orjson.dumps(USAGE))]


def outcome(usage: dict[str, Any] | None, *, stream: bool = True, first: float | None = 10.5) -> RequestOutcome:
    return RequestOutcome(
        api="openai",
        model="m",
        node="a",
        status=200,
        stream=stream,
        started=10.0,
        ended=12.5,
        first_byte=first,
        usage=usage,
    )


def test_decode_speed_from_the_nodes_usage_when_present() -> None:
    assert usage_figures(outcome(USAGE)) == (17, 256, USAGE["avg_compl_tok_per_sec"])
    assert usage_figures(outcome(USAGE, stream=False)) == (17, 256, USAGE["avg_compl_tok_per_sec"])


def test_decode_speed_from_cortexs_clock_otherwise() -> None:
    openai_usage = {"prompt_tokens": 12, "completion_tokens": 41, "total_tokens": 53}
    # A stream: tokens after the first, over first byte → end (2.0 s).
    prompt, completion, decode = usage_figures(outcome(openai_usage))
    assert (prompt, completion) == (12, 41)
    assert decode == pytest.approx(40 / 2.0)
    # mistral.rs reports 0.0 when its decode time rounded to 0 ms: measured too.
    zero = frames.usage(3, 9, 0.0, 0.0)
    assert zero["avg_compl_tok_per_sec"] == 0.0
    prompt, completion, decode = usage_figures(outcome(zero))
    assert (prompt, completion) == (3, 9)
    assert decode == pytest.approx(8 / 2.0)
    # Not measurable: no rate and no stream, no first byte, or a single token.
    assert usage_figures(outcome(openai_usage, stream=False)) == (12, 41, None)
    assert usage_figures(outcome(openai_usage, first=None)) == (12, 41, None)
    assert usage_figures(outcome({"prompt_tokens": 1, "completion_tokens": 1})) == (1, 1, None)
    assert usage_figures(outcome(None)) == (0, 0, None)


def test_token_counts_tolerate_other_shapes() -> None:
    assert usage_figures(outcome({"input_tokens": 7, "output_tokens": 3}, first=None)) == (7, 3, None)
    junk = {"prompt_tokens": "7", "completion_tokens": True, "avg_compl_tok_per_sec": True}
    assert usage_figures(outcome(junk, first=None)) == (0, 0, None)


async def test_huge_tool_call_stream_through_the_gateway(fleet: FleetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = frames.usage

    def recording(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(frames, "usage", recording)
    f = await fleet(NodeSpec("a", [SimModel("m1", 1000)]), gateway={"metrics_listen": "127.0.0.1:0"})
    f.sim("a").script_tool_call("write", orjson.dumps({"text": "y" * 400_000}).decode())
    tool = {"type": "function", "function": {"name": "write", "parameters": {"type": "object"}}}
    body = {"model": "m1", "stream": True, "tools": [tool], "messages": [{"role": "user", "content": "go"}]}
    async with f.http.post(f.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        text = await resp.read()
    assert b'"finish_reason":"tool_calls"' in text
    assert len(text) > 400_000
    await wait_until(lambda: f.engine.metrics.requests_total == 1, what="the request recorded")
    assert len(seen) == 1
    m = await scrape(f.http, f.servers.metrics)
    assert m.value("cortex_prompt_tokens_total", model="m1", node="a", api="openai") == seen[0]["prompt_tokens"]
    assert m.value("cortex_completion_tokens_total", model="m1", node="a", api="openai") == seen[0]["completion_tokens"]
    record = f.engine.metrics.recent()[0]
    assert (record.prompt_tokens, record.completion_tokens) == (seen[0]["prompt_tokens"], seen[0]["completion_tokens"])


def test_usage_is_found_once_per_state_of_the_tail() -> None:
    body = mistralrs_stream()
    tail = feed([body])
    first = tail.usage()
    assert first == USAGE
    assert tail.usage() is first  # asked again (include_usage, then the metrics): no second scan
    later = {**USAGE, "completion_tokens": 1}
    tail.add(b'data: {"choices":[],"usage":' + orjson.dumps(later) + b"}\n\n")
    assert tail.usage() == later  # a new chunk: scanned again
