"""The server's metrics, in one place so an exporter (issue: hardening and operability) can expose them as they are.

A registry per server instance, not prometheus_client's global one: tests start many servers in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Stage latencies run from tens of microseconds (fusion) to tens of milliseconds (encode under load).
STAGE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("rag_requests", "RPCs by method and status code", ["method", "code"],
                                registry=self.registry)
        self.request_seconds = Histogram("rag_request_seconds", "Server time per RPC", ["method"],
                                         buckets=STAGE_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("rag_stage_seconds", "Time per pipeline stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("rag_requests_in_flight", "Search requests admitted and not finished",
                               registry=self.registry)
        self.shed = Counter("rag_requests_shed", "Requests refused by admission control", registry=self.registry)

    def observe_stages(self, stage_us: dict[str, int]) -> None:
        for stage, us in stage_us.items():
            self.stage_seconds.labels(stage).observe(us / 1e6)
