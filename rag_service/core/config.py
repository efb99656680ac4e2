"""Server configuration: defaults < TOML config file < environment (RAG_*) < command line.

The search defaults are the settings that scored best on SciFact's train split (bench/experiments/tune_fusion.py; the table is in
bench/README.md): change them only with a new measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


class SearchDefaults(BaseModel):
    # SciFact train (809 queries): weighted, depth 100, w 0.5 gave nDCG@10 0.7388, the best of the grid in
    # bench/README.md; for RRF requests k = 10 beat 20, 30 and 60.
    top_k: int = Field(10, ge=1)
    depth: int = Field(100, ge=1)
    fusion: Literal["rrf", "weighted"] = "weighted"
    dense_weight: float = Field(0.5, ge=0.0, le=1.0)
    rrf_k: float = Field(10.0, gt=0.0)
    # Second stage (issue 4), bench/README.md "Issue 4": the shipped rerank model was fitted on the fused top 100
    # (SciFact train). MMR lambda 0.8 with cosine dedup above 0.9 had the best mean context recall over budgets of
    # 256-2048 tokens on SciFact train (bench/experiments/context_recall.py), but it reorders every reply (scores no longer
    # descend) and its effect on the ranking's nDCG is not measured, so it is the recommended setting for requests
    # with a token budget rather than the default.
    rerank: bool = True
    rerank_depth: int = Field(100, ge=1)
    mmr_lambda: float = Field(1.0, ge=0.0, le=1.0)
    dedup_threshold: float = Field(1.0, gt=0.0, le=1.0)
    max_context_tokens: int = Field(0, ge=0)


class Limits(BaseModel):
    """The request contract: values outside these get INVALID_ARGUMENT naming the field."""

    max_query_chars: int = Field(4096, ge=1)
    max_top_k: int = Field(1000, ge=100)
    max_depth: int = Field(2000, ge=100)
    max_filters: int = Field(16, ge=0)
    max_filter_value_chars: int = Field(1024, ge=1)
    max_rerank_depth: int = Field(2000, ge=100)
    max_context_tokens: int = Field(1_000_000, ge=1)
    max_budget_ms: int = Field(600_000, ge=1)


class CacheConfig(BaseModel):
    """Exact and semantic cache, Prefetch and StreamSearch (rag_service/search/cache.py, prefetch.py, speculate.py).

    The semantic thresholds are the highest-hit-rate setting that met the fidelity target on SciFact's queries and
    their variants (bench/experiments/cache_fidelity.py; table in bench/README.md): change them only with a new measurement.
    """

    enabled: bool = True
    # Semantic lookups for requests in the default mode (off: default behaves as exact_only).
    semantic: bool = True
    max_bytes: int = Field(256 << 20, ge=0)
    ttl_seconds: float = Field(600.0, gt=0.0)
    semantic_min_cosine: float = Field(0.98, ge=0.0, le=1.0)
    # Fidelity guard: share of the query's BM25 top guard_depth chunks also in the cached query's ...
    guard_depth: int = Field(100, ge=1)
    guard_min_overlap: float = Field(0.8, ge=0.0, le=1.0)
    # ... and IDF-weighted Jaccard of the two queries' index terms.
    guard_min_term_overlap: float = Field(0.7, ge=0.0, le=1.0)
    # Nearest cached queries tried against the guard, best cosine first.
    semantic_candidates: int = Field(4, ge=1)
    # Strict mode: same content-word signature and at least this cosine.
    strict_min_cosine: float = Field(0.9, ge=0.0, le=1.0)
    # Prefetch: a bounded background queue, run only while fewer live searches than this are in flight.
    prefetch_queue: int = Field(256, ge=0)
    prefetch_busy_in_flight: int = Field(1, ge=1)
    max_prefetch_requests: int = Field(256, ge=1)
    # StreamSearch: a draft is searched once no newer draft has come for this long; no speculation while this many
    # live searches are in flight.
    stream_debounce_ms: float = Field(40.0, ge=0.0)
    speculative_busy_in_flight: int = Field(8, ge=1)


class TracingConfig(BaseModel):
    """OpenTelemetry tracing (rag_service/core/tracing.py): a span per RPC and per pipeline stage, exported over OTLP."""

    otlp_endpoint: str | None = Field(None, description="OTLP/gRPC collector address (http://host:4317) the spans "
                                      "are exported to; None: no exporter, and spans cost nothing")
    service_name: str = Field("rag-service", min_length=1, description="service.name of the exported spans")


class ServerConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", env_nested_delimiter="__", extra="forbid")

    index: Path = Field(Path("indexes/demo"), description="index root (with CURRENT) or a version directory")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # Threads that run the CPU-bound pipeline off the event loop; one per core is the measured sweet spot.
    workers: int = Field(2, ge=1)
    # Admission control: requests beyond this many in flight are refused at once with RESOURCE_EXHAUSTED.
    max_in_flight: int = Field(64, ge=1)
    grace_seconds: float = Field(10.0, ge=0.0)
    verify_checksums: bool = True
    warmup_queries: int = Field(8, ge=0)
    model_path: str | None = None
    # Query encoder (issue 5): the int8 ONNX export in the index is ~4x faster than torch at nDCG@10 within 0.5 point
    # (bench/README.md, "Issue 5"); torch is sentence-transformers itself, the reference.
    query_encoder: Literal["onnx-int8", "onnx-fp32", "torch"] = "onnx-int8"
    # ONNX Runtime threads per query encode; one per request keeps concurrent requests from contending for cores.
    encoder_threads: int = Field(1, ge=1)
    # Micro-batching of concurrent query encodes (rag_service/encoder/batching.py): the longest a request waits for company,
    # and the largest batch; 0 ms turns it off. Default set by bench/README.md "Issue 5" (p50/p99 at offered rates).
    micro_batch_ms: float = Field(0.0, ge=0.0, le=50.0)
    micro_batch_max: int = Field(16, ge=1)
    # Adaptive routing (rag_service/search/adaptive.py): budget/load/confidence decide depth and rerank per request.
    adaptive: bool = True
    adaptive_confidence: bool = True
    adaptive_busy_in_flight: int = Field(2, ge=1)
    # The lexical route: BM25 alone, no query encode, when the budget left cannot pay for the encode (adaptive.py).
    adaptive_lexical: bool = True
    # Brownout (adaptive.py): under sustained load, only a share of budgeted requests takes the full pipeline, the
    # rest the lexical route, so the p95 of recent server time stays under `adaptive_brownout_target` of the budget.
    # Needs adaptive_lexical. Target set by bench/README.md "Issue 5", "Brownout".
    adaptive_brownout: bool = True
    adaptive_brownout_target: float = Field(0.5, gt=0.0, le=1.0)
    max_message_bytes: int = Field(1 << 20, ge=1024)
    # Requests admitted but waiting for a pipeline thread. Past this they are refused at once: a queue of q requests
    # adds up to q/workers service times to every admitted request. One per default worker absorbs bursts and keeps
    # the admitted p99 near nominal under 2x overload (bench/experiments/overload.py; figures in bench/README.md).
    max_queued: int = Field(2, ge=0)
    # On SIGTERM health reports NOT_SERVING this long while requests are still answered, so load balancers that poll
    # health move traffic away before the server stops accepting.
    shutdown_notice_seconds: float = Field(0.0, ge=0.0)
    # ReloadIndex paths must resolve inside this directory (default: the index root of `index`).
    index_root: Path | None = None
    # Bearer tokens. Admin RPCs (ReloadIndex) are refused unless an admin token is configured; Search and the other
    # read RPCs need a token only when a search token is configured. From RAG_ADMIN_TOKEN / RAG_SEARCH_TOKEN, the
    # config file, or a file named here; never from the command line (it would show in `ps`).
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    search_token: SecretStr | None = None
    search_token_file: Path | None = None
    # TLS: certificate chain and key (PEM). With a client CA, clients must present a certificate it signed (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Prometheus exposition over HTTP (/metrics); None: no HTTP endpoint.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Query text is user data: kept out of the request log unless asked for.
    log_queries: bool = False
    # Replicas (issue 8): names this server in every reply's trailing metadata (x-served-by) and in its request log, so
    # callers and operators see how load spreads; default host:pid (the pod name and pid under Kubernetes).
    replica_name: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/+=-]+$")
    # Close each client connection after this long (a GOAWAY; calls in flight get max_connection_age_grace_seconds to
    # finish) so clients that balance round_robin over a DNS name re-resolve it and find replicas added since (an
    # autoscaler's new pods). None: connections live until a side closes them.
    max_connection_age_seconds: float | None = Field(None, gt=0.0)
    max_connection_age_grace_seconds: float = Field(30.0, ge=0.0)
    # Router role (rag_service/shard/router.py): the shard servers' addresses, one per shard of the set; `index` is
    # then the router directory a sharded build wrote (OUT/router). Empty: serve `index` itself.
    shards: list[str] = Field(default_factory=list)
    # The longest the router waits for a shard when the call has no (shorter) deadline.
    shard_timeout_seconds: float = Field(5.0, gt=0.0)
    defaults: SearchDefaults = SearchDefaults()
    limits: Limits = Limits()
    cache: CacheConfig = CacheConfig()
    tracing: TracingConfig = TracingConfig()

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    # Set on a per-file subclass by load_config; read when pydantic-settings builds its sources.
    config_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = cls.config_file
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_config(config_file: Path | None = None, **overrides: Any) -> ServerConfig:
    """Build the configuration; `overrides` (command-line values) win, None values are ignored."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if config_file is None:
        return ServerConfig(**given)
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    # A subclass per file keeps the file choice out of global state.
    bound = type("FileServerConfig", (ServerConfig,), {"config_file": Path(config_file)})
    return bound(**given)
