"""The rerank stage kernel by kernel (before) against one native call (now), interleaved in one process.

    python bench/experiments/native_rerank.py --index /tmp/lead/scifact_full \
        --queries ../shared/data/scifact/queries.jsonl --qrels ../shared/data/scifact/qrels/test.tsv

Per test query the query vector and the fused top `--depth` (100, the server's rerank_depth) are computed up front,
so only the rerank stage is timed: "before" is the code this replaces, rebuilt here (query terms through a Counter and
idf_values per query, native window MaxSim, numba lexical features, native proximity, NumPy finish_features with
Python-dict ranks, the model through native linear_scores, NumPy's stable argsort); "now" is
rag_service.search.rerank.rerank, one GIL-released native call. Each query runs both, in alternating order, over
`--rounds` passes after a warm-up pass. Prints p50/p99 in microseconds and their ratios; the largest feature
difference and whether the orders agree; nDCG@10 of the reranked candidates and of the whole pipeline
(Pipeline.search with the server defaults, the rerank stage patched to "before" and back) for both.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import chunk_doc_ids, doc_run, evaluate
from rag_service.core.config import SearchDefaults
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.kernels.reference import finish_features_reference, lexical_features_reference
from rag_service.retrievers.lexical import idf_values
from rag_service.search import rerank as rerank_mod
from rag_service.search.pipeline import Pipeline


def before(store: rerank_mod.RerankStore, model: rerank_mod.RerankModel, query: str, query_vector: np.ndarray,
           candidates: np.ndarray, fused_scores: np.ndarray, bm25_ranked: np.ndarray,
           dense_ranked: np.ndarray) -> rerank_mod.Reranked:
    """The rerank stage as it was: one kernel at a time, with Python and NumPy between them."""
    cands = np.ascontiguousarray(candidates, dtype=np.int64)
    counts = Counter(int(t) for t in store.bm25.term_ids(store.bm25.analyzer.tokens(query)).tolist())
    terms = np.asarray(sorted(counts), dtype=np.int32)
    qcount = np.asarray([counts[t] for t in terms.tolist()], dtype=np.float64)
    df = store.bm25.df[terms.astype(np.int64)] if len(terms) else np.zeros(0, np.int64)
    idf = np.asarray(idf_values(df, store.bm25.corpus_chunks, store.bm25.idf_kind) if len(terms) else np.zeros(0),
                     dtype=np.float64)
    local = np.zeros((len(cands), len(rerank_mod.LOCAL_FEATURES)), dtype=np.float32)
    q = np.ascontiguousarray(query_vector, dtype=np.float32)
    w, bm25 = store.windows, store.bm25
    local[:, 4:7] = native.window_maxsim(q, w.window_offsets, w.vectors, w.scales, cands)
    local[:, 0:4] = lexical_features_reference(w.tokens, w.token_offsets, w.title_lengths, w.window_offsets,
                                               w.window_spans, cands, terms, qcount, idf, bm25.k1, bm25.b,
                                               bm25.avgdl, store.avg_title, store.avg_window)
    span, matched = native.proximity(terms, w.token_offsets, w.tokens, cands)
    local[:, 7] = np.where(matched >= 2, matched / np.maximum(span, 1), 0.0)
    features = finish_features_reference(local, np.asarray(store.vectors[cands], dtype=np.float32), q, cands,
                                         fused_scores, bm25_ranked, dense_ranked)
    scores = native.linear_scores(np.ascontiguousarray(features[:, model.columns]), model.weights, model.bias)
    order = np.argsort(-scores, kind="stable")
    return rerank_mod.Reranked(ids=cands[order], scores=scores[order], features=features[order], order=order)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=SearchDefaults().rerank_depth)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    d = SearchDefaults()
    index = load_index(args.index, verify_checksums=False)
    pipeline = Pipeline(index, Encoder())
    qrels = load_qrels(args.qrels)
    queries = {q: t for q, t in load_queries(args.queries).items() if q in qrels}
    vectors = dict(zip(queries, pipeline.encoder.encode_queries(list(queries.values()))))
    base = SearchParams(query="", top_k=d.top_k, depth=d.depth, fusion=d.fusion, dense_weight=d.dense_weight,
                        rrf_k=d.rrf_k, rerank_depth=d.rerank_depth, mmr_lambda=d.mmr_lambda,
                        dedup_threshold=d.dedup_threshold)
    store, model = pipeline.rerank_store, pipeline.rerank_model
    work = {}
    for qid, text in queries.items():
        cand = pipeline.retrieve(replace(base, query=text, top_k=max(d.top_k, args.depth)),
                                 query_vector=vectors[qid])
        work[qid] = (text, cand.query_vector, cand.fused.ids[:args.depth], cand.fused.scores[:args.depth],
                     cand.bm25[0], cand.dense[0])
    print(f"{len(work)} queries, {args.depth} candidates each, simd {native.simd_level()}")

    impl = {"before": before, "now": rerank_mod.rerank}
    times: dict[str, list[float]] = {name: [] for name in impl}
    results: dict[str, dict[str, rerank_mod.Reranked]] = {name: {} for name in impl}
    for r in range(args.rounds + 1):  # round 0 warms caches and numba; not kept
        for i, (qid, (text, qv, ids, scores, bm25, dense)) in enumerate(work.items()):
            names = list(impl) if (i + r) % 2 == 0 else list(impl)[::-1]
            for name in names:
                t0 = time.perf_counter()
                result = impl[name](store, model, text, qv, ids, scores, bm25, dense)
                elapsed = time.perf_counter() - t0
                if r:
                    times[name].append(elapsed * 1e6)
                results[name][qid] = result

    worst, same_order = 0.0, 0
    for qid in work:
        a, b = results["before"][qid], results["now"][qid]
        worst = max(worst, float(np.abs(a.features[np.argsort(a.order)] - b.features[np.argsort(b.order)]).max()))
        same_order += int(np.array_equal(a.order, b.order))
    print(f"largest feature difference {worst:.2e}; same order on {same_order}/{len(work)} queries")

    doc_ids = chunk_doc_ids(pipeline)
    stage_runs = {name: {qid: doc_run((doc_ids[c] for c in res.ids.tolist()), 100)
                         for qid, res in results[name].items()} for name in impl}
    pipe_runs = {}
    for name in impl:
        with mock.patch.object(rerank_mod, "rerank", impl[name]):
            pipe_runs[name] = {qid: doc_run((c.doc_id for c in pipeline.search(replace(base, query=text, top_k=100),
                                                                                query_vector=vectors[qid]).contexts),
                                            100) for qid, text in queries.items()}
    stage_q = evaluate(stage_runs, qrels)
    pipe_q = evaluate(pipe_runs, qrels)

    print("\n| rerank stage | p50 µs | p99 µs | p50 / before | p99 / before | nDCG@10 reranked top 100 | "
          "nDCG@10 pipeline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    b50, b99 = pct(times["before"], 50), pct(times["before"], 99)
    for name in impl:
        p50, p99 = pct(times[name], 50), pct(times[name], 99)
        print(f"| {name} | {p50:.0f} | {p99:.0f} | {p50 / b50:.2f} | {p99 / b99:.2f} | "
              f"{stage_q[name]['nDCG@10']:.4f} | {pipe_q[name]['nDCG@10']:.4f} |")


if __name__ == "__main__":
    main()
