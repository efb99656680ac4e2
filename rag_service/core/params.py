"""The request and result types every tier shares: what a search asks for (SearchParams) and what it answers
(SearchResult, ContextResult), plus the deadline check the stages share.

They sit at the bottom so that a stage, the cache, the adaptive policy and the shard router can all name them without
importing the pipeline. Defaults come from one place, `SearchDefaults` (core/config.py): a field left out of
SearchParams(...) takes the shipped default, and `SearchParams.from_defaults` applies a server's configured ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

from rag_service.core.config import SearchDefaults
from rag_service.core.errors import DeadlineExceeded
from rag_service.core.filter import Tree

_SHIPPED = SearchDefaults()


@dataclass(frozen=True)
class Decay:
    """A recency decay (search/shape.py): final score += weight x factor(|date - origin|), factor in [0, 1]."""

    field: str  # a metadata field holding dates (index/dates.py parses them)
    function: str = "exp"  # exp | linear | gauss
    origin: float = 0.0  # Unix seconds
    scale: float = 86400.0  # seconds, > 0: the distance (beyond offset) at which the factor is `decay`
    offset: float = 0.0  # seconds: distances up to this get factor 1
    decay: float = 0.5
    weight: float = 0.0


@dataclass(frozen=True)
class SearchParams:
    query: str
    top_k: int = _SHIPPED.top_k
    depth: int = _SHIPPED.depth
    fusion: str = _SHIPPED.fusion
    dense_weight: float = _SHIPPED.dense_weight
    rrf_k: float = _SHIPPED.rrf_k
    filters: dict[str, str] = field(default_factory=dict)
    filter: Tree | None = None  # the structured filter (core/filter.py), ANDed with `filters`
    rerank: bool = _SHIPPED.rerank
    rerank_depth: int = _SHIPPED.rerank_depth
    max_context_tokens: int = _SHIPPED.max_context_tokens  # 0: no budget
    mmr_lambda: float = _SHIPPED.mmr_lambda
    dedup_threshold: float = _SHIPPED.dedup_threshold
    budget_ms: float | None = None  # the request's latency budget, for the adaptive pipeline
    cache: str = "default"  # default | bypass | exact_only | strict
    require_complete: bool = False  # router only: a shard that does not answer fails the request (shard/router.py)
    # The query API's shaping of the ranking (search/shape.py); all off by default, and then nothing of it runs.
    group_size: int = 0  # > 0: grouped by document, at most this many chunks each; top_k and offset count documents
    offset: int = 0  # the page starts at this rank (documents when grouped)
    paged: bool = False  # the request asked for a page (offset or page_token): its reply carries the next token
    min_score: float | None = None  # contexts below it leave the reply
    decay: Decay | None = None
    highlight: bool = False  # matched query terms and the best sentence window per context
    explain: bool = False  # per-context explanations (debug replies)

    @property
    def shaped(self) -> bool:
        """Whether any of the query API's shaping options is set (the plain request skips search/shape.py)."""
        return bool(self.group_size or self.paged or self.decay is not None or self.min_score is not None
                    or self.highlight or self.explain)

    @classmethod
    def from_defaults(cls, query: str, defaults: SearchDefaults, **overrides: object) -> SearchParams:
        """Parameters for `query` with a server's configured defaults; `overrides` name SearchParams fields."""
        names = {f.name for f in fields(cls)}
        values: dict[str, object] = {k: v for k, v in defaults.model_dump().items() if k in names}
        values.update(overrides)
        return cls(query=query, **values)  # type: ignore[arg-type]  # values are typed by SearchDefaults' fields


class FeatureRow(Mapping[str, float]):
    """A read-only name -> value view of one row of a feature matrix. Every reranked context carries its features
    but only debug replies read them: a view costs nothing to make, where a dict per context cost ~15 µs."""

    __slots__ = ("_names", "_row")

    def __init__(self, names: Sequence[str], row: Sequence[float]) -> None:
        if len(names) != len(row):
            raise ValueError(f"{len(names)} feature names for {len(row)} values")
        self._names = names
        self._row = row

    def __getitem__(self, name: str) -> float:
        try:
            return float(self._row[self._names.index(name)])
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def parts(self) -> tuple[Sequence[str], Sequence[float]]:
        """(names, row): what this view was made of; FeatureRow(*parts) makes it again."""
        return self._names, self._row

    def values(self):  # one conversion for the row instead of a look-up per name
        return [float(v) for v in self._row]

    def __repr__(self) -> str:
        return f"FeatureRow({dict(self)!r})"


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
    features: Mapping[str, float] | None = None  # the reranker's inputs, reported with debug
    tokens: int = 0  # counted with the model's tokenizer, toward max_context_tokens
    fused_score: float | None = None  # the fusion score; `score` is the reranker's when it ran
    # The query API (search/shape.py): set only when the request asks for them.
    highlights: tuple[tuple[int, int, str], ...] = ()  # (start, end, term), code points of `text`
    best_window: tuple[int, int] | None = None
    explanation: Explanation | None = None
    document_score: float | None = None  # grouped replies: the best score of the context's document


@dataclass(frozen=True)
class Explanation:
    """Why a context has its score (search/shape.py); the terms add up to the score (api's Explanation message)."""

    fused_score: float
    bm25_rank: int | None = None  # 1-based
    bm25_normalized: float | None = None
    bm25_contribution: float | None = None
    dense_rank: int | None = None
    dense_normalized: float | None = None
    dense_contribution: float | None = None
    rerank_contributions: dict[str, float] | None = None  # feature -> weight x value
    rerank_bias: float | None = None
    decay_factor: float | None = None
    decay_contribution: float | None = None


@dataclass(frozen=True)
class DocumentGroup:
    doc_id: str
    score: float
    first: int  # contexts[first:first + count] are the document's
    count: int


@dataclass
class SearchResult:
    contexts: list[ContextResult]
    index_version: str
    stage_us: dict[str, int]
    context_tokens: int = 0
    route: str = "full"  # the adaptive pipeline's choice, and why
    route_reason: str = ""
    # False when the answer is not the one the parameters ask for: the adaptive policy cut it short (load, a tight
    # budget) or a shard is missing. Such answers are served but never cached.
    complete: bool = True
    # Router only (shard/router.py): some shard did not answer, so its documents are missing; which ones did.
    partial: bool = False
    shards_answered: list[str] = field(default_factory=list)
    shards_missing: list[str] = field(default_factory=list)
    # The query API (search/shape.py): grouped replies' documents, contexts dropped by min_score, the page's offset.
    groups: list[DocumentGroup] | None = None
    below_min_score: int = 0
    offset: int = 0
    full_page: bool = False  # the page has top_k contexts (documents when grouped) before min_score: more may follow
    shaped: bool = False  # set by search/shape.py: the contexts may carry the query API's fields
    # Which retrievers and stages ran: bm25, dense, rerank.
    legs: tuple[str, ...] = ()
    # Label-free quality signals (core/metrics.py): top-1 and top-10 fused scores, BM25/dense overlap@10 (None on
    # the lexical route).
    signals: tuple[float, float, float | None] | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a searcher can do, for the callers that adapt to it (the cache, the adaptive policy, GetIndexInfo)."""

    rerank: bool  # the index has sentence windows: the reranker can run
    lexical_route: bool  # BM25 alone, without a query vector (a local index; not the shard router)
    semantic_guard: bool  # the cache's semantic hits can be checked against this index's BM25 (a local index)


@dataclass(frozen=True)
class IndexSummary:
    """What the server reports of the index behind a searcher (GetIndexInfo, metrics, logs)."""

    name: str
    version: str
    path: str
    manifest: dict
    n_docs: int
    n_chunks: int
    metadata_fields: list[str]
    dense_kind: str
    # Field -> (type, distinct values of a keyword or keyword list field, else 0); see index/metadata.py.
    metadata_schema: dict[str, tuple[str, int]] = field(default_factory=dict)
    tenant_key: str | None = None  # the keyword field holding each passage's tenant (api/tenancy.py)


# Warm-up touches every stage (numba compilation, faiss pages, the encoder's first call) before SERVING.
WARMUP_QUERIES = ("what is the effect of", "how does it work", "definition and examples", "error handling",
                  "performance of the method", "history", "configuration options", "results compared")


def check_deadline(deadline: float | None, stage: str) -> None:
    """Stops a request whose caller has given up: work past the deadline is wasted and delays the others."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"deadline passed before stage {stage!r}; the request was stopped there")
