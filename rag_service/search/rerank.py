"""Rerank stage: features of the fused candidates, combined by a model fitted on SciFact train (tools/fit_reranker.py).

The features are signals MiniLM and BM25 were built for, read from what the index stores for this stage
(rag_service.index.windows): the query's cosine with each sentence window of a chunk (window MaxSim, native kernel),
BM25 recomputed exactly for every candidate and over the chunk's title and windows (from the stored token streams),
term proximity (native kernel), the candidate's rank in each retriever, and a vector pseudo-relevance-feedback score.
Every feature is on a per-query scale that does not depend on the corpus (cosines, ratios, or BM25 divided by the
query's best candidate), so weights fitted on one collection carry to another (bench/README.md shows cranfield).

The model is a JSON file shipped in the package (rerank_model.json) that carries the sha256 of its own content; a
file that does not match its checksum does not load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.core.params import FeatureRow
from rag_service.index.windows import WindowData
from rag_service.kernels import native
from rag_service.kernels.reference import RERANK_FEATURES, RERANK_LOCAL_FEATURES
from rag_service.retrievers.lexical import BM25Index, idf_values

MODEL_FORMAT = 1
MODEL_RESOURCE = "rerank_model.json"

# Every feature this stage can compute, in column order (each explained in rag_service.kernels.reference, beside the
# kernels that compute them). A model names the subset it uses.
FEATURES = RERANK_FEATURES
# Columns of local_features: what depends on one candidate alone (and corpus statistics), so a shard that holds the
# candidate computes it bit for bit as one index would (rag_service/shard/).
LOCAL_FEATURES = RERANK_LOCAL_FEATURES


class ModelError(ValueError):
    """A rerank model file that cannot be used: unreadable, wrong format, or not matching its checksum."""


def _content_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class RerankModel:
    """score = features[:, columns] @ weights + bias; `columns` are positions in FEATURES."""

    features: tuple[str, ...]
    weights: np.ndarray
    bias: float
    info: dict[str, Any]  # how it was fitted: data, figures, window_sentences

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown:
            raise ModelError(f"rerank model uses unknown features {unknown}; known: {', '.join(FEATURES)}")
        if len(self.weights) != len(self.features):
            raise ModelError(f"rerank model has {len(self.weights)} weights for {len(self.features)} features")
        if not (np.all(np.isfinite(self.weights)) and math.isfinite(self.bias)):
            raise ModelError("rerank model weights must be finite")

    @functools.cached_property
    def columns(self) -> np.ndarray:
        return np.asarray([FEATURES.index(f) for f in self.features], dtype=np.int64)

    def body(self) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, "kind": "linear", "features": list(self.features),
                "weights": [float(w) for w in self.weights], "bias": float(self.bias), "info": self.info}

    def to_json(self) -> str:
        body = self.body()
        return json.dumps({**body, "sha256": _content_digest(body)}, indent=2) + "\n"

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @property
    def sha256(self) -> str:
        return _content_digest(self.body())

    @classmethod
    def from_json(cls, text: str, where: str = "rerank model") -> RerankModel:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"{where}: not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT or data.get("kind") != "linear":
            raise ModelError(f"{where}: not a format-{MODEL_FORMAT} linear rerank model")
        recorded = data.pop("sha256", None)
        if recorded != _content_digest(data):
            raise ModelError(f"{where}: checksum mismatch (content sha256 {_content_digest(data)[:16]}..., file says "
                             f"{str(recorded)[:16]}...)")
        try:
            return cls(features=tuple(data["features"]), weights=np.asarray(data["weights"], dtype=np.float32),
                       bias=float(data["bias"]), info=dict(data.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: Path | str | None = None) -> RerankModel:
        """The model at `path`, or the one shipped in the package when None."""
        if path is None:
            text = resources.files("rag_service.search").joinpath(MODEL_RESOURCE).read_text(encoding="utf-8")
            return cls.from_json(text, f"rag_service/search/{MODEL_RESOURCE}")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ModelError(f"{path}: cannot read: {e}") from None
        return cls.from_json(text, str(path))

    def score(self, features: np.ndarray) -> np.ndarray:
        return native.linear_scores(np.ascontiguousarray(features[:, self.columns]), self.weights, self.bias)


@dataclass
class RerankStore:
    """What the reranker reads from a loaded index: windows and token streams, BM25 statistics, chunk vectors, and
    the native rerank stage built over them once (kernels.native.RerankCore)."""

    windows: WindowData
    bm25: BM25Index
    vectors: np.ndarray  # float32 (chunks, dim), the dense index's exact vectors
    avg_title: float
    avg_window: float
    core: native.RerankCore
    # idf of every term, when it depends on the term's df alone (lucene); okapi's floor depends on the query's terms
    idf: np.ndarray | None = None

    @classmethod
    def create(cls, windows: WindowData, bm25: BM25Index, vectors: np.ndarray) -> RerankStore:
        # A shard carries the whole corpus' averages (shard/split.py) so its features equal one index's.
        corpus = windows.params.get("corpus") or {}
        avg_title, avg_window = corpus.get("avg_title"), corpus.get("avg_window")
        if avg_title is None or avg_window is None:
            avg_title, avg_window = corpus_averages(windows)
        w = windows
        core = native.RerankCore(
            window_offsets=np.ascontiguousarray(w.window_offsets, dtype=np.int64),
            window_vectors=np.ascontiguousarray(w.vectors),
            window_scales=np.ascontiguousarray(w.scales, dtype=np.float32) if w.vectors.dtype == np.int8 else None,
            window_spans=np.ascontiguousarray(w.window_spans, dtype=np.int32),
            tokens=np.ascontiguousarray(w.tokens, dtype=np.int32),
            token_offsets=np.ascontiguousarray(w.token_offsets, dtype=np.int64),
            title_lengths=np.ascontiguousarray(w.title_lengths, dtype=np.int32),
            dense_vectors=np.ascontiguousarray(vectors, dtype=np.float32),
            k1=bm25.k1, b=bm25.b, avgdl=bm25.avgdl, avg_title=float(avg_title), avg_window=float(avg_window))
        idf = idf_values(bm25.df, bm25.corpus_chunks, bm25.idf_kind) if bm25.idf_kind == "lucene" else None
        return cls(windows=windows, bm25=bm25, vectors=vectors, avg_title=float(avg_title),
                   avg_window=float(avg_window), core=core, idf=idf)

    def query_terms(self, query: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct term ids int32 ascending, count in the query float64, idf float64) of the query's known terms."""
        return self.terms_of(self.bm25.query_term_ids(query))

    def terms_of(self, term_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """query_terms from the query's known term ids with repeats (BM25's input), so one analysis serves both."""
        terms, counts = np.unique(term_ids, return_counts=True)
        if self.idf is not None:
            idf = self.idf[terms]
        elif len(terms):
            idf = np.asarray(idf_values(self.bm25.df[terms], self.bm25.corpus_chunks, self.bm25.idf_kind))
        else:
            idf = np.zeros(0)
        return terms.astype(np.int32), counts.astype(np.float64), np.asarray(idf, dtype=np.float64)


def corpus_averages(windows: WindowData) -> tuple[float, float]:
    """(mean title length over chunks with a title, mean window length) in tokens: the b-normalisation of the
    title and window BM25 features."""
    spans = np.asarray(windows.window_spans)
    avg_window = float((spans[:, 1] - spans[:, 0]).mean()) if len(spans) else 1.0
    titles = np.asarray(windows.title_lengths)
    avg_title = float(titles[titles > 0].mean()) if np.any(titles > 0) else 1.0
    return avg_title, avg_window


def local_features(store: RerankStore, query: str, query_vector: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float32 (m, len(LOCAL_FEATURES)) per candidate: raw BM25 of chunk/title/best window, coverage, window MaxSim
    (NaN for a chunk without windows) and proximity. Each row depends on its candidate only."""
    terms, counts, idf = store.query_terms(query)
    return store.core.local_features(query_vector, terms, counts, idf, candidates)


def finish_features(local: np.ndarray, vectors: np.ndarray, query_vector: np.ndarray, candidates: np.ndarray,
                    fused_scores: np.ndarray, bm25_ranked: np.ndarray, dense_ranked: np.ndarray) -> np.ndarray:
    """float32 (m, len(FEATURES)) from the candidates' local features and chunk vectors (in fused order, best first)
    plus what needs the whole candidate list: scales by the query's best, ranks, the PRF centroid."""
    return native.finish_features(local, vectors, query_vector, candidates, fused_scores, bm25_ranked, dense_ranked)


def compute_features(store: RerankStore, query: str, query_vector: np.ndarray, candidates: np.ndarray,
                     fused_scores: np.ndarray, bm25_ranked: np.ndarray, dense_ranked: np.ndarray) -> np.ndarray:
    """float32 (m, len(FEATURES)) for `candidates` (chunk ids in fused order, best first)."""
    cands = np.ascontiguousarray(candidates, dtype=np.int64)
    if len(cands) == 0:
        return np.zeros((0, len(FEATURES)), dtype=np.float32)
    local = local_features(store, query, query_vector, cands)
    return finish_features(local, np.asarray(store.vectors[cands], dtype=np.float32), query_vector, cands,
                           fused_scores, bm25_ranked, dense_ranked)


@dataclass
class Reranked:
    """Candidates in rerank order with their scores and feature rows (FEATURES columns)."""

    ids: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    order: np.ndarray  # positions in the input candidate list

    def feature_dict(self, i: int) -> FeatureRow:
        return FeatureRow(FEATURES, self.features[i])


def rerank(store: RerankStore, model: RerankModel, query: str, query_vector: np.ndarray, candidates: np.ndarray,
           fused_scores: np.ndarray, bm25_ranked: np.ndarray, dense_ranked: np.ndarray) -> Reranked:
    """Scores `candidates` with `model` and sorts them by score (ties keep the fused order): compute_features then
    rank, in one native call."""
    terms, counts, idf = store.query_terms(query)
    ids, scores, features, order = store.core.rerank(query_vector, terms, counts, idf, candidates, fused_scores,
                                                     bm25_ranked, dense_ranked, model.columns, model.weights,
                                                     model.bias)
    return Reranked(ids=ids, scores=scores, features=features, order=order)


def final_order(fused_scores: np.ndarray, reranked: Reranked | None) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the fused list in final order, and the relevance the context filter ranks them by.

    Candidates past rerank_depth (a caller asking for more contexts than were reranked) follow the reranked ones in
    fused order, below every reranked score. Shared by a single index and the shard router, so both rank alike."""
    if reranked is None:
        return np.arange(len(fused_scores)), fused_scores
    tail = np.arange(len(reranked.order), len(fused_scores))
    floor = float(reranked.scores.min()) if len(reranked.scores) else 0.0
    relevance = np.concatenate([reranked.scores, floor - 1.0 - fused_scores.max(initial=0.0) + fused_scores[tail]])
    return np.concatenate([reranked.order, tail]), relevance.astype(np.float32)


def final_top(n_fused: int, reranked: Reranked | None, k: int) -> np.ndarray:
    """The first k positions of final_order's order, without the relevance: what a context filter that keeps the
    ranking as it is (no MMR, dedup or budget) returns."""
    if reranked is None:
        return np.arange(min(k, n_fused))
    m = len(reranked.order)
    if m >= k or m >= n_fused:
        return reranked.order[:k]
    return np.concatenate([reranked.order, np.arange(m, min(n_fused, k))])


def rank(model: RerankModel, candidates: np.ndarray, features: np.ndarray) -> Reranked:
    """Scores feature rows (FEATURES columns) of `candidates` and sorts by score, ties in the given order."""
    scores, order = native.rank_features(features, model.columns, model.weights, model.bias)
    return Reranked(ids=np.asarray(candidates, dtype=np.int64)[order], scores=scores, features=features[order],
                    order=order)
