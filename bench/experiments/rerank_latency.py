"""Per-stage latency of the second stage (rerank, contexts) beside the first, in one process (not run by the tests).

    python bench/experiments/rerank_latency.py --index /tmp/rerank/scifact \
        --queries ../shared/data/scifact/queries.jsonl [--limit 300] [--max-context-tokens 1024]

Query vectors are encoded up front (the encoder is not what is measured); each query then runs Pipeline.search with
the server defaults, with rerank on and off, interleaved so machine noise hits both alike. Prints median and p99 in
microseconds per stage and the ratio of the whole search with rerank to without.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_queries
from rag_service.core.config import SearchDefaults
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.search.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--max-context-tokens", type=int, default=0)
    args = parser.parse_args()

    d = SearchDefaults()
    pipeline = Pipeline(load_index(args.index, verify_checksums=False), Encoder())
    texts = list(load_queries(args.queries).values())[: args.limit]
    vectors = pipeline.encoder.encode_queries(texts)
    base = SearchParams(query="", top_k=d.top_k, depth=d.depth, fusion=d.fusion, dense_weight=d.dense_weight,
                        rrf_k=d.rrf_k, rerank_depth=d.rerank_depth, mmr_lambda=d.mmr_lambda,
                        dedup_threshold=d.dedup_threshold, max_context_tokens=args.max_context_tokens)
    stages: dict[str, dict[str, list[int]]] = {"on": {}, "off": {}}
    for _ in range(2):  # the first pass warms caches and numba; only the second is kept
        for name in stages:
            stages[name].clear()
        for text, vector in zip(texts, vectors):
            for name, rerank in (("on", True), ("off", False)):
                result = pipeline.search(replace(base, query=text, rerank=rerank), query_vector=vector)
                for stage, us in result.stage_us.items():
                    stages[name].setdefault(stage, []).append(us)
                stages[name].setdefault("total", []).append(sum(result.stage_us.values()))
    print(f"# {len(texts)} queries, backend {native.kernel_backend('window_maxsim')} ({native.simd_level()}), "
          f"rerank_depth {d.rerank_depth}, max_context_tokens {args.max_context_tokens}")
    print(f"{'stage':<10}{'on med':>9}{'p99':>9}{'off med':>9}{'p99':>9}")
    for stage in stages["on"]:
        on = np.asarray(stages["on"][stage])
        off = np.asarray(stages["off"].get(stage, [0]))
        print(f"{stage:<10}{np.median(on):>9.0f}{np.percentile(on, 99):>9.0f}{np.median(off):>9.0f}"
              f"{np.percentile(off, 99):>9.0f}")
    on, off = np.asarray(stages["on"]["total"]), np.asarray(stages["off"]["total"])
    print(f"# whole search, rerank on / off: median {np.median(on) / np.median(off):.2f}x, "
          f"p99 {np.percentile(on, 99) / np.percentile(off, 99):.2f}x")


if __name__ == "__main__":
    main()
