"""The rerank and context-filter kernels: C++ (every SIMD level this CPU runs) and CUDA against the NumPy references
in rag_service.kernels.reference, on seeded random and adversarial inputs, plus the boundary checks and the facade's
backend choice. Agreement is 1e-5 relative (scores near 0 get an absolute 1e-6: float32 sums in another order)."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

import numpy as np
import pytest

from rag_service.kernels import native
from rag_service.kernels import reference as ref

RTOL, ATOL = 1e-5, 1e-6
D = 384


@pytest.fixture(scope="module")
def simd_levels():
    from rag_service import _native

    return list(_native.simd_levels())


def unit_rows(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    rows = rng.normal(size=(n, d)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def window_store(rng: np.random.Generator, counts, d: int = D, dtype=np.int8):
    """(offsets, vectors, scales) for chunks with the given window counts, stored as dtype."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = unit_rows(rng, int(offsets[-1]), d)
    if dtype == np.int8:
        scales = (np.abs(rows).max(axis=1) / 127).astype(np.float32)
        scales[scales == 0] = 1.0
        return offsets, np.round(rows / scales[:, None]).astype(np.int8), scales
    return offsets, rows.astype(dtype), None


def store_of(dtype, counts, seed=0, d=D):
    rng = np.random.default_rng(seed)
    offsets, vectors, scales = window_store(rng, counts, d, dtype)
    query = unit_rows(rng, 1, d)[0]
    return query, offsets, vectors, scales


DTYPES = [np.int8, np.float16, np.float32]


# ---------------------------------------------------------------------------------------------------------------------
# window MaxSim
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp16", "fp32"])
def test_window_maxsim_matches_reference_at_every_simd_level(ext, simd_levels, dtype):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 9, size=400)
    counts[:3] = (0, 1, 60)  # no windows, one window, many windows
    query, offsets, vectors, scales = store_of(dtype, counts, seed=2)
    candidates = np.concatenate([rng.permutation(400)[:250], [0, 1, 2, 2]]).astype(np.int64)  # repeats allowed
    expected = ref.window_maxsim_reference(query, offsets, vectors, scales, candidates)
    assert np.isnan(expected[candidates == 0]).all()
    for level in simd_levels:
        got = ext.window_maxsim(query, offsets, vectors, scales, candidates, 0.05, False, level)
        assert got.dtype == np.float32 and got.shape == (candidates.size, 3)
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=level)
    np.testing.assert_allclose(native.window_maxsim(query, offsets, vectors, scales, candidates, backend="cpp"),
                               expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("d", [1, 7, 16, 33, 100])
def test_window_maxsim_odd_dimensions(ext, simd_levels, d):
    """Dimensions that leave SIMD tails (masked AVX-512 loads, scalar AVX2 tails)."""
    for dtype in DTYPES:
        query, offsets, vectors, scales = store_of(dtype, [3, 1, 5], seed=d, d=d)
        candidates = np.arange(3, dtype=np.int64)
        expected = ref.window_maxsim_reference(query, offsets, vectors, scales, candidates)
        for level in simd_levels:
            got = ext.window_maxsim(query, offsets, vectors, scales, candidates, 0.05, False, level)
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"{dtype} {level}")


def test_window_maxsim_columns_semantics():
    query = np.array([1.0, 0.0], dtype=np.float32)
    vectors = np.array([[0.5, 0.1], [0.9, 0.0], [0.2, 0.3], [0.7, 0.0], [0.6, 0.0]], dtype=np.float32)
    offsets = np.array([0, 3, 3, 4, 4, 5], dtype=np.int64)  # chunk 0: three windows, 1: none, 2: one, 3: none, 4: one
    for backend in ("cpp", "numpy"):
        got = native.window_maxsim(query, offsets, vectors, None, [0, 1, 2, 3, 4], backend=backend)
        assert got[0, 0] == pytest.approx(0.9)
        assert got[0, 1] == pytest.approx((0.9 + 0.5) / 2)
        expected_soft = 0.05 * np.log(np.exp(0.9 / 0.05) + np.exp(0.5 / 0.05) + np.exp(0.2 / 0.05)) - 0.05 * np.log(3)
        assert got[0, 2] == pytest.approx(expected_soft, rel=1e-6)
        assert got[0, 2] <= got[0, 0]
        assert np.isnan(got[1]).all() and np.isnan(got[3]).all()
        np.testing.assert_array_equal(got[2], np.float32([0.7, 0.7, 0.7]))  # one window: all three are the max
        np.testing.assert_array_equal(got[4], np.float32([0.6, 0.6, 0.6]))


def test_window_maxsim_ties_and_soft_max_bound(ext, simd_levels):
    """Identical windows: top-2 mean equals the max and the soft max equals it too (log of count cancels)."""
    rng = np.random.default_rng(3)
    row = unit_rows(rng, 1)[0]
    vectors = np.repeat(row[None, :], 6, axis=0)
    offsets = np.array([0, 6], dtype=np.int64)
    query = row.copy()
    for level in simd_levels:
        got = ext.window_maxsim(query, offsets, vectors, None, np.array([0], dtype=np.int64), 0.05, False, level)
        assert got[0, 0] == got[0, 1]
        assert got[0, 2] == pytest.approx(got[0, 0], rel=1e-6) and got[0, 2] <= got[0, 0]
    # random: the soft max never exceeds the max and is at least the mean's lower bound
    query, offsets, vectors, scales = store_of(np.float32, rng.integers(1, 12, size=200), seed=4)
    got = native.window_maxsim(query, offsets, vectors, scales, np.arange(200), backend="cpp")
    assert (got[:, 2] <= got[:, 0]).all() and (got[:, 1] <= got[:, 0]).all()


def test_window_maxsim_empty_candidates(ext):
    query, offsets, vectors, scales = store_of(np.int8, [2, 3])
    for backend in ("cpp", "numpy"):
        got = native.window_maxsim(query, offsets, vectors, scales, np.zeros(0, dtype=np.int64), backend=backend)
        assert got.shape == (0, 3) and got.dtype == np.float32
    # an index with no chunks at all
    got = ext.window_maxsim(query, np.zeros(1, dtype=np.int64), vectors[:0], scales[:0], np.zeros(0, dtype=np.int64))
    assert got.shape == (0, 3)


def test_window_maxsim_threads_over_large_calls(ext):
    """Enough work for several threads (> 2M multiply-adds per thread): same results as the reference."""
    rng = np.random.default_rng(5)
    query, offsets, vectors, scales = store_of(np.int8, rng.integers(3, 7, size=3000), seed=6)
    candidates = rng.permutation(3000).astype(np.int64)
    expected = ref.window_maxsim_reference(query, offsets, vectors, scales, candidates)
    np.testing.assert_allclose(ext.window_maxsim(query, offsets, vectors, scales, candidates), expected, rtol=RTOL,
                               atol=ATOL)


def _progress_during(call) -> tuple[float, float, int]:
    """(seconds `call()` took, the longest stretch of it in which a pure-Python thread made no progress, the thread's
    loop iterations inside it). A call that holds the GIL stops the thread for (nearly) all of its length; one that
    releases it leaves gaps of a few scheduler slices."""
    stamps: list[float] = []
    running, stop = threading.Event(), threading.Event()

    def count() -> None:
        running.set()
        while not stop.is_set():
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    running.wait()
    try:
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    inside = [t for t in stamps if start < t < end]
    edges = [start, *inside, end]
    return end - start, max(b - a for a, b in zip(edges, edges[1:])), len(inside)


def test_window_maxsim_releases_the_gil(ext):
    """While one long window_maxsim call runs (~0.3 s), a pure-Python thread keeps running: the binding drops the GIL
    around the kernel (py::gil_scoped_release), so the server's other request threads are not stalled by a rerank.
    A C call that holds the GIL for as long (libc usleep through ctypes.PyDLL) fails the same check."""
    query, offsets, vectors, scales = store_of(np.int8, [5] * 2000, seed=7)
    base = np.arange(2000, dtype=np.int64)
    once = []
    for _ in range(3):  # the first call also starts the kernel's threads
        started = time.perf_counter()
        ext.window_maxsim(query, offsets, vectors, scales, base)
        once.append(time.perf_counter() - started)
    candidates = np.tile(base, int(np.clip(0.3 / max(min(once), 1e-5), 1, 2000)))  # repeated ids are allowed

    expected = ext.window_maxsim(query, offsets, vectors, scales, base)
    got: list[np.ndarray] = []
    kernel_s, gap, iterations = _progress_during(
        lambda: got.append(ext.window_maxsim(query, offsets, vectors, scales, candidates)))
    assert kernel_s > 0.1, f"the call took {kernel_s:.3f} s: too short to tell a released GIL from a held one"
    assert gap < 0.5 * kernel_s and iterations > 100, (
        f"a Python thread stood still for {gap:.3f} s of a {kernel_s:.3f} s kernel call ({iterations} iterations)")
    np.testing.assert_allclose(got[0][: len(base)], expected, rtol=RTOL, atol=ATOL)

    # Negative control: a C call as long that keeps the GIL must fail the check above.
    hold_gil = ctypes.PyDLL(ctypes.util.find_library("c")).usleep
    held_s, gap, _ = _progress_during(lambda: hold_gil(int(kernel_s * 1e6)))
    assert gap >= 0.5 * held_s, f"the check cannot see a held GIL: longest stall {gap:.3f} s of {held_s:.3f} s"


def _window_error_cases():
    query, offsets, vectors, scales = store_of(np.int8, [2, 0, 3], seed=8)
    q16, o16, v16, _ = store_of(np.float16, [2, 0, 3], seed=8)
    cand = np.array([0, 2], dtype=np.int64)
    nan_query = query.copy()
    nan_query[3] = np.nan
    nan_scales = scales.copy()
    nan_scales[3] = np.nan
    nan_rows = v16.copy()
    nan_rows[4, 10] = np.nan
    inf_rows = v16.astype(np.float32)
    inf_rows[0, 0] = np.inf
    bad_offsets = offsets.copy()
    bad_offsets[2] = 6  # chunk 1 = [2, 6), chunk 2 = [6, 5): decreasing
    beyond = offsets.copy()
    beyond[3] = 9
    return [
        ("query", (nan_query, offsets, vectors, scales, cand)),
        ("query", (query[:10], offsets, vectors, scales, cand)),  # wrong dimension -> names the columns
        ("vectors", (query, offsets, vectors.astype(np.float64), None, cand)),
        ("vectors", (query, offsets, np.asfortranarray(vectors), scales, cand)),  # layout: native only
        ("vectors", (query, offsets, vectors.ravel(), scales, cand)),
        ("vectors", (q16, o16, nan_rows, None, cand)),
        ("vectors", (q16, o16, inf_rows, None, cand)),
        ("scales", (query, offsets, vectors, None, cand)),
        ("scales", (query, offsets, vectors, scales[:-1], cand)),
        ("scales", (query, offsets, vectors, nan_scales, cand)),
        ("scales", (q16, o16, v16, np.ones(5, dtype=np.float32), cand)),
        ("candidates", (query, offsets, vectors, scales, np.array([0, 3], dtype=np.int64))),
        ("candidates", (query, offsets, vectors, scales, np.array([-1], dtype=np.int64))),
        ("candidates", (query, offsets, vectors, scales, np.array([0, 2], dtype=np.int32))),
        ("candidates", (query, offsets, vectors, scales, np.arange(6, dtype=np.int64)[::2])),  # layout
        ("offsets", (query, bad_offsets, vectors, scales, np.array([1], dtype=np.int64))),
        ("offsets", (query, beyond, vectors, scales, np.array([2], dtype=np.int64))),
        ("offsets", (query, offsets.astype(np.int32), vectors, scales, cand)),
        ("offsets", (query, np.zeros(0, dtype=np.int64), vectors, scales, np.zeros(0, dtype=np.int64))),
    ]


@pytest.mark.parametrize("case", range(len(_window_error_cases())))
def test_window_maxsim_rejects_bad_input(ext, case):
    name, args = _window_error_cases()[case]
    with pytest.raises(ValueError, match=name):
        ext.window_maxsim(*args)
    if all(a is None or not isinstance(a, np.ndarray) or a.flags.c_contiguous for a in args):
        # the references accept any memory layout (contiguity is the native boundary's concern)
        with pytest.raises(ValueError, match=name):
            ref.window_maxsim_reference(*args)


def test_window_maxsim_rejects_bad_temperature(ext):
    query, offsets, vectors, scales = store_of(np.int8, [2])
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            ext.window_maxsim(query, offsets, vectors, scales, np.array([0], dtype=np.int64), t)
        with pytest.raises(ValueError, match="temperature"):
            ref.window_maxsim_reference(query, offsets, vectors, scales, np.array([0], dtype=np.int64),
                                        temperature=t)
    with pytest.raises(ValueError, match="simd"):
        ext.window_maxsim(query, offsets, vectors, scales, np.array([0], dtype=np.int64), 0.05, False, "sse9")


def test_window_maxsim_facade_converts_small_inputs():
    query, offsets, vectors, scales = store_of(np.int8, [2, 3])
    expected = ref.window_maxsim_reference(query, offsets, vectors, scales, np.array([1, 0], dtype=np.int64))
    got = native.window_maxsim(query.astype(np.float64), offsets, vectors, scales, [1, 0])
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="candidates"):
        native.window_maxsim(query, offsets, vectors, scales, [0.5])


# ---------------------------------------------------------------------------------------------------------------------
# proximity
# ---------------------------------------------------------------------------------------------------------------------

def token_store(rng, n_chunks, vocab=40, max_len=300):
    lengths = rng.integers(0, max_len, size=n_chunks)
    lengths[:2] = (0, 1)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(-1, vocab, size=int(offsets[-1])).astype(np.int32)
    return offsets, tokens


@pytest.mark.parametrize("q", [0, 1, 2, 5, 12])
def test_proximity_matches_reference(ext, q):
    rng = np.random.default_rng(10 + q)
    offsets, tokens = token_store(rng, 300)
    terms = rng.choice(45, size=q, replace=False).astype(np.int32)  # some terms beyond the vocabulary: never found
    candidates = rng.permutation(300).astype(np.int64)
    span_ref, matched_ref = ref.proximity_reference(terms, offsets, tokens, candidates)
    span, matched = ext.proximity(terms, offsets, tokens, candidates)
    assert span.dtype == np.int32 and matched.dtype == np.int32
    np.testing.assert_array_equal(matched, matched_ref)
    np.testing.assert_array_equal(span, span_ref)
    assert ((span == 0) == (matched == 0)).all() and (span[matched == 1] == 1).all()


def test_proximity_worked_example():
    #          0  1   2  3  4  5  6  7  8
    tokens = [5, -1, 7, 9, 5, 2, 2, 7, 9,   # chunk 0: {5, 7, 9} present; shortest cover is 7 9 5 (positions 2-4)
              2, 2, -1,                     # chunk 1: no query term
              9,                            # chunk 2: one term
              5, 7, 7, 7, 7, 5]             # chunk 3: repeated terms; 5 7 at positions 0-1
    offsets = np.array([0, 9, 12, 13, 19], dtype=np.int64)
    tokens = np.array(tokens, dtype=np.int32)
    for backend in ("cpp", "numpy"):
        span, matched = native.proximity([9, 7, 5, 100], offsets, tokens, [0, 1, 2, 3], backend=backend)
        np.testing.assert_array_equal(matched, [3, 0, 1, 2])
        np.testing.assert_array_equal(span, [3, 0, 1, 2])


def test_proximity_empty_and_long_streams(ext):
    offsets = np.array([0, 0, 50_000], dtype=np.int64)
    tokens = np.full(50_000, -1, dtype=np.int32)
    tokens[[10, 49_990]] = (3, 4)
    span, matched = ext.proximity(np.array([3, 4], dtype=np.int32), offsets, tokens, np.array([1, 0], dtype=np.int64))
    np.testing.assert_array_equal(span, [49_981, 0])
    np.testing.assert_array_equal(matched, [2, 0])
    span, matched = ext.proximity(np.array([3], dtype=np.int32), offsets, tokens, np.zeros(0, dtype=np.int64))
    assert span.shape == matched.shape == (0,)


@pytest.mark.parametrize("name,change", [
    ("query_terms", lambda a: {**a, "terms": np.array([3, 3], dtype=np.int32)}),
    ("query_terms", lambda a: {**a, "terms": np.array([-1], dtype=np.int32)}),
    ("query_terms", lambda a: {**a, "terms": np.array([3], dtype=np.int64)}),
    ("tokens", lambda a: {**a, "tokens": a["tokens"].astype(np.int64)}),
    ("token_offsets", lambda a: {**a, "offsets": np.array([0, 5, 3, 12], dtype=np.int64)}),
    ("token_offsets", lambda a: {**a, "offsets": np.array([0, 5, 8, 13], dtype=np.int64)}),
    ("candidates", lambda a: {**a, "candidates": np.array([3], dtype=np.int64)}),
    ("candidates", lambda a: {**a, "candidates": np.array([[0]], dtype=np.int64)}),
])
def test_proximity_rejects_bad_input(ext, name, change):
    args = {"terms": np.array([3, 4], dtype=np.int32), "offsets": np.array([0, 5, 8, 12], dtype=np.int64),
            "tokens": np.arange(12, dtype=np.int32), "candidates": np.array([1, 2], dtype=np.int64)}
    args = change(args)
    call = (args["terms"], args["offsets"], args["tokens"], args["candidates"])
    with pytest.raises(ValueError, match=name):
        ext.proximity(*call)
    with pytest.raises(ValueError, match=name):
        ref.proximity_reference(*call)


# ---------------------------------------------------------------------------------------------------------------------
# linear scores
# ---------------------------------------------------------------------------------------------------------------------

def test_linear_scores_matches_reference(ext):
    rng = np.random.default_rng(20)
    features = rng.normal(size=(500, 11)).astype(np.float32)
    weights = rng.normal(size=11).astype(np.float32)
    expected = ref.linear_scores_reference(features, weights, -0.25)
    np.testing.assert_allclose(ext.linear_scores(features, weights, -0.25), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(native.linear_scores(features.astype(np.float64), list(weights), -0.25), expected,
                               rtol=RTOL, atol=ATOL)
    assert ext.linear_scores(np.zeros((0, 3), dtype=np.float32), np.ones(3, dtype=np.float32), 1.0).shape == (0,)
    np.testing.assert_array_equal(ext.linear_scores(np.zeros((2, 0), dtype=np.float32), np.zeros(0, np.float32), 2.0),
                                  [2.0, 2.0])


def test_linear_scores_rejects_bad_input(ext):
    features = np.ones((3, 2), dtype=np.float32)
    weights = np.ones(2, dtype=np.float32)
    nan_features = features.copy()
    nan_features[1, 1] = np.nan
    cases = [("features", (nan_features, weights, 0.0)), ("weights", (features, np.ones(3, np.float32), 0.0)),
             ("weights", (features, np.array([1, np.inf], np.float32), 0.0)), ("bias", (features, weights, np.nan)),
             ("features", (features.astype(np.float64), weights, 0.0))]
    for name, args in cases:
        with pytest.raises(ValueError, match=name):
            ext.linear_scores(*args)
        with pytest.raises(ValueError, match=name):
            ref.linear_scores_reference(*args)
    with pytest.raises(ValueError, match="features must be C-contiguous"):
        ext.linear_scores(features[:, ::2], np.ones(1, np.float32), 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# similarity matrix and MMR
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,d", [(0, 8), (1, 384), (3, 5), (37, 384), (130, 17), (300, 384)])
def test_similarity_matrix_matches_reference(ext, simd_levels, m, d):
    vectors = unit_rows(np.random.default_rng(m + d), m, d)
    expected = ref.similarity_matrix_reference(vectors)
    for level in simd_levels:
        got = ext.similarity_matrix(vectors, False, level)
        assert got.shape == (m, m) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=level)
        np.testing.assert_array_equal(got, got.T)  # each pair computed once and mirrored


def test_similarity_matrix_rejects_bad_input(ext):
    vectors = unit_rows(np.random.default_rng(30), 4, 8)
    nan_vectors = vectors.copy()
    nan_vectors[2, 3] = np.nan
    for bad in (nan_vectors, vectors.astype(np.float64), vectors[0]):
        with pytest.raises(ValueError, match="vectors"):
            ext.similarity_matrix(bad)
        with pytest.raises(ValueError, match="vectors"):
            ref.similarity_matrix_reference(bad)
    with pytest.raises(ValueError, match="vectors must be C-contiguous"):
        ext.similarity_matrix(vectors[:, ::2])


@pytest.mark.parametrize("mmr_lambda", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0, float("inf")])
def test_mmr_matches_reference(ext, simd_levels, mmr_lambda, threshold):
    rng = np.random.default_rng(int(mmr_lambda * 10) + 100)
    base = unit_rows(rng, 60, 32)
    # near-duplicates of some rows, so dedup has something to drop
    dupes = base[:15] + 0.05 * rng.normal(size=(15, 32)).astype(np.float32)
    vectors = np.concatenate([base, dupes / np.linalg.norm(dupes, axis=1, keepdims=True)]).astype(np.float32)
    sim = ref.similarity_matrix_reference(vectors)
    relevance = rng.normal(size=75).astype(np.float32)
    relevance[10:14] = relevance[9]  # ties
    for k in (0, 1, 10, 75, 200):
        expected = ref.mmr_select_reference(relevance, sim, mmr_lambda, k, threshold)
        for level in simd_levels:  # the vectorised greedy step (8 / 4 lanes, then a scalar tail of 75 % 8)
            got = ext.mmr_select(relevance, sim, mmr_lambda, k, threshold, False, level)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, expected, err_msg=level)
            assert len(set(got.tolist())) == got.size <= k


def test_mmr_lambda_one_is_relevance_order(ext, simd_levels):
    rng = np.random.default_rng(40)
    relevance = rng.integers(0, 20, size=200).astype(np.float32)  # many ties
    sim = ref.similarity_matrix_reference(unit_rows(rng, 200, 16))
    expected = np.argsort(-relevance, kind="stable")
    for backend in ("cpp", "numpy"):
        np.testing.assert_array_equal(native.mmr_select(relevance, sim, 1.0, 200, 1.0, backend=backend), expected)
        np.testing.assert_array_equal(native.mmr_select(relevance, sim, 1.0, 7, 1.0, backend=backend), expected[:7])
    for level in simd_levels:
        np.testing.assert_array_equal(ext.mmr_select(relevance, sim, 1.0, 200, 1.0, False, level), expected)
    # equal gains everywhere (identical relevance and rows): index order at every level
    flat = np.ones((37, 37), dtype=np.float32) * 0.5
    for level in simd_levels:
        np.testing.assert_array_equal(ext.mmr_select(np.ones(37, np.float32), flat, 0.6, 37, 1.0, False, level),
                                      np.arange(37))


def test_mmr_diversity_and_dedup_semantics():
    # 0 and 1 are near-duplicates; 2 is different but less relevant
    vectors = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sim = ref.similarity_matrix_reference(vectors)
    relevance = np.array([1.0, 0.95, 0.5], dtype=np.float32)
    for backend in ("cpp", "numpy"):
        assert native.mmr_select(relevance, sim, 1.0, 3, 1.0, backend=backend).tolist() == [0, 1, 2]
        assert native.mmr_select(relevance, sim, 0.5, 3, 1.0, backend=backend).tolist() == [0, 2, 1]  # diversity
        assert native.mmr_select(relevance, sim, 1.0, 3, 0.95, backend=backend).tolist() == [0, 2]  # 1 dropped
        assert native.mmr_select(relevance, sim, 0.0, 2, 1.0, backend=backend).tolist() == [0, 2]  # first: relevance
        assert native.mmr_select(np.zeros(0, np.float32), np.zeros((0, 0), np.float32), 0.5, 3, 0.9,
                                 backend=backend).tolist() == []


def test_mmr_rejects_bad_input(ext):
    relevance = np.array([1.0, 0.5], dtype=np.float32)
    sim = np.eye(2, dtype=np.float32)
    nan_sim = sim.copy()
    nan_sim[0, 1] = np.nan
    cases = [("relevance", (np.array([np.nan, 1.0], np.float32), sim, 0.5, 2, 0.9)),
             ("sim", (relevance, nan_sim, 0.5, 2, 0.9)),
             ("sim", (relevance, np.eye(3, dtype=np.float32), 0.5, 2, 0.9)),
             ("sim", (relevance, sim.astype(np.float64), 0.5, 2, 0.9)),
             ("mmr_lambda", (relevance, sim, 1.5, 2, 0.9)),
             ("mmr_lambda", (relevance, sim, float("nan"), 2, 0.9)),
             ("k", (relevance, sim, 0.5, -1, 0.9)),
             ("dedup_threshold", (relevance, sim, 0.5, 2, float("nan")))]
    for name, args in cases:
        with pytest.raises(ValueError, match=name):
            ext.mmr_select(*args)
        with pytest.raises(ValueError, match=name):
            ref.mmr_select_reference(*args)
    # only the rows of picks followed by another pick are read, and so checked: a NaN in the row of a candidate
    # never picked, or picked last, is not an error
    relevance3 = np.array([1.0, 0.5, 0.2], dtype=np.float32)
    sim3 = np.eye(3, dtype=np.float32)
    sim3[1, 0] = np.nan
    for k in (1, 2):
        assert ext.mmr_select(relevance3, sim3, 0.5, k, 0.9).tolist() == [0, 1][:k]
        assert ref.mmr_select_reference(relevance3, sim3, 0.5, k, 0.9).tolist() == [0, 1][:k]
    with pytest.raises(ValueError, match=r"sim must be finite, got nan at \[1, 0\]"):
        ext.mmr_select(relevance3, sim3, 0.5, 3, 0.9)
    with pytest.raises(ValueError, match=r"sim must be finite, got nan at \[1, 0\]"):
        ref.mmr_select_reference(relevance3, sim3, 0.5, 3, 0.9)


# ---------------------------------------------------------------------------------------------------------------------
# facade: backend choice
# ---------------------------------------------------------------------------------------------------------------------

def test_simd_level_reported(ext):
    assert native.simd_level() == ext.simd_level() in ("scalar", "avx2", "avx512")
    assert ext.simd_level() == ext.simd_levels()[-1] and ext.simd_levels()[0] == "scalar"


def test_numpy_backend_forced_by_env(ext, monkeypatch):
    calls = []
    monkeypatch.setattr(native, "similarity_matrix_reference", lambda v: calls.append(1) or v @ v.T)
    vectors = unit_rows(np.random.default_rng(50), 5, 8)
    monkeypatch.setenv(native.BACKEND_ENV, "numpy")
    native.similarity_matrix(vectors)
    monkeypatch.setenv(native.BACKEND_ENV, "cpp")
    native.similarity_matrix(vectors)
    assert calls == [1]
    assert native.kernel_backend("proximity") == "cpp"


def test_auto_picks_cuda_only_for_large_calls_with_a_device(ext, monkeypatch):
    monkeypatch.setattr(native, "HAS_CUDA", True)
    monkeypatch.setattr(native, "cuda_device_status", lambda: (True, ""))
    big = native.CUDA_MIN_WORK["window_maxsim"]
    assert native.kernel_backend("window_maxsim", "auto", work=big) == "cuda"
    assert native.kernel_backend("window_maxsim", "auto", work=big - 1) == "cpp"
    assert native.kernel_backend("proximity", "auto", work=10**12) == "cpp"  # no CUDA twin
    assert native.kernel_backend("mmr_select", "cuda") == "cuda"
    assert native.kernel_backend("linear_scores", "cuda") == "cpp"
    monkeypatch.setattr(native, "cuda_device_status", lambda: (False, "no device"))
    assert native.kernel_backend("window_maxsim", "auto", work=big) == "cpp"
    with pytest.raises(ValueError, match="kernel"):
        native.kernel_backend("nope")


def test_auto_falls_back_to_cpp_when_the_device_fails(ext, monkeypatch, caplog):
    """auto chose CUDA (faked: a device "answers") but the CUDA call fails: the C++ result comes back, with a warning;
    a forced "cuda" raises instead. Real failures where the build has CUDA and no device (CI here)."""
    if not ext.HAS_CUDA:
        pytest.skip("rag_service._native was built without CUDA")
    if native.cuda_device_status()[0]:
        pytest.skip("a CUDA device answers now: the CUDA call would not fail")
    monkeypatch.setattr(native, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setattr(native, "CUDA_MIN_WORK", dict.fromkeys(native.CUDA_MIN_WORK, 0))
    query, offsets, vectors, scales = store_of(np.int8, [2, 3])
    expected = ext.window_maxsim(query, offsets, vectors, scales, np.array([1, 0], dtype=np.int64))
    with caplog.at_level("WARNING", logger="rag_service.kernels.native"):
        got = native.window_maxsim(query, offsets, vectors, scales, [1, 0], backend="auto")
    np.testing.assert_array_equal(got, expected)
    assert "CUDA window_maxsim failed" in caplog.text
    vectors_f = unit_rows(np.random.default_rng(1), 5, 8)
    sim = native.similarity_matrix(vectors_f, backend="auto")
    np.testing.assert_array_equal(sim, ext.similarity_matrix(vectors_f))
    assert native.mmr_select(np.arange(5, dtype=np.float32), sim, 0.5, 3, 0.99, backend="auto").tolist() == \
        ext.mmr_select(np.arange(5, dtype=np.float32), sim, 0.5, 3, 0.99).tolist()
    with pytest.raises(RuntimeError, match="CUDA"):
        native.window_maxsim(query, offsets, vectors, scales, [1, 0], backend="cuda")


def test_forcing_cuda_without_it_says_how_to_get_it(ext, monkeypatch):
    query, offsets, vectors, scales = store_of(np.int8, [2])
    monkeypatch.setenv(native.BACKEND_ENV, "cuda")
    if not native.HAS_CUDA:
        with pytest.raises(RuntimeError, match="built without CUDA.*RAG_SERVICE_CUDA=ON"):
            native.window_maxsim(query, offsets, vectors, scales, [0])
    elif not native.cuda_device_status()[0]:
        with pytest.raises(RuntimeError, match="no CUDA device is usable"):
            native.window_maxsim(query, offsets, vectors, scales, [0])
    else:
        pytest.skip("a CUDA device answers: forcing cuda works (covered by the CUDA tests)")


# ---------------------------------------------------------------------------------------------------------------------
# CUDA twins (compared with C++)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def cuda(ext):
    if not ext.HAS_CUDA:
        pytest.skip("rag_service._native was built without CUDA")
    available, reason = native.cuda_device_status()
    if not available:
        pytest.skip(f"built with CUDA, but no CUDA device answers now: {reason}")
    return ext


def test_cuda_kernels_fail_cleanly_without_a_device(ext):
    """Built with CUDA on a machine without a device (CI here): the CUDA path raises RuntimeError, never crashes."""
    if not ext.HAS_CUDA:
        pytest.skip("rag_service._native was built without CUDA")
    if native.cuda_device_status()[0]:
        pytest.skip("a CUDA device answers now")
    query, offsets, vectors, scales = store_of(np.int8, [2, 1])
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.window_maxsim(query, offsets, vectors, scales, np.array([0, 1], dtype=np.int64), 0.05, True)
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.similarity_matrix(unit_rows(np.random.default_rng(0), 3, 8), True)
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.mmr_select(np.ones(2, np.float32), np.eye(2, dtype=np.float32), 0.5, 2, 0.9, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp16", "fp32"])
def test_cuda_window_maxsim_matches_cpp(cuda, dtype):
    rng = np.random.default_rng(60)
    counts = rng.integers(0, 9, size=2000)
    counts[:3] = (0, 1, 300)
    query, offsets, vectors, scales = store_of(dtype, counts, seed=61)
    candidates = np.concatenate([rng.permutation(2000), [0, 1, 2]]).astype(np.int64)
    expected = cuda.window_maxsim(query, offsets, vectors, scales, candidates)
    got = cuda.window_maxsim(query, offsets, vectors, scales, candidates, 0.05, True)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert cuda.window_maxsim(query, offsets, vectors, scales, np.zeros(0, np.int64), 0.05, True).shape == (0, 3)
    nan_vectors = vectors.astype(np.float32) if dtype == np.int8 else vectors.copy()
    nan_vectors[offsets[5], 0] = np.nan
    if counts[5]:
        with pytest.raises(ValueError, match="vectors"):
            cuda.window_maxsim(query, offsets, nan_vectors, None, np.array([5], np.int64), 0.05, True)


@pytest.mark.gpu
@pytest.mark.parametrize("m,d", [(1, 384), (37, 384), (1000, 384), (130, 17)])
def test_cuda_similarity_and_mmr_match_cpp(cuda, m, d):
    rng = np.random.default_rng(m)
    vectors = unit_rows(rng, m, d)
    sim = cuda.similarity_matrix(vectors)
    np.testing.assert_allclose(cuda.similarity_matrix(vectors, True), sim, rtol=RTOL, atol=ATOL)
    relevance = rng.normal(size=m).astype(np.float32)
    relevance[: m // 4] = relevance[0]  # ties
    for mmr_lambda, threshold, k in ((0.5, 0.9, 50), (1.0, 1.0, m), (0.0, 0.3, 10), (0.7, float("inf"), 2 * m)):
        np.testing.assert_array_equal(cuda.mmr_select(relevance, sim, mmr_lambda, k, threshold, True),
                                      cuda.mmr_select(relevance, sim, mmr_lambda, k, threshold))
