"""Grid search of the fusion settings (method, dense weight, depth) on a TRAIN split; prints the table and the best.

    python bench/experiments/tune_fusion.py --index /tmp/idx/scifact \
        --queries ../shared/data/scifact/queries.jsonl --qrels ../shared/data/scifact/qrels/train.tsv

The best row becomes rag_service.core.config.SearchDefaults; never tune on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import chunk_doc_ids, collect_candidates, evaluate, method_runs
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.search.pipeline import Pipeline


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, required=True)
    parser.add_argument("--depths", default="50,100,200")
    parser.add_argument("--weights", default="0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--rrf-k", default="20,60")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    qrels = load_qrels(args.qrels)
    queries = {q: t for q, t in load_queries(args.queries).items() if q in qrels}
    pipeline = Pipeline(load_index(args.index), Encoder())
    depths = [int(d) for d in args.depths.split(",")]
    started = time.perf_counter()
    candidates = collect_candidates(pipeline, queries, SearchParams(query="", depth=max(depths)))
    doc_ids = chunk_doc_ids(pipeline)
    print(f"{len(queries)} train queries, candidates collected in {time.perf_counter() - started:.1f} s")

    rows = []
    base = SearchParams(query="")
    for depth in depths:
        single = evaluate(method_runs(doc_ids, candidates, replace(base, depth=depth), methods=("bm25", "dense")),
                          qrels)
        rows += [{"method": m, "depth": depth, **single[m]} for m in ("bm25", "dense")]
        grid = [("weighted", w, 60.0) for w in floats(args.weights)]
        grid += [("rrf", w, k) for k in floats(args.rrf_k) for w in floats(args.weights)]
        for method, weight, rrf_k in grid:
            params = replace(base, depth=depth, fusion=method, dense_weight=weight, rrf_k=rrf_k)
            table = evaluate(method_runs(doc_ids, candidates, params, methods=("fused",)), qrels)["fused"]
            rows.append({"method": method, "depth": depth, "dense_weight": weight,
                         "rrf_k": rrf_k if method == "rrf" else None, **table})

    rows.sort(key=lambda r: r["nDCG@10"], reverse=True)
    print(f"{'method':<9}{'depth':>6}{'w':>6}{'rrf_k':>7}{'nDCG@10':>10}{'R@100':>8}{'RR@10':>8}")
    for r in rows[:25]:
        w = "" if r.get("dense_weight") is None else f"{r['dense_weight']:.2f}"
        k = "" if r.get("rrf_k") is None else f"{r['rrf_k']:.0f}"
        print(f"{r['method']:<9}{r['depth']:>6}{w:>6}{k:>7}{r['nDCG@10']:>10.4f}{r['R@100']:>8.4f}{r['RR@10']:>8.4f}")
    best = next(r for r in rows if r["method"] in ("weighted", "rrf"))
    print("best:", best)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "best": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
