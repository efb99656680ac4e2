"""One native call per request (search_core: first stage, confidence rule, rerank) against two (retrieve, then the
rerank), on Pipeline.search with the query vector given, so the server's work minus the encode is timed.

    python bench/experiments/search_core.py --index /tmp/lead/scifact_full --data ../shared/data/scifact \
        --rounds 2

One process, one loaded index, the queries (SciFact test, `--limit` of them) encoded up front. Both pipelines share
the index and differ only in Pipeline.native_one_call; they run interleaved query by query, which one goes first
alternating, so load drifts hit both alike. Prints p50/p99 per path and the ratios against two calls, the routes
taken, whether every reply is the same (contexts, scores, features, route, reason) and nDCG@10 per path.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import doc_run, evaluate
from rag_service.core.params import SearchParams, SearchResult
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.search.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR directory (queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the queries")
    parser.add_argument("--limit", type=int, default=300, help="queries (the first of the test split)")
    args = parser.parse_args()

    index = load_index(args.index, verify_checksums=False)
    encoder = Encoder()
    qrels = load_qrels(args.data / "qrels" / "test.tsv")
    queries = dict(list({q: t for q, t in load_queries(args.data / "queries.jsonl").items() if q in qrels}.items())
                   [: args.limit])
    vectors = dict(zip(queries, encoder.encode_queries(list(queries.values())), strict=True))
    print(f"{len(queries)} queries, {index.n_chunks} chunks, dense {index.dense.kind}, simd {native.simd_level()}")

    one = Pipeline(index, encoder)
    two = Pipeline(index, encoder)
    two.native_one_call = False
    paths = {"two calls (retrieve, rerank)": two, "one call (search_core)": one}
    items = list(queries.items())
    for pipeline in paths.values():  # warm-up
        for q, text in items[:20]:
            pipeline.search(SearchParams(query=text), query_vector=vectors[q])
    times: dict[str, list[float]] = {name: [] for name in paths}
    replies: dict[str, dict[str, SearchResult]] = {name: {} for name in paths}
    routes: collections.Counter[str] = collections.Counter()
    for r in range(args.rounds):
        for i, (q, text) in enumerate(items):
            order = list(paths.items()) if (i + r) % 2 == 0 else list(reversed(paths.items()))
            for name, pipeline in order:
                start = time.perf_counter_ns()
                result = pipeline.search(SearchParams(query=text), query_vector=vectors[q])
                times[name].append((time.perf_counter_ns() - start) / 1e3)
                replies[name][q] = result
                if name.startswith("one"):
                    routes[result.route] += 1

    ref = times["two calls (retrieve, rerank)"]
    print(f"\nPipeline.search (query vector given, shipped defaults), {args.rounds} x {len(items)} queries")
    print("| path | p50 us | p99 us | p50 ratio | p99 ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        p50, p99 = np.percentile(values, 50), np.percentile(values, 99)
        print(f"| {name} | {p50:.0f} | {p99:.0f} | {p50 / np.percentile(ref, 50):.3f} | "
              f"{p99 / np.percentile(ref, 99):.3f} |")
    print("routes (one call):", dict(routes))
    a, b = (replies[name] for name in paths)
    same = sum(1 for q in queries if [repr(c) for c in a[q].contexts] == [repr(c) for c in b[q].contexts]
               and (a[q].route, a[q].route_reason) == (b[q].route, b[q].route_reason))
    print(f"identical replies: {same} of {len(queries)}")
    runs = {name: {q: doc_run(c.doc_id for c in result.contexts) for q, result in got.items()}
            for name, got in replies.items()}
    for name, measures in evaluate(runs, qrels).items():
        print(f"{name}: nDCG@10 {measures['nDCG@10']:.4f}")


if __name__ == "__main__":
    main()
