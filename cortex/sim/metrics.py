"""The ``/metrics`` surface of a simulated node, in mistral.rs's names and labels.

Each node owns its own ``CollectorRegistry`` (several nodes share a test process, and the global registry
would merge them). The engine gauges are unlabeled and computed at scrape time from the node's counters,
as in mistral.rs where they are process-global, so a request pays only for the four HTTP series, whose
labelled children are cached (``labels()`` costs more than the update itself).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "EXCLUDED_PATHS", "SimMetrics"]

EXCLUDED_PATHS = frozenset({"/", "/health", "/metrics"})
"""Paths the HTTP middleware metrics skip, as in mistral.rs."""

_HTTP_LABELS = ("method", "path", "model", "status")
_FLIGHT_LABELS = ("method", "path", "model")
_BODY_BUCKETS = (256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, float("inf"))
# vLLM's time-to-first-token buckets, which mistral.rs reuses.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class SimMetrics:
    """The Prometheus series of one node.

    Args:
        running: Called at scrape time for ``mistralrs_sequences_running``.
    """

    def __init__(self, running: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("http_requests_total", "HTTP requests", _HTTP_LABELS, registry=reg)
        self.duration = Histogram("http_request_duration_seconds", "HTTP request duration", _HTTP_LABELS, registry=reg)
        self.in_flight = Gauge("http_requests_in_flight", "HTTP requests in flight", _FLIGHT_LABELS, registry=reg)
        self.body_bytes = Histogram(
            "http_request_body_bytes",
            "HTTP request body size",
            _FLIGHT_LABELS,
            buckets=_BODY_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "mistralrs_time_to_first_token_seconds",
            "Time to first token",
            _HTTP_LABELS,
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.tokens = Counter("mistralrs_tokens_processed", "Tokens processed", registry=reg)
        Gauge("mistralrs_sequences_running", "Running sequences", registry=reg).set_function(running)
        Gauge("mistralrs_sequences_waiting", "Waiting sequences", registry=reg).set_function(lambda: 0.0)
        self._flights: dict[tuple[str, str, str], tuple[Gauge, Histogram]] = {}
        self._outcomes: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}

    def request_started(self, method: str, path: str, model: str, body_bytes: int | None) -> Gauge:
        """Count a request in flight (and its body size); returns the gauge to decrement when it ends."""
        key = (method, path, model)
        children = self._flights.get(key)
        if children is None:
            children = self._flights[key] = (self.in_flight.labels(*key), self.body_bytes.labels(*key))
        children[0].inc()
        if body_bytes is not None:
            children[1].observe(body_bytes)
        return children[0]

    def request_finished(self, method: str, path: str, model: str, status: int, seconds: float) -> None:
        """Count a finished request and its duration."""
        key = (method, path, model, str(status))
        children = self._outcomes.get(key)
        if children is None:
            children = self._outcomes[key] = (self.requests.labels(*key), self.duration.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
