"""Prometheus metrics of one server (its own CollectorRegistry: two apps in one process never mix)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """Every figure /metrics shows; labels are model name and version (or the error's kind)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("genflow_serve_requests", "Generate requests answered, by outcome",
                                ["model", "version", "status"], registry=r)
        self.errors = Counter("genflow_serve_request_errors", "Requests refused or failed, by kind "
                              "(invalid, not_found, queue_full, timeout, failed)", ["model", "kind"], registry=r)
        self.latency = Histogram("genflow_serve_request_seconds", "Generate latency, queue wait included",
                                 ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("genflow_serve_queue_depth", "Requests admitted and not yet answered",
                                 ["model"], registry=r)
        self.batch_size = Histogram("genflow_serve_batch_size", "Requests run in one engine call",
                                    ["model"], buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.swaps = Counter("genflow_serve_model_swaps", "Versions swapped in after an alias move",
                             ["model", "alias"], registry=r)
        self.smoke_failures = Counter("genflow_serve_smoke_check_failures",
                                      "New versions refused by the smoke check (the old one kept serving)",
                                      ["model", "alias"], registry=r)
        self.served_version = Gauge("genflow_serve_served_version", "Version served under the alias",
                                    ["model", "alias"], registry=r)
        self.registry_up = Gauge("genflow_serve_registry_up", "1 when the last registry poll succeeded",
                                 registry=r)
        self.polls = Counter("genflow_serve_registry_polls", "Registry polls, by outcome", ["outcome"],
                             registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
