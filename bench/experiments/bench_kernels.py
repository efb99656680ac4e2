"""Micro-benchmark of the rerank and context-filter kernels: C++ against the NumPy references (not run by the tests).

    python bench/experiments/bench_kernels.py [--sizes 100 1000 10000] [--kernels window_maxsim_int8 ...] \
        [--budget-s 1.5]
    python bench/experiments/bench_kernels.py --levels   # the C++ kernels forced to each SIMD level, CPU time per call

Inputs are shaped like a real index (SciFact: ~4.4 windows and ~230 tokens per chunk, d = 384):
  window_maxsim_int8 / _fp16   m candidates drawn from a 20,000-chunk store with 1-8 windows per chunk
  proximity                    m candidates from a 20,000-chunk token store (~230 tokens each), 6 query terms
  linear_scores                m x 12 features
  similarity_matrix            m x 384 unit rows
  mmr_select                   m x m similarity matrix, k = 20, lambda 0.7, dedup 0.95
For each kernel and size it prints the median and p99 wall time per call (microseconds) and the mean CPU time per
call (all threads) of the C++ kernel through the facade (rag_service.kernels.native, backend="cpp": what the service
calls) and of the NumPy reference, their ratios, and the bytes the kernel must read per second against the machine's
memory bandwidth (a large NumPy copy, read + write bytes per second, measured at start). The references run with one
BLAS thread (OPENBLAS_NUM_THREADS=1 unless set); the C++ kernels use up to one thread per core for large calls.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

# One BLAS thread for the references unless the caller says otherwise (set before NumPy loads OpenBLAS): on a shared
# 2-core machine, idle BLAS threads spin on the cores the other threads need, which inflated the references' times
# 10-100x in trial runs and would flatter the speed-ups.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402 (after the BLAS thread settings above)

from rag_service.kernels import native  # noqa: E402
from rag_service.kernels import reference as ref  # noqa: E402

D = 384
N_CHUNKS = 20_000


def memory_bandwidth(megabytes: int = 512) -> float:
    """Bytes per second (read + write) of the best of 5 copies of a large array: the machine's streaming ceiling."""
    src = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def time_calls(fn, budget_s: float, min_repeat: int = 5, max_repeat: int = 5000) -> tuple[np.ndarray, float]:
    """(wall microseconds per call, mean CPU microseconds per call over all threads): warm-up, then as many calls as
    fit in budget_s (within the bounds). CPU time is the figure to trust on a loaded machine: wall time there counts
    the time other processes held our core."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(min(20, max(1, int(0.1 / max(first, 1e-9))))):
        fn()
    repeat = int(min(max_repeat, max(min_repeat, budget_s / max(first, 1e-7))))
    samples = np.empty(repeat, dtype=np.float64)
    clock = time.perf_counter_ns
    gc.disable()
    cpu_start = time.process_time()
    try:
        for i in range(repeat):
            t0 = clock()
            fn()
            samples[i] = clock() - t0
    finally:
        cpu = time.process_time() - cpu_start
        gc.enable()
    return samples / 1000.0, cpu / repeat * 1e6


def window_store(rng: np.random.Generator, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    counts = rng.integers(1, 9, size=N_CHUNKS)  # mean 4.5 windows per chunk
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = rng.normal(size=(int(offsets[-1]), D)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    if dtype == np.int8:
        scales = (np.abs(rows).max(axis=1) / 127).astype(np.float32)
        return offsets, np.round(rows / scales[:, None]).astype(np.int8), scales
    return offsets, rows.astype(np.float16), None


def kernel_cases(kernel: str, m: int, rng: np.random.Generator, stores: dict):
    """(cpp_call, numpy_call, bytes read per call, check) for one kernel at m candidates."""
    if kernel.startswith("window_maxsim"):
        dtype = np.int8 if kernel.endswith("int8") else np.float16
        if dtype not in stores:
            stores[dtype] = window_store(np.random.default_rng(1), dtype)
        offsets, vectors, scales = stores[dtype]
        query = rng.normal(size=D).astype(np.float32)
        query /= np.linalg.norm(query)
        candidates = rng.choice(N_CHUNKS, size=min(m, N_CHUNKS), replace=False).astype(np.int64)
        windows = int((offsets[candidates + 1] - offsets[candidates]).sum())
        nbytes = windows * D * vectors.itemsize + (windows * 4 if scales is not None else 0) + candidates.size * 24

        def cpp():
            return native.window_maxsim(query, offsets, vectors, scales, candidates, backend="cpp")

        def numpy():
            return ref.window_maxsim_reference(query, offsets, vectors, scales, candidates)

        return cpp, numpy, nbytes, lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if kernel == "proximity":
        if "tokens" not in stores:
            r = np.random.default_rng(2)
            lengths = r.integers(100, 360, size=N_CHUNKS)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            # Zipf-like term ids, -1 for stop words (~40%)
            tokens = np.minimum(r.zipf(1.3, size=int(offsets[-1])), 30_000).astype(np.int32)
            tokens[r.random(tokens.size) < 0.4] = -1
            stores["tokens"] = (offsets, tokens)
        offsets, tokens = stores["tokens"]
        terms = np.array([12, 57, 133, 410, 1200, 5001], dtype=np.int32)
        candidates = rng.choice(N_CHUNKS, size=min(m, N_CHUNKS), replace=False).astype(np.int64)
        nbytes = int((offsets[candidates + 1] - offsets[candidates]).sum()) * 4 + candidates.size * 24

        def cpp():
            return native.proximity(terms, offsets, tokens, candidates, backend="cpp")

        def numpy():
            return ref.proximity_reference(terms, offsets, tokens, candidates)

        def check(a, b):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])

        return cpp, numpy, nbytes, check
    if kernel == "linear_scores":
        features = rng.normal(size=(m, 12)).astype(np.float32)
        weights = rng.normal(size=12).astype(np.float32)
        return (lambda: native.linear_scores(features, weights, 0.1, backend="cpp"),
                lambda: ref.linear_scores_reference(features, weights, 0.1), features.nbytes,
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6))
    vectors = rng.normal(size=(m, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if kernel == "similarity_matrix":
        return (lambda: native.similarity_matrix(vectors, backend="cpp"),
                lambda: ref.similarity_matrix_reference(vectors), vectors.nbytes,
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5))
    if kernel == "mmr_select":
        sim = ref.similarity_matrix_reference(vectors)
        relevance = rng.normal(size=m).astype(np.float32)
        k = 20
        return (lambda: native.mmr_select(relevance, sim, 0.7, k, 0.95, backend="cpp"),
                lambda: ref.mmr_select_reference(relevance, sim, 0.7, k, 0.95),
                relevance.nbytes + min(k, m) * m * 4, np.testing.assert_array_equal)
    raise ValueError(f"unknown kernel {kernel!r}")


def levels_table() -> None:
    """CPU microseconds per call (best of 5 series) of the C++ kernels at each SIMD level this CPU runs, forced
    through the extension's simd= argument: what the AVX2 / AVX-512 code paths buy over the scalar fallback."""
    from rag_service import _native

    rng = np.random.default_rng(1)
    offsets, v8, scales = window_store(np.random.default_rng(1), np.int8)
    _, v16, _ = window_store(np.random.default_rng(1), np.float16)
    query = rng.normal(size=D).astype(np.float32)
    query /= np.linalg.norm(query)
    candidates = rng.choice(N_CHUNKS, size=1000, replace=False).astype(np.int64)
    vectors = rng.normal(size=(1000, D)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = vectors @ vectors.T
    relevance = rng.normal(size=1000).astype(np.float32)
    v200 = vectors[:200].copy()

    def cpu_us(fn, n: int) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, (time.process_time() - start) / n * 1e6)
        return best

    levels = list(_native.simd_levels())
    print("| kernel | " + " | ".join(levels) + " | NumPy reference |")
    print("| --- |" + " --- |" * (len(levels) + 1))
    cases = [
        ("window_maxsim int8, 1,000 candidates",
         lambda lv: _native.window_maxsim(query, offsets, v8, scales, candidates, 0.05, False, lv), 50,
         lambda: ref.window_maxsim_reference(query, offsets, v8, scales, candidates), 1),
        ("window_maxsim fp16, 1,000 candidates",
         lambda lv: _native.window_maxsim(query, offsets, v16, None, candidates, 0.05, False, lv), 50,
         lambda: ref.window_maxsim_reference(query, offsets, v16, None, candidates), 1),
        ("similarity_matrix 200 x 384", lambda lv: _native.similarity_matrix(v200, False, lv), 50,
         lambda: ref.similarity_matrix_reference(v200), 50),
        ("similarity_matrix 1,000 x 384", lambda lv: _native.similarity_matrix(vectors, False, lv), 3,
         lambda: ref.similarity_matrix_reference(vectors), 3),
        ("mmr_select 1,000, k 20", lambda lv: _native.mmr_select(relevance, sim, 0.7, 20, 0.95, False, lv), 200,
         lambda: ref.mmr_select_reference(relevance, sim, 0.7, 20, 0.95), 50),
    ]
    for name, native_call, n, reference_call, n_ref in cases:
        cells = [f"{cpu_us(lambda: native_call(lv), n):.1f}" for lv in levels]
        print(f"| {name} | " + " | ".join(cells) + f" | {cpu_us(reference_call, n_ref):.1f} |", flush=True)
    print("# CPU microseconds per call, best of 5 series (all threads)")


KERNELS = ["window_maxsim_int8", "window_maxsim_fp16", "proximity", "linear_scores", "similarity_matrix",
           "mmr_select"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    parser.add_argument("--budget-s", type=float, default=1.5, help="seconds of timed calls per series (about)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--levels", action="store_true",
                        help="instead: CPU time per call at each SIMD level (scalar, avx2, avx512) the CPU runs")
    args = parser.parse_args()

    if native.simd_level() == "none":
        print("the native extension (with the rerank kernels) is not built; run `python setup.py build_ext "
              "--inplace`", file=sys.stderr)
        return 1
    from rag_service import _native

    if args.levels:
        print(f"# {_native.BUILD_INFO}; best SIMD {native.simd_level()}")
        levels_table()
        return 0
    bandwidth = memory_bandwidth()
    print(f"# {_native.BUILD_INFO}; SIMD {native.simd_level()}; {os.cpu_count()} CPUs")
    print(f"# numpy {np.__version__} (OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}), python "
          f"{sys.version.split()[0]}; memory bandwidth (np.copyto 512 MiB, read + write) {bandwidth / 1e9:.1f} GB/s")
    columns = ["kernel", "m", "C++ med", "C++ p99", "C++ CPU", "NumPy med", "NumPy p99", "NumPy CPU", "speed-up",
               "CPU speed-up", "C++ read GB/s", "% of bandwidth"]
    if args.markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
    else:
        print("".join(f"{c:>16}" if i else f"{c:<20}" for i, c in enumerate(columns)))
    stores: dict = {}
    for kernel in args.kernels:
        for m in args.sizes:
            rng = np.random.default_rng(m)
            cpp, numpy, nbytes, check = kernel_cases(kernel, m, rng, stores)
            check(cpp(), numpy())
            fast, fast_cpu = time_calls(cpp, args.budget_s)
            slow, slow_cpu = time_calls(numpy, args.budget_s, min_repeat=3, max_repeat=1000)
            fast_med, fast_p99 = float(np.median(fast)), float(np.percentile(fast, 99))
            slow_med, slow_p99 = float(np.median(slow)), float(np.percentile(slow, 99))
            rate = nbytes / (fast_med * 1e-6)
            row = [kernel, str(m), f"{fast_med:.1f}", f"{fast_p99:.1f}", f"{fast_cpu:.1f}", f"{slow_med:.1f}",
                   f"{slow_p99:.1f}", f"{slow_cpu:.1f}", f"{slow_med / fast_med:.1f}x", f"{slow_cpu / fast_cpu:.1f}x",
                   f"{rate / 1e9:.2f}", f"{100 * rate / bandwidth:.0f}%"]
            if args.markdown:
                print("| " + " | ".join(row) + " |", flush=True)
            else:
                print("".join(f"{c:>16}" if i else f"{c:<20}" for i, c in enumerate(row)), flush=True)
    print("# microseconds per call (wall median, p99; CPU = mean CPU time per call, all threads); read GB/s = bytes "
          "the kernel must read / C++ median wall time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
