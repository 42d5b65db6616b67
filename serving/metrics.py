"""Prometheus metrics of the routing app (exposed by the ingress at ``GET /metrics``).

Each metric lives in a registry owned by the ingress replica, so one scrape of a replica
sees its own counts; with several ingress replicas, scrape each (or use Ray's metrics
export, which Serve's built-in request metrics already go through). The prefix-cache
counters add up what each Encoder replica reports with every encoded prompt, so they
cover every Encoder replica the ingress called. ``request_duration_seconds`` is the
end-to-end time a client sees (less the network); ``queue_seconds`` is the part of it
before the target started work, which shows queueing that the target latency does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from serving.messages import PrefixUse

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class RouterMetrics:
    registry: CollectorRegistry
    requests: Counter
    decisions: Counter
    novel: Counter
    fallbacks: Counter
    errors: Counter
    overhead: Histogram
    target_latency: Histogram
    duration: Histogram
    queue: Histogram
    log_dropped: Counter
    prefix: dict[str, Counter]

    @classmethod
    def create(cls) -> "RouterMetrics":
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("prefill_router_requests", "HTTP requests by endpoint and status code.",
                             ["endpoint", "status"], registry=reg),
            decisions=Counter("prefill_router_decisions", "Routing decisions by chosen target.", ["target"],
                              registry=reg),
            novel=Counter("prefill_router_novel_decisions", "Decisions the novelty gate made by the targets' mean "
                          "scores (prompts unlike the router's training ones; shared.novelty): a rising share of "
                          "prefill_router_decisions says the traffic has drifted from what the router learnt.",
                          registry=reg),
            fallbacks=Counter("prefill_router_fallbacks", "Requests moved to another target after a failure.",
                              ["failed_target", "next_target"], registry=reg),
            errors=Counter("prefill_router_errors", "Errors by kind.", ["kind"], registry=reg),
            overhead=Histogram("prefill_router_overhead_seconds", "Encoder + router head time per decision.",
                               buckets=LATENCY_BUCKETS, registry=reg),
            target_latency=Histogram("prefill_router_target_latency_seconds", "Target answer time.", ["target"],
                                     buckets=LATENCY_BUCKETS, registry=reg),
            duration=Histogram("prefill_router_request_duration_seconds", "End-to-end time of a request in the "
                               "ingress, from receiving it to its response starting (a stream: its first token), by "
                               "endpoint and status code.", ["endpoint", "status"], buckets=LATENCY_BUCKETS,
                               registry=reg),
            queue=Histogram("prefill_router_queue_seconds", "Chat completions: from the ingress receiving the "
                            "request to the answering target starting work on it (end-to-end time until the answer "
                            "minus the target's own reported work time): routing, waiting for a replica and "
                            "waiting inside it for the model.", ["target"], buckets=LATENCY_BUCKETS, registry=reg),
            log_dropped=Counter("prefill_router_log_dropped", "Decision-log records dropped (never written), by "
                                 "kind (decisions, feedback) and reason (queue_full, write_failed).", ["kind", "reason"],
                                 registry=reg),
            prefix={name: Counter(f"prefill_router_prefix_cache_{name}", help, registry=reg) for name, help in (
                ("hits", "Prompts whose prefix KV came from the Encoder's prefix cache."),
                ("misses", "Prompts the prefix cache had no prefix for (with the cache on)."),
                ("evictions", "Prefix-cache entries evicted to stay under its memory bound."),
                ("tokens_saved", "Prompt tokens the encoder did not compute thanks to a cached prefix."))},
        )

    def count_prefix(self, use: PrefixUse | None) -> None:
        """Add one prompt's prefix-cache outcome (None: the cache is off, nothing to count)."""
        if use is None:
            return
        self.prefix["hits" if use.hit else "misses"].inc()
        self.prefix["evictions"].inc(use.evicted)
        self.prefix["tokens_saved"].inc(use.tokens_saved)

    def observe_queue(self, target: str, received: float | None, now: float, work_s: float | None) -> None:
        """One answered chat request's queue time (nothing when the target reports no work time)."""
        if received is not None and work_s is not None:
            self.queue.labels(target).observe(max(0.0, now - received - work_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
