"""What the one native call costs around its parts: the facade, the arguments' checks and the result arrays.

    python bench/experiments/call_overhead.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl

For a before / after, run it with each install's interpreter (`/tmp/before/.venv/bin/python bench/...`).

In this process: the index loaded as the server loads it, its first `--queries` queries encoded and analysed once,
then the pipeline's prepared call (`kernels.native.SearchCall`, depth 100, the rerank of the fused top 50, as a plain
request asks) on them in turn, `--calls` times warm (the previous call's caches) and `--calls` times after a
`--flush-mb` MB write (the caches a request finds after its encode). Printed per case, p50 / p99 µs: the whole call,
its parts as the call times them (BM25, dense, fusion, rerank) and the rest, which is what the call costs around
them; the pipeline reports that rest as its `call` stage.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from rag_service.api.loader import load_searcher
from rag_service.bench.data import load_queries
from rag_service.core.config import ServerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100, help="queries used")
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--flush-mb", type=int, default=32)
    args = parser.parse_args()
    searcher = load_searcher(ServerConfig(index=args.index))
    call = getattr(searcher, "_search_call", None)
    if call is None:
        raise SystemExit("this index's pipeline has no one-call search (kernels.native.SearchCall)")
    texts = list(load_queries(args.queries).values())[: args.limit]
    dense = searcher.index.dense
    vectors = [dense.query_row(searcher.encode(text)) for text in texts]
    terms = [searcher.index.bm25.query_term_ids(text) for text in texts]
    junk = np.zeros(args.flush_mb << 20, np.uint8)

    def once(i: int, flush: bool) -> tuple[float, float]:
        if flush:
            junk[::64] += 1
        started = time.perf_counter_ns()
        result = call(terms[i], vectors[i], 100, method="weighted", dense_weight=0.5, top_k=10, rrf_k=60.0,
                      rerank_depth=50, confidence=None)
        whole = time.perf_counter_ns() - started
        return whole / 1e3, (whole - sum(result.first.times_ns) - result.rerank_ns) / 1e3

    for flush in (False, True):
        rows = np.array([once(i % len(texts), flush) for i in range(args.calls + 20)])[20:]
        label = f"after a {args.flush_mb} MB write" if flush else "warm"
        print(f"{label:<22} whole call p50 {np.median(rows[:, 0]):7.1f} p99 {np.percentile(rows[:, 0], 99):7.1f} µs;"
              f"  around its parts p50 {np.median(rows[:, 1]):6.1f} p99 {np.percentile(rows[:, 1], 99):6.1f} µs")


if __name__ == "__main__":
    main()
