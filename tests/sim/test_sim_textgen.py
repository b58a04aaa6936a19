"""Pure checks of the simulator's deterministic generation (no sockets)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from cortex.sim.textgen import (
    count_tokens,
    embedding_vector,
    plan_generation,
    reply_pieces,
    tool_arguments,
)


def test_count_tokens_is_ceil_quarter_and_at_least_one() -> None:
    assert [count_tokens(t) for t in ("", "a", "abcd", "abcde", "x" * 400)] == [1, 1, 1, 2, 100]


def test_max_tokens_limits_and_finishes_with_length() -> None:
    plan = plan_generation(max_tokens=3)
    assert (plan.text, plan.finish_reason, plan.completion_tokens) == ("The quick brown", "length", 3)
    plan = plan_generation(max_tokens=None)
    assert (plan.finish_reason, plan.completion_tokens) == ("stop", 16)


def test_thinking_counts_against_max_tokens() -> None:
    plan = plan_generation(max_tokens=7, thinking=True)
    assert (len(plan.reasoning), len(plan.content), plan.finish_reason) == (5, 2, "length")


@given(st.text(alphabet="ab c", max_size=40), st.text(alphabet="ab c", min_size=1, max_size=3))
def test_stop_string_never_appears_and_text_is_a_prefix(reply: str, stop: str) -> None:
    plan = plan_generation(max_tokens=None, reply=reply, stop=[stop])
    assert stop not in plan.text
    assert reply.startswith(plan.text)
    if stop in reply:
        assert plan.text == reply[: reply.index(stop)]
        assert plan.finish_reason == "stop"
    else:
        assert plan.text == reply


def test_reply_pieces_rejoin_to_the_reply() -> None:
    assert reply_pieces("Hello  big world") == ["Hello", "  big", " world"]


def test_tool_arguments_follow_the_schema() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "n": {"type": "integer"},
                    "ok": {"type": "boolean"},
                    "tags": {"type": "array"},
                    "where": {"type": "object", "properties": {"x": {"type": "number"}}},
                },
            },
        },
    }
    args = tool_arguments(tool)
    assert json.loads(args) == {"unit": "c", "n": 1, "ok": True, "tags": [], "where": {"x": 1.5}}
    assert " " not in args


def test_embedding_vectors_are_deterministic_unit_vectors() -> None:
    first, again, other = embedding_vector("a"), embedding_vector("a"), embedding_vector([1, 2])
    assert first == again
    assert first != other
    assert abs(sum(v * v for v in first) - 1.0) < 1e-4
