"""Prometheus metrics of the server, in a registry of its own (one per app).

Engine state (KV blocks, queues, cumulative counters) comes from ``LLMEngine.get_metrics()``,
read on the engine thread when ``/metrics`` is scraped and exposed by a custom collector, so
gauges are never stale and never race a step.  Latencies are measured by the server per
request, as a client sees them: time to first token from the moment the request arrived, and
time per output token after that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.outputs import RequestOutput

PREFIX = "pagedattn_"

# (metric name without prefix, get_metrics() key, help)
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("kv_blocks_used", "kv_blocks_used", "KV cache blocks held by live sequences"),
    ("kv_blocks_total", "kv_blocks_total", "KV cache blocks in the device pool"),
    ("kv_blocks_cached", "kv_blocks_cached", "Free KV blocks still holding reusable prefix-cache content"),
    ("kv_blocks_free", "kv_blocks_free", "KV cache blocks on the free list"),
    ("cpu_blocks_used", "cpu_blocks_used", "CPU swap blocks in use"),
    ("cpu_blocks_total", "cpu_blocks_total", "CPU swap blocks in the pool"),
    ("prefix_cache_hit_rate", "prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens"),
    ("requests_running", "num_requests_running", "Requests in the running batch"),
    ("requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled"),
    ("requests_swapped", "num_requests_swapped", "Requests preempted to the CPU swap pool"),
)
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("preemptions", "num_preemptions", "Preemptions (swap or recompute)"),
    ("generation_tokens", "num_generated_tokens", "Generated tokens"),
    ("prompt_tokens", "num_prompt_tokens", "Prompt tokens of accepted requests"),
    ("engine_steps", "num_steps", "Engine steps"),
    ("prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
    ("prefix_cache_query_tokens", "prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache"),
)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineCollector(Collector):
    """Exposes the last engine snapshot handed to :meth:`update` as gauges and counters."""

    def __init__(self) -> None:
        self._snapshot: Mapping[str, float | int] = {}

    def update(self, snapshot: Mapping[str, float | int]) -> None:
        self._snapshot = dict(snapshot)

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._snapshot)

    @staticmethod
    def _families(snap: Mapping[str, float | int]) -> Iterator[Metric]:
        for name, key, doc in _GAUGES:
            g = GaugeMetricFamily(PREFIX + name, doc)
            if key in snap:
                g.add_metric([], float(snap[key]))
            yield g
        for name, key, doc in _COUNTERS:
            c = CounterMetricFamily(PREFIX + name, doc)  # exposed as <name>_total
            if key in snap:
                c.add_metric([], float(snap[key]))
            yield c


class RequestTimer:
    """Latency bookkeeping of one engine request, fed with its outputs as the server asks for
    them: DELTA ones (a stream: each holds only its new tokens) or one final output (a
    response), so a choice's tokens are the sum over the outputs it appears in."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._metrics = metrics
        self.arrival = arrival
        self.first_token: float | None = None
        self._tokens: dict[int, int] = {}  # output tokens per choice so far
        self._finished: set[int] = set()  # choices counted as finished

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        for c in out.outputs:
            self._tokens[c.index] = self._tokens.get(c.index, 0) + len(c.token_ids)
            if c.finish_reason is not None and c.index not in self._finished:  # once per choice
                self._finished.add(c.index)
                self._metrics.finished.labels(finish_reason=c.finish_reason).inc()
        if self.first_token is None and any(c.token_ids for c in out.outputs):
            # An output that is also the last (a response made once, or max_tokens=1): the
            # engine's time of the first token, not the end's.
            self.first_token = out.metrics.get("first_token_time", now) if out.finished else now
            self._metrics.ttft.observe(self.first_token - self.arrival)
        if out.finished:
            self._finish(now)

    def _finish(self, now: float) -> None:
        m = self._metrics
        m.e2e.observe(now - self.arrival)
        longest = max(self._tokens.values(), default=0)
        if self.first_token is not None and longest > 1:
            m.tpot.observe((now - self.first_token) / (longest - 1))


class ServerMetrics:
    """The collectors of one server app and their private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = EngineCollector()
        self.registry.register(self.engine)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from request arrival to its last token",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter(PREFIX + "request_completions", "Finished completions (choices) by finish reason",
                                ["finish_reason"], registry=self.registry)
        self.http_errors = Counter(PREFIX + "request_errors", "Requests answered with an error, by HTTP status",
                                   ["status"], registry=self.registry)
        # Cut before a request reached the app: beyond the connection cap, too slow, not HTTP.
        self.connections_cut = Counter(PREFIX + "connections_cut", "Connections refused or closed by the server's "
                                       "guards, by reason", ["reason"], registry=self.registry)

    def timer(self, arrival: float | None = None) -> RequestTimer:
        return RequestTimer(self, time.monotonic() if arrival is None else arrival)

    def render(self, engine_snapshot: Mapping[str, float | int]) -> bytes:
        self.engine.update(engine_snapshot)
        return generate_latest(self.registry)
