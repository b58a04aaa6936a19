"""The event bus: lifecycle events reach everyone; per-request events only those who ask for them."""

from __future__ import annotations

import asyncio

from cortex.engine.events import EventBus, ModelLoaded, RequestCompleted
from cortex.engine.state import RequestRecord

RECORD = RequestRecord(
    ts=1.0,
    api="openai",
    model="m",
    node="a",
    status=200,
    ttft_s=0.1,
    tok_s=10.0,
    prompt_tokens=1,
    completion_tokens=2,
    latency_s=0.2,
)


async def test_a_subscriber_without_requests_gets_no_request_events() -> None:
    bus = EventBus()
    quiet = bus.subscribe(requests=False)
    everything = bus.subscribe()
    first_quiet = asyncio.ensure_future(anext(quiet))
    first_all = asyncio.ensure_future(anext(everything))
    await asyncio.sleep(0)
    assert bus.subscribers == 1  # only `everything` costs the proxy a wake-up per request
    bus.publish(RequestCompleted(RECORD))
    bus.publish(ModelLoaded("a", "m"))
    assert isinstance(await asyncio.wait_for(first_all, 1), RequestCompleted)
    assert isinstance(await asyncio.wait_for(anext(everything), 1), ModelLoaded)
    assert isinstance(await asyncio.wait_for(first_quiet, 1), ModelLoaded)
    await quiet.aclose()
    await everything.aclose()
    assert bus.subscribers == 0


async def test_a_full_queue_drops_request_events_first() -> None:
    bus = EventBus(maxsize=2)
    stream = bus.subscribe()
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    bus.publish(ModelLoaded("a", "m1"))
    assert isinstance(await asyncio.wait_for(pending, 1), ModelLoaded)
    for _ in range(5):
        bus.publish(RequestCompleted(RECORD))
    bus.publish(ModelLoaded("a", "m2"))
    seen = [await asyncio.wait_for(anext(stream), 1) for _ in range(2)]
    assert isinstance(seen[-1], ModelLoaded)
    assert seen[-1].model == "m2"
    await stream.aclose()
