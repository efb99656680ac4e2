"""The first stage as one native call against the stage-by-stage Python path: latency, sq8 oversampling, nDCG@10.

    python bench/experiments/native_retrieve.py --index /tmp/lead/scifact_full --data ../shared/data/scifact \
        --rounds 3

All in one process, on the same loaded index, queries encoded once up front so only retrieval is timed:
  1. sq8 oversampling: recall@100 of the native sq8 scan + exact rescoring against the native exact float scan, per
     oversample factor (depth 100);
  2. latency of Pipeline.retrieve (filter, BM25, dense, fusion; the pool a reranking request asks for) for the old
     path (numba BM25, faiss flat, native fusion, Python between them), the one call over float rows and the one
     call over sq8 codes, interleaved query by query, p50/p99 and ratios against the old path;
  3. nDCG@10 of the full pipeline (Pipeline.search, shipped defaults: rerank and context filter included) per path.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import doc_run, evaluate
from rag_service.core.params import SearchParams
from rag_service.core.timing import StageTimer
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.search.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR directory (queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the queries")
    parser.add_argument("--oversamples", default="1,2,3,4,6,8")
    args = parser.parse_args()

    index = load_index(args.index, verify_checksums=False)
    encoder = Encoder()
    qrels = load_qrels(args.data / "qrels" / "test.tsv")
    queries = {q: t for q, t in load_queries(args.data / "queries.jsonl").items() if q in qrels}
    vectors = dict(zip(queries, encoder.encode_queries(list(queries.values())), strict=True))
    print(f"{len(queries)} queries, {index.n_chunks} chunks, dense {index.dense.kind}, simd {native.simd_level()}")

    dense = index.dense
    assert dense.sq8 is not None, "the experiment needs a flat index scanned on the CPU"
    print("\noversample  recall@100 (vs exact float scan)")
    for factor in (int(x) for x in args.oversamples.split(",")):
        recalls = []
        for q in queries:
            want, _ = native.dense_top(dense.vectors, vectors[q], 100, backend="cpp")
            got, _ = native.dense_top(dense.vectors, vectors[q], 100, codes=dense.sq8, oversample=factor,
                                      backend="cpp")
            recalls.append(len(set(got.tolist()) & set(want.tolist())) / len(want))
        print(f"{factor:10d}  {np.mean(recalls):.4f} (min {np.min(recalls):.3f})")

    old = Pipeline(index, encoder)
    old.native_first_stage = False
    one = Pipeline(index, encoder)
    # The pool a reranking request retrieves (Pipeline._rank).
    base = SearchParams(query="")
    base = replace(base, top_k=max(base.top_k, base.rerank_depth))
    paths = {"old (numba + faiss + fuse)": (old, None), "one call, float scan": (one, 0),
             f"one call, sq8 x{dense.native_oversample}": (one, dense.native_oversample)}
    default_oversample = dense.native_oversample
    times: dict[str, list[float]] = {name: [] for name in paths}
    parts: dict[str, dict[str, list[int]]] = {name: {"lexical": [], "dense": [], "fusion": []} for name in paths}
    items = list(queries.items())
    for _ in range(2):  # warm-up
        for pipeline, oversample in paths.values():
            if oversample is not None:
                dense.native_oversample = oversample
            pipeline.retrieve(replace(base, query=items[0][1]), query_vector=vectors[items[0][0]])
    for _ in range(args.rounds):
        for q, text in items:
            params = replace(base, query=text)
            for name, (pipeline, oversample) in paths.items():
                if oversample is not None:
                    dense.native_oversample = oversample
                timer = StageTimer()
                start = time.perf_counter_ns()
                pipeline.retrieve(params, timer, query_vector=vectors[q])
                times[name].append((time.perf_counter_ns() - start) / 1e3)
                for stage, values in parts[name].items():
                    values.append(timer.us[stage])
    dense.native_oversample = default_oversample
    ref = next(iter(times.values()))
    print(f"\nPipeline.retrieve, {args.rounds} x {len(items)} queries, depth {base.depth}, top_k {base.top_k}")
    print("| path | p50 us | p99 us | p50 ratio | p99 ratio | p50 us lexical / dense / fusion |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, values in times.items():
        p50, p99 = np.percentile(values, 50), np.percentile(values, 99)
        split = " / ".join(f"{np.percentile(v, 50):.0f}" for v in parts[name].values())
        print(f"| {name} | {p50:.0f} | {p99:.0f} | {p50 / np.percentile(ref, 50):.2f} | "
              f"{p99 / np.percentile(ref, 99):.2f} | {split} |")

    runs = {}
    for name, (pipeline, oversample) in paths.items():
        if oversample is not None:
            dense.native_oversample = oversample
        run = {}
        for q, text in items:
            result = pipeline.search(SearchParams(query=text), query_vector=vectors[q])
            run[q] = doc_run(c.doc_id for c in result.contexts)
        runs[name] = run
    dense.native_oversample = default_oversample
    print("\nfull pipeline (shipped defaults), SciFact test")
    for name, measures in evaluate(runs, qrels).items():
        print(f"{name}: nDCG@10 {measures['nDCG@10']:.4f}")


if __name__ == "__main__":
    main()
