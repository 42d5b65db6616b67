"""Prometheus metrics of the routing app (exposed by the ingress at ``GET /metrics``).

Each metric lives in a registry owned by the ingress replica, so one scrape of a replica
sees its own counts; with several ingress replicas, scrape each (or use Ray's metrics
export, which Serve's built-in request metrics already go through).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry
    requests: Counter
    decisions: Counter
    fallbacks: Counter
    errors: Counter
    overhead: Histogram
    target_latency: Histogram

    @classmethod
    def create(cls) -> "RouterMetrics":
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("prefill_router_requests", "HTTP requests by endpoint and status code.",
                             ["endpoint", "status"], registry=reg),
            decisions=Counter("prefill_router_decisions", "Routing decisions by chosen target.", ["target"],
                              registry=reg),
            fallbacks=Counter("prefill_router_fallbacks", "Requests moved to another target after a failure.",
                              ["failed_target", "next_target"], registry=reg),
            errors=Counter("prefill_router_errors", "Errors by kind.", ["kind"], registry=reg),
            overhead=Histogram("prefill_router_overhead_seconds", "Encoder + router head time per decision.",
                               buckets=LATENCY_BUCKETS, registry=reg),
            target_latency=Histogram("prefill_router_target_latency_seconds", "Target answer time.", ["target"],
                                     buckets=LATENCY_BUCKETS, registry=reg),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
