"""One loader for what a server searches through: a local index (Pipeline) or, with `shards` configured, the router
over a shard set (ShardedPipeline). Both get their query encoder, adaptive policy and warm-up here, the same way."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from rag_service.core.config import ServerConfig, index_defaults
from rag_service.core.errors import IndexFormatError
from rag_service.core.params import WARMUP_QUERIES, SearchParams
from rag_service.encoder.batching import MicroBatcher
from rag_service.encoder.encode import SearchEncoder, load_index_encoder
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.search.adaptive import AdaptiveConfig, AdaptivePolicy
from rag_service.search.pipeline import Pipeline
from rag_service.search.searcher import Searcher
from rag_service.shard.router import ShardedPipeline
from rag_service.shard.split import read_router

log = logging.getLogger(__name__)


def _query_encoder(config: ServerConfig, model_dir: Path, encoder: SearchEncoder | None) -> SearchEncoder:
    settings = config.encoder
    idle_threads = settings.idle_threads or min(4, os.cpu_count() or 1)
    encoder = encoder or load_index_encoder(settings.backend, model_dir, settings.model_path, settings.threads,
                                            idle_threads)
    if settings.micro_batch_ms > 0 and not isinstance(encoder, MicroBatcher):
        encoder = MicroBatcher(encoder, window_ms=settings.micro_batch_ms, max_batch=settings.micro_batch_max)
    return encoder


def load_searcher(config: ServerConfig, encoder: SearchEncoder | None = None,
                  load: Callable[[], int] | None = None) -> Searcher:
    """Loads, checks and warms the searcher `config` describes. `encoder`: reuse one already loaded (a reload keeps
    the serving one; tests share one). `load`: the server's count of admitted searches (AdaptivePolicy)."""
    # A misconfigured RAG_SERVICE_BACKEND must stop the start, not fail every request later.
    log.info("native backends: %s", native.backend_info())
    policy = AdaptivePolicy(AdaptiveConfig(**config.adaptive.model_dump()), load)
    searcher: Searcher
    shards = config.router.shards
    if shards:
        router_dir = Path(config.index)
        read_router(router_dir)  # a wrong directory fails here, before the model loads
        token = config.auth.search_token.get_secret_value() if config.auth.search_token is not None else None
        searcher = ShardedPipeline(router_dir, list(shards), _query_encoder(config, router_dir, encoder),
                                   policy=policy, timeout_s=config.router.shard_timeout_seconds, token=token)
    else:
        index = load_index(config.index, verify_checksums=config.verify_checksums)
        query_encoder = _query_encoder(config, index.path, encoder)
        model = index.manifest["model"]
        if query_encoder.name != model["name"]:
            raise IndexFormatError(f"{index.path}/manifest.json: index was built with model {model['name']!r}, "
                                   f"the server encodes queries with {query_encoder.name!r}")
        searcher = Pipeline(index, query_encoder, policy=policy)
        searcher.search_defaults = index_defaults(config.defaults, index.manifest.get("tuned"))
        if searcher.search_defaults is not config.defaults:
            d = searcher.search_defaults
            log.info("index %s carries tuned search defaults: fusion %s, depth %d, dense_weight %g; rerank model %s",
                     index.name, d.fusion, d.depth, d.dense_weight, searcher.rerank_model.sha256[:16]
                     if searcher.rerank_model is not None else "none")
        # The static reply bytes of every chunk (api/reply.py), before the first request rather than during it.
        index.context_bytes()
    try:
        for query in WARMUP_QUERIES[: config.warmup_queries]:
            searcher.search(SearchParams.from_defaults(query, searcher.search_defaults or config.defaults))
    except BaseException:
        searcher.close()
        raise
    summary = searcher.summary()
    log.info("loaded %s version %s (%d chunks)%s", summary.name, summary.version, summary.n_chunks,
             f" over {len(shards)} shards: {', '.join(shards)}" if shards else "")
    return searcher
