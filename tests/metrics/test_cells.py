"""cortex's own counter and histogram cells render exactly what prometheus-client's would.

``cortex/engine/metrics.py`` keeps the request-path metrics in plain cells (a float, a bucket list) and
renders them at scrape time; dashboards and alerts written against prometheus-client's output must not see
a difference. The reference is prometheus-client's ``Counter`` and ``Histogram`` on their own registry,
less the ``_created`` series cortex never exported.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cortex.engine.metrics import _counter, _histogram

BUCKETS = (0.0001, 0.001, 0.05, 1, 2.5, 10, 600)
VALUES = [0.0, 0.0001, 0.00010001, 0.05, 0.7, 1.0, 1, 2.5, 3, 600, 601, 1e9, math.inf, 1e-12]


def _without_created(text: bytes) -> str:
    return "".join(line + "\n" for line in text.decode().splitlines() if "_created" not in line)


def test_the_cells_render_as_prometheus_client_does() -> None:
    theirs = CollectorRegistry()
    counter = Counter("x_requests_total", "Requests", ["model", "status"], registry=theirs)
    histogram = Histogram("x_seconds", "Latency", ["model"], buckets=BUCKETS, registry=theirs)
    ours = CollectorRegistry()
    our_counter = _counter("x_requests_total", "Requests", ["model", "status"])
    our_histogram = _histogram("x_seconds", "Latency", ["model"], BUCKETS)
    ours.register(our_counter)
    ours.register(our_histogram)
    for i, value in enumerate(VALUES):
        model = f"m{i % 3}"
        counter.labels(model, 200 + i % 2).inc(i)
        our_counter.labels(model, 200 + i % 2).inc(i)
        histogram.labels(model).observe(value)
        our_histogram.labels(model).observe(value)
    histogram.labels("never")  # a child with no observations: all-zero buckets
    our_histogram.labels("never")
    assert generate_latest(ours).decode() == _without_created(generate_latest(theirs))


def test_a_counter_refuses_a_negative_step_and_labels_must_all_be_given() -> None:
    counter = _counter("y_total", "Y", ["a", "b"])
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("1", "2").inc(-1)
    with pytest.raises(ValueError, match="2 label values"):
        counter.labels("1")
