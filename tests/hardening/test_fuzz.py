"""The client fuzz corpus against a live gateway: every malformed request gets a 4xx in its dialect's
envelope, never a 500; no lease is left behind; the process is still alive at the end."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from cortex.sim import SimNode
from tests.hardening.conftest import Gateway, GatewayFactory
from tests.hardening.corpus import ANTHROPIC_PATHS, BAD_IDS, CASES, KEY, OPENAI_PATHS, VALID, Case
from tests.hardening.rawhttp import Reply, exchange, request_bytes


@pytest.fixture
async def gw(sim: SimNode, gateway: GatewayFactory) -> Gateway:
    return await gateway(sim.url, api_keys=[KEY.decode()], max_body_mb=1.0, header_timeout_s=5.0)


def test_the_corpus_is_large_and_covers_both_dialects() -> None:
    assert len(CASES) >= 200
    assert len({case.id for case in CASES}) == len(CASES), "case ids are unique"
    paths = {case.path for case in CASES}
    assert paths == set(OPENAI_PATHS) | set(ANTHROPIC_PATHS)
    assert sum(case.anthropic for case in CASES) >= 100
    assert sum(not case.anthropic for case in CASES) >= 100


def envelope_problem(case: Case, reply: Reply) -> str | None:
    """What is wrong with the reply's error envelope, or None."""
    try:
        body: Any = reply.json()
    except ValueError:
        return f"not JSON: {reply.body[:80]!r}"
    if case.anthropic:
        if not (isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)):
            return f"not an Anthropic error: {body!r:.120}"
        if not isinstance(body["error"].get("type"), str) or not isinstance(body["error"].get("message"), str):
            return f"Anthropic error without type/message: {body!r:.120}"
    else:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
            return f"not an OpenAI error: {body!r:.120}"
    return None


async def test_every_malformed_request_gets_a_clean_4xx(gw: Gateway, sim: SimNode) -> None:
    problems: list[str] = []
    limit = asyncio.Semaphore(8)

    async def one(case: Case) -> None:
        async with limit:
            raw = request_bytes(case.path, case.body, list(case.headers))
            try:
                reply = await exchange(gw.port, raw)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                problems.append(f"{case.id}: no reply ({type(exc).__name__})")
                return
        if reply.status not in case.status:
            problems.append(f"{case.id}: {reply.status}, expected {case.status}: {reply.body[:160]!r}")
        elif (problem := envelope_problem(case, reply)) is not None:
            problems.append(f"{case.id}: {problem}")
        elif len(reply.body) > 4096:
            problems.append(f"{case.id}: an error of {len(reply.body)} bytes echoes the input")

    await asyncio.gather(*(one(case) for case in CASES))
    assert not problems, f"{len(problems)} of {len(CASES)} cases:\n" + "\n".join(problems)
    await gw.settled()
    await gw.alive()
    # and the gateway still serves a good request in each dialect
    auth = [(b"Authorization", b"Bearer " + KEY)]
    for path in ("/v1/chat/completions", "/v1/messages"):
        reply = await exchange(gw.port, request_bytes(path, json.dumps(VALID[path]).encode(), auth))
        assert reply.status == 200, reply.body


@pytest.mark.parametrize("name", sorted(BAD_IDS))
async def test_a_bad_request_id_is_replaced_not_fatal(name: str, gw: Gateway, sim: SimNode) -> None:
    """The lease leak of issue 13: an ``x-request-id`` that is not Latin-1 (or not printable, or 10 kB) used to
    raise in the upstream send and leak the lease. Now the node gets a fresh id and the client its answer."""
    auth = (b"Authorization", b"Bearer " + KEY)
    for path in ("/v1/chat/completions", "/v1/messages"):
        before = len(sim.requests)
        body = json.dumps(VALID[path]).encode()
        reply = await exchange(gw.port, request_bytes(path, body, [auth, (b"x-request-id", BAD_IDS[name])]))
        assert reply.status == 200, reply.body
        sent = [r for r in sim.requests[before:] if r.path == "/v1/chat/completions"]
        assert len(sent) == 1
        assert re.fullmatch(r"req_[0-9a-f]{32}", sent[0].headers["x-request-id"])
        assert reply.headers["x-request-id"] == sent[0].headers["x-request-id"]
    await gw.settled()


async def test_a_good_request_id_goes_through(gw: Gateway, sim: SimNode) -> None:
    auth = (b"Authorization", b"Bearer " + KEY)
    body = json.dumps(VALID["/v1/chat/completions"]).encode()
    reply = await exchange(gw.port, request_bytes("/v1/chat/completions", body, [auth, (b"x-request-id", b"trace-7")]))
    assert reply.status == 200
    assert reply.headers["x-request-id"] == "trace-7"
    sent = [r for r in sim.requests if r.path == "/v1/chat/completions"]
    assert sent[-1].headers["x-request-id"] == "trace-7"
