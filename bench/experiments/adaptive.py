"""Issue 5: the adaptive pipeline's routes on SciFact: nDCG@10 and latency per route, and the confidence rule.

    python bench/experiments/adaptive.py --index /tmp/fastpath/scifact_rr --data ../shared/data/scifact --split test \
        --json /tmp/fastpath/adaptive.json

In process, one query at a time (closed loop, the server's encoder: ONNX int8 from the index), each query runs:
    full       rerank of the fused top 100 (the server default)
    light      rerank of the fused top 30
    fused      no rerank
    shallow    first stage at depth 30, no rerank
    adaptive   the default policy (confidence routing, no budget), and with budgets of --budgets ms
For every route: nDCG@10 (document level, like rag-bench quality), p50 / p99 of Pipeline.search, and for the adaptive
runs the share of each route taken. The confidence table gives, per level of top-5 agreement between BM25 and dense,
how many queries and nDCG@10 with and without the rerank: the rule skips the rerank only where it does not pay.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import ir_measures
import numpy as np

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import doc_run
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import load_index_encoder
from rag_service.index.load import load_index
from rag_service.search.adaptive import LEXICAL, AdaptiveConfig, AdaptivePolicy, Plan, agreement
from rag_service.search.pipeline import Pipeline

NDCG = ir_measures.nDCG @ 10


def ndcg(run: dict[str, dict[str, float]], qrels) -> float:
    complete = {q: (run.get(q) or {"__none__": 0.0}) for q in qrels}
    return float(ir_measures.calc_aggregate([NDCG], qrels, complete)[NDCG])


def per_query(run, qrels) -> dict[str, float]:
    return {m.query_id: float(m.value) for m in ir_measures.iter_calc([NDCG], qrels, run)}


class AlwaysLexical(AdaptivePolicy):
    """Plans every request down the lexical route, as the brownout sends a share of them."""

    def plan(self, params, deadline, in_flight, encoded, rerank_available, arrival=None,
             lexical_available=False) -> Plan:
        return Plan(params, LEXICAL, "forced", None, in_flight, start=time.monotonic())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoder", default="onnx-int8")
    parser.add_argument("--budgets", default="5,10,20", help="ms, comma-separated")
    parser.add_argument("--budgets-only", action="store_true",
                        help="only the adaptive runs with budgets (no forced routes, no confidence table)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    index = load_index(args.index, verify_checksums=False)
    if index.windows is None:
        raise SystemExit(f"{args.index}: no sentence windows, so no reranker to route around; build with windows")
    encoder = load_index_encoder(args.encoder, index.path)
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / f"{args.split}.tsv")
    judged = {q: queries[q] for q in qrels if q in queries}

    def run_route(name: str, params: SearchParams, config: AdaptiveConfig, lexical: bool = False) -> dict:
        """`lexical`: every request takes the lexical route (BM25 alone, no encode), as the brownout sends it."""
        pipeline = Pipeline(index, encoder, policy=(AlwaysLexical if lexical else AdaptivePolicy)(config))
        search = pipeline.search

        for q in list(judged.values())[:10]:  # warm-up, and the cost model's first samples
            search(replace(params, query=q))
        run, times, routes = {}, [], Counter()
        for qid, text in judged.items():
            started = time.perf_counter()
            result = search(replace(params, query=text))
            times.append(time.perf_counter() - started)
            routes[result.route] += 1
            run[qid] = doc_run(c.doc_id for c in result.contexts)
        ms = np.asarray(times) * 1e3
        row = {"ndcg@10": ndcg(run, qrels), "p50_ms": float(np.percentile(ms, 50)),
               "p99_ms": float(np.percentile(ms, 99)), "routes": dict(routes), "per_query": per_query(run, qrels)}
        print(f"{name:<22} nDCG@10 {row['ndcg@10']:.4f}  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
              f"routes {dict(routes)}", flush=True)
        return row

    forced = AdaptiveConfig(enabled=False)
    base = SearchParams(query="", top_k=10, depth=100, rerank=True, rerank_depth=100)
    report: dict[str, dict] = {}
    if not args.budgets_only:
        report["full"] = run_route("full (rerank 100)", base, forced)
        report["light"] = run_route("light (rerank 30)", replace(base, rerank_depth=30), forced)
        report["fused"] = run_route("fused (no rerank)", replace(base, rerank=False), forced)
        report["shallow"] = run_route("shallow (depth 30)", replace(base, depth=30, rerank=False), forced)
        report["lexical"] = run_route("lexical (BM25 alone)", base, forced, lexical=True)
        report["adaptive"] = run_route("adaptive, no budget", base, AdaptiveConfig())
    for budget in (float(b) for b in args.budgets.split(",") if b):
        report[f"adaptive {budget:g} ms"] = run_route(f"adaptive, budget {budget:g} ms",
                                                      replace(base, budget_ms=budget), AdaptiveConfig())

    if args.budgets_only:
        for row in report.values():
            row.pop("per_query", None)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
        return
    # Confidence: nDCG with and without the rerank, by top-5 agreement of the two retrievers.
    cfg = AdaptiveConfig()
    pipeline = Pipeline(index, encoder, policy=AdaptivePolicy(forced))
    levels: dict[int, list[str]] = {}
    for qid, text in judged.items():
        cand = pipeline.retrieve(replace(base, query=text))
        levels.setdefault(agreement(cand.bm25[0], cand.dense[0], cfg.agree_top), []).append(qid)
    table = {}
    for level in sorted(levels):
        qids = levels[level]
        with_rr = float(np.mean([report["full"]["per_query"].get(q, 0.0) for q in qids]))
        without = float(np.mean([report["fused"]["per_query"].get(q, 0.0) for q in qids]))
        table[level] = {"queries": len(qids), "ndcg_rerank": with_rr, "ndcg_fused": without}
        print(f"top-{cfg.agree_top} agreement {level}: {len(qids):4d} queries  nDCG@10 rerank {with_rr:.4f}  "
              f"fused {without:.4f}  gain {with_rr - without:+.4f}", flush=True)
    report["confidence_table"] = table
    for row in report.values():
        row.pop("per_query", None)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
