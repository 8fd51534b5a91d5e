"""`GET /metrics`: what the service did, in Prometheus' text format (prometheus_client, a registry per app).

Requests by endpoint and status, and their latency; texts classified, early exits among them (and their share),
texts refused by error kind, texts dropped because their client went away; the queue (texts waiting, in flight,
the limit) and the streams open. A rate over time is Prometheus' to take, e.g.
`rate(edge2dexit_early_exits_total[5m]) / rate(edge2dexit_documents_total[5m])`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..classifier import Result
from ..errors import Edge2DExitError
from .worker import Worker

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, worker: Worker):
        self.classified = self.early_exits = 0  # for the ratio (a Counter's value is not public)
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("edge2dexit_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram("edge2dexit_request_seconds", "Time from a request to its answer, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.documents = Counter("edge2dexit_documents", "Texts classified (batch and streams)", registry=registry)
        self.early = Counter("edge2dexit_early_exits", "Texts whose policy decided before a full read",
                             registry=registry)
        self.errors = Counter("edge2dexit_errors", "Texts refused, by error kind", ["kind"], registry=registry)
        self.cancelled = Counter("edge2dexit_cancelled", "Requests whose client went away before the answer",
                                 registry=registry)
        self.streams = Counter("edge2dexit_stream_sessions", "Streams opened", registry=registry)
        Gauge("edge2dexit_early_exit_ratio", "Early exits / texts classified, since the start",
              registry=registry).set_function(self._early_ratio)
        Gauge("edge2dexit_queue_waiting", "Texts waiting for a place in the batch",
              registry=registry).set_function(lambda: worker.waiting)
        Gauge("edge2dexit_queue_in_flight", "Texts being read", registry=registry).set_function(
            lambda: worker.in_flight)
        Gauge("edge2dexit_queue_limit", "Texts accepted and not yet answered, at most",
              registry=registry).set(worker.queue)
        Gauge("edge2dexit_streams_open", "Streams open", registry=registry).set_function(lambda: worker.streams_open)

    def outcome(self, outcome: Result | Edge2DExitError) -> None:
        """Count one text's outcome."""
        if isinstance(outcome, Result):
            self.documents.inc()
            self.classified += 1
            if outcome.early:
                self.early.inc()
                self.early_exits += 1
        else:
            self.errors.labels(type(outcome).__name__).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _early_ratio(self) -> float:
        return self.early_exits / self.classified if self.classified else 0.0
