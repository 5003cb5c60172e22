"""Prometheus metrics of one server (its own registry, so that several apps in one process,
as in the tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("twotower_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("twotower_queue_depth", "requests waiting for a batch", registry=r)
        self.running = Gauge("twotower_running_rows", "rows of the batch being decoded", registry=r)
        self.rows_ended = Counter("twotower_rows_ended", "decoded rows by how they ended (stop, length, "
                                  "cancelled: the client left, timeout)", ["reason"], registry=r)
        self.batch_size = Histogram("twotower_batch_size", "rows of the batch at each step boundary", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.rows_joined = Counter("twotower_rows_joined", "requests that joined a batch already running",
                                   registry=r)
        self.generated_tokens = Counter("twotower_generated_tokens", "tokens generated", registry=r)
        self.nfe = Counter("twotower_nfe", "forward passes per row (denoiser steps; AR: one a token)", registry=r)
        self.tokens_per_nfe = Histogram("twotower_tokens_per_nfe", "a request's tokens per forward pass", registry=r,
                                        buckets=(0.5, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8, 16))
        self.ttft = Histogram("twotower_time_to_first_token_seconds", "request received to its first token",
                              registry=r, buckets=LATENCY_BUCKETS)
        self.token_latency = Histogram("twotower_inter_token_latency_seconds", "time per streamed token after the "
                                       "first (a run of k tokens arriving together counts k of 1/k)", registry=r,
                                       buckets=LATENCY_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)
