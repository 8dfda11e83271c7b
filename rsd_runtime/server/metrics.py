"""Prometheus metrics of one instance, under vLLM's metric names with our prefix ``rsd:``.

Gauges and counters are read from the engine when ``/metrics`` is scraped (nothing is
counted twice). Latency histograms are observed as requests finish, each on both clocks:
the label ``clock`` is ``wall`` or ``emulated``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "rsd:"
# Seconds. Wall latencies of the tiny model are milliseconds, emulated ones microseconds;
# the buckets cover both (vLLM's buckets start at 1 ms).
BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05,
           0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CLOCKS = (("wall", ""), ("emulated", "emu_"))


class ServerMetrics:
    def __init__(self, llm, model_name: str):
        self.llm = llm
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm, model_name))
        labels = ["model_name", "clock"]

        def hist(name, doc):
            return Histogram(PREFIX + name, doc, labels, registry=self.registry, buckets=BUCKETS)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("request_queue_time_seconds", "Time a request waited before it first ran")
        self.tpot = hist("request_time_per_output_token_seconds", "Mean time per output token of a request")
        self._children = {}

    def _child(self, hist, clock):
        key = (id(hist), clock)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = hist.labels(self.model_name, clock)
        return child

    def observe_finished(self, metrics: dict) -> None:
        """A finished request's timings (RequestOutput.metrics)."""
        for clock, prefix in CLOCKS:
            for hist, key in ((self.ttft, "ttft_s"), (self.e2e, "latency_s"), (self.queue, "queue_s"),
                              (self.tpot, "tpot_s")):
                value = metrics.get(prefix + key)
                if value is not None:
                    self._child(hist, clock).observe(value)

    def observe_itl(self, wall_s: float, emu_s: float) -> None:
        self._child(self.itl, "wall").observe(wall_s)
        self._child(self.itl, "emulated").observe(emu_s)


class _EngineCollector:
    """Read at scrape time from the engine; the engine thread writes these values, we only read."""

    def __init__(self, llm, model_name: str):
        self.llm, self.model_name = llm, model_name

    def collect(self):
        engine = self.llm.engine
        stats = engine.stats
        labels = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("num_requests_running", "Requests on the cards in this step", engine.num_running())
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled",
                    engine.num_waiting() + self.llm.num_inbox())
        yield gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use (1 means all)",
                    engine.kv_usage())
        yield counter("prompt_tokens", "Prompt tokens run on the cards (prefill)", stats.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated", stats.generation_tokens)
        yield counter("engine_steps", "Steps run on the cards (a step: one plan, every running request)", stats.steps)
        yield counter("request_success", "Requests that finished (any reason but abort and error)", stats.finished)
        yield counter("request_aborted", "Requests aborted (client gone)", stats.aborted)
        yield counter("request_errored", "Requests ended by a card failure", stats.errored)
        yield counter("card_restarts", "Cards restarted after they died", stats.cards_restarted)
        yield counter("engine_recoveries", "Times the engine put its cards back in step after a failure",
                      stats.recoveries)
        control = getattr(engine.cluster, "control", None)
        if control is not None and hasattr(control, "num_malformed"):
            yield counter("control_malformed_messages", "Malformed control-plane messages dropped",
                          control.num_malformed)
