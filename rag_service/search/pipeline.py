"""One local index as a Searcher: the request path stage by stage.

    [SearcherBase.search: plan, encode, cache stage]  filter mask -> lexical || dense -> fusion -> rerank
        -> context filter -> assemble [-> shape: decay, groups, pages, floors, explanations, highlights, only for a
        request that asks for one of them (search/shape.py)]

Plain function calls on plain data: the pipeline knows no gRPC, stages know no pipeline. Each stage is timed so the
server can report per-stage latency. To add a stage, add it to `Pipeline._rank` in request order, timed with
`timer.stage(name)` after a `check_deadline`, and give the shard router (shard/router.py) the same step.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace

import numpy as np

from rag_service.core.errors import InvalidArgument
from rag_service.core.params import (
    Capabilities,
    ContextResult,
    IndexSummary,
    SearchParams,
    SearchResult,
    check_deadline,
)
from rag_service.core.timing import StageTimer
from rag_service.core.tracing import request_tracer
from rag_service.encoder.encode import SearchEncoder
from rag_service.index.dates import DateColumns
from rag_service.index.load import Index
from rag_service.index.store import DocStore
from rag_service.index.windows import DEFAULT_WINDOW_SENTENCES, sentence_windows, split_sentences
from rag_service.kernels import native
from rag_service.kernels.native import FusionResult
from rag_service.search import adaptive, context_filter, fusion, shape
from rag_service.search import rerank as rerank_mod
from rag_service.search.searcher import (
    Ahead,
    ChunkFields,
    LexicalGuard,
    SearcherBase,
    assemble_contexts,
    quality_signals,
)


@dataclass
class Candidates:
    """First-stage output of one query, kept whole for evaluation (bench) and debugging."""

    bm25: tuple[np.ndarray, np.ndarray]
    dense: tuple[np.ndarray, np.ndarray]
    fused: FusionResult
    query_vector: np.ndarray | None = None


def _record_stage(timer: StageTimer, name: str, start_ns: int, ns: int) -> None:
    """Books a part of one native call as a stage (and, traced, as a span over its wall-clock interval)."""
    timer.us[name] = timer.us.get(name, 0) + ns // 1000
    tracer = request_tracer()
    if tracer is not None:
        tracer.start_span(name, start_time=start_ns).end(end_time=start_ns + ns)


@dataclass
class LexicalAhead:
    """A request's query analysis and filter mask, made before its encode (Pipeline._before_encode), and its BM25
    list when that is ranked on the beside thread: (ids, scores, start ns, duration ns). `later`: BM25 goes to that
    thread after the encode, beside the dense index's search (Pipeline._lexical_beside)."""

    depth: int
    terms: np.ndarray
    mask: np.ndarray | None
    bm25: Future[tuple[np.ndarray, np.ndarray, int, int]] | None = None
    later: bool = False

    @property
    def beside(self) -> bool:
        return self.bm25 is not None

    def hits(self, depth: int, timer: StageTimer, deadline: float | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The BM25 list ranked beside the encode, booked as the lexical stage, when it is the one a search of
        `depth` needs (a plan made again after the encode may have lowered the depth); else None."""
        if self.bm25 is None or depth != self.depth:
            return None
        check_deadline(deadline, "lexical")
        ids, scores, start_ns, ns = self.bm25.result()
        _record_stage(timer, "lexical", start_ns, ns)
        return ids, scores


# BM25 beside the encode is tried on indexes of at least this many chunks only: where BM25's sums outgrow the core's
# caches (native/src/retrieve.cpp, kScanMinChunks), so that a posting costs what it does at 1M. Below, a query rarely
# has the postings to pay for it, and making its analysis before the encode would cost every semantic hit (which needs
# no first stage) ~60 µs for nothing.
BESIDE_MIN_CHUNKS = 1 << 17


def _bm25_beside(postings: native.Postings, terms: np.ndarray, depth: int,
                 mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    started = time.time_ns()
    ids, scores = native.bm25_top(postings, terms, depth, mask=mask, backend="cpp")
    return ids, scores, started, time.time_ns() - started


# Which retrievers and stages ran (SearchResult.legs).
LEXICAL_LEGS, FUSED_LEGS, RERANKED_LEGS = ("bm25",), ("bm25", "dense"), ("bm25", "dense", "rerank")


def index_rerank_model(index: Index) -> rerank_mod.RerankModel:
    """The rerank combiner an index carries (refit by `rag-index tune` with its model), else the shipped one."""
    tuned = index.manifest.get("tuned")
    if isinstance(tuned, dict) and tuned.get("rerank_model") is not None:
        return rerank_mod.RerankModel.from_json(json.dumps(tuned["rerank_model"]),
                                                f"{index.path}/manifest.json tuned.rerank_model")
    return rerank_mod.RerankModel.load()


class Pipeline(SearcherBase):
    """One index and one query encoder; thread-safe (stages allocate per call), so a thread pool can share it."""

    # The first stage as one native call (BM25, the dense scan of a flat index, fusion) when the C++ kernels are in
    # use; False keeps the stage-by-stage path (numba BM25, faiss, fusion), e.g. to compare the two.
    native_first_stage: bool = True
    # With a rerank store, the first stage, the confidence rule and the rerank as one native call (search_core);
    # False keeps them as two (retrieve, then the rerank), e.g. to compare the two.
    native_one_call: bool = True

    def __init__(self, index: Index, encoder: SearchEncoder, rerank_model: rerank_mod.RerankModel | None = None,
                 policy: adaptive.AdaptivePolicy | None = None, beside: Executor | None = None,
                 helper_cpus: Sequence[int] = ()) -> None:
        """`rerank_model`: the combiner of the rerank stage; None takes the index's own (an index built with a
        tuned model carries the combiner refit with it, manifest "tuned") or else the one shipped in the package.
        `beside`: a thread on the cores a lone search's encode would take, where its BM25 may run meanwhile
        (_before_encode); None: BM25 runs after the encode, in the one native call. `helper_cpus`: the CPUs of
        the worker thread that takes part of a lone search's scan and rerank (Placement.encode_cpus; empty:
        anywhere)."""
        if encoder.dim != index.manifest["model"]["dim"]:
            raise ValueError(f"encoder dimension {encoder.dim} != index dimension {index.manifest['model']['dim']}")
        self.index = index
        self.encoder = encoder
        # No windows (an index built before the reranker): the rerank stage is skipped, the load logged why.
        self.rerank_store = (rerank_mod.RerankStore.create(index.windows, index.bm25, index.dense.vectors)
                             if index.windows is not None else None)
        self.rerank_model = rerank_model or (index_rerank_model(index) if self.rerank_store is not None else None)
        if self.rerank_store is not None:
            self.rerank_store.core.place_helper(helper_cpus)
        # Every reply reports its contexts' tokens: stored at build time (an older index counts them here, once),
        # since tokenizing a passage per request costs ~0.1-0.7 ms.
        self._chunk_tokens = index.token_counts(encoder)
        # One reader for every context this pipeline makes (a bound method would be a new object per request, and a
        # cache entry keeps its contexts' reader; a method bound here would put the pipeline in a cycle).
        self.read_chunk = functools.partial(_chunk_fields, index.store)
        # The kernels' backend (RAG_SERVICE_BACKEND) is read once, at load, like every other setting of an index:
        # resolved per request it cost ~25 µs on the caches the encode has just flushed.
        self._first_stage_cpp = native.retrieve_backend() == "cpp"
        # The one native call, its per-index arguments prepared once; None where it cannot run (NumPy backend, no
        # rerank store or model).
        self._search_call = self._prepare_search_call() if self._first_stage_cpp else None
        # Route choice per request (budget, load, retriever agreement); see adaptive.py.
        self.policy = policy or adaptive.AdaptivePolicy()
        self._beside = beside if (self._first_stage_cpp and self.policy.config.lexical_beside_postings > 0
                                  and index.bm25.postings.n_docs >= BESIDE_MIN_CHUNKS) else None
        self._beside_last: Future | None = None  # the BM25 this pipeline last sent beside
        self._capabilities = Capabilities(rerank=self.rerank_store is not None, lexical_route=True,
                                          semantic_guard=True)
        # Dates of the metadata fields that hold them, for recency decays (index/dates.py).
        self.dates = DateColumns.of(index.store)
        self.tenant_key = index.tenant_key

    def _prepare_search_call(self) -> native.SearchCall | None:
        """The one native call's per-index arguments, prepared once (kernels.native.SearchCall)."""
        store, model, dense_index = self.rerank_store, self.rerank_model, self.index.dense
        if store is None or model is None or native.search_core_backend(store.core) != "cpp":
            return None
        scan = dense_index.native_scan
        oversample = dense_index.native_oversample if scan and dense_index.sq8 is not None else 0
        return native.SearchCall(store.core, self.index.bm25.postings, vectors=dense_index.vectors if scan else None,
                                 codes=dense_index.sq8 if oversample else None, oversample=oversample,
                                 idf_table=store.idf, columns=model.columns, weights=model.weights, bias=model.bias)

    @property
    def version(self) -> str:
        return self.index.version

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def guard(self) -> LexicalGuard:
        return self.index

    def summary(self) -> IndexSummary:
        index = self.index
        return IndexSummary(name=index.name, version=index.version, path=str(index.path), manifest=index.manifest,
                            n_docs=index.n_docs, n_chunks=index.n_chunks,
                            metadata_fields=sorted(index.metadata_fields), dense_kind=index.dense.kind,
                            metadata_schema={name: (kind, index.store.distinct_values(name))
                                             for name, kind in sorted(index.store.metadata_schema.items())},
                            tenant_key=self.tenant_key)

    def _before_encode(self, plan: adaptive.Plan, alone: bool, timer: StageTimer) -> LexicalAhead | None:
        """With a beside thread (and the one native call's first stage), a lone search's query analysis and filter
        mask are made before its encode, and when its postings reach `lexical_beside_postings` its BM25 list is
        ranked on that thread: on an index searched by its graph (HNSW), after the encode, which keeps both CPUs,
        while the graph is searched on the home one (BM25 read block by block takes about what the graph search
        does: bench/README.md, "BM25 block by block"); on a scanned index, while the encode runs on the home CPU
        alone (the scan takes the other CPU's worker in the call: "BM25 beside the encode")."""
        if self._beside is None or not alone or not self.native_first_stage:
            return None
        params = plan.params
        if params.depth < 1:
            return None  # the first stage names the field
        mask = self._mask(params, timer, None)
        bm25_index = self.index.bm25
        with timer.stage("analyze"):
            terms = self._term_ids(params.query)
            indptr = bm25_index.postings.indptr
            postings = int((indptr[terms + 1] - indptr[terms]).sum()) if len(terms) else 0
        ahead = LexicalAhead(params.depth, terms, mask)
        last = self._beside_last
        # A BM25 still running beside belongs to a search that gave up on it (a deadline, a semantic hit): this one
        # would wait behind it, so it ranks its own in the call.
        if postings >= self.policy.config.lexical_beside_postings and (last is None or last.done()):
            ahead.later = True
            if self.index.dense.native_scan:
                self._lexical_beside(ahead)
        return ahead

    def _lexical_beside(self, ahead: LexicalAhead | None) -> None:
        """Sends the BM25 list that _before_encode chose to rank beside to the beside thread: before the encode
        (a scanned index), or before the graph's search (unless a BM25 that a search gave up on holds the thread
        meanwhile: the call then ranks its own)."""
        if ahead is None or not ahead.later or self._beside is None:
            return
        ahead.later = False
        last = self._beside_last
        if last is None or last.done():
            ahead.bm25 = self._beside_last = self._beside.submit(_bm25_beside, self.index.bm25.postings, ahead.terms,
                                                                 ahead.depth, ahead.mask)

    def _mask(self, params: SearchParams, timer: StageTimer, ahead: LexicalAhead | None) -> np.ndarray | None:
        """The request's filter mask: the one made before the encode, else made here as the filter stage."""
        if ahead is not None:
            return ahead.mask
        with timer.stage("filter"):
            return self.index.filter_mask(params.filters, params.filter)

    def _term_ids(self, query: str) -> np.ndarray:
        """The query's BM25 input: its analysed tokens' term ids, repeats kept."""
        return self.index.bm25.query_term_ids(query)

    def retrieve(self, params: SearchParams, timer: StageTimer | None = None,
                 query_vector: np.ndarray | None = None, deadline: float | None = None,
                 lexical_only: bool = False, ahead: LexicalAhead | None = None) -> Candidates:
        """The first stage and fusion alone (evaluation reads it whole). `lexical_only`: no encode and no dense
        retrieval; fusion sees an empty dense list, so the BM25 order stands and every candidate's dense score is
        missing (the adaptive pipeline's lexical route). `ahead`: what _before_encode made for this request."""
        timer = timer or StageTimer()
        mask = self._mask(params, timer, ahead)
        dense = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        if lexical_only:
            query_vector = None
        elif query_vector is None:
            query_vector = self._encode_stage(params.query, deadline, timer)
        if self.native_first_stage and self._first_stage_cpp:
            return self._retrieve_native(params, timer, mask, query_vector, deadline, ahead)
        check_deadline(deadline, "lexical")
        with timer.stage("lexical"):
            bm25 = self.index.bm25.search(params.query, params.depth, mask)
        if query_vector is not None:  # not the lexical route
            check_deadline(deadline, "dense")
            with timer.stage("dense"):
                dense = self.index.dense.search(query_vector, params.depth, mask)
        check_deadline(deadline, "fusion")
        with timer.stage("fusion"):
            fused = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight,
                                top_k=params.top_k, rrf_k=params.rrf_k)
        return Candidates(bm25=bm25, dense=dense, fused=fused, query_vector=None if lexical_only else query_vector)

    def _retrieve_native(self, params: SearchParams, timer: StageTimer, mask: np.ndarray | None,
                         query_vector: np.ndarray | None, deadline: float | None,
                         ahead: LexicalAhead | None = None) -> Candidates:
        """BM25, the dense scan of a flat index and fusion in one native call (GIL released throughout); an index
        the call cannot scan (HNSW, a flat index on a GPU) is searched first and its hits passed in. Same candidates
        as the stage-by-stage path, whose stage names the call's parts are reported under."""
        if params.depth < 1:
            raise InvalidArgument("depth", f"must be >= 1, got {params.depth}")
        bm25_index, dense_index = self.index.bm25, self.index.dense
        # The query's analysis is timed on its own: the native call's parts are booked as lexical/dense/fusion.
        if ahead is not None:
            terms = ahead.terms
        else:
            with timer.stage("analyze"):
                terms = self._term_ids(params.query)
        scan = query_vector is not None and dense_index.native_scan
        hits = None
        if query_vector is not None and not scan:
            check_deadline(deadline, "dense")
            self._lexical_beside(ahead)
            with timer.stage("dense"):
                hits = dense_index.search(query_vector, params.depth, mask)
        oversample = dense_index.native_oversample if dense_index.sq8 is not None else 0
        query = dense_index.query_row(query_vector) if scan and query_vector is not None else None
        bm25 = ahead.hits(params.depth, timer, deadline) if ahead is not None else None
        check_deadline(deadline, "lexical")
        started = time.time_ns()
        result = native.retrieve(bm25_index.postings, terms, params.depth, mask=mask,
                                 vectors=dense_index.vectors if scan else None, query=query,
                                 codes=dense_index.sq8 if scan and oversample else None,
                                 oversample=oversample if scan else 0, dense=hits, method=params.fusion,
                                 dense_weight=params.dense_weight, top_k=params.top_k, rrf_k=params.rrf_k,
                                 backend="cpp", bm25=bm25)
        bm25_ns, dense_ns, fusion_ns = result.times_ns
        if bm25 is None:
            _record_stage(timer, "lexical", started, bm25_ns)
        if scan:
            _record_stage(timer, "dense", started + bm25_ns, dense_ns)
        _record_stage(timer, "fusion", started + bm25_ns + dense_ns, fusion_ns)
        return Candidates(bm25=result.bm25, dense=result.dense, fused=result.fused, query_vector=query_vector)

    def _one_call(self, early: adaptive.RerankPlan) -> bool:
        """Whether this request's first stage, confidence rule and rerank run as one native call: on C++, with a
        rerank store, and for a request whose rerank decision does not need the first stage's duration (no
        budget; a budgeted one decides its affordable depth in between, so it keeps two calls)."""
        return (self.native_first_stage and self.native_one_call and self._search_call is not None
                and not early.budgeted
                and (early.confidence is None or early.confidence[0] >= 0))

    def _search_native(self, params: SearchParams, top_k: int, early: adaptive.RerankPlan, timer: StageTimer,
                       query_vector: np.ndarray | None, deadline: float | None, ahead: LexicalAhead | None = None,
                       alone: bool = False) -> tuple[Candidates, rerank_mod.Reranked | None, tuple[int, str, str]]:
        """The first stage (as _retrieve_native, fusion keeping `top_k` in place of params.top_k: a copy of the
        params costs ~10 µs), the confidence rule and the rerank in one native call, GIL released throughout; the
        query is analysed once, for BM25 and the rerank's terms. Same candidates, rerank and route as retrieve() +
        policy.rerank_depth + rerank.rerank; the call's parts are reported under those stages' names."""
        store, call = self.rerank_store, self._search_call
        if store is None or call is None:
            raise RuntimeError("the one-call search needs the rerank store and model")
        mask = self._mask(params, timer, ahead)
        if query_vector is None:
            query_vector = self._encode_stage(params.query, deadline, timer)
        if alone and (ahead is None or not ahead.later):
            # The worker that takes part of the call's work wakes meanwhile (~0.1 ms on a VM), not in the call; not
            # before the encode, whose own workers have that core, nor while BM25 runs there beside the dense search
            # (it would spin beside it). Its own stage: waking a thread on a vCPU that has halted costs the caller
            # 20-45 µs here (the interrupt to another CPU is a VM exit).
            with timer.stage("rouse"):
                store.core.rouse_helper()
        if params.depth < 1:
            raise InvalidArgument("depth", f"must be >= 1, got {params.depth}")
        dense_index = self.index.dense
        with timer.stage("analyze"):
            terms = ahead.terms if ahead is not None else self._term_ids(params.query)
            # With a per-term idf table (lucene idf) the call derives the rerank's distinct terms itself: NumPy
            # calls on this path cost ~130 µs on caches the encode has just flushed.
            query_terms = None if store.idf is not None else store.terms_of(terms)
        scan = dense_index.native_scan
        hits = None
        if not scan:
            check_deadline(deadline, "dense")
            self._lexical_beside(ahead)
            with timer.stage("dense"):
                hits = dense_index.search(query_vector, params.depth, mask)
        bm25 = ahead.hits(params.depth, timer, deadline) if ahead is not None else None
        check_deadline(deadline, "lexical")
        started = time.time_ns()
        result = call(terms, dense_index.query_row(query_vector), params.depth, mask=mask, dense=hits,
                      method=params.fusion, dense_weight=params.dense_weight, top_k=top_k, rrf_k=params.rrf_k,
                      rerank_depth=early.limit, confidence=early.confidence,
                      query_terms=query_terms, bm25=bm25, helper=alone)
        returned = time.time_ns()
        first = result.first
        bm25_ns, dense_ns, fusion_ns = first.times_ns
        if bm25 is None:
            _record_stage(timer, "lexical", started, bm25_ns)
        if scan:
            _record_stage(timer, "dense", started + bm25_ns, dense_ns)
        _record_stage(timer, "fusion", started + bm25_ns + dense_ns, fusion_ns)
        inside = bm25_ns + dense_ns + fusion_ns
        reranked = None
        if len(result.ids):
            _record_stage(timer, "rerank", started + inside, result.rerank_ns)
            inside += result.rerank_ns
        # What the call costs around its parts (argument checks, result arrays, the facade), so that the stages
        # still add up to the request's time.
        _record_stage(timer, "call", started + inside, max(0, returned - started - inside))
        if len(result.ids):
            reranked = rerank_mod.Reranked(ids=result.ids, scores=result.scores, features=result.features,
                                           order=result.order)
        candidates = Candidates(bm25=first.bm25, dense=first.dense, fused=first.fused, query_vector=query_vector)
        return candidates, reranked, early.finish(result.agreement, len(first.fused.ids))

    def _rank(self, plan: adaptive.Plan, query_vector: np.ndarray | None, deadline: float | None,
              timer: StageTimer, ahead: Ahead | None = None, alone: bool = False) -> SearchResult:
        if not isinstance(ahead, LexicalAhead):
            ahead = None
        shaper = shape.Shaper(plan.params) if plan.params.shaped else None
        params = plan.params if shaper is None else shaper.ranking
        # A decay's field is checked before any retrieval: a request that cannot be answered costs nothing.
        dates = self._dates(shaper.params) if shaper is not None else None
        filter_params = context_filter.FilterParams.of(params)
        lexical_only = plan.route == adaptive.LEXICAL
        # No rerank on the lexical route: the reranker's features need the query vector (rerank.py).
        reranking = params.rerank and self.rerank_store is not None and not lexical_only
        # The second stage sees the fused top rerank_depth; without it (and without a filter) fusion's top_k is final.
        pool = max(params.top_k, params.rerank_depth) if reranking or not filter_params.is_identity else params.top_k
        early = self.policy.rerank_plan(plan) if reranking else None
        reranked: rerank_mod.Reranked | None = None
        if early is not None and self._one_call(early):
            candidates, reranked, (depth, route, reason) = self._search_native(
                params, pool, early, timer, query_vector, deadline, ahead, alone)
            fused = candidates.fused
        else:
            candidates = self.retrieve(replace(params, top_k=pool), timer, query_vector=query_vector,
                                       deadline=deadline, lexical_only=lexical_only, ahead=ahead)
            fused = candidates.fused
            depth, route, reason = (self.policy.rerank_depth(plan, candidates.bm25[0], candidates.dense[0],
                                                             len(fused.ids))
                                    if reranking else (0, plan.route, plan.reason))
            if depth > 0 and self.rerank_store is not None and self.rerank_model is not None \
                    and candidates.query_vector is not None:
                check_deadline(deadline, "rerank")
                with timer.stage("rerank"):
                    reranked = rerank_mod.rerank(self.rerank_store, self.rerank_model, params.query,
                                                 candidates.query_vector, fused.ids[:depth], fused.scores[:depth],
                                                 candidates.bm25[0], candidates.dense[0])
        check_deadline(deadline, "contexts")
        with timer.stage("contexts"):
            rows = None
            if shaper is None and filter_params.is_identity:
                # The filter keeps the ranking: its first top_k, with their stored token counts (one gather).
                order = rerank_mod.final_top(len(fused.ids), reranked, params.top_k)
                counts = self._chunk_tokens[fused.ids[order]].tolist()
                # A Python sum of ~10 ints: ndarray.sum's reduction machinery cost ~20 µs on cold caches.
                selection = context_filter.Selection(positions=list(range(len(order))), tokens=counts,
                                                     total_tokens=sum(counts))
            else:
                order, relevance = rerank_mod.final_order(fused.scores, reranked)
                if shaper is not None:
                    chunk_docs = self.index.store.chunk_docs
                    order, relevance, rows = shaper.arrange(
                        fused, reranked, order, relevance, lambda at: np.asarray(chunk_docs[fused.ids[at]]),
                        None if dates is None else lambda at: dates[fused.ids[at]])
                ids = fused.ids[order]
                vectors = (np.asarray(self.index.dense.vectors[ids]) if not filter_params.is_identity
                           else np.zeros((len(ids), 0), np.float32))
                store = self.index.store
                selection = context_filter.select(relevance, vectors, lambda i: store.chunk_text(int(ids[i])),
                                                  self.encoder.count_tokens, filter_params,
                                                  count_at=lambda i: self.chunk_tokens(int(ids[i])))
                if shaper is not None:
                    selection = shaper.page(selection)
        check_deadline(deadline, "assemble")
        with timer.stage("assemble"):
            contexts = assemble_contexts(fused, order, selection, reranked, ranks=rows, stored=self.read_chunk)
        legs = LEXICAL_LEGS if lexical_only else (RERANKED_LEGS if reranked is not None else FUSED_LEGS)
        self.policy.observe(timer.us, depth)
        result = SearchResult(contexts=contexts, index_version=self.version, stage_us=timer.us,
                              context_tokens=selection.total_tokens, route=route, route_reason=reason, legs=legs,
                              signals=quality_signals(fused, candidates.bm25[0], candidates.dense[0]))
        if shaper is not None:
            with timer.stage("shape"):
                highlight = self._highlighter(shaper.params.query, candidates.query_vector) \
                    if shaper.params.highlight else None
                shaper.apply(result, [int(order[p]) for p in selection.positions], fused=fused,
                             bm25=candidates.bm25, dense=candidates.dense, model=self.rerank_model,
                             highlight=highlight)
        return result

    def _dates(self, params: SearchParams) -> np.ndarray | None:
        """Unix seconds per chunk of the decay's field; None without a decay."""
        return None if params.decay is None else self.dates.column(params.decay.field)

    def _highlighter(self, query: str, query_vector: np.ndarray | None):
        """Highlights of a context: the query terms it matched, and its best sentence window (the reranker's window
        similarity with the query; by matched terms on the lexical route, which has no query vector)."""
        analyzer = self.index.analyzer
        windows = self.index.windows

        def highlight(c: ContextResult) -> tuple[tuple[tuple[int, int, str], ...], tuple[int, int] | None]:
            spans = shape.term_spans(analyzer, query, c.text)
            sentences = split_sentences(c.text)
            size = int(windows.params.get("window_sentences", DEFAULT_WINDOW_SENTENCES)) if windows is not None \
                else DEFAULT_WINDOW_SENTENCES
            runs = [(sentences[a][0], sentences[b - 1][1]) for a, b in sentence_windows(len(sentences), size)]
            if windows is None or query_vector is None or not runs:
                return spans, shape.best_window_by_terms(spans, runs)
            first, last = int(windows.window_offsets[c.chunk]), int(windows.window_offsets[c.chunk + 1])
            rows = np.asarray(windows.vectors[first:last], np.float32) * \
                np.asarray(windows.scales[first:last], np.float32)[:, None]
            # The title, when there is one, is the chunk's first window; the rest are the text's runs, in order.
            skip = (last - first) - len(runs)
            if skip not in (0, 1):
                return spans, shape.best_window_by_terms(spans, runs)
            similarity = rows[skip:] @ np.asarray(query_vector, np.float32)
            return spans, runs[int(np.argmax(similarity))]

        return highlight

    def chunk_tokens(self, chunk: int) -> int:
        return int(self._chunk_tokens[chunk])


def _chunk_fields(store: DocStore, chunk: int) -> ChunkFields:
    doc = store.chunk_doc(chunk)
    return ChunkFields(doc_id=store.doc_id(doc), chunk_id=store.chunk_id(chunk), title=store.doc_title(doc),
                       text=store.chunk_text(chunk), metadata=store.doc_metadata(doc))
