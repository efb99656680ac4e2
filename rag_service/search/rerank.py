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

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from rag_service.index.windows import WindowData
from rag_service.kernels import native
from rag_service.retrievers.lexical import BM25Index, idf_values

MODEL_FORMAT = 1
MODEL_RESOURCE = "rerank_model.json"

# Every feature this stage can compute, in column order. A model names the subset it uses.
FEATURES = (
    "fused",        # the fusion score (min-max weighted), as fusion ranked the candidates
    "bm25",         # BM25 of the chunk, exact for every candidate, / the query's best candidate
    "dense",        # exact cosine of the query with the chunk vector
    "win_max",      # max cosine over the chunk's sentence windows (title included)
    "win_top2",     # mean of the two best window cosines
    "win_soft",     # soft max (log-sum-exp, T = 0.05) of the window cosines
    "bm25_title",   # BM25 over the title tokens only, / the query's best
    "bm25_window",  # best BM25 over the chunk's windows, / the query's best
    "proximity",    # distinct query terms matched / shortest span covering them (0 when fewer than 2 match)
    "coverage",     # idf-weighted share of the query terms the chunk contains
    "rr_bm25",      # 10 / (10 + BM25 rank), 0 when BM25 did not return the chunk
    "rr_dense",     # 10 / (10 + dense rank), 0 when dense did not return the chunk
    "prf",          # cosine with the centroid of the 3 best fused candidates' vectors
)
_RANK_K = 10.0
_PRF_TOP = 3


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

    @property
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


# Lexical features from the token streams ---------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _lexical_features(tokens, t_off, title_len, w_off, w_spans, cands, qterms, qcount, idf, k1, b,
                      avgdl, avg_title, avg_window):
    """Per candidate: BM25 of the chunk, of its title, best over its windows, and idf-weighted query coverage."""
    m = cands.shape[0]
    nq = qterms.shape[0]
    out = np.zeros((m, 4), dtype=np.float32)
    total_idf = 0.0
    for j in range(nq):
        total_idf += idf[j]
    tf = np.zeros(nq, dtype=np.float64)
    for r in range(m):
        c = cands[r]
        start = t_off[c]
        n = t_off[c + 1] - start
        qi = np.full(n, -1, dtype=np.int64)
        for p in range(n):
            t = tokens[start + p]
            for j in range(nq):
                if qterms[j] == t:
                    qi[p] = j
                    break
        # whole chunk
        tf[:] = 0.0
        for p in range(n):
            if qi[p] >= 0:
                tf[qi[p]] += 1.0
        score = 0.0
        covered = 0.0
        norm = k1 * (1.0 - b + b * n / max(avgdl, 1e-9))
        for j in range(nq):
            if tf[j] > 0:
                score += qcount[j] * idf[j] * tf[j] * (k1 + 1.0) / (tf[j] + norm)
                covered += idf[j]
        out[r, 0] = score
        out[r, 3] = covered / total_idf if total_idf > 0 else 0.0
        # title: the first title_len tokens
        tl = title_len[c]
        tf[:] = 0.0
        for p in range(tl):
            if qi[p] >= 0:
                tf[qi[p]] += 1.0
        score = 0.0
        norm = k1 * (1.0 - b + b * tl / max(avg_title, 1e-9))
        for j in range(nq):
            if tf[j] > 0:
                score += qcount[j] * idf[j] * tf[j] * (k1 + 1.0) / (tf[j] + norm)
        out[r, 1] = score
        # windows
        best = 0.0
        for w in range(w_off[c], w_off[c + 1]):
            a = w_spans[w, 0]
            e = w_spans[w, 1]
            tf[:] = 0.0
            for p in range(a, e):
                if qi[p] >= 0:
                    tf[qi[p]] += 1.0
            score = 0.0
            norm = k1 * (1.0 - b + b * (e - a) / max(avg_window, 1e-9))
            for j in range(nq):
                if tf[j] > 0:
                    score += qcount[j] * idf[j] * tf[j] * (k1 + 1.0) / (tf[j] + norm)
            if score > best:
                best = score
        out[r, 2] = best
    return out


@dataclass
class RerankStore:
    """What the reranker reads from a loaded index: windows and token streams, BM25 statistics, chunk vectors."""

    windows: WindowData
    bm25: BM25Index
    vectors: np.ndarray  # float32 (chunks, dim), the dense index's exact vectors
    avg_title: float
    avg_window: float

    @classmethod
    def create(cls, windows: WindowData, bm25: BM25Index, vectors: np.ndarray) -> RerankStore:
        # A shard carries the whole corpus' averages (shard/split.py) so its features equal one index's.
        corpus = windows.params.get("corpus") or {}
        avg_title, avg_window = corpus.get("avg_title"), corpus.get("avg_window")
        if avg_title is None or avg_window is None:
            avg_title, avg_window = corpus_averages(windows)
        return cls(windows=windows, bm25=bm25, vectors=vectors, avg_title=float(avg_title),
                   avg_window=float(avg_window))

    def query_terms(self, query: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct term ids int32, count in the query float64, idf float64) of the query's known terms."""
        counts = Counter(int(t) for t in self.bm25.term_ids(self.bm25.analyzer.tokens(query)).tolist())
        terms = np.asarray(sorted(counts), dtype=np.int32)
        qcount = np.asarray([counts[t] for t in terms.tolist()], dtype=np.float64)
        df = self.bm25.df[terms.astype(np.int64)] if len(terms) else np.zeros(0, np.int64)
        idf = idf_values(df, self.bm25.corpus_chunks, self.bm25.idf_kind) if len(terms) else np.zeros(0)
        return terms, qcount, np.asarray(idf, dtype=np.float64)


def corpus_averages(windows: WindowData) -> tuple[float, float]:
    """(mean title length over chunks with a title, mean window length) in tokens: the b-normalisation of the
    title and window BM25 features."""
    spans = np.asarray(windows.window_spans)
    avg_window = float((spans[:, 1] - spans[:, 0]).mean()) if len(spans) else 1.0
    titles = np.asarray(windows.title_lengths)
    avg_title = float(titles[titles > 0].mean()) if np.any(titles > 0) else 1.0
    return avg_title, avg_window


def _by_max(values: np.ndarray) -> np.ndarray:
    top = float(values.max()) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _reciprocal_ranks(ranked: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    rank = {c: r for r, c in enumerate(ranked.tolist())}
    return np.asarray([_RANK_K / (_RANK_K + rank[c]) if c in rank else 0.0 for c in candidates.tolist()],
                      dtype=np.float32)


# Columns of local_features: what depends on one candidate alone (and corpus statistics), so a shard that holds the
# candidate computes it bit for bit as one index would (rag_service/shard/).
LOCAL_FEATURES = ("bm25_raw", "bm25_title_raw", "bm25_window_raw", "coverage", "win_max", "win_top2", "win_soft",
                  "proximity")


def local_features(store: RerankStore, query: str, query_vector: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float32 (m, len(LOCAL_FEATURES)) per candidate: raw BM25 of chunk/title/best window, coverage, window MaxSim
    (NaN for a chunk without windows) and proximity. Each row depends on its candidate only."""
    cands = np.ascontiguousarray(candidates, dtype=np.int64)
    out = np.zeros((len(cands), len(LOCAL_FEATURES)), dtype=np.float32)
    if len(cands) == 0:
        return out
    q = np.ascontiguousarray(query_vector, dtype=np.float32)
    w = store.windows
    out[:, 4:7] = native.window_maxsim(q, w.window_offsets, w.vectors, w.scales, cands)
    terms, qcount, idf = store.query_terms(query)
    bm25 = store.bm25
    out[:, 0:4] = _lexical_features(w.tokens, w.token_offsets, w.title_lengths, w.window_offsets, w.window_spans,
                                    cands, terms, qcount, idf, bm25.k1, bm25.b, bm25.avgdl, store.avg_title,
                                    store.avg_window)
    span, matched = native.proximity(terms, w.token_offsets, w.tokens, cands)
    out[:, 7] = np.where(matched >= 2, matched / np.maximum(span, 1), 0.0)
    return out


def finish_features(local: np.ndarray, vectors: np.ndarray, query_vector: np.ndarray, candidates: np.ndarray,
                    fused_scores: np.ndarray, bm25_ranked: np.ndarray, dense_ranked: np.ndarray) -> np.ndarray:
    """float32 (m, len(FEATURES)) from the candidates' local features and chunk vectors (in fused order, best first)
    plus what needs the whole candidate list: scales by the query's best, ranks, the PRF centroid."""
    cands = np.ascontiguousarray(candidates, dtype=np.int64)
    m = len(cands)
    out = np.zeros((m, len(FEATURES)), dtype=np.float32)
    if m == 0:
        return out
    q = np.ascontiguousarray(query_vector, dtype=np.float32)
    vecs = np.asarray(vectors, dtype=np.float32)
    dense = vecs @ q
    # A chunk without windows (empty title and text) falls back on its own vector.
    maxsim = np.where(np.isnan(local[:, 4:7]), dense[:, None], local[:, 4:7])
    centroid = vecs[:_PRF_TOP].mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    columns = {
        "fused": fused_scores,
        "bm25": _by_max(local[:, 0]),
        "dense": dense,
        "win_max": maxsim[:, 0],
        "win_top2": maxsim[:, 1],
        "win_soft": maxsim[:, 2],
        "bm25_title": _by_max(local[:, 1]),
        "bm25_window": _by_max(local[:, 2]),
        "proximity": local[:, 7],
        "coverage": local[:, 3],
        "rr_bm25": _reciprocal_ranks(bm25_ranked, cands),
        "rr_dense": _reciprocal_ranks(dense_ranked, cands),
        "prf": vecs @ centroid,
    }
    for j, name in enumerate(FEATURES):
        out[:, j] = columns[name]
    return out


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

    def feature_dict(self, i: int) -> dict[str, float]:
        return {name: float(v) for name, v in zip(FEATURES, self.features[i].tolist())}


def rerank(store: RerankStore, model: RerankModel, query: str, query_vector: np.ndarray, candidates: np.ndarray,
           fused_scores: np.ndarray, bm25_ranked: np.ndarray, dense_ranked: np.ndarray) -> Reranked:
    """Scores `candidates` with `model` and sorts them by score (ties keep the fused order)."""
    features = compute_features(store, query, query_vector, candidates, fused_scores, bm25_ranked, dense_ranked)
    return rank(model, candidates, features)


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


def rank(model: RerankModel, candidates: np.ndarray, features: np.ndarray) -> Reranked:
    """Scores feature rows (FEATURES columns) of `candidates` and sorts by score, ties in the given order."""
    scores = model.score(features) if len(candidates) else np.zeros(0, np.float32)
    order = np.argsort(-scores, kind="stable")
    return Reranked(ids=np.asarray(candidates, dtype=np.int64)[order], scores=scores[order],
                    features=features[order], order=order)
