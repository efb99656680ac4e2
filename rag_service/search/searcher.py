"""What the server searches through: the `Searcher` protocol, and the part of a request that every searcher shares.

Two searchers implement it: `Pipeline` (one local index, search/pipeline.py) and `ShardedPipeline` (a shard set
behind a router, shard/router.py). Both derive from `SearcherBase`, which owns the front of the request path

    plan (adaptive route) -> [before the encode] -> encode -> cache stage: semantic lookup -> [the searcher's ranking]
    -> cache stage: store

and both build their reply contexts with `assemble_contexts`. A searcher supplies `_rank` (first stage, fusion,
rerank, context filter), optionally `_before_encode` (what needs no query vector: a large index's BM25 runs beside
the encode), and the few facts below.

The cache reaches a searcher in two places only: an exact lookup before `search` (CachedSearch, search/cache.py), and
the `CacheStage` passed into `search`, which the searcher calls after its encode. The stage checks a semantic hit with
the searcher's `guard` (the index's own BM25 terms and candidates), never with the index's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from rag_service.core.config import SearchDefaults
from rag_service.core.filter import Tree
from rag_service.core.params import (
    Capabilities,
    ContextResult,
    FeatureRow,
    IndexSummary,
    SearchParams,
    SearchResult,
    check_deadline,
)
from rag_service.core.timing import StageTimer
from rag_service.encoder.encode import SearchEncoder
from rag_service.kernels.native import FusionResult
from rag_service.search import adaptive
from rag_service.search import rerank as rerank_mod
from rag_service.search.context_filter import Selection


class Ahead(Protocol):
    """What a searcher did for a request before its encode (SearcherBase._before_encode). `beside`: part of the search
    runs on another thread meanwhile, on the cores the encode would otherwise take."""

    @property
    def beside(self) -> bool: ...


class LexicalGuard(Protocol):
    """What the semantic cache asks of an index to tell whether two queries would get the same answer."""

    def guard_terms(self, query: str) -> tuple[dict[str, float], np.ndarray]:
        """From one analysis of the query: its index terms with their idf (a term the index lacks weighs the most),
        and its BM25 input, the index term ids with repeats, sorted (int64). BM25 scores a multiset of terms, so two
        queries with equal inputs get the same BM25 ranking under the same filters."""
        ...

    def lexical_candidates(self, lexical_input: np.ndarray, filters: dict[str, str], depth: int,
                           tree: Tree | None = None) -> np.ndarray:
        """The BM25 top `depth` chunk ids of a query's `lexical_input` under `filters` and the structured filter
        `tree`, sorted by id."""
        ...


class CacheStage(Protocol):
    """The cache's part inside a search, called by the searcher once the query vector is known."""

    def lookup(self, vector: np.ndarray, guard: LexicalGuard | None) -> SearchResult | None:
        """A cached answer for this request (a semantic hit), or None."""
        ...

    def store(self, vector: np.ndarray, result: SearchResult, guard: LexicalGuard | None) -> None:
        """Keeps a fresh answer (only complete ones are kept)."""
        ...


class Searcher(Protocol):
    """The one interface the server, the cache, Prefetch and StreamSearch use, whatever serves the index."""

    policy: adaptive.AdaptivePolicy
    encoder: SearchEncoder
    # The search defaults requests take for this index (core/config.py index_defaults); None: the server's.
    search_defaults: SearchDefaults | None
    # The keyword metadata field holding each passage's tenant; None: the index is not divided by tenant.
    tenant_key: str | None
    # The collection this searcher serves as (api/collections.py names it at load): part of every cache key.
    collection: str

    @property
    def version(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def guard(self) -> LexicalGuard | None: ...

    def summary(self) -> IndexSummary: ...

    def encode(self, query: str, deadline: float | None = None, idle: bool | None = None) -> np.ndarray: ...

    def search(self, params: SearchParams, *, query_vector: np.ndarray | None = None,
               deadline: float | None = None, timer: StageTimer | None = None, arrival: float | None = None,
               cache: CacheStage | None = None) -> SearchResult: ...

    def close(self) -> None: ...


class SearcherBase:
    """The shared front of a search. Subclasses set `encoder`, `policy` and implement `capabilities`, `version`
    and `_rank`."""

    encoder: SearchEncoder
    policy: adaptive.AdaptivePolicy
    search_defaults: SearchDefaults | None = None
    tenant_key: str | None = None
    collection: str = ""

    @property
    def version(self) -> str:
        raise NotImplementedError

    @property
    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    @property
    def guard(self) -> LexicalGuard | None:
        return None

    def close(self) -> None:
        """Releases what the searcher holds open (channels); a local index holds nothing to release."""

    def encode(self, query: str, deadline: float | None = None, idle: bool | None = None) -> np.ndarray:
        """`idle`: whether the encode may take the idle cores; None: when the search is alone in the server."""
        encode_one = getattr(self.encoder, "encode_one", None)
        if deadline is not None and encode_one is not None:  # a MicroBatcher bounds its wait by the deadline
            return encode_one(query, deadline)
        # Alone in the server, the encode, most of a search's time, may take the idle cores.
        return self.encoder.encode_queries([query], idle=self.policy.alone() if idle is None else idle)[0]

    def plan(self, params: SearchParams, *, deadline: float | None = None, encoded: bool = False,
             arrival: float | None = None) -> adaptive.Plan:
        """The route a request would take now (it changes nothing: tests and benchmarks inspect the policy)."""
        caps = self.capabilities
        return self.policy.plan(params, deadline, self.policy.in_flight + 1, encoded, caps.rerank, arrival,
                                lexical_available=caps.lexical_route)

    def search(self, params: SearchParams, *, query_vector: np.ndarray | None = None,
               deadline: float | None = None, timer: StageTimer | None = None, arrival: float | None = None,
               cache: CacheStage | None = None) -> SearchResult:
        """`deadline` is on the time.monotonic() clock; past it, the next stage raises DeadlineExceeded.
        `query_vector`: the caller encoded already (a batch, a benchmark). `cache`: the cache's stage for this
        request (semantic lookup after the encode, store at the end); None for a cache-bypassing caller."""
        timer = timer or StageTimer()
        caps = self.capabilities
        in_flight = self.policy.enter()
        # The lexical route is decided before the encode: it is the one route that skips it.
        plan = self.policy.plan(params, deadline, in_flight, query_vector is not None, caps.rerank, arrival,
                                lexical_available=caps.lexical_route)
        try:
            if plan.route == adaptive.LEXICAL:
                return self._finish(params, self._rank(plan, None, deadline, timer))
            ahead = None
            alone = False
            if query_vector is None:
                alone = self.policy.alone()
                ahead = self._before_encode(plan, alone, timer)
                # The idle cores go to the encode unless part of the search runs on them meanwhile.
                query_vector = self._encode_stage(params.query, deadline, timer,
                                                  idle=alone and (ahead is None or not ahead.beside))
                # Planned again with the encode paid: the rest of the budget decides depth and rerank. Without a
                # budget, or with one the encode cannot have brought into play, the plan stands.
                if self.policy.replan_after_encode(plan):
                    plan = self.policy.plan(params, deadline, in_flight, True, caps.rerank, arrival,
                                            lexical_available=caps.lexical_route)
            if cache is not None:
                with timer.stage("cache_semantic"):
                    hit = cache.lookup(query_vector, self.guard)
                if hit is not None:
                    return hit
            result = self._finish(params, self._rank(plan, query_vector, deadline, timer, ahead, alone))
            if cache is not None:
                with timer.stage("cache_store"):
                    cache.store(query_vector, result, self.guard)
            return result
        finally:
            self.policy.leave(plan)

    def _encode_stage(self, query: str, deadline: float | None, timer: StageTimer,
                      idle: bool | None = None) -> np.ndarray:
        check_deadline(deadline, "encode")
        with timer.stage("encode"):
            return self.encode(query, deadline, idle)

    def _before_encode(self, plan: adaptive.Plan, alone: bool, timer: StageTimer) -> Ahead | None:
        """What of the search can be done before its query is encoded (Ahead), or None: nothing here."""
        return None

    def _rank(self, plan: adaptive.Plan, query_vector: np.ndarray | None, deadline: float | None,
              timer: StageTimer, ahead: Ahead | None = None, alone: bool = False) -> SearchResult:
        """Everything after the encode: first stage, fusion, rerank, context filter, contexts. `query_vector` is
        None only on the lexical route; `ahead`: what _before_encode did for this request; `alone`: the search is
        alone in the server (AdaptivePolicy.alone, asked before its encode), so it may use the idle cores."""
        raise NotImplementedError

    def _finish(self, params: SearchParams, result: SearchResult) -> SearchResult:
        result.complete = _complete(params, result, self.capabilities)
        return result


def _complete(params: SearchParams, result: SearchResult, caps: Capabilities) -> bool:
    """Whether `result` is what `params` ask for: not cut short by the adaptive policy (load, a tight budget) nor
    missing a shard's documents. A later request with room to spare must get the full answer, so the cache keeps only
    complete results."""
    if result.partial:
        return False
    if result.route in (adaptive.FULL, adaptive.CONFIDENT):
        return True
    if result.route == adaptive.FUSED:  # by design when no rerank was asked or the index cannot rerank; else budget
        return not params.rerank or not caps.rerank
    return False


def quality_signals(fused: FusionResult, bm25_ids: np.ndarray,
                    dense_ids: np.ndarray) -> tuple[float, float, float | None] | None:
    """(top-1 fused score, top-10 fused score, overlap@10 of the BM25 and dense lists) for the quality metrics and
    the cache's guard; None without candidates; overlap None when dense retrieval did not run. The overlap is the share
    of the shorter top 10 found in the other (BM25 finds fewer than 10 chunks on a small index or a rare word), and 0
    when BM25 found nothing."""
    scores = fused.scores
    n = len(scores)
    if n == 0:
        return None
    overlap = None
    if len(dense_ids):
        top, other = bm25_ids[:10], dense_ids[:10]
        shorter = min(len(top), len(other))
        overlap = len(set(top.tolist()).intersection(other.tolist())) / shorter if shorter else 0.0
    return float(scores[0]), float(scores[min(9, n - 1)]), overlap


class ChunkFields(NamedTuple):
    """A chunk's reply fields, from wherever the searcher keeps them (a local store, a shard's answer)."""

    doc_id: str
    chunk_id: str
    title: str
    text: str
    metadata: dict[str, str]


_STORED = frozenset(ChunkFields._fields)


class StoredContext(ContextResult):
    """A reply context whose index fields (doc_id, chunk_id, title, text, metadata) are read from the index when
    something first reads one of them. A reply joined from prepared bytes (api/reply.py) never does, and those reads
    touch memory-mapped columns that are cold by the time a request gets there (~11 µs a context in the server).
    Compares, copies and pickles as the ContextResult it stands for."""

    def __getattr__(self, name: str):  # only for attributes not set yet: the stored fields before the first read
        state = self.__dict__
        read = state.get("_read")
        if read is None or name not in _STORED:
            raise AttributeError(name)
        for key, value in read(state["chunk"])._asdict().items():
            state.setdefault(key, value)  # a field a copy was given (replace_context) stays
        state.pop("_read", None)
        return state[name]

    @property
    def resolved(self) -> bool:
        """Whether the stored fields have been read (and are held by this object)."""
        return "_read" not in self.__dict__

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in _CONTEXT_FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContextResult):
            return NotImplemented
        return self._values() == tuple(getattr(other, f) for f in _CONTEXT_FIELDS)

    def __reduce__(self):
        return ContextResult, self._values()


_CONTEXT_FIELDS = tuple(f.name for f in dataclasses.fields(ContextResult))


def replace_context(context: ContextResult, **changes: Any) -> ContextResult:
    """dataclasses.replace(context, **changes), without reading a StoredContext's stored fields: the copy reads
    them when it needs them, as the original would have."""
    if not isinstance(context, StoredContext) or context.resolved or "chunk" in changes:
        return dataclasses.replace(context, **changes)
    unknown = changes.keys() - set(_CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"ContextResult has no field {sorted(unknown)[0]!r}")
    copy = object.__new__(StoredContext)
    copy.__dict__.update(context.__dict__, **changes)
    return copy


def assemble_contexts(fused: FusionResult, order: np.ndarray, selection: Selection,
                      reranked: rerank_mod.Reranked | None, fields: Callable[[int], ChunkFields] | None = None,
                      ranks: Sequence[int] | np.ndarray | None = None,
                      stored: Callable[[int], ChunkFields] | None = None) -> list[ContextResult]:
    """Reply contexts for the ranking positions `selection.positions` of `order` (indices into `fused`).

    The reply fields come from `fields(at)` for fused candidate `at`, read now, or from `stored(chunk)` by chunk id,
    read when first used (StoredContext; `stored` must stay valid as long as the contexts live: a local index's
    store does). `ranks[pos]` is ranking position pos's row in `reranked` (default: pos itself)."""
    if (fields is None) == (stored is None):
        raise ValueError("assemble_contexts takes one of fields and stored")
    out: list[ContextResult] = []
    tokens = selection.tokens
    for n, pos in enumerate(selection.positions):
        at = int(order[pos])
        rank = pos if ranks is None else int(ranks[pos])
        chunk, score = int(fused.ids[at]), float(fused.scores[at])
        bm25, dense = float(fused.bm25[at]), float(fused.dense[at])
        rerank_score = float(reranked.scores[rank]) if reranked is not None and rank < len(reranked.scores) \
            else None
        own: dict[str, Any] = {"chunk": chunk, "score": rerank_score if rerank_score is not None else score,
               "bm25_score": None if bm25 != bm25 else bm25,  # NaN: the retriever did not return this chunk
               "dense_score": None if dense != dense else dense, "rerank_score": rerank_score,
               "features": reranked.feature_dict(rank) if rerank_score is not None and reranked is not None
               else None,
               "tokens": tokens[n] if tokens else 0, "fused_score": score}
        if stored is not None:
            # Built without the frozen dataclass's __init__ (one setattr per field): the defaults it would set,
            # then this context's own values.
            context = object.__new__(StoredContext)
            context.__dict__.update(_LAZY_DEFAULTS, **own, _read=stored)
            out.append(context)
        elif fields is not None:
            out.append(ContextResult(**fields(at)._asdict(), **own))
    return out


_LAZY_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ContextResult)
                  if f.name not in _STORED and f.default is not dataclasses.MISSING}
# A packed StoredContext (pack_contexts): these values in this order, then whether it has features.
_PACKED = ("chunk", "score", "bm25_score", "dense_score", "rerank_score", "tokens", "fused_score")
# What an unshaped StoredContext holds besides those: the query API's fields at their defaults, and its reader.
_UNSHAPED = tuple((name, default) for name, default in _LAZY_DEFAULTS.items()
                  if name not in _PACKED and name != "features")
_PACKED_STATE = {*_LAZY_DEFAULTS, *_PACKED, "features", "_read"}


class PackedContexts(NamedTuple):
    """Unshaped, unread StoredContexts of one reader as flat tuples of numbers and strings and one array: the
    collector stops tracking such a tuple at its first pass over it (a nested one takes a pass per level), where ten
    live contexts are ~40 tracked objects. A cache entry holds its contexts packed for minutes (api/heap.py says why
    that count matters)."""

    read: Callable[[int], ChunkFields]
    values: tuple  # len(_PACKED) values per context, one context after another
    featured: tuple[bool, ...]  # per context: whether it has features (the reranker scored it)
    names: tuple[str, ...]  # the feature names, one set for every context
    features: np.ndarray | None  # float32 (contexts, features): a featured context's row (zeros for the others)

    def unpack(self) -> list[ContextResult]:
        """New StoredContexts equal to the packed ones."""
        out: list[ContextResult] = []
        read, values, width = self.read, self.values, len(_PACKED)
        for i, featured in enumerate(self.featured):
            context = object.__new__(StoredContext)
            state = context.__dict__
            state.update(_LAZY_DEFAULTS)
            state.update(zip(_PACKED, values[i * width:(i + 1) * width]))
            if featured and self.features is not None:
                state["features"] = FeatureRow(self.names, self.features[i])
            state["_read"] = read
            out.append(context)
        return out


def pack_contexts(contexts: Sequence[ContextResult]) -> PackedContexts | None:
    """`contexts` packed (PackedContexts), or None when one of them holds more than its chunk, scores and features:
    fields already read, the query API's fields, another kind of context, another reader, features that are not a
    float32 row or under other names."""
    read = None
    values: list = []
    featured: list[bool] = []
    rows: list[tuple[int, np.ndarray]] = []
    names: tuple[str, ...] = ()
    for context in contexts:
        if type(context) is not StoredContext:
            return None
        state = context.__dict__
        if state.keys() != _PACKED_STATE or (read is not None and state["_read"] is not read):
            return None
        read = state["_read"]
        if any(state[name] != default for name, default in _UNSHAPED):
            return None
        values.extend([state[name] for name in _PACKED])
        features = state["features"]
        if features is None:
            featured.append(False)
            continue
        if type(features) is not FeatureRow:
            return None
        row_names, row = features.parts()
        if not (isinstance(row, np.ndarray) and row.dtype == np.float32 and row.ndim == 1):
            return None
        if not rows:
            names = tuple(row_names)
        elif tuple(row_names) != names:
            return None
        rows.append((len(featured), row))
        featured.append(True)
    if read is None:  # no contexts: nothing to read them with
        return PackedContexts(_no_reader, (), (), (), None)
    matrix = None
    if rows:
        matrix = np.zeros((len(featured), len(names)), dtype=np.float32)
        for at, kept in rows:
            matrix[at] = kept
    return PackedContexts(read, tuple(values), tuple(featured), names, matrix)


def _no_reader(chunk: int) -> ChunkFields:
    raise LookupError(f"chunk {chunk}: an empty packed list has no reader")
