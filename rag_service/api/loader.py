"""One loader for what a server searches through: a local index (Pipeline) or, with `shards` configured, the router
over a shard set (ShardedPipeline). Both get their query encoder, adaptive policy and warm-up here, the same way."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path

from rag_service.core.config import ServerConfig, index_defaults
from rag_service.core.errors import IndexFormatError
from rag_service.core.params import WARMUP_QUERIES, SearchParams
from rag_service.encoder import onnx_export
from rag_service.encoder.batching import MicroBatcher
from rag_service.encoder.encode import SearchEncoder, load_index_encoder
from rag_service.index.load import load_index
from rag_service.index.manifest import sha256_file
from rag_service.index.resident import make_resident
from rag_service.kernels import native
from rag_service.search.adaptive import AdaptiveConfig, AdaptivePolicy
from rag_service.search.pipeline import Pipeline
from rag_service.search.searcher import Searcher
from rag_service.shard.router import ShardedPipeline
from rag_service.shard.split import read_router

log = logging.getLogger(__name__)


def _query_encoder(config: ServerConfig, model_dir: Path, encoder: SearchEncoder | None,
                   idle_cpus: Sequence[int] = ()) -> SearchEncoder:
    settings = config.encoder
    idle_threads = settings.idle_threads or min(4, os.cpu_count() or 1)
    encoder = encoder or load_index_encoder(settings.backend, model_dir, settings.model_path, settings.threads,
                                            idle_threads, idle_cpus)
    if settings.micro_batch_ms > 0 and not isinstance(encoder, MicroBatcher):
        encoder = MicroBatcher(encoder, window_ms=settings.micro_batch_ms, max_batch=settings.micro_batch_max)
    return encoder


class EncoderPool:
    """The query encoders of a server's collections: one per distinct model, shared by every collection built with it
    (a hundred collections of one model hold one encoder, bench/README.md). A model is told by what the configured
    backend runs: the checksum of the index's exported graph (encoder.onnx, from which the fused int8 graph is
    derived, or encoder-int8.onnx), or for torch the model name. `given`: an encoder already loaded (tests share
    one), used for every index built with a model of its name. `idle_cpus`: the CPUs a lone search's encode workers
    are held to (Placement.encode_cpus). Loads run on the load threads, hence the lock."""

    def __init__(self, config: ServerConfig, given: SearchEncoder | None = None,
                 idle_cpus: Sequence[int] = ()) -> None:
        self.config = config
        self.given = given
        self.idle_cpus = list(idle_cpus)
        self._encoders: dict[tuple, SearchEncoder] = {}
        self._lock = threading.Lock()

    def key(self, index_dir: Path, manifest: dict) -> tuple:
        model = str(manifest["model"]["name"])
        backend = self.config.encoder.backend
        if self.given is not None and self.given.name == model:
            return ("given", model)
        if backend != "torch" and onnx_export.has_export(index_dir):
            graph = onnx_export.FP32_FILE if backend in onnx_export.DERIVED_KINDS \
                else onnx_export.ONNX_FILE_FOR[backend]
            entry = manifest.get("files", {}).get(graph)
            # A router directory's export is outside any manifest: its bytes tell the model.
            return (backend, entry["sha256"] if isinstance(entry, dict) and "sha256" in entry
                    else sha256_file(index_dir / graph))
        return ("torch", self.config.encoder.model_path or "", model)

    def get(self, index_dir: Path, manifest: dict) -> SearchEncoder:
        key = self.key(index_dir, manifest)
        with self._lock:
            encoder = self._encoders.get(key)
            if encoder is None:
                encoder = _query_encoder(self.config, index_dir, self.given if key[0] == "given" else None,
                                         self.idle_cpus)
                self._encoders[key] = encoder
                log.info("query encoder %s for model %s (%d loaded)", encoder.name, key, len(self._encoders))
            return encoder

    def __len__(self) -> int:
        return len(self._encoders)

    def keep(self, in_use: Iterable[SearchEncoder]) -> None:
        """Forgets the encoders no collection uses any more (a request still running on one keeps it alive)."""
        used = {id(e) for e in in_use}
        with self._lock:
            for key in [k for k, e in self._encoders.items() if id(e) not in used]:
                del self._encoders[key]


def load_searcher(config: ServerConfig, encoder: SearchEncoder | None = None,
                  load: Callable[[], int] | None = None, encoders: EncoderPool | None = None,
                  beside: Executor | None = None) -> Searcher:
    """Loads, checks and warms the searcher `config` describes. `encoder`: reuse one already loaded (tests share
    one); else `encoders` gives the one for the index's model (shared by the collections built with it). `load`: the
    server's count of admitted searches (AdaptivePolicy). `beside`: the server's thread for a lone search's BM25
    (Pipeline)."""
    # A misconfigured RAG_SERVICE_BACKEND must stop the start, not fail every request later.
    log.info("native backends: %s", native.backend_info())
    policy = AdaptivePolicy(AdaptiveConfig(**config.adaptive.model_dump()), load)
    searcher: Searcher
    shards = config.router.shards
    if shards:
        router_dir = Path(config.index)
        router = read_router(router_dir)  # a wrong directory fails here, before the model loads
        token = config.auth.search_token.get_secret_value() if config.auth.search_token is not None else None
        query_encoder = encoders.get(router_dir, {"model": router["model"]}) \
            if encoder is None and encoders is not None else _query_encoder(config, router_dir, encoder)
        searcher = ShardedPipeline(router_dir, list(shards), query_encoder,
                                   policy=policy, timeout_s=config.router.shard_timeout_seconds, token=token)
    else:
        index = load_index(config.index, verify_checksums=config.verify_checksums)
        query_encoder = encoders.get(index.path, index.manifest) if encoder is None and encoders is not None \
            else _query_encoder(config, index.path, encoder)
        model = index.manifest["model"]
        if query_encoder.name != model["name"]:
            raise IndexFormatError(f"{index.path}/manifest.json: index was built with model {model['name']!r}, "
                                   f"the server encodes queries with {query_encoder.name!r}")
        searcher = Pipeline(index, query_encoder, policy=policy, beside=beside,
                            helper_cpus=encoders.idle_cpus if encoders is not None else ())
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
    if config.resident_index and not shards:
        # After the warm-up, which maps what is mapped on first use.
        residency = make_resident(summary.path)
        if residency.skipped:
            log.info("index %s pages left to the kernel: %s", summary.name, residency.skipped)
        else:
            log.info("index %s pages resident: %d MiB mapped, in %.2f s", summary.name,
                     residency.resident_bytes >> 20, residency.seconds)
    log.info("loaded %s version %s (%d chunks)%s", summary.name, summary.version, summary.n_chunks,
             f" over {len(shards)} shards: {', '.join(shards)}" if shards else "")
    return searcher
