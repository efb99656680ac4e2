"""The request path, stage by stage: filter mask, encode, lexical || dense, fusion, assemble.

Plain function calls on plain data: the pipeline knows no gRPC, stages know no pipeline. Each stage is timed so the
server can report per-stage latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from rag_service import fusion
from rag_service.encode import Encoder
from rag_service.errors import DeadlineExceeded
from rag_service.index.load import Index
from rag_service.native import FusionResult
from rag_service.timing import StageTimer


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


@dataclass
class Candidates:
    """First-stage output of one query, kept whole for evaluation (bench) and debugging."""

    bm25: tuple[np.ndarray, np.ndarray]
    dense: tuple[np.ndarray, np.ndarray]
    fused: FusionResult


@dataclass
class SearchResult:
    contexts: list[ContextResult]
    index_version: str
    stage_us: dict[str, int]
    context_tokens: int = 0
    route: str = "full"  # the adaptive pipeline's choice, and why
    route_reason: str = ""


def check_deadline(deadline: float | None, stage: str) -> None:
    """Stops a request whose caller has given up: work past the deadline is wasted and delays the others."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"deadline passed before stage {stage!r}; the request was stopped there")


class Pipeline:
    """One index and one query encoder; thread-safe (stages allocate per call), so a thread pool can share it."""

    def __init__(self, index: Index, encoder: Encoder) -> None:
        if encoder.dim != index.manifest["model"]["dim"]:
            raise ValueError(f"encoder dimension {encoder.dim} != index dimension {index.manifest['model']['dim']}")
        self.index = index
        self.encoder = encoder

    @property
    def version(self) -> str:
        return self.index.version

    def encode(self, query: str) -> np.ndarray:
        return self.encoder.encode_queries([query])[0]

    def retrieve(self, params: SearchParams, timer: StageTimer | None = None,
                 query_vector: np.ndarray | None = None, deadline: float | None = None) -> Candidates:
        """`deadline` is on the time.monotonic() clock; past it, the next stage raises DeadlineExceeded."""
        timer = timer or StageTimer()
        with timer.stage("filter"):
            mask = self.index.filter_mask(params.filters)
        if query_vector is None:
            check_deadline(deadline, "encode")
            with timer.stage("encode"):
                query_vector = self.encode(params.query)
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
        return Candidates(bm25=bm25, dense=dense, fused=fused)

    def search(self, params: SearchParams, *, query_vector: np.ndarray | None = None,
               deadline: float | None = None, timer: StageTimer | None = None) -> SearchResult:
        timer = timer or StageTimer()
        candidates = self.retrieve(params, timer, query_vector=query_vector, deadline=deadline)
        check_deadline(deadline, "assemble")
        with timer.stage("assemble"):
            contexts = self.assemble(candidates.fused)
        return SearchResult(contexts=contexts, index_version=self.version, stage_us=timer.us)

    def assemble(self, fused: FusionResult) -> list[ContextResult]:
        store = self.index.store
        out = []
        for chunk, score, bm25, dense in zip(fused.ids.tolist(), fused.scores.tolist(), fused.bm25.tolist(),
                                             fused.dense.tolist()):
            doc = store.chunk_doc(chunk)
            out.append(ContextResult(
                chunk=chunk,
                doc_id=store.doc_id(doc),
                chunk_id=store.chunk_id(chunk),
                title=store.doc_title(doc),
                text=store.chunk_text(chunk),
                metadata=store.doc_metadata(doc),
                score=score,
                bm25_score=None if bm25 != bm25 else bm25,  # NaN: the retriever did not return this chunk
                dense_score=None if dense != dense else dense,
            ))
        return out
