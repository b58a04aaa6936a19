"""Every Prometheus metric cortex exports, and the sliding windows the console reads.

The registry belongs to the engine (not prometheus-client's global one), so several engines can live in one
test process. Per-request metrics are recorded once, when a request ends, from one :class:`RequestOutcome`;
labelled children are cached per label tuple because ``labels()`` costs more than the increment itself.
Fleet gauges (node up, VRAM, loaded, pinned, in flight, queue depth) are not updated as things change: a
collector reads the current snapshot when Prometheus scrapes, so they can never drift from the truth.
Label values are bounded: the gateway passes a catalogue model id or ``unknown``, never raw client input;
load results and unload reasons are mapped onto their documented sets here.

Counters and histograms are cortex's own small cells (:class:`_Family`), rendered by prometheus-client at
scrape time: an increment is one float addition and an observation one C ``bisect`` (prometheus-client's
take a lock, check the value and walk the buckets in Python: 12 µs of a request's 150 went there). The text
format is the same as prometheus-client's ``Counter`` and ``Histogram``, less their ``_created`` series (one
extra gauge per labelled child, which Prometheus stores as a series of its own).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cortex.engine.state import FleetSnapshot, FleetTotals, RequestRecord, SlotState, WindowStats

__all__ = ["LOAD_RESULTS", "UNLOAD_REASONS", "CortexMetrics", "RequestOutcome", "SlidingWindow", "usage_figures"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_TPS_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_MIB = 1024 * 1024
_NUMBER = (int, float)
LOAD_RESULTS = frozenset({"ok", "failed", "timeout"})
"""Values of ``cortex_model_loads_total{result}``; anything else is counted as ``failed``."""
UNLOAD_REASONS = frozenset({"evict", "ttl", "manual", "defrag"})
"""Values of ``cortex_model_unloads_total{reason}`` (product spec §5).

The lifecycle's ``reconcile`` unloads (a node found over its VRAM budget) are evictions, and any other
reason is counted as ``evict`` too, so the label set stays the documented one.
"""


@dataclass(slots=True)
class RequestOutcome:
    """What the gateway knows about one finished request (times from ``time.monotonic``)."""

    api: str
    model: str
    """A catalogue id or ``unknown``."""
    node: str
    """The node that served it, or ``""``."""
    status: int
    stream: bool
    started: float
    ended: float
    first_byte: float | None = None
    """When the first content byte went to the client."""
    queue_s: float = 0.0
    upstream_s: float = 0.0
    """Time spent waiting on the node (headers, body, chunks)."""
    usage: dict[str, Any] | None = None
    """mistral.rs usage (nine fields) or OpenAI usage, when the response carried one."""


class SlidingWindow:
    """Per-second buckets over the last ``size`` seconds, plus recent samples for percentiles."""

    __slots__ = ("_decode", "_err", "_req", "_sec", "_tok", "_ttft", "_ttft_n", "_ttft_sum", "size")

    def __init__(self, size: int = 60) -> None:
        self.size = size
        self._sec = [-1] * size
        self._req = [0] * size
        self._err = [0] * size
        self._tok = [0] * size
        self._ttft_sum = [0.0] * size
        self._ttft_n = [0] * size
        self._ttft: deque[tuple[float, float]] = deque(maxlen=2048)
        self._decode: deque[tuple[float, float]] = deque(maxlen=2048)

    def _bucket(self, second: int) -> int:
        i = second % self.size
        if self._sec[i] > second:
            return -1  # older than the window (a wall clock stepped back): never wipe a newer second
        if self._sec[i] != second:
            self._sec[i] = second
            self._req[i] = self._err[i] = self._tok[i] = self._ttft_n[i] = 0
            self._ttft_sum[i] = 0.0
        return i

    def add(self, now: float, *, error: bool, tokens: int, ttft: float | None, decode: float | None) -> None:
        """Count one finished request at time ``now``."""
        i = self._bucket(int(now))
        if i < 0:
            return
        self._req[i] += 1
        self._err[i] += error
        self._tok[i] += tokens
        if ttft is not None:
            self._ttft_sum[i] += ttft
            self._ttft_n[i] += 1
            self._ttft.append((now, ttft))
        if decode is not None:
            self._decode.append((now, decode))

    def stats(self, now: float) -> WindowStats:
        """The window's figures at ``now``."""
        cur = int(now)
        tok_series: list[float] = []
        ttft_series: list[float] = []
        req = err = tok = 0
        for second in range(cur - self.size + 1, cur + 1):
            i = second % self.size
            if self._sec[i] != second:
                tok_series.append(0.0)
                ttft_series.append(0.0)
                continue
            req += self._req[i]
            err += self._err[i]
            tok += self._tok[i]
            tok_series.append(float(self._tok[i]))
            n = self._ttft_n[i]
            ttft_series.append(self._ttft_sum[i] / n if n else 0.0)
        horizon = cur - self.size + 1  # the same seconds as the buckets
        ttfts = sorted(v for t, v in self._ttft if t >= horizon)
        decodes = sorted(v for t, v in self._decode if t >= horizon)
        return WindowStats(
            req_s=req / self.size,
            tok_s=tok / self.size,
            decode_tok_s=_quantile(decodes, 0.5),
            ttft_p50=_quantile(ttfts, 0.5),
            ttft_p95=_quantile(ttfts, 0.95),
            errors=err,
            tok_s_series=tuple(tok_series),
            ttft_series=tuple(ttft_series),
        )


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def usage_figures(outcome: RequestOutcome) -> tuple[int, int, float | None]:
    """(prompt tokens, completion tokens, decode tok/s) of a finished request.

    Token counts come from the node's usage (mistral.rs or OpenAI names, else Anthropic ones). Decode speed
    is mistral.rs's ``avg_compl_tok_per_sec`` when it is there and non-zero; otherwise, for a stream, it is
    measured on cortex's clock from the first forwarded byte to the end (the first token is excluded: it
    arrived with that byte). A non-streaming answer without the rate gives None, since cortex sees its
    tokens arrive all at once and cannot tell decode time from prefill and queueing.
    """
    usage = outcome.usage or {}
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    completion = _count(usage, "completion_tokens", "output_tokens")
    decode = usage.get("avg_compl_tok_per_sec")
    if isinstance(decode, _NUMBER) and not isinstance(decode, bool) and decode > 0:
        return prompt, completion, float(decode)
    first = outcome.first_byte
    if outcome.stream and completion > 1 and first is not None and outcome.ended > first:
        return prompt, completion, (completion - 1) / (outcome.ended - first)
    return prompt, completion, None


def _count(usage: dict[str, Any], *keys: str) -> int:
    """The first positive integer count among ``keys`` (0 when none)."""
    for key in keys:
        value = usage.get(key)
        if value.__class__ is int:  # the usual case, checked first (a bool's class is bool)
            if value > 0:
                return value
        elif isinstance(value, _NUMBER) and not isinstance(value, bool) and value > 0:
            return int(value)
    return 0


class _Count:
    """One labelled counter: a float."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _Buckets:
    """One labelled histogram: a count per bucket (not cumulative: summed at scrape) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value (le)
        self.sum += value


class _Family(Collector):
    """A counter (``buckets`` None) or a histogram, its children by label values, rendered at scrape."""

    def __init__(self, name: str, doc: str, labelnames: Iterable[str], buckets: tuple[float, ...] | None = None):
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self.buckets = buckets
        self._les = None if buckets is None else [*(floatToGoString(b) for b in buckets), "+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: object) -> Any:
        """The child for these label values (made on first use), a :class:`_Count` or :class:`_Buckets`."""
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name} takes {len(self.labelnames)} label values, not {len(key)}")
            child = self._children[key] = _Count() if self.buckets is None else _Buckets(self.buckets)
        return child

    def describe(self) -> Iterable[Metric]:
        return [self._empty()]

    def _empty(self) -> CounterMetricFamily | HistogramMetricFamily:
        if self._les is None:
            return CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        children = list(self._children.items())
        if self._les is None:
            counter = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
            for key, child in children:
                counter.add_metric(key, child.value)
            yield counter
            return
        histogram = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, child in children:
            running = 0.0
            buckets = []
            for le, count in zip(self._les, child.counts, strict=True):
                running += count
                buckets.append((le, running))
            histogram.add_metric(key, buckets, child.sum)
        yield histogram


def _counter(name: str, doc: str, labelnames: Iterable[str]) -> _Family:
    return _Family(name, doc, labelnames)


def _histogram(name: str, doc: str, labelnames: Iterable[str], buckets: tuple[float, ...]) -> _Family:
    return _Family(name, doc, labelnames, tuple(float(b) for b in buckets))


class _FleetCollector(Collector):
    """Fleet gauges computed from the snapshot at scrape time."""

    def __init__(self, source: Callable[[], FleetSnapshot | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._source()
        up = GaugeMetricFamily("cortex_node_up", "1 when the node answers polls and takes requests", labels=["node"])
        total = GaugeMetricFamily("cortex_node_vram_total_bytes", "GPU memory of the node", labels=["node"])
        used = GaugeMetricFamily("cortex_node_vram_used_bytes", "GPU memory in use on the node", labels=["node"])
        cycles = GaugeMetricFamily(
            "cortex_node_eviction_cycles", "Eviction cycles since the node's last defrag", labels=["node"]
        )
        loaded = GaugeMetricFamily(
            "cortex_model_loaded", "1 when the model is loaded on the node", labels=["model", "node"]
        )
        pinned = GaugeMetricFamily(
            "cortex_model_pinned", "1 when the model is pinned on the node", labels=["model", "node"]
        )
        inflight = GaugeMetricFamily(
            "cortex_requests_in_flight", "Requests being served, per model and node", labels=["model", "node"]
        )
        queue = GaugeMetricFamily("cortex_queue_depth", "Requests waiting for a model to load", labels=["model"])
        agent_up = GaugeMetricFamily(
            "cortex_agent_up", "1 while the node's agent reports (fresh), 0 once stale", labels=["node"]
        )
        gpu_total = GaugeMetricFamily(
            "cortex_gpu_memory_total_bytes",
            "GPU memory per device, as the node's agent reads it (NVML)",
            labels=["node", "gpu", "name"],
        )
        gpu_used = GaugeMetricFamily(
            "cortex_gpu_memory_used_bytes", "GPU memory in use per device (NVML)", labels=["node", "gpu", "name"]
        )
        gpu_util = GaugeMetricFamily(
            "cortex_gpu_utilization_ratio", "GPU utilisation per device, 0-1 (NVML)", labels=["node", "gpu", "name"]
        )
        families = (up, total, used, cycles, loaded, pinned, inflight, queue, agent_up, gpu_total, gpu_used, gpu_util)
        if snap is not None:
            for node in snap.nodes:
                up.add_metric([node.name], 1.0 if node.status.value in ("up", "draining") else 0.0)
                total.add_metric([node.name], float(node.vram_total_mb * _MIB))
                used.add_metric([node.name], float(node.vram_used_mb * _MIB))
                cycles.add_metric([node.name], float(node.cycles))
                if node.agent is not None:
                    agent_up.add_metric([node.name], 1.0 if node.agent.fresh else 0.0)
                    for gpu in node.agent.gpus if node.agent.fresh else ():
                        labels = [node.name, str(gpu.index), gpu.name]
                        gpu_total.add_metric(labels, float(gpu.total_mb * _MIB))
                        gpu_used.add_metric(labels, float(gpu.used_mb * _MIB))
                        if gpu.util_pct is not None:
                            gpu_util.add_metric(labels, gpu.util_pct / 100.0)
                for slot in node.slots:
                    loaded.add_metric([slot.model_id, node.name], 1.0 if slot.state is SlotState.LOADED else 0.0)
                    pinned.add_metric([slot.model_id, node.name], 1.0 if slot.pinned else 0.0)
                    inflight.add_metric([slot.model_id, node.name], float(slot.in_flight))
            for model in snap.models:
                queue.add_metric([model.id], float(model.queued))
        yield from families


class _Children:
    """The labelled children one (model, node, api, status) records into.

    ``labels()`` costs more than an increment, so they are looked up once. Those that only some requests
    touch (TTFT, tokens, decode speed) are created on first use, so an error that never reached a node
    adds no all-zero token or TTFT series.
    """

    __slots__ = ("_completion", "_decode", "_key", "_metrics", "_prompt", "_ttft", "duration", "overhead", "requests")

    def __init__(self, metrics: CortexMetrics, model: str, node: str, api: str, status: int) -> None:
        self._metrics = metrics
        self._key = (model, node, api)
        self.requests: _Count = metrics.requests.labels(model, node, api, str(status))
        self.duration: _Buckets = metrics.duration.labels(model, node, api)
        self.overhead: _Buckets = metrics.overhead.labels(api)
        self._ttft: _Buckets | None = None
        self._prompt: _Count | None = None
        self._completion: _Count | None = None
        self._decode: _Buckets | None = None

    def ttft(self) -> _Buckets:
        if self._ttft is None:
            self._ttft = self._metrics.ttft.labels(*self._key)
        return self._ttft

    def prompt(self) -> _Count:
        if self._prompt is None:
            self._prompt = self._metrics.prompt_tokens.labels(*self._key)
        return self._prompt

    def completion(self) -> _Count:
        if self._completion is None:
            self._completion = self._metrics.completion_tokens.labels(*self._key)
        return self._completion

    def decode(self) -> _Buckets:
        if self._decode is None:
            self._decode = self._metrics.decode.labels(self._key[0], self._key[1])
        return self._decode


class CortexMetrics:
    """The engine's registry, its metrics, the console's windows and the recent-request ring."""

    def __init__(
        self,
        *,
        window_s: int = 60,
        ring: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.window_s = window_s
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = _counter(
            "cortex_requests_total", "Client requests by outcome", ["model", "node", "api", "status"]
        )
        self.duration = _histogram(
            "cortex_request_duration_seconds",
            "End-to-end request latency seen by cortex",
            ["model", "node", "api"],
            buckets=_LATENCY_BUCKETS,
        )
        self.ttft = _histogram(
            "cortex_time_to_first_token_seconds",
            "Request accepted to first content byte forwarded; streaming requests only (a non-streaming answer"
            " arrives whole, so its time is in cortex_request_duration_seconds)",
            ["model", "node", "api"],
            buckets=_TTFT_BUCKETS,
        )
        self.prompt_tokens = _counter(
            "cortex_prompt_tokens_total", "Prompt tokens (from the node's usage)", ["model", "node", "api"]
        )
        self.completion_tokens = _counter(
            "cortex_completion_tokens_total",
            "Completion tokens (from the node's usage)",
            ["model", "node", "api"],
        )
        self.decode = _histogram(
            "cortex_generation_tokens_per_second",
            "Decode speed per request",
            ["model", "node"],
            buckets=_TPS_BUCKETS,
        )
        self.queue_wait = _histogram(
            "cortex_queue_wait_seconds",
            "Time a request waited for its model to be placed and loaded",
            ["model"],
            buckets=_LATENCY_BUCKETS,
        )
        self.overhead = _histogram(
            "cortex_proxy_overhead_seconds",
            "Time spent in cortex itself, queue and upstream excluded",
            ["api"],
            buckets=_OVERHEAD_BUCKETS,
        )
        self.loads = _counter("cortex_model_loads_total", "Model loads cortex asked for", ["model", "node", "result"])
        self.load_duration = _histogram(
            "cortex_model_load_duration_seconds",
            "Time a node took to load a model",
            ["model", "node"],
            buckets=_LOAD_BUCKETS,
        )
        self.unloads = _counter("cortex_model_unloads_total", "Model unloads by reason", ["model", "node", "reason"])
        self.cycles = _counter("cortex_eviction_cycles_total", "Eviction rounds per node", ["node"])
        self.restarts = _counter("cortex_node_restarts_total", "Node server restarts through the agent", ["node"])
        self._fleet_source: Callable[[], FleetSnapshot | None] = lambda: None
        for metric in (
            self.requests,
            self.duration,
            self.ttft,
            self.prompt_tokens,
            self.completion_tokens,
            self.decode,
            self.queue_wait,
            self.overhead,
            self.loads,
            self.load_duration,
            self.unloads,
            self.cycles,
            self.restarts,
        ):
            self.registry.register(metric)
        self.registry.register(_FleetCollector(lambda: self._fleet_source()))
        self._children: dict[tuple[str, str, str, int], _Children] = {}
        self._windows: dict[tuple[str, str], SlidingWindow] = {}
        self._total = SlidingWindow(window_s)
        self._ring: deque[RequestRecord] = deque(maxlen=ring)
        self._ring_view: tuple[RequestRecord, ...] | None = ()
        self.requests_total = 0
        self.errors_total = 0

    def bind_fleet(self, source: Callable[[], FleetSnapshot | None]) -> None:
        """Where the fleet gauges read the snapshot from."""
        self._fleet_source = source

    def _labelled(self, model: str, node: str, api: str, status: int) -> _Children:
        key = (model, node, api, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(self, model, node, api, status)
        return children

    def _window(self, kind: str, name: str) -> SlidingWindow:
        key = (kind, name)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SlidingWindow(self.window_s)
        return window

    def request_done(self, o: RequestOutcome) -> RequestRecord:
        """Record one finished request everywhere it counts; returns its log record."""
        children = self._labelled(o.model, o.node, o.api, o.status)
        latency = o.ended - o.started
        # Only a stream has a first token to time: a non-streaming answer's first byte comes with its last,
        # and counting it would pass total latency off as TTFT (in the histogram, p50 and sparklines).
        ttft = o.first_byte - o.started if o.stream and o.first_byte is not None else None
        prompt, completion, decode = usage_figures(o)
        children.requests.inc()
        children.duration.observe(latency)
        children.overhead.observe(max(0.0, latency - o.queue_s - o.upstream_s))
        if ttft is not None:
            children.ttft().observe(ttft)
        if prompt:
            children.prompt().inc(prompt)
        if completion:
            children.completion().inc(completion)
        if decode is not None:
            children.decode().observe(decode)
        now = self.clock()
        error = o.status >= 400
        self.requests_total += 1
        self.errors_total += error
        self._total.add(now, error=error, tokens=completion, ttft=ttft, decode=decode)
        self._window("model", o.model).add(now, error=error, tokens=completion, ttft=ttft, decode=decode)
        if o.node:
            self._window("node", o.node).add(now, error=error, tokens=completion, ttft=ttft, decode=decode)
        # positional: keywords cost as much again on the request path
        record = RequestRecord(
            now, o.api, o.model, o.node, o.status, ttft, decode, prompt, completion, latency, o.queue_s, o.stream
        )
        self._ring.append(record)
        self._ring_view = None
        return record

    def queue_waited(self, model: str, seconds: float) -> None:
        """A request left the load queue after ``seconds``."""
        self.queue_wait.labels(model).observe(seconds)

    def load_done(self, model: str, node: str, result: str, seconds: float | None) -> None:
        """A load cortex asked for ended (`ok`, `failed`, `timeout`; anything else counts as `failed`)."""
        if result not in LOAD_RESULTS:
            result = "failed"
        self.loads.labels(model, node, result).inc()
        if seconds is not None and result == "ok":
            self.load_duration.labels(model, node).observe(seconds)

    def unloaded(self, model: str, node: str, reason: str) -> None:
        """Cortex unloaded a model (`evict`, `ttl`, `manual`, `defrag`; `reconcile` and others count as `evict`)."""
        self.unloads.labels(model, node, reason if reason in UNLOAD_REASONS else "evict").inc()

    def cycle(self, node: str) -> None:
        """One eviction round on a node."""
        self.cycles.labels(node).inc()

    def restarted(self, node: str) -> None:
        """A node's server was restarted through its agent."""
        self.restarts.labels(node).inc()

    # -- console views ------------------------------------------------------------------------------

    def model_stats(self, model: str) -> WindowStats:
        """Window figures for a model."""
        window = self._windows.get(("model", model))
        return window.stats(self.clock()) if window else WindowStats()

    def node_stats(self, node: str) -> WindowStats:
        """Window figures for a node."""
        window = self._windows.get(("node", node))
        return window.stats(self.clock()) if window else WindowStats()

    def totals(self) -> FleetTotals:
        """Gateway-wide figures (in-flight and queue filled in by the fleet)."""
        stats = self._total.stats(self.clock())
        return FleetTotals(req_s=stats.req_s, tok_s=stats.tok_s, requests=self.requests_total, errors=self.errors_total)

    def recent(self) -> tuple[RequestRecord, ...]:
        """Recent requests, newest first."""
        if self._ring_view is None:
            self._ring_view = tuple(reversed(self._ring))
        return self._ring_view

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
