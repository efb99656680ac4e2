"""The request path, stage by stage: filter mask, encode, lexical || dense, fusion, assemble.

Plain function calls on plain data: the pipeline knows no gRPC, stages know no pipeline. Each stage is timed so the
server can report per-stage latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rag_service import fusion
from rag_service.encode import Encoder
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

    def retrieve(self, params: SearchParams, timer: StageTimer | None = None,
                 query_vector: np.ndarray | None = None) -> Candidates:
        timer = timer or StageTimer()
        with timer.stage("filter"):
            mask = self.index.filter_mask(params.filters)
        if query_vector is None:
            with timer.stage("encode"):
                query_vector = self.encoder.encode_queries([params.query])[0]
        with timer.stage("lexical"):
            bm25 = self.index.bm25.search(params.query, params.depth, mask)
        with timer.stage("dense"):
            dense = self.index.dense.search(query_vector, params.depth, mask)
        with timer.stage("fusion"):
            fused = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight,
                                top_k=params.top_k, rrf_k=params.rrf_k)
        return Candidates(bm25=bm25, dense=dense, fused=fused)

    def search(self, params: SearchParams) -> SearchResult:
        timer = StageTimer()
        candidates = self.retrieve(params, timer)
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
