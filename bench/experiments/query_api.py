"""The query API on a real index, in process (Pipeline.search as the server runs it): grouped replies against the
evaluator's best-chunk document ranking, a decay of weight 0 against none, what a strong decay does, and the
label-free quality signals for a matched query stream against a mismatched one.

    python bench/experiments/query_api.py --index /tmp/results/scifact --data ../shared/data/scifact \
        --other ../shared/data/cranfield --date-field published --json /tmp/results/query_api.json

- Groups: the evaluator (rag_service/bench/quality.py) ranks documents by their best chunk in an ungrouped reply;
  here that reply asks for top_k = depth chunks, and the grouped one for top_k documents with group_size 1, at the
  same depth. Reported: nDCG@10 of both and how many queries' top-10 document lists differ.
- Decay: nDCG@10 with a decay of weight 0 (and the same chunks, scores), and with growing weights on the synthetic
  dates; with each, the share of neighbouring contexts (of two documents) whose dates are in order, newer first:
  about one half when dates play no part; and that share among near ties (scores without the decay closer than
  --near), which a decay strong enough to matter puts in date order.
- Quality signals: the test queries of --data and the queries of --other, both served by the index of --data,
  counted by core.metrics.Metrics as the server counts them; printed: each histogram's median and mean, and the share
  of empty, degraded and below-floor replies, the floor being the 5th percentile of the matched stream's best score.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import doc_run, evaluate
from rag_service.core.metrics import Metrics
from rag_service.core.params import Decay, SearchParams, SearchResult
from rag_service.encoder.encode import load_index_encoder
from rag_service.index.load import load_index
from rag_service.search import shape
from rag_service.search.pipeline import Pipeline

YEAR = 365.25 * 86400


def encode_all(pipeline: Pipeline, queries: dict[str, str]) -> dict[str, np.ndarray]:
    qids = list(queries)
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(qids), 64):
        batch = qids[start:start + 64]
        for qid, vector in zip(batch, pipeline.encoder.encode_queries([queries[q] for q in batch]), strict=True):
            out[qid] = vector
    return out


def run(pipeline: Pipeline, queries: dict[str, str], vectors: dict[str, np.ndarray],
        params: SearchParams) -> dict[str, SearchResult]:
    return {qid: pipeline.search(replace(params, query=text), query_vector=vectors[qid])
            for qid, text in queries.items()}


def ndcg(results: dict[str, SearchResult], qrels: dict[str, dict[str, int]]) -> float:
    runs = {"m": {qid: doc_run(c.doc_id for c in r.contexts) for qid, r in results.items()}}
    return evaluate(runs, qrels)["m"]["nDCG@10"]


def date_order(pipeline: Pipeline, results: dict[str, SearchResult], field: str, decay: Decay | None,
               near: float) -> tuple[float, float, int]:
    """(share of neighbouring contexts, ranks i and i + 1, of different documents whose dates are in order, newer
    first; the same share among near ties: pairs whose scores without the decay differ by less than `near`; how many
    near ties)."""
    column = pipeline.dates.column(field)
    ordered = total = tied = tied_ordered = 0
    for r in results.values():
        dates = np.asarray([column[c.chunk] for c in r.contexts])
        base = np.asarray([c.score for c in r.contexts], np.float64)
        if decay is not None:
            base = base - decay.weight * shape.decay_factors(dates, decay)
        for i in range(len(r.contexts) - 1):
            if r.contexts[i].doc_id == r.contexts[i + 1].doc_id:
                continue
            in_order = bool(dates[i] >= dates[i + 1])
            total += 1
            ordered += in_order
            if abs(base[i] - base[i + 1]) < near:
                tied += 1
                tied_ordered += in_order
    return ordered / max(total, 1), tied_ordered / max(tied, 1), tied


def signals(index_name: str, results: list[SearchResult], floor: float) -> dict[str, float]:
    """The quality metrics a server would export for these results (Metrics.observe_quality), summarised."""
    metrics = Metrics()
    metrics.quality_floor = floor
    summary = type("Summary", (), {"name": index_name, "version": "v", "manifest": {"model": {"name": "m"}},
                                   "n_docs": 0, "n_chunks": 0, "path": ""})()
    metrics.set_index(summary)
    for r in results:
        metrics.observe_quality(r)
    labels = {"index": index_name}
    get = metrics.registry.get_sample_value
    out: dict[str, float] = {}
    for name in ("rag_quality_top1_fused_score", "rag_quality_top10_fused_score",
                 "rag_quality_retriever_overlap_at10"):
        count = get(f"{name}_count", labels) or 0.0
        out[f"{name} mean"] = (get(f"{name}_sum", labels) or 0.0) / max(count, 1.0)
    replies = get("rag_quality_replies_total", labels) or 1.0
    for name in ("empty", "degraded", "below_floor"):
        out[f"{name} share"] = (get(f"rag_quality_{name}_replies_total", labels) or 0.0) / replies
    # Medians from the raw values (the histograms' buckets are coarser than the differences to show).
    out["top1 median"] = float(np.median([r.signals[0] for r in results if r.signals]))
    out["top10 median"] = float(np.median([r.signals[1] for r in results if r.signals]))
    out["overlap@10 median"] = float(np.median([r.signals[2] for r in results
                                                if r.signals and r.signals[2] is not None]))
    out["best score median"] = float(np.median([r.contexts[0].score for r in results if r.contexts]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder of the index's collection")
    parser.add_argument("--split", default="test")
    parser.add_argument("--other", type=Path, required=True, help="BEIR folder whose queries the index does not fit")
    parser.add_argument("--date-field", default="published")
    parser.add_argument("--weights", default="0.01,0.1,1,10")
    parser.add_argument("--function", default="linear", choices=("exp", "linear", "gauss"))
    parser.add_argument("--scale-years", type=float, default=10.0)
    parser.add_argument("--near", type=float, default=0.02, help="scores closer than this count as a near tie")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    index = load_index(args.index)
    # The server's default query encoder (the index's ONNX int8 export).
    pipeline = Pipeline(index, load_index_encoder("onnx-int8", index.path))
    qrels = load_qrels(args.data / "qrels" / f"{args.split}.tsv")
    queries = {q: t for q, t in load_queries(args.data / "queries.jsonl").items() if q in qrels}
    vectors = encode_all(pipeline, queries)
    base = SearchParams(query="", cache="bypass")
    report: dict = {"queries": len(queries)}

    started = time.perf_counter()
    ungrouped = run(pipeline, queries, vectors, replace(base, top_k=base.depth))
    grouped = run(pipeline, queries, vectors, replace(base, top_k=10, group_size=1))
    differ = sum(1 for q in queries if list(doc_run(c.doc_id for c in ungrouped[q].contexts))[:10]
                 != [c.doc_id for c in grouped[q].contexts])
    report["groups"] = {"ungrouped evaluator nDCG@10": ndcg(ungrouped, qrels),
                        "grouped nDCG@10": ndcg(grouped, qrels), "queries whose top-10 documents differ": differ}
    print("groups:", report["groups"], f"({time.perf_counter() - started:.0f} s)")

    plain = run(pipeline, queries, vectors, replace(base, top_k=10))
    decay = Decay(field=args.date_field, function=args.function, origin=time.time(), scale=args.scale_years * YEAR,
                  weight=0.0)
    zero = run(pipeline, queries, vectors, replace(base, top_k=10, decay=decay))
    same = sum(1 for q in queries if [(c.chunk, c.score) for c in zero[q].contexts]
               == [(c.chunk, c.score) for c in plain[q].contexts])
    def row(weight: object, results: dict[str, SearchResult], used: Decay | None) -> dict:
        in_order, ties_in_order, ties = date_order(pipeline, results, args.date_field, used, args.near)
        return {"weight": weight, "nDCG@10": ndcg(results, qrels), "dates in order": in_order,
                "near ties in date order": ties_in_order, "near ties": ties}

    rows = [row("none", plain, None), {**row(0.0, zero, decay), "queries with identical chunks and scores": same}]
    for weight in (float(w) for w in args.weights.split(",")):
        used = replace(decay, weight=weight)
        rows.append(row(weight, run(pipeline, queries, vectors, replace(base, top_k=10, decay=used)), used))
    report["decay"] = rows
    for row in rows:
        print("decay:", row)

    other_qrels_path = args.other / "qrels" / "test.tsv"
    other_queries = load_queries(args.other / "queries.jsonl")
    if other_qrels_path.exists():
        judged = load_qrels(other_qrels_path)
        other_queries = {q: t for q, t in other_queries.items() if q in judged} or other_queries
    other = run(pipeline, other_queries, encode_all(pipeline, other_queries), replace(base, top_k=10))
    floor = float(np.percentile([r.contexts[0].score for r in plain.values() if r.contexts], 5))
    report["signals"] = {"floor (5th percentile of the matched best score)": floor,
                         "matched": signals(index.name, list(plain.values()), floor),
                         "mismatched": signals(index.name, list(other.values()), floor)}
    print("floor:", floor)
    for key in report["signals"]["matched"]:
        print(f"{key:45s} matched {report['signals']['matched'][key]:8.4f}   mismatched "
              f"{report['signals']['mismatched'][key]:8.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
