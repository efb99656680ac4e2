"""What one encoder call for a batch of queries buys, per query encoder: SearchBatch's encode choice.

For each encoder kind (the index's ONNX exports, torch): the encoder's CPU time per query when the queries are encoded
alone (one call each, as Search encodes them) and in calls of B queries (B = --sizes), in input order and sorted by
length (less padding), interleaved over --rounds; the cosine of each query's vector in a batch to its vector alone;
and the share of queries whose pipeline answer (the top 10 of Pipeline.search with that vector) is the very same
ranking as with the vector alone. CPU time (thread time) rather than wall time: the machine is shared, and a
CPU-bound loop's wall time depends on the other work on it.

    python bench/experiments/batch_search.py --index /tmp/batch/scifact --data ../shared/data/scifact \
        --kinds onnx-int8-fused,onnx-fp32,torch --n 128 --json /tmp/batch/encode_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="BEIR folder (queries.jsonl, qrels/).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--kinds", default="onnx-int8-fused,onnx-fp32,torch")
    parser.add_argument("--sizes", default="8,32,128")
    parser.add_argument("--n", type=int, default=128, help="Queries (the first n judged ones of the split).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.core.config import ServerConfig
    from rag_service.core.params import SearchParams
    from rag_service.encoder.encode import load_index_encoder
    from rag_service.index.load import load_index, resolve_version_dir
    from rag_service.search.pipeline import Pipeline

    torch.set_num_threads(1)  # one thread per encode, as a pipeline thread runs it
    judged = load_qrels(args.data / "qrels" / f"{args.split}.tsv")
    queries = [t for qid, t in load_queries(args.data / "queries.jsonl").items() if qid in judged][: args.n]
    sizes = [int(x) for x in args.sizes.split(",")]
    version = resolve_version_dir(args.index)
    index = load_index(args.index)
    defaults = ServerConfig(index=args.index).defaults
    report: dict = {"index": str(version), "queries": len(queries), "rounds": args.rounds, "kinds": {}}
    for kind in args.kinds.split(","):
        encoder = load_index_encoder(kind, version, None, 1, 1)
        pipeline = Pipeline(index, encoder)
        lengths = encoder.count_tokens_batch(queries)
        by_length = [int(i) for i in np.argsort(-lengths, kind="stable")]

        def encode(order: list[int], size: int) -> tuple[np.ndarray, float]:
            out = np.empty((len(queries), encoder.dim), np.float32)
            started = time.thread_time()
            for first in range(0, len(order), size):
                rows = order[first:first + size]
                out[rows] = encoder.encode_queries([queries[i] for i in rows])
            return out, (time.thread_time() - started) / len(queries) * 1000.0

        natural = list(range(len(queries)))
        variants = [("alone", natural, 1)] + [(f"{order} {size}", o, size) for size in sizes
                                              for order, o in (("input", natural), ("sorted", by_length))]
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        vectors: dict[str, np.ndarray] = {}
        encode(natural[:8], 1)  # warm-up
        for r in range(args.rounds):
            for name, order, size in variants[r % len(variants):] + variants[: r % len(variants)]:
                vectors[name], ms = encode(order, size)
                cpu[name].append(ms)
        alone = vectors["alone"]
        answers = {}
        for name in vectors:
            answers[name] = [tuple(c.chunk for c in pipeline.search(SearchParams.from_defaults(q, defaults),
                                                                    query_vector=vectors[name][i]).contexts)
                             for i, q in enumerate(queries)]
        rows = []
        for name, _, _ in variants:
            cos = np.sum(vectors[name] * alone, axis=1)
            same = sum(a == b for a, b in zip(answers[name], answers["alone"], strict=True))
            rows.append({"variant": name, "cpu_ms_per_query": round(statistics.median(cpu[name]), 3),
                         "cos_min": round(float(cos.min()), 6), "cos_median": round(float(np.median(cos)), 6),
                         "same_top10": same})
        report["kinds"][kind] = rows
        print(f"\n{kind} ({len(queries)} queries, mean {lengths.mean():.1f} tokens, max {lengths.max()})")
        print("| calls | encoder CPU ms/query | vs alone | cosine to alone (min / median) | same top 10 as alone |")
        print("| --- | ---: | ---: | ---: | ---: |")
        base = rows[0]["cpu_ms_per_query"]
        for row in rows:
            print(f"| {row['variant']} | {row['cpu_ms_per_query']:.2f} | {row['cpu_ms_per_query'] / base:.2f}x | "
                  f"{row['cos_min']:.4f} / {row['cos_median']:.4f} | {row['same_top10']}/{len(queries)} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
