"""The flat index's dense stage on its own: recall of the sq8 scan's candidates against the exact float top-k, and the
time of one `dense_top` call per SIMD level, with the caches warm and after a 64 MB write has pushed the index out of
them (as the encode does between two requests).

    python bench/experiments/dense_scan.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl

Queries are the data set's own, encoded by the index's query encoder. Recall: per depth and oversample, the share of
the exact float top-depth that the scan returns, for the int8 query the native scan ranks codes by
(`reference.quantize_query`), with and without the sign bits read first (where the loaded index keeps them), and for
the float query the codes were ranked by before (`codes @ (q * scale)`). Times: p50 / p99 µs per call of the float
rows' scan, the codes' scan and the codes' scan after the sign bits, alternating query by query.
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

    c = dense.sq8
    plain = c._replace(bits=None)
    scans = {"sq8": plain, "sq8 + bits": c} if c.bits is not None else {"sq8": plain}
    print("\nrecall of the exact float top-depth")
    for depth in (10, args.depth):
        for oversample in (1, 2):
            got = {name: [] for name in scans}
            got_float = []
            for q in queries:
                exact = set(np.argsort(-(vectors @ q), kind="stable")[:depth].tolist())
                for name, codes in scans.items():
                    ids, _ = native.dense_top(vectors, q, depth, codes=codes, oversample=oversample, backend="cpp")
                    got[name].append(len(exact & set(ids.tolist())) / depth)
                got_float.append(len(exact & set(float_ranked(vectors, c, q, depth, oversample).tolist())) / depth)
            shown = ", ".join(f"{name} {np.mean(values):.4f}" for name, values in got.items())
            print(f"  depth {depth:4d} oversample {oversample}: int8 query: {shown}; "
                  f"float query {np.mean(got_float):.4f}")

    flush = np.zeros(64 << 20, np.uint8)
    oversample = dense.native_oversample or 2
    variants = [("float", None, 0)] + [(name, codes, oversample) for name, codes in scans.items()]
    print(f"\ndense_top, depth {args.depth}: p50 / p99 µs per call (sq8: oversample {oversample})")
    for level in native._native.simd_levels():
        for cold in (False, True):
            times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            # The variants alternate query by query, so a drift of the machine touches them alike.
            for i, q in enumerate(queries):
                for name, codes, ov in variants:
                    if cold:
                        flush[:] = i & 0xFF
                    parts = (codes.codes, codes.scale, codes.base) if codes is not None else (None, None, None)
                    bits = codes.bits if codes is not None else None
                    started = time.perf_counter_ns()
                    native._native.dense_top(vectors, q, None, args.depth, *parts, ov, level, code_bits=bits)
                    times[name].append((time.perf_counter_ns() - started) / 1e3)
            for name, values in times.items():
                t = np.asarray(values[10:])
                print(f"  {level:7s} {name:11s} {'cold' if cold else 'warm'}: "
                      f"{np.percentile(t, 50):7.1f} / {np.percentile(t, 99):7.1f}")


if __name__ == "__main__":
    main()
