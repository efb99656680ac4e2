"""Retrieval quality per method (BM25 alone, dense alone, fused) with ir-measures, on document-level qrels.

The service ranks chunks; a document's rank is that of its best chunk, as a reader of the contexts would see it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

import ir_measures

from rag_service.pipeline import Candidates, Pipeline, SearchParams

MEASURES = (ir_measures.nDCG @ 10, ir_measures.R @ 100, ir_measures.RR @ 10)
METHODS = ("bm25", "dense", "fused")


def doc_run(doc_of_chunk: Iterable[str], limit: int = 100) -> dict[str, float]:
    """Chunk ranking -> document ranking (first occurrence wins); scores strictly decrease so ties cannot reorder."""
    run: dict[str, float] = {}
    for doc in doc_of_chunk:
        if doc not in run:
            run[doc] = float(limit - len(run))
            if len(run) == limit:
                break
    return run


def collect_candidates(pipeline: Pipeline, queries: Mapping[str, str], params: SearchParams,
                       batch_size: int = 64) -> dict[str, Candidates]:
    """Encodes all queries in batches, then runs the pipeline's first stage for each at params.depth."""
    qids = list(queries)
    out = {}
    for start in range(0, len(qids), batch_size):
        batch = qids[start:start + batch_size]
        vectors = pipeline.encoder.encode_queries([queries[q] for q in batch])
        for qid, vector in zip(batch, vectors):
            out[qid] = pipeline.retrieve(replace(params, query=queries[qid]), query_vector=vector)
    return out


def chunk_doc_ids(pipeline: Pipeline) -> list[str]:
    """Document id of every chunk, looked up once per evaluation instead of once per candidate."""
    store = pipeline.index.store
    return [store.doc_id(store.chunk_doc(i)) for i in range(pipeline.index.n_chunks)]


def method_runs(doc_ids: list[str], candidates: Mapping[str, Candidates], params: SearchParams,
                methods: Iterable[str] = METHODS, limit: int = 100) -> dict[str, dict[str, dict[str, float]]]:
    """Document runs per method from collected candidates, truncated to params.depth per retriever."""
    from rag_service import fusion

    runs: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    for qid, cand in candidates.items():
        bm25 = (cand.bm25[0][: params.depth], cand.bm25[1][: params.depth])
        dense = (cand.dense[0][: params.depth], cand.dense[1][: params.depth])
        ranked = {"bm25": bm25[0], "dense": dense[0]}
        if "fused" in runs:
            ranked["fused"] = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight,
                                          top_k=2 * params.depth, rrf_k=params.rrf_k).ids
        for method in runs:
            runs[method][qid] = doc_run((doc_ids[c] for c in ranked[method].tolist()), limit)
    return runs


def evaluate(runs: Mapping[str, Mapping[str, Mapping[str, float]]], qrels: Mapping[str, Mapping[str, int]],
             measures=MEASURES) -> dict[str, dict[str, float]]:
    """Mean of each measure over every judged query; a query a method returned nothing for scores 0, not absent
    (trec_eval would otherwise skip it and flatter the method)."""
    table = {}
    for method, run in runs.items():
        complete = {q: (dict(run.get(q) or {}) or {"__no_result__": 0.0}) for q in qrels}
        agg = ir_measures.calc_aggregate(measures, qrels, complete)
        table[method] = {str(m): float(v) for m, v in agg.items()}
    return table


def quality_report(pipeline: Pipeline, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                   params: SearchParams) -> dict:
    judged_queries = {q: queries[q] for q in qrels if q in queries}
    if not judged_queries:
        raise ValueError("no query in the queries file has judgments in the qrels file")
    started = time.perf_counter()
    candidates = collect_candidates(pipeline, judged_queries, params)
    runs = method_runs(chunk_doc_ids(pipeline), candidates, params)
    table = evaluate(runs, {q: qrels[q] for q in judged_queries})
    return {
        "index": pipeline.index.name, "index_version": pipeline.version, "queries": len(judged_queries),
        "params": {"depth": params.depth, "fusion": params.fusion, "dense_weight": params.dense_weight,
                   "rrf_k": params.rrf_k},
        "seconds": round(time.perf_counter() - started, 2), "results": table,
    }


def format_table(report: dict) -> str:
    measures = [str(m) for m in MEASURES]
    lines = [f"{'method':<8} " + " ".join(f"{m:>9}" for m in measures)]
    for method, row in report["results"].items():
        lines.append(f"{method:<8} " + " ".join(f"{row[m]:>9.4f}" for m in measures))
    return "\n".join(lines)
