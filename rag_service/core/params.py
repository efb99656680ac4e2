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


# Warm-up touches every stage (numba compilation, faiss pages, the encoder's first call) before SERVING.
WARMUP_QUERIES = ("what is the effect of", "how does it work", "definition and examples", "error handling",
                  "performance of the method", "history", "configuration options", "results compared")


def check_deadline(deadline: float | None, stage: str) -> None:
    """Stops a request whose caller has given up: work past the deadline is wasted and delays the others."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"deadline passed before stage {stage!r}; the request was stopped there")
