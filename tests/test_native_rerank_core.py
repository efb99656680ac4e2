"""The rerank stage in one native call (native/src/rerank_core.cpp) against its references in
rag_service.kernels.reference, on seeded random stores: ties, empty and one-candidate lists, chunks without windows
or tokens, queries without known terms or with one; and the wiring in rag_service.search.rerank."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pytest

from rag_service.kernels import native
from rag_service.kernels.reference import (
    RERANK_FEATURES,
    RERANK_LOCAL_FEATURES,
    Postings,
    finish_features_reference,
    lexical_features_reference,
    local_features_reference,
    rank_reference,
    sign_bits,
    sq8_quantize,
)
from rag_service.retrievers.lexical import idf_values
from rag_service.search import rerank as rerank_mod

pytestmark = pytest.mark.skipif(native.rerank_core_backend("auto") != "cpp",
                                reason="rag_service._native lacks the one-call rerank kernels")

VOCAB = 25
DIM = 16
PARAMS = {"k1": 0.9, "b": 0.4, "avgdl": 30.0, "avg_title": 5.0, "avg_window": 12.0}


@dataclass
class Store:
    arrays: dict[str, np.ndarray | None]
    dense: np.ndarray

    def core(self) -> native.RerankCore:
        return native.RerankCore(**self.arrays, dense_vectors=self.dense, **PARAMS)

    def lexical_args(self) -> tuple[np.ndarray, ...]:
        a = self.arrays
        return a["tokens"], a["token_offsets"], a["title_lengths"], a["window_offsets"], a["window_spans"]


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def random_store(rng: np.random.Generator, n_chunks: int = 40, storage: str = "int8", same: bool = False) -> Store:
    """Chunks of 0-60 tokens (stop words are -1) with 0-5 windows each; `same`: every chunk a copy of the first."""
    lengths = rng.integers(0, 60, n_chunks)
    lengths[rng.integers(0, n_chunks)] = 0  # a chunk without tokens
    if same:
        lengths[:] = lengths[0] or 20
    token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    first = rng.integers(-1, VOCAB, lengths[0])
    tokens = (np.tile(first, n_chunks) if same else rng.integers(-1, VOCAB, int(lengths.sum()))).astype(np.int32)
    titles = np.asarray([rng.integers(0, n + 1) for n in lengths], dtype=np.int32)
    per_chunk = rng.integers(0, 6, n_chunks)
    per_chunk[lengths == 0] = 0
    per_chunk[rng.integers(0, n_chunks)] = 0  # a chunk without windows
    if same:
        titles[:] = titles[0]
        per_chunk[:] = max(per_chunk[0], 2)
    spans, vectors = [], []
    first_spans = None
    for c in range(n_chunks):
        rows = []
        for _ in range(per_chunk[c]):
            a = int(rng.integers(0, lengths[c] + 1))
            rows.append((a, int(rng.integers(a, lengths[c] + 1))))
        if same:
            first_spans = first_spans or rows
            rows = first_spans
        spans.extend(rows)
    n_windows = len(spans)
    window_offsets = np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int64)
    base = unit(rng.normal(size=(max(n_windows, 1), DIM)))[:n_windows]
    if same:
        base = np.tile(base[:per_chunk[0]], (n_chunks, 1))
    if storage == "int8":
        scales = (np.abs(base).max(axis=1) / 127.0).astype(np.float32) + np.float32(1e-6)
        vectors = np.round(base / scales[:, None]).astype(np.int8)
    else:
        scales, vectors = None, base.astype(storage)
    dense = unit(rng.normal(size=(n_chunks, DIM)))
    if same:
        dense[:] = dense[0]
    arrays = {"window_offsets": window_offsets, "window_vectors": np.ascontiguousarray(vectors),
              "window_scales": scales, "window_spans": np.asarray(spans, dtype=np.int32).reshape(-1, 2),
              "tokens": tokens, "token_offsets": token_offsets, "title_lengths": titles}
    return Store(arrays, dense)


def random_query(rng: np.random.Generator, n_terms: int) -> tuple[np.ndarray, ...]:
    terms = np.sort(rng.choice(VOCAB, n_terms, replace=False)).astype(np.int32)
    return (unit(rng.normal(size=DIM)), terms, rng.integers(1, 4, n_terms).astype(np.float64),
            rng.uniform(0.1, 4.0, n_terms))


def ranked(rng: np.random.Generator, n_chunks: int, candidates: np.ndarray) -> np.ndarray:
    """Some candidates and some other chunks, in a random order."""
    pool = np.union1d(rng.choice(candidates, len(candidates) // 2, replace=False) if len(candidates) else [],
                      rng.choice(n_chunks, n_chunks // 3, replace=False)).astype(np.int64)
    return rng.permutation(pool)


CASES = [(seed, m, n_terms, storage) for seed, (m, n_terms, storage) in enumerate(
    [(0, 3, "int8"), (1, 3, "int8"), (1, 0, "int8"), (1, 1, "float32"), (12, 0, "int8"), (12, 1, "int8"),
     (25, 4, "float16"), (40, 5, "int8"), (40, 2, "float32"), (30, 8, "int8")])]


@pytest.mark.parametrize(("seed", "m", "n_terms", "storage"), CASES)
def test_lexical_features_equal_the_numba_reference_bit_for_bit(seed, m, n_terms, storage):
    rng = np.random.default_rng(seed)
    store = random_store(rng, storage=storage)
    _, terms, counts, idf = random_query(rng, n_terms)
    cands = rng.choice(40, m, replace=False).astype(np.int64)
    got = native.lexical_features(*store.lexical_args(), cands, terms, counts, idf, **PARAMS)
    want = lexical_features_reference(*store.lexical_args(), cands, terms, counts, idf, **PARAMS)
    assert got.shape == (m, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("seed", "m", "n_terms", "storage"), CASES)
def test_local_features_equal_the_reference(seed, m, n_terms, storage):
    rng = np.random.default_rng(100 + seed)
    store = random_store(rng, storage=storage)
    q, terms, counts, idf = random_query(rng, n_terms)
    cands = rng.choice(40, m, replace=False).astype(np.int64)
    got = store.core().local_features(q, terms, counts, idf, cands)
    want = local_features_reference(**store.arrays, query=q, query_terms=terms, query_counts=counts, query_idf=idf,
                                    candidates=cands, **PARAMS)
    assert got.shape == (m, len(RERANK_LOCAL_FEATURES))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # NaN exactly where a chunk has no windows
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[:, [0, 1, 2, 3, 7]], want[:, [0, 1, 2, 3, 7]])  # lexical and proximity exact


@pytest.mark.skipif(not native._HAS_RERANK_CORE, reason="rag_service._native is not built")
@pytest.mark.parametrize("n_terms", [1, 3, 16, 17, VOCAB])
def test_local_features_at_every_simd_level_and_any_number_of_terms(n_terms):
    # The core at each SIMD level this CPU runs (its window dot products differ by level, its lexical and proximity
    # columns must not), for queries of one term up to the whole vocabulary.
    rng = np.random.default_rng(300 + n_terms)
    store = random_store(rng)
    q, terms, counts, idf = random_query(rng, n_terms)
    cands = rng.choice(40, 30, replace=False).astype(np.int64)
    want = local_features_reference(**store.arrays, query=q, query_terms=terms, query_counts=counts, query_idf=idf,
                                    candidates=cands, **PARAMS)
    assert np.any(want[:, 0] > 0)  # some candidate holds a query term: the matching is exercised
    a = store.arrays
    for level in native._native.simd_levels():
        core = native._native.RerankCore(a["window_offsets"], a["window_vectors"], a["window_scales"],
                                         a["window_spans"], a["tokens"], a["token_offsets"], a["title_lengths"],
                                         store.dense, *PARAMS.values(), simd=level)
        got = core.local_features(q, terms, counts, idf, cands)
        np.testing.assert_array_equal(got[:, [0, 1, 2, 3, 7]], want[:, [0, 1, 2, 3, 7]], err_msg=level)


def test_lexical_features_take_a_repeated_term_once_as_the_reference_does():
    rng = np.random.default_rng(9)
    store = random_store(rng)
    terms = np.asarray([3, 7, 3, 11, 7], np.int32)
    counts, idf = np.asarray([1.0, 2.0, 1.0, 1.0, 3.0]), np.asarray([1.5, 0.5, 1.5, 2.5, 0.5])
    cands = np.arange(40, dtype=np.int64)
    got = native.lexical_features(*store.lexical_args(), cands, terms, counts, idf, **PARAMS)
    want = lexical_features_reference(*store.lexical_args(), cands, terms, counts, idf, **PARAMS)
    np.testing.assert_array_equal(got, want)
    assert np.any(got[:, 0] > 0)  # the query's terms occur: the case is not vacuous


def random_local(rng: np.random.Generator, m: int) -> np.ndarray:
    local = rng.uniform(0, 5, (m, len(RERANK_LOCAL_FEATURES))).astype(np.float32)
    local[rng.random(m) < 0.3, 4:7] = np.nan  # chunks without windows
    if m > 2:
        local[:, 0] = 0.0  # no candidate has a query term: the scaled column stays 0
    return local


@pytest.mark.parametrize(("seed", "m"), [(0, 0), (1, 1), (2, 2), (3, 3), (4, 50), (5, 100)])
def test_finish_features_equal_the_reference(seed, m):
    rng = np.random.default_rng(200 + seed)
    local = random_local(rng, m)
    vectors = unit(rng.normal(size=(m, DIM)))
    q = unit(rng.normal(size=DIM))
    cands = rng.choice(1000, m, replace=False).astype(np.int64)
    fused = np.sort(rng.random(m).astype(np.float32))[::-1].copy()
    bm25, dense = ranked(rng, 1000, cands), ranked(rng, 1000, cands)
    if m:
        bm25 = np.concatenate([bm25, cands[:1]])  # an id listed twice keeps its last rank, as the reference's dict
    got = native.finish_features(local, vectors, q, cands, fused, bm25, dense)
    want = finish_features_reference(local, vectors, q, cands, fused, bm25, dense)
    assert got.shape == (m, len(RERANK_FEATURES)) and got.dtype == np.float32
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    exact = [RERANK_FEATURES.index(f) for f in ("fused", "bm25", "bm25_title", "bm25_window", "proximity",
                                                "coverage", "rr_bm25", "rr_dense")]
    np.testing.assert_array_equal(got[:, exact], want[:, exact])


@pytest.mark.parametrize(("seed", "m"), [(0, 0), (1, 1), (2, 7), (3, 100)])
def test_rank_equals_the_reference_and_ties_keep_the_given_order(seed, m):
    rng = np.random.default_rng(300 + seed)
    features = rng.integers(0, 3, (m, len(RERANK_FEATURES))).astype(np.float32)  # few values: many exact ties
    columns = np.asarray([0, 3, 12], dtype=np.int64)
    weights = np.asarray([1.0, 0.5, -2.0], dtype=np.float32)
    scores, order = native.rank_features(features, columns, weights, 0.25)
    want_scores, want_order = rank_reference(features, columns, weights, 0.25)
    np.testing.assert_array_equal(order, want_order)
    np.testing.assert_array_equal(scores, want_scores)
    assert order.dtype == np.int64 and scores.dtype == np.float32


def check_stable_sort(scores: np.ndarray, order: np.ndarray) -> None:
    assert np.all(np.diff(scores) <= 0)
    for k in range(1, len(order)):
        if scores[k] == scores[k - 1]:
            assert order[k] > order[k - 1]


@pytest.mark.parametrize(("seed", "m", "n_terms", "storage"), CASES)
def test_rerank_in_one_call_equals_the_reference_stages(seed, m, n_terms, storage):
    rng = np.random.default_rng(400 + seed)
    store = random_store(rng, storage=storage)
    q, terms, counts, idf = random_query(rng, n_terms)
    cands = rng.choice(40, m, replace=False).astype(np.int64)
    fused = np.sort(rng.random(m).astype(np.float32))[::-1].copy()
    bm25, dense = ranked(rng, 40, cands), ranked(rng, 40, cands)
    model = rerank_mod.RerankModel.load()
    ids, scores, features, order = store.core().rerank(q, terms, counts, idf, cands, fused, bm25, dense,
                                                       model.columns, model.weights, model.bias)
    ref = store.core().rerank(q, terms, counts, idf, cands, fused, bm25, dense, model.columns, model.weights,
                              model.bias, backend="numpy")
    np.testing.assert_allclose(features, ref[2][np.argsort(ref[3])][order], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, np.sort(ref[1])[::-1], rtol=1e-5, atol=1e-5)
    check_stable_sort(scores, order)
    np.testing.assert_array_equal(ids, cands[order])
    # the one call equals its own stages
    local = store.core().local_features(q, terms, counts, idf, cands)
    staged = native.finish_features(local, store.dense[cands], q, cands, fused, bm25, dense)
    s, o = native.rank_features(staged, model.columns, model.weights, model.bias)
    np.testing.assert_array_equal(o, order)
    np.testing.assert_array_equal(s, scores)
    np.testing.assert_array_equal(staged[o], features)


def test_identical_candidates_tie_and_keep_the_fused_order():
    rng = np.random.default_rng(7)
    store = random_store(rng, n_chunks=12, same=True)
    q, terms, counts, idf = random_query(rng, 3)
    cands = rng.permutation(12).astype(np.int64)
    fused = np.full(12, 0.5, np.float32)
    model = rerank_mod.RerankModel(features=("bm25", "dense", "win_max", "win_soft", "prf", "coverage"),
                                   weights=np.asarray([1, 2, 3, 4, 5, 6], np.float32), bias=0.1, info={})
    empty = np.zeros(0, np.int64)
    ids, scores, _, order = store.core().rerank(q, terms, counts, idf, cands, fused, empty, empty, model.columns,
                                                model.weights, model.bias)
    assert np.all(scores == scores[0])
    np.testing.assert_array_equal(order, np.arange(12))
    np.testing.assert_array_equal(ids, cands)


def test_column_names_match_the_references():
    from rag_service import _native

    assert tuple(_native.RERANK_FEATURES) == RERANK_FEATURES == rerank_mod.FEATURES
    assert tuple(_native.RERANK_LOCAL_FEATURES) == RERANK_LOCAL_FEATURES == rerank_mod.LOCAL_FEATURES


def test_bad_input_names_the_field():
    rng = np.random.default_rng(9)
    store = random_store(rng)
    core = store.core()
    q, terms, counts, idf = random_query(rng, 2)
    with pytest.raises(ValueError, match="candidates must be in"):
        core.local_features(q, terms, counts, idf, np.asarray([40]))
    with pytest.raises(ValueError, match="query must have 16 entries"):
        core.local_features(q[:3], terms, counts, idf, np.asarray([1]))
    with pytest.raises(ValueError, match="query_terms, query_counts and query_idf"):
        core.local_features(q, terms, counts[:1], idf, np.asarray([1]))
    with pytest.raises(ValueError, match="query_terms must not repeat"):
        core.local_features(q, np.asarray([3, 3]), counts, idf, np.asarray([1]))
    with pytest.raises(ValueError, match="fused_scores must have one entry per candidate"):
        core.rerank(q, terms, counts, idf, np.asarray([1, 2]), np.ones(1, np.float32), [], [], [0], [1.0], 0.0)
    with pytest.raises(ValueError, match="columns must be in"):
        core.rerank(q, terms, counts, idf, np.asarray([1]), np.ones(1, np.float32), [], [], [13], [1.0], 0.0)
    bad = dict(store.arrays)
    spans = bad["window_spans"].copy()
    spans[:, 1] = 10_000
    bad["window_spans"] = spans
    chunk = int(np.flatnonzero(np.diff(store.arrays["window_offsets"]))[0])
    with pytest.raises(ValueError, match="window_spans row"):
        native.RerankCore(**bad, dense_vectors=store.dense, **PARAMS).local_features(q, terms, counts, idf,
                                                                                     np.asarray([chunk]))
    with pytest.raises(ValueError, match="dense_vectors must have 16 columns"):
        native.RerankCore(**store.arrays, dense_vectors=store.dense[:, :8].copy(), **PARAMS)
    with pytest.raises(ValueError, match="local_features must be"):
        native.finish_features(np.zeros((2, 3), np.float32), store.dense[:2], q, np.asarray([0, 1]),
                               np.ones(2, np.float32), [], [])


@pytest.mark.skipif(not native._HAS_RERANK_CORE, reason="rag_service._native is not built")
@pytest.mark.parametrize("field, corrupt, message", [
    ("window_spans", lambda a: a.__setitem__((-1, 1), 10_000), "window_spans row"),
    ("token_offsets", lambda a: a.__setitem__(-1, a[-1] + 5), "token_offsets of chunk"),
    ("title_lengths", lambda a: a.__setitem__(0, 10_000), "title_lengths of chunk 0"),
    ("window_offsets", lambda a: a.__setitem__(-1, a[-1] + 3), "offsets of chunk"),
])
def test_the_core_checks_every_chunk_when_it_is_built(field, corrupt, message):
    # Requests check only their candidate ids, so a corrupt chunk must be refused at load, whichever chunk it is
    # and whether or not any request would ever rank it.
    store = random_store(np.random.default_rng(11))
    bad = dict(store.arrays)
    bad[field] = bad[field].copy()
    corrupt(bad[field])
    with pytest.raises(ValueError, match=message):
        native.RerankCore(**bad, dense_vectors=store.dense, **PARAMS)


def test_facade_falls_back_to_the_references(monkeypatch):
    monkeypatch.setenv(native.BACKEND_ENV, "numpy")
    assert native.rerank_core_backend() == "numpy"
    calls = []
    monkeypatch.setattr(native, "rank_reference", lambda *a: calls.append(1) or rank_reference(*a))
    native.rank_features(np.zeros((2, len(RERANK_FEATURES)), np.float32), [0], [1.0], 0.0)
    assert calls == [1]


# Wiring in rag_service.search.rerank, on a built index --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(built_index, encoder):
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    return Pipeline(load_index(built_index), encoder)


def old_query_terms(store: rerank_mod.RerankStore, query: str) -> tuple[np.ndarray, ...]:
    counts = Counter(int(t) for t in store.bm25.term_ids(store.bm25.analyzer.tokens(query)).tolist())
    terms = np.asarray(sorted(counts), dtype=np.int32)
    qcount = np.asarray([counts[t] for t in terms.tolist()], dtype=np.float64)
    df = store.bm25.df[terms.astype(np.int64)] if len(terms) else np.zeros(0, np.int64)
    idf = idf_values(df, store.bm25.corpus_chunks, store.bm25.idf_kind) if len(terms) else np.zeros(0)
    return terms, qcount, np.asarray(idf, dtype=np.float64)


@pytest.mark.parametrize("query", ["glacier ice moraines and ancient air in ice cores", "ice ice ice", "zzqx", ""])
def test_query_terms_from_the_load_time_idf_equal_per_query_idf(pipeline, query):
    store = pipeline.rerank_store
    assert store.idf is not None  # the test index uses lucene idf, a function of each term's df alone
    per_query = replace(store, idf=None)  # how okapi idf (whose floor depends on the query's terms) is computed
    for got, again, want in zip(store.query_terms(query), per_query.query_terms(query), old_query_terms(store, query)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(again, want)


def test_rerank_equals_compute_features_then_rank(pipeline):
    from rag_service.core.params import SearchParams

    query = "glacier ice moraines and ancient air in ice cores"
    cand = pipeline.retrieve(SearchParams(query=query, top_k=20, depth=20))
    store, model = pipeline.rerank_store, pipeline.rerank_model
    args = (cand.fused.ids, cand.fused.scores, cand.bm25[0], cand.dense[0])
    one = rerank_mod.rerank(store, model, query, cand.query_vector, *args)
    staged = rerank_mod.rank(model, cand.fused.ids, rerank_mod.compute_features(store, query, cand.query_vector,
                                                                                *args))
    for name in ("ids", "scores", "features", "order"):
        np.testing.assert_array_equal(getattr(one, name), getattr(staged, name))
    empty = rerank_mod.rerank(store, model, query, cand.query_vector, cand.fused.ids[:0], cand.fused.scores[:0],
                              cand.bm25[0], cand.dense[0])
    assert len(empty.ids) == 0 and empty.features.shape == (0, len(RERANK_FEATURES))


# --------------------------------------------------------------------------------------------------------------------
# Half of the candidates on the core's worker thread
# --------------------------------------------------------------------------------------------------------------------

def helper_case(seed: int, m: int):
    rng = np.random.default_rng(900 + seed)
    store = random_store(rng, n_chunks=200)
    q, terms, counts, idf = random_query(rng, 6)
    cands = rng.choice(200, m, replace=False).astype(np.int64)
    fused = np.sort(rng.random(m).astype(np.float32))[::-1].copy()
    model = rerank_mod.RerankModel.load()
    args = (q, terms, counts, idf, cands, fused, ranked(rng, 200, cands), ranked(rng, 200, cands), model.columns,
            model.weights, model.bias)
    return store, args


TWO_CPUS = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


@contextmanager
def placed(core):
    """The calling thread on one CPU and the core's worker on the others, as the server places a lone search (left
    to the scheduler, the worker may be woken onto the caller's CPU and get no turn during a short call)."""
    if not TWO_CPUS:
        yield
        return
    saved = os.sched_getaffinity(0)
    cpus = sorted(saved)
    os.sched_setaffinity(0, {cpus[0]})
    core.place_helper(cpus[1:])
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def shared_until_taken(core, args, want, calls: int = 500) -> int:
    """Calls core.rerank(helper=True) until its worker has taken part, each answer checked against `want`;
    returns the jobs it took."""
    with placed(core):
        for _ in range(calls):
            core.rouse_helper()  # as a lone search does before its call: the worker is up when the call begins
            time.sleep(0.0005)
            for got, expected in zip(core.rerank(*args, helper=True), want, strict=True):
                np.testing.assert_array_equal(got, expected)
            if core.helper_jobs:
                break
    return core.helper_jobs


@pytest.mark.parametrize(("seed", "m"), [(0, 1), (1, 15), (2, 16), (3, 17), (4, 100), (5, 150)])
def test_the_worker_thread_gives_the_same_rerank(seed, m):
    store, args = helper_case(seed, m)
    core = store.core()
    alone = core.rerank(*args)
    jobs = shared_until_taken(core, args, alone, calls=500 if m >= 16 else 20)
    if m < 16:
        assert jobs == 0  # fewer than 16 candidates are never shared
    elif TWO_CPUS:
        assert jobs > 0


def test_an_error_on_the_worker_thread_reaches_the_caller_and_frees_the_worker():
    store, args = helper_case(6, 40)
    core = store.core()
    for at in (-1, 0):  # the last chunk (the worker's, when it is up) and the first (always the caller's)
        bad = args[4].copy()
        bad[at] = 10_000
        for _ in range(20):
            core.rouse_helper()
            time.sleep(0.0005)
            with pytest.raises(ValueError, match="candidates"):
                core.rerank(*args[:4], bad, *args[5:], helper=True)
    jobs = shared_until_taken(core, args, core.rerank(*args))
    assert jobs > 0 or not TWO_CPUS  # the worker is free again


def test_callers_at_once_share_the_worker_or_work_alone():
    store, args = helper_case(7, 60)
    core = store.core()
    want = core.rerank(*args)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(50):
                for got, expected in zip(core.rerank(*args, helper=True), want, strict=True):
                    np.testing.assert_array_equal(got, expected)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_its_rerank_alone():
    store, args = helper_case(8, 60)
    core = store.core()
    want = core.rerank(*args, helper=True)  # the worker runs in this process now
    pid = os.fork()
    if pid == 0:  # the child: its copy of the worker has no thread; the call must not wait for one
        try:
            got = core.rerank(*args, helper=True)
            ok = all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def helper_cpus() -> dict[str, str]:
    """The CPUs each thread named rag-helper may run on (Linux /proc)."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() != "rag-helper":
                    continue
            with open(f"/proc/self/task/{task}/status") as f:
                found[task] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_the_worker_runs_on_the_cpus_it_is_placed_on():
    store, args = helper_case(9, 60)
    core = store.core()
    before = set(helper_cpus())
    cpu = max(os.sched_getaffinity(0))
    core.place_helper([cpu])
    core.rerank(*args, helper=True)  # starts the worker, which names and places itself as it begins
    deadline = time.monotonic() + 5
    while True:
        mine = {task: cpus for task, cpus in helper_cpus().items() if task not in before}
        if list(mine.values()) == [str(cpu)] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert list(mine.values()) == [str(cpu)]
    core.place_helper([])  # no CPUs: it stays where it is
    core.rerank(*args, helper=True)
    assert [cpus for task, cpus in helper_cpus().items() if task in mine] == [str(cpu)]


def test_a_lone_search_shares_its_scan_and_rerank_with_the_worker():
    """search_core with helper=True on an index large enough for the sign bits (4,500 rows): the scan's bits, codes
    and float rows and the rerank's candidates are shared in chunks; every answer equals the one-thread answer."""
    rng = np.random.default_rng(31)
    n = 4500
    store = random_store(rng, n_chunks=n)
    core = store.core()
    docs = np.sort(rng.choice(n, 900, replace=False)).astype(np.int32)
    indptr = np.asarray([0, 300, 600, 900], np.int64)
    postings = Postings(indptr, docs, rng.choice([0.5, 1.0, 2.0], 900).astype(np.float32), n)
    codes = sq8_quantize(store.dense)._replace(bits=sign_bits(store.dense))
    model = rerank_mod.RerankModel.load()
    terms = np.asarray([0, 2], np.int64)
    q, qt, qc, qi = random_query(rng, 3)
    call = native.SearchCall(core, postings, vectors=store.dense, codes=codes, oversample=2, idf_table=None,
                             columns=model.columns, weights=model.weights, bias=model.bias)
    args = dict(method="weighted", dense_weight=0.5, top_k=60, rrf_k=60.0, rerank_depth=60, confidence=None,
                query_terms=(qt, qc, qi))
    want = call(terms, q, 200, **args)
    with placed(core):
        for _ in range(500):
            core.rouse_helper()
            time.sleep(0.0005)
            got = call(terms, q, 200, helper=True, **args)
            for a, b in zip(got.first.dense + got.first.bm25 + (got.ids, got.scores, got.features, got.order),
                            want.first.dense + want.first.bm25 + (want.ids, want.scores, want.features, want.order),
                            strict=True):
                np.testing.assert_array_equal(a, b)
            if core.helper_jobs >= 3:  # the worker took part in several of the shares
                break
    assert core.helper_jobs >= 3 or not TWO_CPUS
