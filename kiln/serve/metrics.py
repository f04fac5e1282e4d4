"""Prometheus metrics under the names dashboards already know (vLLM's set, with a ``kiln:`` prefix).

Engine-side numbers (running / waiting requests, KV usage, prefix-cache and token counters,
preemptions) are read from ``LLM.stats()`` at scrape time, so they can never drift from the engine.
Per-request latencies are observed by the server when a request ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.serve.engine_client import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    """Reads the engine's counters and gauges when Prometheus scrapes."""

    def __init__(self, llm: Any, model_name: str, server: Any) -> None:
        self._llm = llm
        self._model = model_name
        self._server = server  # EngineClient: requests the server holds

    def collect(self) -> Iterator[Metric]:
        s = self._llm.stats()
        labels = ["model_name"]
        values = [self._model]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"kiln:{name}", doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"kiln:{name}", doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("num_requests_running", "Requests in the engine's running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.", s.kv_usage)
        yield gauge(
            "num_requests_in_server", "Requests the HTTP server is handling.", self._server.num_in_flight
        )
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Preemptions of running requests.", s.num_preemptions)
        yield counter(
            "prompt_tokens", "Prompt tokens computed (prefix hits excluded).", s.prompt_tokens_total
        )
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield gauge(
            "engine_alive", "1 while the engine loop runs, 0 once it is dead.", float(self._llm.is_alive())
        )


class ServerMetrics:
    def __init__(self, llm: Any, model_name: str, client: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(llm, model_name, client))
        self._model = model_name
        lab = ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"kiln:{name}", doc, lab, buckets=buckets, registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = hist(
            "time_per_output_token_seconds", "Mean time per output token after the first.", _TPOT_BUCKETS
        )
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS)
        self.queue = hist(
            "request_queue_time_seconds", "Time a request waited before it was scheduled.", _E2E_BUCKETS
        )
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS)
        self.success = Counter(
            "kiln:request_success",
            "Finished sequences by finish reason (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )

    def observe(self, rec: RequestRecord) -> None:
        if rec.finish_reasons == ["error"]:
            return  # rejected or failed before it ran: not a served request
        m = self._model
        self.e2e.labels(m).observe(rec.e2e)
        if rec.ttft is not None:
            self.ttft.labels(m).observe(rec.ttft)
        if rec.tpot is not None:
            self.tpot.labels(m).observe(rec.tpot)
        if rec.queue_time is not None:
            self.queue.labels(m).observe(rec.queue_time)
        self.prompt_len.labels(m).observe(rec.prompt_tokens)
        self.gen_len.labels(m).observe(rec.completion_tokens)
        for reason in rec.finish_reasons:
            self.success.labels(m, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
