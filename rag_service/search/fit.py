"""Fitting the pipeline's learned settings on judged queries: the fusion weight and depth (a grid) and the reranker's
linear combiner (coordinate ascent on nDCG@10).

The shipped values were fitted this way on SciFact train (tools/fit_reranker.py, bench/experiments/tune_fusion.py);
`rag-index tune` refits them on a team's own queries against its tuned index. nDCG@10 here is computed on documents
(a document ranks as its best chunk), with binary-or-graded gains as in the qrels, which is what ir-measures reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numba import njit

from rag_service.core.params import SearchParams
from rag_service.search import rerank as rerank_mod
from rag_service.search.pipeline import Pipeline

FEATURES = rerank_mod.FEATURES
FUSION_DEPTHS = (50, 100, 200)
FUSION_WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


class QuerySet:
    """Padded per-query arrays: features X (Q, M, F), doc index per candidate, gain of its doc, ideal DCG@10."""

    def __init__(self, qids: Sequence[str], feats: Sequence[np.ndarray], chunk_ids: Sequence[np.ndarray],
                 doc_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]]) -> None:
        self.qids = list(qids)
        q, m, f = len(qids), max((len(x) for x in feats), default=1), len(FEATURES)
        self.X = np.zeros((q, m, f), np.float32)
        self.valid = np.zeros((q, m), bool)
        self.docs = np.full((q, m), -1, np.int64)
        self.gains = np.zeros((q, m), np.float64)
        self.idcg = np.zeros(q, np.float64)
        self.chunk_ids = list(chunk_ids)
        doc_index: dict[str, int] = {}
        for i, (qid, x, cids) in enumerate(zip(qids, feats, chunk_ids)):
            n = len(x)
            self.X[i, :n] = x
            self.valid[i, :n] = True
            rel = qrels.get(qid, {})
            for j, c in enumerate(cids.tolist()):
                d = doc_ids[c]
                self.docs[i, j] = doc_index.setdefault(d, len(doc_index))
                self.gains[i, j] = max(rel.get(d, 0), 0)
            ideal = sorted((max(g, 0) for g in rel.values()), reverse=True)[:10]
            self.idcg[i] = sum(g / np.log2(r + 2) for r, g in enumerate(ideal))

    def subset(self, rows: np.ndarray) -> QuerySet:
        out = object.__new__(QuerySet)
        out.qids = [self.qids[i] for i in rows]
        out.X, out.valid, out.docs = self.X[rows], self.valid[rows], self.docs[rows]
        out.gains, out.idcg = self.gains[rows], self.idcg[rows]
        out.chunk_ids = [self.chunk_ids[i] for i in rows]
        return out

    def scores(self, columns: Sequence[int], weights: np.ndarray) -> np.ndarray:
        s = self.X[:, :, list(columns)] @ np.asarray(weights, np.float32)
        return np.where(self.valid, s, -np.inf)


@njit(cache=True)
def _ndcg10(scores, docs, gains, idcg):  # pragma: no cover - compiled
    q, m = scores.shape
    total = 0.0
    for i in range(q):
        if idcg[i] <= 0:
            continue
        order = np.argsort(-scores[i], kind="mergesort")
        seen = np.full(10, -1, np.int64)
        n = 0
        dcg = 0.0
        for j in order:
            if scores[i, j] == -np.inf:
                break
            d = docs[i, j]
            dup = False
            for k in range(n):
                if seen[k] == d:
                    dup = True
                    break
            if dup:
                continue
            dcg += gains[i, j] / np.log2(n + 2.0)
            seen[n] = d
            n += 1
            if n == 10:
                break
        total += dcg / idcg[i]
    return total / max(q, 1)


def ndcg(qs: QuerySet, columns: Sequence[int], weights: np.ndarray) -> float:
    return float(_ndcg10(qs.scores(columns, weights), qs.docs, qs.gains, qs.idcg))


def coordinate_ascent(qs: QuerySet, names: Sequence[str], rounds: int = 5, seed: int = 0,
                      starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float]:
    """Best of several starts (fusion alone; every feature weighted equally; any given in `starts`): greedy ascent
    gets stuck in local optima."""
    names = list(names)
    inits = [np.array([1.0 if n == "fused" else 0.0 for n in names])] if "fused" in names else []
    inits += [np.ones(len(names)) / len(names), *[np.asarray(s, np.float64) for s in starts]]
    runs = [_ascent(qs, names, w, rounds, seed) for w in inits]
    return max(runs, key=lambda r: r[1])


def _ascent(qs: QuerySet, names: list[str], start: np.ndarray, rounds: int, seed: int) -> tuple[np.ndarray, float]:
    """RankLib-style coordinate ascent: each coordinate in turn is line-searched over a grid of values and then
    refined, keeping a change when nDCG@10 improves; stops when a round changes nothing. Weights are rescaled to L1
    norm 1 at the end (the ranking is scale-free)."""
    columns = [FEATURES.index(n) for n in names]
    xc = np.ascontiguousarray(qs.X[:, :, columns].transpose(2, 0, 1), dtype=np.float64)  # (F, Q, M)
    pad = np.where(qs.valid, 0.0, -np.inf)
    w = start.astype(np.float64).copy()
    base = np.tensordot(w, xc, axes=1) + pad

    def value(s: np.ndarray) -> float:
        return float(_ndcg10(s, qs.docs, qs.gains, qs.idcg))

    best = value(base)
    rng = np.random.default_rng(seed)
    grid = np.concatenate([-np.geomspace(2.0, 0.02, 7), [0.0], np.geomspace(0.02, 2.0, 7)])
    for _ in range(rounds):
        improved = False
        for j in rng.permutation(len(names)):
            scale = max(np.abs(w).sum(), 1e-9)
            trials = list(grid * scale) + [w[j] * f for f in (0.5, 0.8, 0.9, 1.1, 1.25, 2.0)]
            for value_j in trials:
                delta = value_j - w[j]
                if delta == 0:
                    continue
                score = value(base + delta * xc[j])
                if score > best + 1e-9:
                    best, improved = score, True
                    base = base + delta * xc[j]
                    w[j] = value_j
        if not improved:
            break
    return w / max(np.abs(w).sum(), 1e-12), best


def chunk_doc_ids(pipeline: Pipeline) -> list[str]:
    store = pipeline.index.store
    return [store.doc_id(store.chunk_doc(i)) for i in range(pipeline.index.n_chunks)]


def doc_ndcg10(ranked_docs: Sequence[str], rel: Mapping[str, int]) -> float:
    """nDCG@10 of one document ranking (duplicates after the first ignored)."""
    ideal = sorted((max(g, 0) for g in rel.values()), reverse=True)[:10]
    idcg = sum(g / np.log2(r + 2) for r, g in enumerate(ideal))
    if idcg <= 0:
        return 0.0
    seen: set[str] = set()
    dcg = 0.0
    for d in ranked_docs:
        if d in seen:
            continue
        dcg += max(rel.get(d, 0), 0) / np.log2(len(seen) + 2)
        seen.add(d)
        if len(seen) == 10:
            break
    return float(dcg / idcg)


@dataclass(frozen=True)
class Fitted:
    """What a refit found: search defaults and the rerank combiner, with their figures on the queries fitted on."""

    search: dict[str, Any]
    rerank: rerank_mod.RerankModel
    figures: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        import json

        return {"search": dict(self.search), "rerank_model": json.loads(self.rerank.to_json()),
                "figures": dict(self.figures)}


def fit_fusion(pipeline: Pipeline, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
               vectors: Mapping[str, np.ndarray], depths: Sequence[int] = FUSION_DEPTHS,
               weights: Sequence[float] = FUSION_WEIGHTS) -> tuple[dict[str, Any], dict[tuple[int, float], float]]:
    """Weighted fusion's (depth, dense weight) with the best mean nDCG@10 over `queries`; ties go to the shipped
    depth and weight, then to the smaller depth."""
    from rag_service.search import fusion

    doc_ids = chunk_doc_ids(pipeline)
    base = SearchParams(query="", depth=max(depths))
    shipped = SearchParams(query="")
    candidates = {q: pipeline.retrieve(replace(base, query=t), query_vector=vectors[q]) for q, t in queries.items()}
    table: dict[tuple[int, float], float] = {}
    for depth in depths:
        for w in weights:
            total = 0.0
            for qid, cand in candidates.items():
                bm25 = (cand.bm25[0][:depth], cand.bm25[1][:depth])
                dense = (cand.dense[0][:depth], cand.dense[1][:depth])
                ids = fusion.fuse(bm25, dense, method="weighted", dense_weight=w, top_k=2 * depth,
                                  rrf_k=shipped.rrf_k).ids
                total += doc_ndcg10([doc_ids[c] for c in ids.tolist()], qrels[qid])
            table[(depth, w)] = total / max(len(candidates), 1)
    best = max(table, key=lambda k: (round(table[k], 6), k == (shipped.depth, shipped.dense_weight), -k[0]))
    return {"fusion": "weighted", "depth": best[0], "dense_weight": best[1]}, table


def collect_features(pipeline: Pipeline, queries: Mapping[str, str], vectors: Mapping[str, np.ndarray],
                     params: SearchParams, rerank_depth: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{qid: (feature rows, chunk ids)} of the fused top `rerank_depth`, computed as the server computes them."""
    if pipeline.rerank_store is None:
        raise ValueError(f"{pipeline.index.path}: the index has no sentence windows, so no reranker to fit")
    params = replace(params, top_k=rerank_depth)
    out = {}
    for qid, text in queries.items():
        cand = pipeline.retrieve(replace(params, query=text), query_vector=vectors[qid])
        ids = cand.fused.ids
        x = rerank_mod.compute_features(pipeline.rerank_store, text, vectors[qid], ids, cand.fused.scores,
                                        cand.bm25[0], cand.dense[0])
        out[qid] = (x, ids)
    return out


def cross_validated(qs: QuerySet, names: Sequence[str], start: np.ndarray, folds: int, seed: int) -> float:
    """Mean nDCG@10 of the queries each fold leaves out, with weights fitted on the other folds: what a refit is
    worth on queries it has not seen."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(qs.qids))
    total = 0.0
    for k in range(folds):
        test = order[k::folds]
        train = np.setdiff1d(order, test)
        w, _ = coordinate_ascent(qs.subset(train), names, seed=seed, starts=[start])
        total += ndcg(qs.subset(test), [FEATURES.index(n) for n in names], w) * len(test)
    return total / max(len(order), 1)


def refit(pipeline: Pipeline, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
          shipped: rerank_mod.RerankModel, rerank_depth: int = 100, folds: int = 5, seed: int = 0,
          source: str = "") -> Fitted:
    """Fusion (grid) then the rerank combiner (coordinate ascent, started from the shipped weights too) on `queries`.

    With few queries a refit combiner can fit their noise: it is kept only where its cross-validated nDCG@10 (fitted
    on the other folds, scored on each left-out one) beats the shipped combiner's on the same queries; otherwise the
    shipped combiner stays. The fusion grid has two parameters and is taken as fitted."""
    queries = {q: t for q, t in queries.items() if q in qrels}
    if not queries:
        raise ValueError("no query to fit on has judgments")
    qids = list(queries)
    vectors = dict(zip(qids, pipeline.encoder.encode_queries([queries[q] for q in qids])))
    search, table = fit_fusion(pipeline, queries, qrels, vectors)
    shipped_fusion = SearchParams(query="")
    params = replace(shipped_fusion, depth=int(search["depth"]), dense_weight=float(search["dense_weight"]))
    data = collect_features(pipeline, queries, vectors, params, rerank_depth)
    doc_ids = chunk_doc_ids(pipeline)
    qs = QuerySet(qids, [data[q][0] for q in qids], [data[q][1] for q in qids], doc_ids, qrels)
    names = list(FEATURES)
    start = np.array([float(dict(zip(shipped.features, shipped.weights)).get(n, 0.0)) for n in names])
    columns = list(range(len(names)))
    shipped_score = ndcg(qs, columns, start)
    fused_score = ndcg(qs, [FEATURES.index("fused")], np.ones(1))
    cv_fitted = cross_validated(qs, names, start, folds, seed) if len(qids) >= 2 * folds else -1.0
    w, fitted_score = coordinate_ascent(qs, names, seed=seed, starts=[start])
    keep_refit = cv_fitted > shipped_score
    if keep_refit:
        kept = [(n, x) for n, x in zip(names, w) if abs(x) > 1e-6]
        model = rerank_mod.RerankModel(
            features=tuple(n for n, _ in kept), weights=np.asarray([x for _, x in kept], np.float32), bias=0.0,
            info={"fitted_on": source or f"{len(qids)} queries", "method": "coordinate ascent on nDCG@10",
                  "depth": params.depth, "rerank_depth": rerank_depth,
                  "window_sentences": shipped.info.get("window_sentences"),
                  "figures": {"fit": round(fitted_score, 4), "cross_validated": round(cv_fitted, 4)}})
    else:
        model = shipped
    figures = {"queries": float(len(qids)),
               "fusion_shipped": table.get((shipped_fusion.depth, shipped_fusion.dense_weight), float("nan")),
               "fusion_fitted": table[(params.depth, params.dense_weight)],
               "fused_top_at_fitted_fusion": fused_score, "rerank_shipped": shipped_score,
               "rerank_refit": fitted_score, "rerank_refit_cross_validated": cv_fitted,
               "rerank_kept": float(keep_refit)}
    return Fitted(search=search, rerank=model, figures={k: round(float(v), 4) for k, v in figures.items()})


def evaluate(pipeline: Pipeline, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
             params: SearchParams, top_k: int = 100) -> dict[str, float]:
    """Mean nDCG@10 over the judged `queries`: `dense` (the dense retriever alone) and `full` (Pipeline.search as the
    server runs it with `params`, its rerank model included)."""
    queries = {q: t for q, t in queries.items() if q in qrels}
    if not queries:
        raise ValueError("no query to evaluate has judgments")
    qids = list(queries)
    doc_ids = chunk_doc_ids(pipeline)
    vectors = pipeline.encoder.encode_queries([queries[q] for q in qids])
    dense = full = 0.0
    for qid, vector in zip(qids, vectors):
        cand = pipeline.retrieve(replace(params, query=queries[qid]), query_vector=vector)
        dense += doc_ndcg10([doc_ids[c] for c in cand.dense[0].tolist()], qrels[qid])
        result = pipeline.search(replace(params, query=queries[qid], top_k=top_k), query_vector=vector)
        full += doc_ndcg10([c.doc_id for c in result.contexts], qrels[qid])
    return {"dense": dense / len(qids), "full": full / len(qids), "queries": float(len(qids))}
