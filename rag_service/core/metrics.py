"""The server's metrics, in one place; `rag-serve --metrics-port N` exposes them as Prometheus text at /metrics.

A registry per server instance, not prometheus_client's global one: tests start many servers in one process.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# Stage latencies run from tens of microseconds (fusion) to tens of milliseconds (encode under load).
# Fused scores: weighted fusion's are in [0, 1]; reciprocal rank fusion's below 1 / (rrf_k + 1).
SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
OVERLAP_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STAGE_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5)


class StageHistogram(Collector):
    """A histogram per pipeline stage, exposed as prometheus_client's labelled Histogram would expose it
    (`<name>_bucket{stage, le}`, `_count`, `_sum`), but fed a whole request's stages under one lock: the client's
    Histogram takes two locks per observation, ~17 µs for a request's dozen stages warm, on the event loop."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = [float(b) for b in buckets]
        self._lock = threading.Lock()
        # stage -> [per-bucket counts (the last one past every bound), sum of seconds, when first observed]
        self._stages: dict[str, list] = {}
        registry.register(self)

    def observe_us(self, stage_us: Mapping[str, int]) -> None:
        bounds, stages = self._bounds, self._stages
        with self._lock:
            for stage, us in stage_us.items():
                seconds = us / 1e6
                entry = stages.get(stage)
                if entry is None:
                    entry = stages[stage] = [[0] * (len(bounds) + 1), 0.0, time.time()]
                entry[0][bisect.bisect_left(bounds, seconds)] += 1  # the first bound >= seconds: Prometheus's le
                entry[1] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["stage"])
        with self._lock:
            stages = [(stage, list(counts), total, created) for stage, (counts, total, created) in self._stages.items()]
        for stage, counts, total, created in stages:
            cumulative, buckets = 0, []
            for bound, count in zip([*self._bounds, float("inf")], counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([stage], buckets, total)
            family.samples.append(Sample(f"{self.name}_created", {"stage": stage}, created))
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("rag_requests", "RPCs by method and status code", ["method", "code"],
                                registry=self.registry)
        self.request_seconds = Histogram("rag_request_seconds", "Server time per RPC", ["method"],
                                         buckets=STAGE_BUCKETS, registry=self.registry)
        self.stage_seconds = StageHistogram("rag_stage_seconds", "Time per pipeline stage", STAGE_BUCKETS,
                                            self.registry)
        self.in_flight = Gauge("rag_requests_in_flight", "Search requests admitted and not finished",
                               registry=self.registry)
        self.shed = Counter("rag_requests_shed", "Requests refused by admission control (in-flight or queue bound)",
                            registry=self.registry)
        self.refusals_held = Counter("rag_refusals_held", "Refusals for load answered only once their pushback ended, "
                                     "to callers that came back before the pushback they were given",
                                     registry=self.registry)
        self.queued = Gauge("rag_requests_queued", "Admitted requests waiting for a pipeline thread",
                            registry=self.registry)
        self.threads_busy = Gauge("rag_pipeline_threads_busy", "Pipeline threads running a job (a search's thread "
                                  "counts until the search is done, not while its reply is sent)",
                                  registry=self.registry)
        self.full_share = Gauge("rag_adaptive_full_share", "Share of budgeted requests the brownout dimmer lets take "
                                "the full pipeline (the rest take the lexical route)", registry=self.registry)
        self.deadline_stops = Counter("rag_deadline_stops", "Requests whose pipeline work was stopped or dropped "
                                      "from the queue because their deadline passed or the caller went away",
                                      registry=self.registry)
        # A SearchBatch call counts once in rag_requests; its queries' own statuses are counted here.
        self.batch_queries = Counter("rag_batch_queries", "Queries answered inside SearchBatch calls, by status code",
                                     ["code"], registry=self.registry)
        self.index_info = Info("rag_index", "The index being served", registry=self.registry)
        self.index_documents = Gauge("rag_index_documents", "Documents in the served index", registry=self.registry)
        self.index_chunks = Gauge("rag_index_chunks", "Chunks in the served index", registry=self.registry)
        self.index_loaded = Gauge("rag_index_loaded_timestamp_seconds", "When the served index was swapped in",
                                  registry=self.registry)
        self.reloads = Counter("rag_index_reloads", "Index reload attempts by result", ["result"],
                               registry=self.registry)
        self.build_info = Info("rag_build", "rag-service version and native backends", registry=self.registry)
        self.draining = Gauge("rag_draining", "1 while the server drains for shutdown", registry=self.registry)
        self.gc_pause = Histogram("rag_gc_pause_seconds", "CPython's collections in this process, by generation "
                                  "(each holds every thread until it ends)", ["generation"], buckets=STAGE_BUCKETS,
                                  registry=self.registry)
        self._add_cache_metrics()
        self._add_quality_metrics()
        self.quality_floor: float | None = None
        self._quality: tuple | None = None

    def _add_quality_metrics(self) -> None:
        """Signals that move when retrieval gets worse, without judged queries (bench/README.md, "Query API"), per
        index, over the searches the pipeline computed (cache hits repeat an answer already counted)."""
        r = self.registry
        self.quality_top1 = Histogram("rag_quality_top1_fused_score", "Fused score of the best candidate",
                                      ["index"], buckets=SCORE_BUCKETS, registry=r)
        self.quality_top10 = Histogram("rag_quality_top10_fused_score", "Fused score of the 10th candidate (the "
                                       "last one when fewer)", ["index"], buckets=SCORE_BUCKETS, registry=r)
        self.quality_overlap = Histogram("rag_quality_retriever_overlap_at10", "Share of the BM25 top 10 that is "
                                         "also in the dense top 10, of the shorter list when one has fewer than 10 "
                                         "(retriever agreement)", ["index"],
                                         buckets=OVERLAP_BUCKETS, registry=r)
        self.quality_replies = Counter("rag_quality_replies", "Searches the pipeline computed", ["index"], registry=r)
        self.quality_empty = Counter("rag_quality_empty_replies", "Computed searches with no context", ["index"],
                                     registry=r)
        self.quality_degraded = Counter("rag_quality_degraded_replies", "Computed searches whose answer is degraded "
                                        "(a leg skipped for budget or load, a shard missing)", ["index"], registry=r)
        self.quality_below_floor = Counter("rag_quality_below_floor_replies", "Computed searches whose best score "
                                           "is below metrics.quality_floor", ["index"], registry=r)

    def observe_quality(self, result) -> None:
        """Counts one computed SearchResult (core/params.py) in the quality signals of the serving index."""
        bound = self._quality
        if bound is None:
            return
        top1, top10, overlap, replies, empty, degraded, below = bound
        replies.inc()
        signals = result.signals
        if signals is not None:
            top1.observe(signals[0])
            top10.observe(signals[1])
            if signals[2] is not None:
                overlap.observe(signals[2])
        if not result.contexts:
            empty.inc()
        elif self.quality_floor is not None and result.contexts[0].score < self.quality_floor:
            below.inc()
        if not result.complete:
            degraded.inc()

    def _add_cache_metrics(self) -> None:
        """Cache, prefetch and speculative retrieval (rag_service/search/cache.py, prefetch.py, speculate.py)."""
        r = self.registry
        self.cache_hits = Counter("rag_cache_hits", "Searches answered from the cache, by kind (exact, semantic, "
                                  "prefetched, coalesced = waited for an identical search in flight)", ["kind"],
                                  registry=r)
        self.cache_misses = Counter("rag_cache_misses", "Searches that ran the pipeline, by cache mode", ["mode"],
                                    registry=r)
        self.cache_guard_rejections = Counter("rag_cache_guard_rejections", "Semantic candidates above the cosine "
                                              "threshold refused by the fidelity guard (default) or strict check",
                                              ["mode"], registry=r)
        self.cache_evictions = Counter("rag_cache_evictions", "Entries evicted: lru (memory bound), version (index "
                                       "replaced)", ["reason"], registry=r)
        self.cache_expired = Counter("rag_cache_expired", "Entries dropped at the end of their time to live",
                                     registry=r)
        self.cache_bytes = Gauge("rag_cache_bytes", "Estimated bytes held by cache entries", registry=r)
        self.cache_entries = Gauge("rag_cache_entries", "Entries in the cache", registry=r)
        self.cache_similarity = Histogram("rag_cache_semantic_similarity", "Cosine of semantic hits",
                                          buckets=(0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.0),
                                          registry=r)
        self.prefetch_accepted = Counter("rag_prefetch_accepted", "Prefetch requests queued", registry=r)
        self.prefetch_dropped = Counter("rag_prefetch_dropped", "Prefetch requests dropped (queue_full, busy, "
                                        "disabled)", ["reason"], registry=r)
        self.prefetch_completed = Counter("rag_prefetch_completed", "Prefetch requests run to the end, by outcome "
                                          "(filled, cached = already there, failed)", ["outcome"], registry=r)
        self.prefetch_used = Counter("rag_prefetch_used", "Prefetched entries later served to a search", registry=r)
        self.prefetch_queued = Gauge("rag_prefetch_queued", "Prefetch requests waiting", registry=r)
        self.speculative = Counter("rag_speculative", "StreamSearch speculative retrieval by outcome (started, "
                                   "cancelled, stale, used, skipped_busy)", ["outcome"], registry=r)

    def set_index(self, index) -> None:
        """Describes the index now serving (called at load and after every reload)."""
        manifest = index.manifest
        self.index_info.info({"name": index.name, "version": index.version,
                              "format_version": str(manifest.get("format_version", "")),
                              "model": str(manifest["model"]["name"]),
                              "created_at": str(manifest.get("created_at", "")),
                              "path": str(index.path)})
        name = str(index.name)
        self._quality = tuple(m.labels(name) for m in (
            self.quality_top1, self.quality_top10, self.quality_overlap, self.quality_replies, self.quality_empty,
            self.quality_degraded, self.quality_below_floor))
        self.index_documents.set(index.n_docs)
        self.index_chunks.set(index.n_chunks)
        self.index_loaded.set_to_current_time()

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Starts the Prometheus /metrics endpoint on a daemon thread; returns (http_server, actual_port)."""
        from prometheus_client import start_http_server

        http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return http_server, http_server.server_address[1]

    def observe_stages(self, stage_us: Mapping[str, int]) -> None:
        self.stage_seconds.observe_us(stage_us)
