"""Micro-benchmark of score fusion: the C++ kernel against the NumPy reference (not run by the tests).

    python bench/experiments/bench_fusion.py [--sizes 100 1000 10000] [--top-k 10] [--methods weighted rrf]

Each list holds n candidates (bm25 and dense, half of the ids shared, scores in rank order). Per call it times
  native   rag_service._native.fuse (the binding + kernel, strict inputs)
  facade   rag_service.kernels.native.fuse(backend="cpp") (what the service calls: conversion checks, dispatch,
           kernel)
  numpy    rag_service.kernels.reference.fuse_reference
and prints the median and p99 in microseconds, and numpy/native ratios.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import numpy as np

from rag_service.kernels import native
from rag_service.kernels.reference import fuse_reference


def make_lists(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = rng.choice(50 * n, size=n + n // 2, replace=False).astype(np.int64)
    bm25_ids = pool[:n]
    dense_ids = rng.permutation(np.concatenate([pool[: n // 2], pool[n:]]))[:n]
    bm25_scores = np.sort(rng.gamma(2.0, 4.0, size=n)).astype(np.float32)[::-1].copy()
    dense_scores = np.sort(rng.uniform(0.1, 0.9, size=n)).astype(np.float32)[::-1].copy()
    return bm25_ids, bm25_scores, dense_ids, dense_scores


def time_calls(fn, repeat: int) -> np.ndarray:
    for _ in range(max(10, repeat // 20)):  # warm caches and allocator
        fn()
    samples = np.empty(repeat, dtype=np.float64)
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for i in range(repeat):
            start = clock()
            fn()
            samples[i] = clock() - start
    finally:
        gc.enable()
    return samples / 1000.0  # microseconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["weighted", "rrf"], choices=["weighted", "rrf"])
    parser.add_argument("--budget-calls", type=int, default=2_000_000,
                        help="about this many candidates are processed per timed series (sets the repeat count)")
    args = parser.parse_args()

    if not native.HAS_NATIVE:
        print(f"rag_service._native is not available ({native.NATIVE_IMPORT_ERROR}); build it first", file=sys.stderr)
        return 1
    from rag_service import _native

    print(f"# {_native.BUILD_INFO}")
    print(f"# numpy {np.__version__}, python {sys.version.split()[0]}, top_k={args.top_k}")
    header = (f"{'method':<9}{'n':>7}{'native med':>12}{'p99':>9}{'facade med':>12}{'p99':>9}"
              f"{'numpy med':>12}{'p99':>9}{'numpy/native':>14}{'numpy/facade':>14}")
    print(header)
    print("-" * len(header))
    for method in args.methods:
        for n in args.sizes:
            b_ids, b_scores, d_ids, d_scores = make_lists(n, seed=n)
            repeat = int(min(20_000, max(200, args.budget_calls // n)))
            w, k = 0.5, args.top_k

            def run_native():
                return _native.fuse(b_ids, b_scores, d_ids, d_scores, method, w, k, 60.0)

            def run_facade():
                return native.fuse(b_ids, b_scores, d_ids, d_scores, method=method, dense_weight=w, top_k=k,
                                   backend="cpp")

            def run_numpy():
                return fuse_reference(b_ids, b_scores, d_ids, d_scores, method=method, dense_weight=w, top_k=k)

            assert np.array_equal(run_native()[0], run_numpy().ids)
            stats = {}
            for name, fn in (("native", run_native), ("facade", run_facade), ("numpy", run_numpy)):
                samples = time_calls(fn, repeat if name != "numpy" else max(200, repeat // 4))
                stats[name] = (statistics.median(samples), float(np.percentile(samples, 99)))
            print(f"{method:<9}{n:>7}"
                  + "".join(f"{stats[s][0]:>12.1f}{stats[s][1]:>9.1f}" for s in ("native", "facade", "numpy"))
                  + f"{stats['numpy'][0] / stats['native'][0]:>13.1f}x{stats['numpy'][0] / stats['facade'][0]:>13.1f}x")
    print("# microseconds per call (median, p99)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
