"""The request path, stage by stage: filter mask, encode, lexical || dense, fusion, rerank, contexts, assemble.

Plain function calls on plain data: the pipeline knows no gRPC, stages know no pipeline. Each stage is timed so the
server can report per-stage latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from rag_service.search import adaptive, context_filter, fusion
from rag_service.search import rerank as rerank_mod
from rag_service.encoder.encode import Encoder
from rag_service.core.errors import DeadlineExceeded
from rag_service.index.load import Index
from rag_service.kernels.native import FusionResult
from rag_service.core.timing import StageTimer


@dataclass(frozen=True)
class SearchParams:
    query: str
    top_k: int = 10
    depth: int = 100
    fusion: str = "weighted"
    dense_weight: float = 0.5
    rrf_k: float = 60.0
    filters: dict[str, str] = field(default_factory=dict)
    rerank: bool = True
    rerank_depth: int = 100
    max_context_tokens: int = 0  # 0: no budget
    mmr_lambda: float = 1.0
    dedup_threshold: float = 1.0
    budget_ms: float | None = None  # the request's latency budget, for the adaptive pipeline
    cache: str = "default"  # default | bypass | exact_only | strict
    require_complete: bool = False  # router only: a shard that does not answer fails the request (shard/router.py)


@dataclass(frozen=True)
class ContextResult:
    chunk: int
    doc_id: str
    chunk_id: str
    title: str
    text: str
    metadata: dict[str, str]
    score: float
    bm25_score: float | None
    dense_score: float | None
    rerank_score: float | None = None
    features: dict[str, float] | None = None  # the reranker's inputs, reported with debug
    tokens: int = 0  # counted with the model's tokenizer, toward max_context_tokens
    fused_score: float | None = None  # the fusion score; `score` is the reranker's when it ran


@dataclass
class Candidates:
    """First-stage output of one query, kept whole for evaluation (bench) and debugging."""

    bm25: tuple[np.ndarray, np.ndarray]
    dense: tuple[np.ndarray, np.ndarray]
    fused: FusionResult
    query_vector: np.ndarray | None = None


@dataclass
class SearchResult:
    contexts: list[ContextResult]
    index_version: str
    stage_us: dict[str, int]
    context_tokens: int = 0
    route: str = "full"  # the adaptive pipeline's choice, and why
    route_reason: str = ""
    # Router only (shard/router.py): some shard did not answer, so its documents are missing; which ones did.
    partial: bool = False
    shards_answered: list[str] = field(default_factory=list)
    shards_missing: list[str] = field(default_factory=list)


def check_deadline(deadline: float | None, stage: str) -> None:
    """Stops a request whose caller has given up: work past the deadline is wasted and delays the others."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"deadline passed before stage {stage!r}; the request was stopped there")


class Pipeline:
    """One index and one query encoder; thread-safe (stages allocate per call), so a thread pool can share it."""

    def __init__(self, index: Index, encoder: Encoder, rerank_model: rerank_mod.RerankModel | None = None,
                 policy: adaptive.AdaptivePolicy | None = None) -> None:
        """`rerank_model`: the combiner of the rerank stage; None loads the one shipped in the package."""
        if encoder.dim != index.manifest["model"]["dim"]:
            raise ValueError(f"encoder dimension {encoder.dim} != index dimension {index.manifest['model']['dim']}")
        self.index = index
        self.encoder = encoder
        # No windows (an index built before the reranker): the rerank stage is skipped, the load logged why.
        self.rerank_store = (rerank_mod.RerankStore.create(index.windows, index.bm25, index.dense.vectors)
                             if index.windows is not None else None)
        self.rerank_model = rerank_model or (rerank_mod.RerankModel.load() if self.rerank_store is not None else None)
        # Tokens per chunk, counted on first use: tokenizing a passage costs ~0.1-0.7 ms and every reply reports
        # its contexts' tokens. -1 = not counted yet; concurrent writers store the same value.
        self._chunk_tokens = np.full(index.n_chunks, -1, np.int32)
        # Route choice per request (budget, load, retriever agreement); see adaptive.py.
        self.policy = policy or adaptive.AdaptivePolicy()

    @property
    def version(self) -> str:
        return self.index.version

    def encode(self, query: str, deadline: float | None = None) -> np.ndarray:
        if deadline is not None and hasattr(self.encoder, "encode_one"):  # a MicroBatcher bounds its wait by it
            return self.encoder.encode_one(query, deadline)
        return self.encoder.encode_queries([query])[0]

    def retrieve(self, params: SearchParams, timer: StageTimer | None = None,
                 query_vector: np.ndarray | None = None, deadline: float | None = None,
                 lexical_only: bool = False) -> Candidates:
        """`deadline` is on the time.monotonic() clock; past it, the next stage raises DeadlineExceeded.
        `lexical_only`: no encode and no dense retrieval; fusion sees an empty dense list, so the BM25 order stands
        and every candidate's dense score is missing (the adaptive pipeline's lexical route)."""
        timer = timer or StageTimer()
        with timer.stage("filter"):
            mask = self.index.filter_mask(params.filters)
        if lexical_only:
            check_deadline(deadline, "lexical")
            with timer.stage("lexical"):
                bm25 = self.index.bm25.search(params.query, params.depth, mask)
            dense = (np.zeros(0, np.int64), np.zeros(0, np.float32))
            check_deadline(deadline, "fusion")
            with timer.stage("fusion"):
                fused = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight,
                                    top_k=params.top_k, rrf_k=params.rrf_k)
            return Candidates(bm25=bm25, dense=dense, fused=fused, query_vector=None)
        if query_vector is None:
            check_deadline(deadline, "encode")
            with timer.stage("encode"):
                query_vector = self.encode(params.query, deadline)
        check_deadline(deadline, "lexical")
        with timer.stage("lexical"):
            bm25 = self.index.bm25.search(params.query, params.depth, mask)
        check_deadline(deadline, "dense")
        with timer.stage("dense"):
            dense = self.index.dense.search(query_vector, params.depth, mask)
        check_deadline(deadline, "fusion")
        with timer.stage("fusion"):
            fused = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight,
                                top_k=params.top_k, rrf_k=params.rrf_k)
        return Candidates(bm25=bm25, dense=dense, fused=fused, query_vector=query_vector)

    def plan(self, params: SearchParams, *, deadline: float | None = None, encoded: bool = False,
             arrival: float | None = None) -> adaptive.Plan:
        """The adaptive route before any work, for a caller that would encode first (CachedSearch): a lexical plan
        means no encode at all; pass it to `search`. Any other plan is made again by `search`, later and with the
        query vector in hand."""
        return self.policy.plan(params, deadline, self.policy.in_flight + 1, encoded, self.rerank_store is not None,
                                arrival, lexical_available=True)

    def search(self, params: SearchParams, *, query_vector: np.ndarray | None = None,
               deadline: float | None = None, timer: StageTimer | None = None,
               arrival: float | None = None, plan: adaptive.Plan | None = None) -> SearchResult:
        """`plan`: a lexical plan from `self.plan` (the caller skipped the encode for it); otherwise planned here."""
        timer = timer or StageTimer()
        in_flight = self.policy.enter()
        if plan is None or plan.route != adaptive.LEXICAL:
            plan = self.policy.plan(params, deadline, in_flight, query_vector is not None,
                                    self.rerank_store is not None, arrival, lexical_available=True)
        try:
            return self._search(plan, query_vector=query_vector, deadline=deadline, timer=timer)
        finally:
            self.policy.leave(plan)

    def _search(self, plan: adaptive.Plan, *, query_vector: np.ndarray | None, deadline: float | None,
                timer: StageTimer) -> SearchResult:
        params = plan.params
        filter_params = context_filter.FilterParams.of(params)
        lexical_only = plan.route == adaptive.LEXICAL
        # No rerank on the lexical route: the reranker's features need the query vector (rerank.py).
        reranking = params.rerank and self.rerank_store is not None and not lexical_only
        # The second stage sees the fused top rerank_depth; without it (and without a filter) fusion's top_k is final.
        pool = max(params.top_k, params.rerank_depth) if reranking or not filter_params.is_identity else params.top_k
        candidates = self.retrieve(replace(params, top_k=pool), timer, query_vector=query_vector, deadline=deadline,
                                   lexical_only=lexical_only)
        fused = candidates.fused
        depth, route, reason = (self.policy.rerank_depth(plan, candidates.bm25[0], candidates.dense[0], len(fused.ids))
                                if reranking else (0, plan.route, plan.reason))
        reranked = None
        if depth > 0:
            check_deadline(deadline, "rerank")
            with timer.stage("rerank"):
                reranked = rerank_mod.rerank(self.rerank_store, self.rerank_model, params.query,
                                             candidates.query_vector, fused.ids[:depth], fused.scores[:depth],
                                             candidates.bm25[0], candidates.dense[0])
        check_deadline(deadline, "contexts")
        with timer.stage("contexts"):
            order, relevance = rerank_mod.final_order(fused.scores, reranked)
            ids = fused.ids[order]
            vectors = (np.asarray(self.index.dense.vectors[ids]) if not filter_params.is_identity
                       else np.zeros((len(ids), 0), np.float32))
            store = self.index.store
            selection = context_filter.select(relevance, vectors, lambda i: store.chunk_text(int(ids[i])),
                                              self.encoder.count_tokens, filter_params,
                                              count_at=lambda i: self.chunk_tokens(int(ids[i])))
        check_deadline(deadline, "assemble")
        with timer.stage("assemble"):
            contexts = self.assemble(fused, order, selection, reranked)
        self.policy.observe(timer.us, depth)
        return SearchResult(contexts=contexts, index_version=self.version, stage_us=timer.us,
                            context_tokens=selection.total_tokens, route=route, route_reason=reason)

    def chunk_tokens(self, chunk: int) -> int:
        count = int(self._chunk_tokens[chunk])
        if count < 0:
            count = self.encoder.count_tokens(self.index.store.chunk_text(chunk))
            self._chunk_tokens[chunk] = count
        return count

    def assemble(self, fused: FusionResult, order: np.ndarray | None = None,
                 selection: context_filter.Selection | None = None,
                 reranked: rerank_mod.Reranked | None = None) -> list[ContextResult]:
        """Contexts for the fused candidates at positions order[selection.positions] (default: all, fused order)."""
        store = self.index.store
        out = []
        order = np.arange(len(fused.ids)) if order is None else order
        positions = selection.positions if selection is not None else list(range(len(order)))
        for n, pos in enumerate(positions):
            at = int(order[pos])
            chunk, score = int(fused.ids[at]), float(fused.scores[at])
            bm25, dense = float(fused.bm25[at]), float(fused.dense[at])
            doc = store.chunk_doc(chunk)
            rerank_score = float(reranked.scores[pos]) if reranked is not None and pos < len(reranked.scores) \
                else None
            out.append(ContextResult(
                chunk=chunk,
                doc_id=store.doc_id(doc),
                chunk_id=store.chunk_id(chunk),
                title=store.doc_title(doc),
                text=store.chunk_text(chunk),
                metadata=store.doc_metadata(doc),
                score=rerank_score if rerank_score is not None else score,
                bm25_score=None if bm25 != bm25 else bm25,  # NaN: the retriever did not return this chunk
                dense_score=None if dense != dense else dense,
                rerank_score=rerank_score,
                features=reranked.feature_dict(pos) if rerank_score is not None else None,
                tokens=selection.tokens[n] if selection is not None and selection.tokens else 0,
                fused_score=score,
            ))
        return out
