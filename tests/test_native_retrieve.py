"""The first stage in one native call: bm25_top (with and without bounds per block of chunks), dense_top and retrieve
against their NumPy references (and the numba BM25 scorer), then through Pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from rag_service.kernels import native
from rag_service.kernels.reference import (
    Postings,
    RowCodes,
    SQ8Codes,
    bm25_top_reference,
    dense_above_reference,
    dense_top_reference,
    retrieve_reference,
    row_quantize_reference,
    sign_bits,
    sq8_quantize,
)
from rag_service.retrievers import dense as dense_mod
from rag_service.retrievers.lexical import _NO_MASK, _top_n

pytestmark = pytest.mark.skipif(not native.HAS_NATIVE or not native._HAS_RETRIEVE_KERNELS,
                                reason="rag_service._native with the retrieve kernels is not built")

_native = native._native


def random_postings(rng: np.random.Generator, n_docs: int, vocab: int, per_term: int = 12) -> Postings:
    """Impacts from a few values (many exact ties), chunk ids ascending per term, some empty posting lists."""
    indptr = [0]
    docs: list[int] = []
    for _ in range(vocab):
        k = int(rng.integers(0, min(per_term, n_docs) + 1)) if n_docs else 0
        docs.extend(sorted(rng.choice(n_docs, size=k, replace=False).tolist()) if k else [])
        indptr.append(len(docs))
    weights = rng.choice(np.array([0.25, 0.5, 1.0, 1.7, 2.3], np.float32), size=len(docs))
    return Postings(np.asarray(indptr, np.int64), np.asarray(docs, np.int32), weights.astype(np.float32), n_docs)


def masks(rng: np.random.Generator, n: int) -> list[np.ndarray | None]:
    one = np.zeros(n, np.bool_)
    if n:
        one[rng.integers(0, n)] = True
    return [None, np.zeros(n, np.bool_), one, rng.random(n) < 0.5]


def numba_top(p: Postings, terms: np.ndarray, mask: np.ndarray | None, depth: int):
    depth = min(depth, max(p.n_docs, 1))
    if mask is None:
        return _top_n(p.indptr, p.docs, p.weights, terms, p.n_docs, _NO_MASK, False, depth)
    return _top_n(p.indptr, p.docs, p.weights, terms, p.n_docs, mask, True, depth)


def same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].dtype == np.int64 and a[1].dtype == np.float32


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_docs", [1, 2, 37, 400])
def test_bm25_top_equals_the_numba_scorer_and_the_reference(seed, n_docs):
    rng = np.random.default_rng(seed * 1000 + n_docs)
    p = random_postings(rng, n_docs, vocab=30)
    queries = [np.zeros(0, np.int64), np.array([3], np.int64), np.array([5, 5, 9], np.int64),
               rng.integers(0, 30, size=8).astype(np.int64)]
    for terms in queries:
        for mask in masks(rng, n_docs):
            for depth in (1, 3, n_docs, n_docs + 5):
                got = native.bm25_top(p, terms, depth, mask=mask, backend="cpp")
                same(got, numba_top(p, terms, mask, depth))
                same(got, bm25_top_reference(p, terms, mask, depth))
                if mask is not None and not mask.any():
                    assert got[0].size == 0


@pytest.mark.parametrize("seed", range(3))
def test_bm25_top_on_a_large_index_reads_its_sums_in_chunk_order_to_the_same_answer(seed):
    # Past 2^17 chunks, a query whose postings cover an eighth of them has its sums read in chunk order rather than
    # at each posting: the same top, ties and all (few distinct impacts, repeated terms, masks), and a clean buffer.
    rng = np.random.default_rng(seed)
    n_docs, vocab = 140_000, 8
    indptr, docs = [0], []
    for t in range(vocab):
        k = int(rng.integers(n_docs // 40, n_docs // (2 + t)))
        docs.extend(np.sort(rng.choice(n_docs, size=k, replace=False)).tolist())
        indptr.append(len(docs))
    weights = rng.choice(np.array([0.25, 0.5, 1.0, 1.7], np.float32), size=len(docs))
    p = Postings(np.asarray(indptr, np.int64), np.asarray(docs, np.int32), weights.astype(np.float32), n_docs)
    for terms in (np.arange(vocab, dtype=np.int64), np.array([0, 0, 5], np.int64), np.array([7], np.int64)):
        covered = int(sum(p.indptr[t + 1] - p.indptr[t] for t in terms))
        for mask in (None, rng.random(n_docs) < 0.3, np.zeros(n_docs, np.bool_)):
            for depth in (1, 100, 5000):
                got = native.bm25_top(p, terms, depth, mask=mask, backend="cpp")
                same(got, numba_top(p, terms, mask, depth))
                same(got, bm25_top_reference(p, terms, mask, depth))
        assert covered * 8 >= n_docs or terms.size == 1
    # Nothing left behind in the thread's sums: a small query afterwards scores from zero.
    small = np.array([vocab - 1], np.int64)
    same(native.bm25_top(p, small, 10, backend="cpp"), numba_top(p, small, None, 10))


def test_bm25_top_with_no_chunks_and_bad_input():
    empty = Postings(np.zeros(4, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), 0)
    assert native.bm25_top(empty, np.array([1], np.int64), 10, backend="cpp")[0].size == 0
    p = random_postings(np.random.default_rng(0), 20, vocab=5)
    for backend in ("cpp", "numpy"):
        with pytest.raises(ValueError, match="term_ids"):
            native.bm25_top(p, np.array([5], np.int64), 10, backend=backend)
        with pytest.raises(ValueError, match="depth"):
            native.bm25_top(p, np.array([1], np.int64), 0, backend=backend)
        with pytest.raises(ValueError, match="mask"):
            native.bm25_top(p, np.array([1], np.int64), 3, mask=np.ones(19, np.bool_), backend=backend)
        bad = Postings(p.indptr, np.full_like(p.docs, 99), p.weights, 20)
        with pytest.raises(ValueError, match="docs"):
            native.bm25_top(bad, np.array([int(np.argmax(np.diff(p.indptr)))], np.int64), 3, backend=backend)
    # A failed call leaves no partial sums behind for the next one on this thread.
    same(native.bm25_top(p, np.array([0, 1, 2], np.int64), 20, backend="cpp"),
         numba_top(p, np.array([0, 1, 2], np.int64), None, 20))


def exact_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Multiples of 1/8 in [-1, 1]: every dot product is exact in float32 whatever the summation order, so the SIMD
    levels and NumPy agree bit for bit and equal scores (ties) really are equal."""
    return (rng.integers(-8, 9, size=(n, d)) / 8).astype(np.float32)


def exact_codes(rng: np.random.Generator, n: int, d: int) -> SQ8Codes:
    codes = rng.integers(-128, 128, size=(n, d)).astype(np.int8)
    scale = (2.0 ** -rng.integers(4, 8, size=d)).astype(np.float32)
    return SQ8Codes(codes, scale, rng.standard_normal(d).astype(np.float32))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 3, 64, 517])
@pytest.mark.parametrize("d", [1, 7, 16, 45, 130])
def test_dense_top_float_and_sq8_equal_the_reference_at_every_simd_level(seed, n, d):
    rng = np.random.default_rng(seed * 7919 + n * 31 + d)
    vectors = exact_rows(rng, n, d)
    vectors[n // 2 :] = vectors[: n - n // 2]  # duplicate rows: exact ties, broken by id
    codes = exact_codes(rng, n, d)
    codes.codes[n // 3 :] = codes.codes[: n - n // 3]
    query = exact_rows(rng, 1, d)[0]
    for mask in masks(rng, n):
        for depth in (1, 4, n, n + 2):
            for oversample in (0, 1, 3):
                c = codes if oversample else None
                want = dense_top_reference(vectors, query, mask, depth, c, oversample)
                for level in _native.simd_levels():
                    parts = c[:3] if c else (None, None, None)
                    got = _native.dense_top(vectors, query, mask, depth, *parts, oversample, level)
                    same(got, want)


def test_dense_top_with_a_huge_depth_or_oversample_does_not_overflow():
    rng = np.random.default_rng(4)
    vectors, codes, query = exact_rows(rng, 30, 8), exact_codes(rng, 30, 8), exact_rows(rng, 1, 8)[0]
    for depth, oversample in ((2**62, 2**40), (3, 2**62), (2**40, 3)):
        got = native.dense_top(vectors, query, depth, codes=codes, oversample=oversample, backend="cpp")
        assert got[0].size == min(depth, 30)
        same(got, dense_top_reference(vectors, query, None, depth, codes, oversample))


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)).astype(np.float32)


def quantize_cases(rng: np.random.Generator) -> list[np.ndarray]:
    huge = unit_rows(rng, 3, 8)
    huge[:, 0] = np.float32(3e38)  # squares overflow a float: the bounds are summed in double
    return [unit_rows(rng, 200, 384), exact_rows(rng, 50, 9), np.zeros((3, 5), np.float32),
            np.zeros((0, 4), np.float32), (1e-30 * unit_rows(rng, 4, 6)).astype(np.float32), huge,
            # halves after scaling (rint rounds them to even), a row with one entry, negative-only rows
            np.array([[127.0, 0.5, 1.5, -2.5, 63.5]], np.float32), np.array([[-3.0]], np.float32),
            -np.abs(unit_rows(rng, 5, 17))]


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_row_quantize_bounds_hold(backend):
    rng = np.random.default_rng(11)
    for vectors in quantize_cases(rng):
        c = native.row_quantize(vectors, backend=backend)
        assert c.codes.dtype == np.int8 and c.scale.dtype == c.slack.dtype == c.norm.dtype == np.float32
        assert len(c.codes) == len(c.scale) == len(c.slack) == len(c.norm) == len(vectors)
        if len(vectors) and vectors.shape[1]:
            assert (np.abs(c.codes).max(axis=1)[np.abs(vectors).max(axis=1) > 0] == 127).all()
        decoded = c.codes.astype(np.float64) * c.scale.astype(np.float64)[:, None]
        assert (np.linalg.norm(vectors.astype(np.float64) - decoded, axis=1) <= c.slack).all()
        assert (np.linalg.norm(decoded, axis=1) <= c.norm).all()
    with pytest.raises(ValueError, match="finite"):
        native.row_quantize(np.array([[1.0, np.inf]], np.float32), backend=backend)


def test_row_quantize_native_equals_the_reference():
    """Codes and scales bit for bit; the bounds to the last bit of the float but for the order of the double sums."""
    rng = np.random.default_rng(12)
    for vectors in quantize_cases(rng):
        got, want = native.row_quantize(vectors, backend="cpp"), row_quantize_reference(vectors)
        np.testing.assert_array_equal(got.codes, want.codes)
        np.testing.assert_array_equal(got.scale, want.scale)
        for g, w in ((got.slack, want.slack), (got.norm, want.norm)):
            assert (np.abs(g.view(np.int32).astype(np.int64) - w.view(np.int32).astype(np.int64)) <= 1).all()


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_row_quantize_writes_rows_of_out(backend):
    rng = np.random.default_rng(13)
    vectors = unit_rows(rng, 6, 10)
    out = native.row_quantize(np.zeros((6, 10), np.float32), backend=backend)
    for row in (4, 0, 5):
        assert native.row_quantize(vectors[row:row + 1], out=out, start=row, backend=backend) is out
    whole = native.row_quantize(vectors, backend=backend)
    zero = native.row_quantize(np.zeros((1, 10), np.float32), backend=backend)
    for column, full, zero_row in zip(out, whole, zero, strict=True):
        np.testing.assert_array_equal(column[[0, 4, 5]], full[[0, 4, 5]])
        np.testing.assert_array_equal(column[1:4], np.repeat(zero_row, 3, axis=0))  # rows never written
    before = [column.copy() for column in out]
    with pytest.raises(ValueError, match=r"vectors\[1, 2\]" if backend == "cpp" else "finite"):
        bad = vectors[:2].copy()
        bad[1, 2] = np.nan
        native.row_quantize(bad, out=out, start=0, backend=backend)
    for column, kept in zip(out, before, strict=True):  # checked before anything is written
        np.testing.assert_array_equal(column, kept)
    with pytest.raises(ValueError, match="start"):
        native.row_quantize(vectors[:2], out=out, start=5, backend=backend)
    with pytest.raises(ValueError, match="vectors"):
        native.row_quantize(vectors.astype(np.float64), backend=backend)


def test_row_quantize_refuses_bad_output_arrays():
    vectors = unit_rows(np.random.default_rng(14), 3, 4)
    codes = native.row_quantize(vectors)
    with pytest.raises(ValueError, match="codes"):
        _native.row_quantize(vectors, codes.codes[:2], codes.scale, codes.slack, codes.norm)
    with pytest.raises(ValueError, match="slack"):
        _native.row_quantize(vectors, codes.codes, codes.scale, codes.slack[:2], codes.norm)
    frozen = codes.norm.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="norm must be writeable"):
        _native.row_quantize(vectors, codes.codes, codes.scale, codes.slack, frozen)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 3, 64, 517])
@pytest.mark.parametrize("d", [1, 7, 45, 130])
def test_dense_above_equals_the_filtered_float_scan_at_every_simd_level(seed, n, d):
    """At every SIMD level the result is the float rows' scan (dense_top) with the scores below min_score dropped,
    bit for bit: exact rows (ties really tie; there the NumPy reference agrees bit for bit too) and unit rows with
    near duplicates whose scores differ in the last bits, thresholds at, just above and just below real scores, so
    a bound that cut a row by a hair would show."""
    rng = np.random.default_rng(seed * 104729 + n * 37 + d)
    exact = exact_rows(rng, n, d)
    exact[n // 2 :] = exact[: n - n // 2]
    unit = unit_rows(rng, n, d)
    unit[n // 3 :] = unit[: n - n // 3] + np.float32(1e-6) * unit_rows(rng, n - n // 3, d)
    for vectors, query in ((exact, exact_rows(rng, 1, d)[0]), (unit, unit_rows(rng, 1, d)[0]),
                           (unit, np.float32(3.0) * unit[n // 2])):
        codes = row_quantize_reference(vectors)
        for level in _native.simd_levels():
            scores = np.sort(_native.dense_top(vectors, query, None, n, None, None, None, 0, level)[1])[::-1]
            pivot = np.float32(scores[min(len(scores) - 1, 2)])
            for min_score in (-np.inf, 0.0, float(pivot), float(np.nextafter(pivot, np.float32(np.inf))),
                              float(np.nextafter(pivot, np.float32(-np.inf))), float(scores[0]), 2.0 * d):
                for mask in masks(rng, n):
                    for depth in (1, 3, n + 2):
                        top = _native.dense_top(vectors, query, mask, depth, None, None, None, 0, level)
                        kept = top[1].astype(np.float64) >= min_score
                        got = _native.dense_above(vectors, *codes, query, mask, min_score, depth, level)
                        same(got, (top[0][kept], top[1][kept]))
                        if vectors is exact:
                            same(got, dense_above_reference(vectors, codes, query, mask, min_score, depth))


def test_dense_above_refuses_bad_input():
    vectors = unit_rows(np.random.default_rng(2), 10, 4)
    codes = row_quantize_reference(vectors)
    query = np.ones(4, np.float32)
    empty = np.zeros((0, 4), np.float32)
    assert native.dense_above(empty, row_quantize_reference(empty), query, 0.0, 3, backend="cpp")[0].size == 0
    for backend in ("cpp", "numpy"):
        with pytest.raises(ValueError, match="query"):
            native.dense_above(vectors, codes, np.ones(5, np.float32), 0.0, 3, backend=backend)
        with pytest.raises(ValueError, match="query"):
            native.dense_above(vectors, codes, np.array([1, np.nan, 0, 0], np.float32), 0.0, 3, backend=backend)
        with pytest.raises(ValueError, match="depth"):
            native.dense_above(vectors, codes, query, 0.0, 0, backend=backend)
        with pytest.raises(ValueError, match="min_score"):
            native.dense_above(vectors, codes, query, float("nan"), 3, backend=backend)
        with pytest.raises(ValueError, match="mask"):
            native.dense_above(vectors, codes, query, 0.0, 3, mask=np.ones(9, np.bool_), backend=backend)
        with pytest.raises(ValueError, match="codes"):
            native.dense_above(vectors, row_quantize_reference(vectors[:9]), query, 0.0, 3, backend=backend)
        with pytest.raises(ValueError, match="code_slack"):
            native.dense_above(vectors, RowCodes(codes.codes, codes.scale, codes.slack[:9], codes.norm), query, 0.0,
                               3, backend=backend)


def test_dense_top_refuses_bad_input():
    rng = np.random.default_rng(3)
    vectors = exact_rows(rng, 10, 4)
    for backend in ("cpp", "numpy"):
        with pytest.raises(ValueError, match="query"):
            native.dense_top(vectors, np.ones(5, np.float32), 3, backend=backend)
        with pytest.raises(ValueError, match="query"):
            native.dense_top(vectors, np.array([1, np.nan, 0, 0], np.float32), 3, backend=backend)
        with pytest.raises(ValueError, match="oversample"):
            native.dense_top(vectors, np.ones(4, np.float32), 3, oversample=2, backend=backend)
        with pytest.raises(ValueError, match="mask"):
            native.dense_top(vectors, np.ones(4, np.float32), 3, mask=np.ones(10, np.int8), backend=backend)
    with pytest.raises(ValueError, match="codes"):
        bad = SQ8Codes(np.zeros((9, 4), np.int8), np.ones(4, np.float32), np.zeros(4, np.float32))
        native.dense_top(vectors, np.ones(4, np.float32), 3, codes=bad, oversample=2, backend="cpp")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    v = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_sq8_codes_decode_within_half_a_step_and_keep_recall():
    vectors = clustered(3000, 64, seed=0)
    codes = sq8_quantize(vectors, rows_per_step=700)  # several steps
    decoded = codes.base + codes.scale * codes.codes.astype(np.float32)
    assert np.all(np.abs(decoded - vectors) <= codes.scale / 2 + 1e-6)
    rng = np.random.default_rng(1)
    recalls = []
    for q in vectors[rng.integers(0, 3000, 30)]:
        want, _ = native.dense_top(vectors, q, 50, backend="cpp")
        got, scores = native.dense_top(vectors, q, 50, codes=codes, oversample=4, backend="cpp")
        recalls.append(len(set(got.tolist()) & set(want.tolist())) / 50)
        np.testing.assert_allclose(scores, vectors[got] @ q, rtol=1e-5, atol=1e-6)  # exact rescoring
    assert np.mean(recalls) >= 0.99, np.mean(recalls)
    # A dimension with one value quantizes to one code.
    flat = sq8_quantize(np.ones((5, 2), np.float32))
    np.testing.assert_array_equal(flat.base + flat.scale * flat.codes, np.ones((5, 2), np.float32))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("method", ["weighted", "rrf"])
def test_retrieve_equals_its_parts_and_the_reference(seed, method):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 300)), 16
    p = random_postings(rng, n, vocab=40)
    vectors = exact_rows(rng, n, d)
    codes = exact_codes(rng, n, d)
    query = exact_rows(rng, 1, d)[0]
    terms = rng.integers(0, 40, size=int(rng.integers(0, 6))).astype(np.int64)
    for mask in masks(rng, n):
        depth, top_k = int(rng.integers(1, n + 4)), int(rng.integers(1, 30))
        fusion = {"method": method, "dense_weight": float(rng.random()), "top_k": top_k, "rrf_k": 60.0}
        for oversample in (0, 2):
            c = codes if oversample else None
            got = native.retrieve(p, terms, depth, mask=mask, vectors=vectors, query=query, codes=c,
                                  oversample=oversample, backend="cpp", **fusion)
            want = retrieve_reference(p, terms, mask, depth, vectors=vectors, query=query, codes=c,
                                      oversample=oversample, **fusion)
            same(got.bm25, want.bm25)
            same(got.dense, want.dense)
            for a, b in zip(got.fused, want.fused, strict=True):
                np.testing.assert_array_equal(a, b)
            assert all(t >= 0 for t in got.times_ns)
            # The parts, called one by one, give the same.
            same(got.bm25, native.bm25_top(p, terms, depth, mask=mask, backend="cpp"))
            fused = native.fuse(*got.bm25, *got.dense, backend="cpp", **fusion)
            np.testing.assert_array_equal(fused.ids, got.fused.ids)
        # Hits computed elsewhere (HNSW) pass through; no dense list at all (the lexical route).
        hits = native.dense_top(vectors, query, depth, mask=mask, backend="cpp")
        given = native.retrieve(p, terms, depth, mask=mask, dense=hits, backend="cpp", **fusion)
        same(given.dense, hits)
        np.testing.assert_array_equal(given.fused.ids,
                                      native.fuse(*given.bm25, *hits, backend="cpp", **fusion).ids)
        alone = native.retrieve(p, terms, depth, mask=mask, backend="cpp", **fusion)
        assert alone.dense[0].size == 0 and np.isnan(alone.fused.dense).all()
        want = retrieve_reference(p, terms, mask, depth, **fusion)
        np.testing.assert_array_equal(alone.fused.ids, want.fused.ids)


def test_retrieve_refuses_bad_input():
    rng = np.random.default_rng(0)
    p = random_postings(rng, 10, vocab=5)
    v = exact_rows(rng, 10, 4)
    q = np.ones(4, np.float32)
    hits = (np.array([1], np.int64), np.array([0.5], np.float32))
    for backend in ("cpp", "numpy"):
        with pytest.raises(ValueError, match="vectors and query"):
            native.retrieve(p, np.array([1], np.int64), 5, vectors=v, backend=backend)
        with pytest.raises(ValueError, match="dense_ids"):
            native.retrieve(p, np.array([1], np.int64), 5, vectors=v, query=q, dense=hits, backend=backend)
        with pytest.raises(ValueError, match="one row per chunk"):
            native.retrieve(p, np.array([1], np.int64), 5, vectors=v[:9], query=q, backend=backend)
        with pytest.raises(ValueError, match="method"):
            native.retrieve(p, np.array([1], np.int64), 5, vectors=v, query=q, method="max", backend=backend)


def test_a_flat_index_gets_sq8_codes_at_load_and_reuses_its_own(tmp_path):
    vectors = clustered(500, 32, seed=2)
    for name, codes in (("plain", "none"), ("coded", "sq8")):
        (tmp_path / name).mkdir()
        dense_mod.write_dense(tmp_path / name, dense_mod.build_dense_index(vectors, "flat"), vectors, "flat")
        if codes != "none":
            dense_mod.write_codes(tmp_path / name, vectors, codes)
    plain = dense_mod.DenseIndex.load(tmp_path / "plain", use_gpu=False)
    coded = dense_mod.DenseIndex.load(tmp_path / "coded", use_gpu=False)
    assert plain.native_scan and plain.sq8 is not None and plain.sq8.codes.shape == vectors.shape
    # The faiss codes, taken over: decoding them here gives what faiss decodes.
    assert coded.sq8 is not None
    decoded = coded.sq8.base + coded.sq8.scale * coded.sq8.codes.astype(np.float32)
    faiss_decoded = coded.codes.sa_decode(coded.codes.sa_encode(vectors))
    np.testing.assert_allclose(decoded, faiss_decoded, atol=1e-6)
    hnsw_dir = tmp_path / "hnsw"
    hnsw_dir.mkdir()
    dense_mod.write_dense(hnsw_dir, dense_mod.build_dense_index(vectors, "hnsw"), vectors, "hnsw")
    hnsw = dense_mod.DenseIndex.load(hnsw_dir, use_gpu=False)
    assert not hnsw.native_scan and hnsw.sq8 is None


def test_without_avx2_a_flat_index_still_scans_its_sq8_codes(tmp_path, monkeypatch):
    vectors = clustered(50, 8, seed=3)
    dense_mod.write_dense(tmp_path, dense_mod.build_dense_index(vectors, "flat"), vectors, "flat")
    monkeypatch.setattr(native, "simd_level", lambda: "scalar")
    index = dense_mod.DenseIndex.load(tmp_path, use_gpu=False)
    assert index.native_scan and index.sq8 is not None and index.native_oversample == dense_mod.NATIVE_SQ8_OVERSAMPLE
    query = vectors[7]
    ids, scores = index.search(query[None, :], 5)
    want, _ = native.dense_top(vectors, query, 5, backend="cpp")
    np.testing.assert_array_equal(ids, want)  # the exact top 5 of 50 rows: every row is a candidate at oversample 2
    monkeypatch.setattr(native, "simd_level", lambda: "none")
    assert dense_mod.DenseIndex.load(tmp_path, use_gpu=False).sq8 is None


QUERIES = ["how do glaciers carve valleys", "volcano eruption ash", "glacier", "zzzz unknown words", ""]


@pytest.mark.parametrize("lexical_only", [False, True])
def test_pipeline_one_call_gives_the_stage_by_stage_candidates(built_index, encoder, lexical_only, monkeypatch):
    from rag_service.core.params import SearchParams
    from rag_service.core.timing import StageTimer
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    calls = []
    real = native.retrieve
    monkeypatch.setattr(native, "retrieve", lambda *a, **k: calls.append(k) or real(*a, **k))
    index = load_index(built_index)
    assert index.dense.native_scan  # the test index is flat: the call scans it
    one = Pipeline(index, encoder)
    staged = Pipeline(index, encoder)
    staged.native_first_stage = False
    filters = [None, {"topic": "geology"}, {"topic": "no such topic"}]
    for query in QUERIES:
        vector = None if lexical_only or not query else encoder.encode_queries(query)[0]
        for filt in filters:
            for params in (SearchParams(query=query, top_k=5, depth=7, filters=filt),
                           SearchParams(query=query, top_k=50, depth=100, fusion="rrf", filters=filt)):
                timer = StageTimer()
                got = one.retrieve(params, timer, query_vector=vector, lexical_only=lexical_only or vector is None)
                assert len(calls) == 1 and (calls.pop()["vectors"] is None) == (vector is None)
                want = staged.retrieve(params, query_vector=vector, lexical_only=lexical_only or vector is None)
                assert not calls
                same(got.bm25, want.bm25)
                np.testing.assert_array_equal(got.dense[0], want.dense[0])
                np.testing.assert_allclose(got.dense[1], want.dense[1], rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(got.fused.ids, want.fused.ids)
                np.testing.assert_allclose(got.fused.scores, want.fused.scores, rtol=1e-5, atol=1e-6)
                assert {"filter", "lexical", "fusion"} <= set(timer.us)
                assert ("dense" in timer.us) == (vector is not None and not lexical_only)


def test_pipeline_passes_hits_of_an_index_it_cannot_scan_into_the_call(built_index, encoder, monkeypatch):
    from rag_service.core.params import SearchParams
    from rag_service.core.timing import StageTimer
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    index = load_index(built_index)
    # As for HNSW or a flat index on a GPU: the dense hits come from DenseIndex.search.
    monkeypatch.setattr(type(index.dense), "native_scan", property(lambda self: False))
    calls = []
    real = native.retrieve
    monkeypatch.setattr(native, "retrieve", lambda *a, **k: calls.append(k) or real(*a, **k))
    one = Pipeline(index, encoder)
    staged = Pipeline(index, encoder)
    staged.native_first_stage = False
    for query in QUERIES[:3]:
        vector = encoder.encode_queries(query)[0]
        for filt in (None, {"topic": "geology"}):
            params = SearchParams(query=query, top_k=20, depth=30, filters=filt)
            timer = StageTimer()
            got = one.retrieve(params, timer, query_vector=vector)
            (call,) = calls
            calls.clear()
            assert call["vectors"] is None and call["dense"] is not None
            want = staged.retrieve(params, query_vector=vector)
            same(got.bm25, want.bm25)
            same(got.dense, want.dense)
            np.testing.assert_array_equal(got.fused.ids, want.fused.ids)
            assert {"lexical", "dense", "fusion"} <= set(timer.us)


def test_the_cache_guards_lexical_candidates_are_the_bm25_retrievers_top_depth(built_index):
    from rag_service.index.load import load_index

    index = load_index(built_index)
    for query in [*QUERIES, "the of and", "glacier glacier ice"]:
        for filters in ({}, {"topic": "geology"}, {"topic": "no such topic"}):
            for depth in (1, 3, 100):
                want, _ = index.bm25.search(query, depth, index.filter_mask(filters))
                got = index.lexical_candidates(index.guard_terms(query)[1], filters, depth)
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, np.sort(want))
    # BM25 scores the multiset of terms: the same words in another order are the same input (the cache's guard skips
    # the search for them).
    def lexical_input(query):
        return index.guard_terms(query)[1]

    same = lexical_input("ice glacier glacier"), lexical_input("Glacier, ice glacier")
    np.testing.assert_array_equal(*same)
    assert not np.array_equal(lexical_input("glacier ice"), lexical_input("glacier glacier ice"))
    # The guard's terms and BM25 input come from one analysis: the same as the BM25 index's own for each.
    bm25 = index.bm25
    for query in [*QUERIES, "Glacier, ice glacier", "zzzz glacier"]:
        terms, bm25_input = index.guard_terms(query)
        assert terms == bm25.query_terms(query)
        np.testing.assert_array_equal(bm25_input, np.sort(bm25.term_ids(bm25.analyzer.tokens(query))))
        assert bm25_input.dtype == np.int64


# --------------------------------------------------------------------------------------------------------------------
# The sign bits read before the codes
# --------------------------------------------------------------------------------------------------------------------

def coded(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, SQ8Codes]:
    """Exact rows (duplicated, for ties) with random sq8 codes and the rows' sign bits."""
    vectors = exact_rows(rng, n, d)
    vectors[n // 2 :] = vectors[: n - n // 2]
    codes = exact_codes(rng, n, d)
    codes.codes[n // 3 :] = codes.codes[: n - n // 3]
    return vectors, codes._replace(bits=sign_bits(vectors))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("n,d", [(4096, 7), (4500, 64), (5000, 130), (6000, 384), (4100, 600)])
def test_dense_top_with_sign_bits_equals_the_reference_at_every_simd_level(seed, n, d):
    """Rows of 1 to 10 words (600: wider than the VNNI kernel's fixed widths), bit sums with many ties (d = 7), keeps
    at the floor (1,024 rows) and above it (depth 250 x oversample 3 x 5 = 3,750 of 4,096-6,000 rows: the bits
    are then not read, as the reference has it)."""
    rng = np.random.default_rng(seed * 101 + n + d)
    vectors, codes = coded(rng, n, d)
    plain = codes._replace(bits=None)
    decided = 0
    for query in exact_rows(rng, 3, d):
        for depth in (1, 10, 250):
            for oversample in (1, 2, 3):
                want = dense_top_reference(vectors, query, None, depth, codes, oversample)
                for level in _native.simd_levels():
                    same(_native.dense_top(vectors, query, None, depth, codes.codes, codes.scale, codes.base,
                                           oversample, level, code_bits=codes.bits), want)
                decided += not np.array_equal(want[0], dense_top_reference(vectors, query, None, depth, plain,
                                                                           oversample)[0])
    assert decided > 0  # the bits changed some answer, so they were read


def test_sign_bits_rule_rows_out_only_on_a_large_unfiltered_scan():
    rng = np.random.default_rng(11)
    n, d = 4096, 64
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    query = np.ones(d, np.float32)
    codes = sq8_quantize(vectors)._replace(bits=sign_bits(vectors))
    # Row 5 the best by far, but with every sign negative: its bit sum is the lowest of all.
    vectors[5] = -0.01
    vectors[5, 0] = 100.0
    codes.codes[5] = 127
    codes.bits[5] = 0
    ids, _ = native.dense_top(vectors, query, 10, codes=codes, oversample=2, backend="cpp")
    assert 5 not in ids
    assert 5 not in native.dense_top(vectors, query, 10, codes=codes, oversample=2, backend="numpy")[0]
    assert native.dense_top(vectors, query, 10, codes=codes._replace(bits=None), oversample=2,
                            backend="cpp")[0][0] == 5
    # A mask, or a keep above a quarter of the rows, scans every code.
    assert native.dense_top(vectors, query, 10, codes=codes, oversample=2, mask=np.ones(n, np.bool_),
                            backend="cpp")[0][0] == 5
    assert native.dense_top(vectors[:4095], query, 10, codes=SQ8Codes(codes.codes[:4095], codes.scale, codes.base,
                                                                      codes.bits[:4095]),
                            oversample=2, backend="cpp")[0][0] == 5


def test_sign_bits_layout():
    vectors = np.zeros((3, 70), np.float32)
    vectors[0, [0, 63, 64, 69]] = 1.0
    vectors[1, 1] = 1.0
    bits = sign_bits(vectors, mean=np.zeros(70, np.float32))
    assert bits.dtype == np.uint64 and bits.shape == (3, 2)
    assert bits[0].tolist() == [1 | (1 << 63), 1 | (1 << 5)]
    assert bits[1].tolist() == [2, 0] and bits[2].tolist() == [0, 0]
    # The column means centre the signs unless a mean is given.
    assert sign_bits(vectors)[2].tolist() == [0, 0] and sign_bits(vectors)[1].tolist() == [2, 0]


def test_dense_top_refuses_bad_sign_bits():
    rng = np.random.default_rng(5)
    vectors, codes = coded(rng, 40, 70)
    q = vectors[0]
    with pytest.raises(ValueError, match="code_bits"):
        _native.dense_top(vectors, q, None, 5, codes.codes, codes.scale, codes.base, 2, code_bits=codes.bits[:, :1])
    with pytest.raises(ValueError, match="code_bits"):
        _native.dense_top(vectors, q, None, 5, codes.codes, codes.scale, codes.base, 2,
                          code_bits=codes.bits.astype(np.int64))
    with pytest.raises(ValueError, match="code_bits"):
        _native.dense_top(vectors, q, None, 5, None, None, None, 0, code_bits=codes.bits)


def bunched(n: int, dim: int, seed: int) -> np.ndarray:
    """Rows close to one mean, their ranking carried by four dimensions of wide spread: each row's signs in the
    other dimensions are noise, so its bit sum says little about its inner product."""
    rng = np.random.default_rng(seed)
    v = 1.0 + 0.01 * rng.standard_normal((n, dim))
    v[:, :4] += 0.5 * rng.standard_normal((n, 4))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.skipif(not native.sign_bits_pay(), reason="the sign bits are read only with AVX-512 VNNI")
def test_a_flat_index_reads_sign_bits_only_where_they_agree_with_its_codes(tmp_path):
    spread = clustered(6000, 64, seed=4)
    bunch = bunched(6000, 64, seed=4)
    small = clustered(4000, 64, seed=4)
    indexes = {}
    for name, vectors in (("spread", spread), ("bunched", bunch), ("small", small)):
        path = tmp_path / name
        path.mkdir()
        dense_mod.write_dense(path, dense_mod.build_dense_index(vectors, "flat"), vectors, "flat")
        indexes[name] = dense_mod.DenseIndex.load(path, use_gpu=False)
    assert indexes["spread"].sq8.bits is not None and indexes["spread"].bits_agreement >= 0.99
    assert indexes["bunched"].sq8.bits is None and indexes["bunched"].bits_agreement < 0.9
    assert indexes["small"].sq8.bits is None and indexes["small"].bits_agreement is None  # below 4 x 1,024 rows
    # Searched through the index, the bits give the reference's answer (the same rule, the same rows kept).
    index = indexes["spread"]
    for query in spread[[3, 700, 5999]]:
        ids, scores = index.search(query[None, :], 20)
        want = dense_top_reference(spread, query, None, 20, index.sq8, index.native_oversample)
        np.testing.assert_array_equal(ids, want[0])


@pytest.mark.parametrize("seed", range(3))
def test_retrieve_reads_the_sign_bits_as_dense_top_does(seed):
    rng = np.random.default_rng(seed)
    n, d = 4500, 64
    p = random_postings(rng, n, vocab=40, per_term=300)
    vectors, codes = coded(rng, n, d)
    terms = rng.integers(0, 40, size=5).astype(np.int64)
    fusion = {"method": "weighted", "dense_weight": 0.5, "top_k": 20, "rrf_k": 60.0}
    for query in exact_rows(rng, 3, d):
        got = native.retrieve(p, terms, 100, vectors=vectors, query=query, codes=codes, oversample=2,
                              backend="cpp", **fusion)
        want = retrieve_reference(p, terms, None, 100, vectors=vectors, query=query, codes=codes, oversample=2,
                                  **fusion)
        same(got.dense, want.dense)
        same(got.dense, native.dense_top(vectors, query, 100, codes=codes, oversample=2, backend="cpp"))
        for a, b in zip(got.fused, want.fused, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_flat_index_reads_no_sign_bits_where_their_kernel_does_not_pay(tmp_path, monkeypatch):
    vectors = clustered(6000, 64, seed=4)
    dense_mod.write_dense(tmp_path, dense_mod.build_dense_index(vectors, "flat"), vectors, "flat")
    monkeypatch.setattr(native, "sign_bits_pay", lambda: False)
    index = dense_mod.DenseIndex.load(tmp_path, use_gpu=False)
    assert index.sq8 is not None and index.sq8.bits is None and index.bits_agreement is None

# BM25 block by block: bm25_top with bounds per block of chunks (native.block_bounds) gives the postings pass's
# answer, refuses bounds that are not its postings', and a large index's pipeline reads them.

IMPACTS = np.array([0.25, 0.5, 1.0, 1.7, 2.3], np.float32)


def skewed_postings(rng: np.random.Generator, n_docs: int, vocab: int, negative: bool = False) -> Postings:
    """Lists from a few chunks to nearly all of them (a common word's), impacts from a few values (exact ties),
    chunk ids ascending per term; with `negative`, some impacts below zero."""
    indptr, docs = [0], []
    for t in range(vocab):
        share = (0.9, 0.5, 0.2, 0.05, 0.01)[t % 5]
        k = min(n_docs, int(rng.binomial(n_docs, share)))
        docs.extend(np.sort(rng.choice(n_docs, size=k, replace=False)).tolist() if k else [])
        indptr.append(len(docs))
    weights = rng.choice(IMPACTS, size=len(docs)) * (1 + (np.arange(len(docs)) % 3 == 0) * rng.random(len(docs)))
    if negative:
        weights[rng.random(len(docs)) < 0.1] *= -1
    return Postings(np.asarray(indptr, np.int64), np.asarray(docs, np.int32), weights.astype(np.float32), n_docs)


def block_masks(rng: np.random.Generator, n: int) -> list[np.ndarray | None]:
    return [*masks(rng, n), rng.random(n) < 0.02]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_docs", [1, 2, 37, 400, 5000])
def test_bm25_top_with_bounds_equals_the_postings_pass(seed, n_docs):
    rng = np.random.default_rng(seed * 7919 + n_docs)
    vocab = 12
    p = skewed_postings(rng, n_docs, vocab, negative=seed == 3)
    queries = [np.zeros(0, np.int64), np.array([0], np.int64), np.array([3], np.int64), np.array([0, 0, 4], np.int64),
               np.array([1, 2, 3, 4], np.int64), rng.integers(0, vocab, size=9).astype(np.int64)]
    for shift, min_postings in ((0, 0), (2, None), (6, None), (3, 10**9)):
        bounds = native.block_bounds(p, shift=shift, min_postings=min_postings)
        with_bounds = p._replace(blocks=bounds)
        assert bounds.shift == shift and bounds.n_blocks == -(-n_docs // (1 << shift))
        assert (bounds.rows == 0) == (min_postings == 10**9)
        for terms in queries:
            for mask in block_masks(rng, n_docs):
                for depth in (1, 3, 100, n_docs + 5):
                    got = native.bm25_top(with_bounds, terms, depth, mask=mask, backend="cpp")
                    same(got, numba_top(p, terms, mask, depth))
                    same(got, bm25_top_reference(p, terms, mask, depth))
    # Nothing left behind in the thread's buffers: the pass without bounds still scores from zero.
    terms = np.arange(vocab, dtype=np.int64)
    same(native.bm25_top(p, terms, 10, backend="cpp"), numba_top(p, terms, None, 10))


@pytest.mark.parametrize("seed", range(3))
def test_bounds_skip_most_blocks_and_keep_the_answer_on_a_large_index(seed):
    # A common word (every chunk, a tiny impact) beside rarer ones, as on a large corpus; every block is read by the
    # pass without bounds, and the top is the same with them, ties and masks included.
    rng = np.random.default_rng(seed)
    n_docs = 200_000
    common = np.arange(n_docs, dtype=np.int32)
    lists = [common] + [np.sort(rng.choice(n_docs, size=k, replace=False)).astype(np.int32)
                        for k in (40, 900, 20_000, 90_000)]
    indptr = np.cumsum([0] + [len(x) for x in lists]).astype(np.int64)
    docs = np.concatenate(lists)
    weights = np.concatenate([rng.choice(np.array([0.001, 0.002, 0.003], np.float32), size=n_docs)]
                             + [rng.choice(IMPACTS * s, size=len(x)).astype(np.float32)
                                for s, x in zip((8.0, 5.0, 2.0, 1.0), lists[1:], strict=True)])
    p = Postings(indptr, docs, weights.astype(np.float32), n_docs)
    with_bounds = p._replace(blocks=native.block_bounds(p))
    for terms in (np.array([0, 1, 3], np.int64), np.array([0, 0, 0], np.int64), np.array([4, 3, 2, 0], np.int64),
                  np.array([2, 0, 4, 0], np.int64)):
        for mask in (None, rng.random(n_docs) < 0.3, np.zeros(n_docs, np.bool_)):
            for depth in (1, 100, 2000):
                got = native.bm25_top(with_bounds, terms, depth, mask=mask, backend="cpp")
                same(got, numba_top(p, terms, mask, depth))
                same(got, bm25_top_reference(p, terms, mask, depth))


def test_retrieve_passes_the_bounds_to_bm25_and_refuses_others(built_index):
    from rag_service.index.load import load_index

    index = load_index(built_index)
    p = index.bm25.postings
    assert p.blocks is None  # a small index gets none
    with_bounds = p._replace(blocks=native.block_bounds(p, shift=1, min_postings=2))
    rng = np.random.default_rng(5)
    for _ in range(20):
        terms = rng.integers(0, len(p.indptr) - 1, size=int(rng.integers(1, 6))).astype(np.int64)
        for mask in (None, rng.random(p.n_docs) < 0.5):
            want = native.bm25_top(p, terms, 30, mask=mask, backend="cpp")
            same(native.retrieve(with_bounds, terms, 30, mask=mask, backend="cpp").bm25, want)
    # Bounds made from other arrays are refused, whatever the call.
    copy = Postings(p.indptr.copy(), p.docs.copy(), p.weights.copy(), p.n_docs, blocks=with_bounds.blocks)
    terms = np.array([0], np.int64)
    with pytest.raises(ValueError, match="blocks were made from other postings"):
        native.bm25_top(copy, terms, 5, backend="cpp")
    with pytest.raises(ValueError, match="blocks were made from other postings"):
        native.retrieve(copy, terms, 5, backend="cpp")


def test_block_bounds_refuse_bad_postings():
    p = Postings(np.array([0, 3, 5], np.int64), np.array([0, 4, 2, 1, 3], np.int32),
                 np.ones(5, np.float32), 6)
    with pytest.raises(ValueError, match=r"docs\[2\] = 2 .*ascending"):
        native.block_bounds(p)
    with pytest.raises(ValueError, match=r"docs\[1\] = 9 "):
        native.block_bounds(Postings(p.indptr, np.array([0, 9, 1, 1, 3], np.int32), p.weights, 6))
    for shift in (-1, 13):
        with pytest.raises(ValueError, match="shift"):
            native.block_bounds(p._replace(docs=np.array([0, 2, 4, 1, 3], np.int32)), shift=shift)
    with pytest.raises(ValueError, match="blocks must be a BlockBounds"):
        native._native.bm25_top(p.indptr, p.docs, p.weights, 6, np.array([0], np.int64), None, 3, blocks=object())
    # Postings changed in place after their bounds were made: refused, never read out of bounds.
    good = Postings(p.indptr, np.array([0, 2, 4, 1, 3], np.int32), p.weights.copy(), 6)
    for min_postings, at, value, problem in ((10, 3, 99, "outside"), (0, 1, 5, "not in the block")):
        docs = good.docs.copy()
        changed = good._replace(docs=docs)
        changed = changed._replace(blocks=native.block_bounds(changed, shift=1, min_postings=min_postings))
        docs[at] = value
        with pytest.raises(ValueError, match=rf"docs\[{at}\] = {value} .*{problem}.*changed after the bounds"):
            native.bm25_top(changed, np.array([0, 1, 0, 1], np.int64), 3, backend="cpp")
    # A failed call leaves the thread's buffers clean.
    bounded = good._replace(blocks=native.block_bounds(good, shift=1, min_postings=0))
    same(native.bm25_top(bounded, np.array([0, 1], np.int64), 6, backend="cpp"),
         bm25_top_reference(good, np.array([0, 1], np.int64), None, 6))


def test_a_large_index_reads_its_bounds_through_the_pipeline(built_index, encoder, monkeypatch):
    # The search with bounds (an index treated as large) answers as the one without, contexts and scores alike.
    from rag_service.core.params import SearchParams
    from rag_service.index.load import load_index
    from rag_service.retrievers import lexical
    from rag_service.search.pipeline import Pipeline

    # The one native call takes the index's bounds once, as it is prepared (the last argument of PreparedSearch);
    # every search of a pipeline goes through its own prepared call.
    prepared: list = []
    real_prepared = native._native.PreparedSearch
    monkeypatch.setattr(native._native, "PreparedSearch", lambda *a: prepared.append(a[-1]) or real_prepared(*a))
    plain = Pipeline(load_index(built_index), encoder)
    assert plain.index.bm25.postings.blocks is None
    monkeypatch.setattr(lexical, "BLOCK_BOUNDS_MIN_CHUNKS", 1)
    bounded = Pipeline(load_index(built_index), encoder)
    blocks = bounded.index.bm25.postings.blocks
    assert blocks is not None and blocks.shift == native.BLOCK_SHIFT
    assert len(prepared) == 2 and prepared[0] is None and prepared[1] is blocks
    seen: list = []
    real_call = native.SearchCall.__call__
    monkeypatch.setattr(native.SearchCall, "__call__",
                        lambda self, *a, **k: seen.append(self) or real_call(self, *a, **k))
    for query in ["how do glaciers carve valleys", "volcano eruption ash", "glacier", "zzzz unknown words"]:
        for filt in (None, {"topic": "geology"}):
            params = SearchParams(query=query, top_k=5, filters=filt)
            seen.clear()
            got = bounded.search(params)
            assert seen and all(call is bounded._search_call for call in seen)
            seen.clear()
            want = plain.search(params)
            assert seen and all(call is plain._search_call for call in seen)
            assert [(c.chunk, c.score, c.bm25_score) for c in got.contexts] == \
                [(c.chunk, c.score, c.bm25_score) for c in want.contexts]
