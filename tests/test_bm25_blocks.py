"""BM25 block by block: bm25_top with bounds per block of chunks (kernels.native.block_bounds) gives the postings
pass's answer (the numba scorer's and the reference's) on seeded cases, refuses bounds that are not its postings',
and a large index's pipeline reads them."""

from __future__ import annotations

import numpy as np
import pytest

from rag_service.kernels import native
from rag_service.kernels.reference import Postings, bm25_top_reference
from rag_service.retrievers.lexical import _NO_MASK, _top_n

pytestmark = pytest.mark.skipif(not native.HAS_NATIVE or not native._HAS_RETRIEVE_KERNELS,
                                reason="rag_service._native with the retrieve kernels is not built")

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


def numba_top(p: Postings, terms: np.ndarray, mask: np.ndarray | None, depth: int):
    depth = min(depth, max(p.n_docs, 1))
    if mask is None:
        return _top_n(p.indptr, p.docs, p.weights, terms, p.n_docs, _NO_MASK, False, depth)
    return _top_n(p.indptr, p.docs, p.weights, terms, p.n_docs, mask, True, depth)


def same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def masks(rng: np.random.Generator, n: int) -> list[np.ndarray | None]:
    one = np.zeros(n, np.bool_)
    one[rng.integers(0, n)] = True
    return [None, np.zeros(n, np.bool_), one, rng.random(n) < 0.5, rng.random(n) < 0.02]


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
            for mask in masks(rng, n_docs):
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


def test_retrieve_and_search_core_pass_the_bounds_to_bm25(built_index):
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


def test_a_large_index_reads_its_bounds_through_the_pipeline(built_index, encoder, monkeypatch):
    # The search with bounds (an index treated as large) answers as the one without, contexts and scores alike.
    from rag_service.core.params import SearchParams
    from rag_service.index.load import load_index
    from rag_service.retrievers import lexical
    from rag_service.search.pipeline import Pipeline

    plain = Pipeline(load_index(built_index), encoder)
    assert plain.index.bm25.postings.blocks is None
    monkeypatch.setattr(lexical, "BLOCK_BOUNDS_MIN_CHUNKS", 1)
    bounded = Pipeline(load_index(built_index), encoder)
    blocks = bounded.index.bm25.postings.blocks
    assert blocks is not None and blocks.shift == native.BLOCK_SHIFT
    seen: list = []
    real = native._native.search_core
    monkeypatch.setattr(native._native, "search_core", lambda *a, **k: seen.append(k.get("blocks")) or real(*a, **k))
    for query in ["how do glaciers carve valleys", "volcano eruption ash", "glacier", "zzzz unknown words"]:
        for filt in (None, {"topic": "geology"}):
            params = SearchParams(query=query, top_k=5, filters=filt)
            seen.clear()
            got = bounded.search(params)
            assert seen and all(b is blocks for b in seen)
            seen.clear()
            want = plain.search(params)
            assert seen and all(b is None for b in seen)
            assert [(c.chunk, c.score, c.bm25_score) for c in got.contexts] == \
                [(c.chunk, c.score, c.bm25_score) for c in want.contexts]
