"""The flat index's dense stage on its own: recall of the sq8 scan's candidates against the exact float top-k, and the
time of one `dense_top` call per SIMD level, with the caches warm and after a 64 MB write has pushed the index out of
them (as the encode does between two requests).

    python bench/experiments/dense_scan.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl

Queries are the data set's own, encoded by the index's query encoder. Recall: per depth and oversample, the share of
the exact float top-depth that the scan returns, for the int8 query the native scan ranks codes by
(`reference.quantize_query`) and for the float query the codes were ranked by before (`codes @ (q * scale)`).
Times: p50 / p99 µs per call, `oversample` 0 (the float rows scanned) and the index's own oversample (the sq8 codes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def float_ranked(vectors: np.ndarray, codes, query: np.ndarray, depth: int, oversample: int) -> np.ndarray:
    """The top depth after rescoring the best depth * oversample rows by the float query's product with the codes."""
    approx = codes.codes.astype(np.float32) @ (query * codes.scale)
    wide = np.argsort(-approx, kind="stable")[: depth * oversample]
    exact = vectors[wide] @ query
    return wide[np.argsort(-exact, kind="stable")[:depth]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--depth", type=int, default=100)
    args = parser.parse_args()

    from rag_service.api.loader import load_searcher
    from rag_service.bench.data import load_queries
    from rag_service.core.config import ServerConfig
    from rag_service.kernels import native

    searcher = load_searcher(ServerConfig(index=args.index))
    dense = searcher.index.dense
    if dense.sq8 is None:
        raise SystemExit(f"{args.index}: the dense index has no sq8 codes for the native scan (kind {dense.kind})")
    vectors = np.asarray(dense.vectors)
    texts = list(load_queries(args.queries).values())[: args.limit]
    queries = [dense.query_row(q) for q in searcher.encoder.encode_queries(texts)]
    print(f"{args.index}: {vectors.shape[0]} rows x {vectors.shape[1]}, {len(queries)} queries, "
          f"SIMD {native.simd_level()}")

    print("\nrecall of the exact float top-depth")
    for depth in (10, args.depth):
        for oversample in (1, 2):
            got_int, got_float = [], []
            for q in queries:
                exact = set(np.argsort(-(vectors @ q), kind="stable")[:depth].tolist())
                ids, _ = native.dense_top(vectors, q, depth, codes=dense.sq8, oversample=oversample, backend="cpp")
                got_int.append(len(exact & set(ids.tolist())) / depth)
                got_float.append(len(exact & set(float_ranked(vectors, dense.sq8, q, depth, oversample).tolist()))
                                 / depth)
            print(f"  depth {depth:4d} oversample {oversample}: int8 query {np.mean(got_int):.4f}, "
                  f"float query {np.mean(got_float):.4f}")

    flush = np.zeros(64 << 20, np.uint8)
    c = dense.sq8
    print(f"\ndense_top, depth {args.depth}: p50 / p99 µs per call")
    for level in native._native.simd_levels():
        for oversample in (0, dense.native_oversample or 2):
            for cold in (False, True):
                times = []
                for i, q in enumerate(queries):
                    if cold:
                        flush[:] = i & 0xFF
                    started = time.perf_counter_ns()
                    native._native.dense_top(vectors, q, None, args.depth, *((c.codes, c.scale, c.base) if oversample
                                                                             else (None, None, None)),
                                             oversample, level)
                    times.append((time.perf_counter_ns() - started) / 1e3)
                t = np.asarray(times[10:])
                print(f"  {level:7s} oversample {oversample} {'cold' if cold else 'warm'}: "
                      f"{np.percentile(t, 50):7.1f} / {np.percentile(t, 99):7.1f}")


if __name__ == "__main__":
    main()
