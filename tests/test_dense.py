from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from rag_service.core.errors import IndexFormatError, InvalidArgument
from rag_service.retrievers import dense
from rag_service.retrievers.dense import DenseIndex, build_dense_index, choose_kind, omp_threads, write_dense

DIM = 32


def unit_vectors(rng, n, dim=DIM, clusters=20):
    # Clustered, like real embeddings, so HNSW recall is meaningful.
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(vectors, q, k, allowed=None):
    scores = vectors @ q
    ids = np.arange(len(vectors)) if allowed is None else np.flatnonzero(allowed)
    order = np.lexsort((ids, -scores[ids]))[:k]
    return ids[order], scores[ids][order]


def saved(tmp_path, vectors, kind):
    write_dense(tmp_path, build_dense_index(vectors, kind), vectors, kind)
    return DenseIndex.load(tmp_path)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit_vectors(rng, 3000), unit_vectors(rng, 40)


def test_flat_search_is_exact(tmp_path, data):
    vectors, queries = data
    index = saved(tmp_path, vectors, "flat")
    assert (index.kind, index.n, index.dim, index.device) == ("flat", 3000, DIM, "cpu")
    for q in queries:
        ids, scores = index.search(q, 10)
        e_ids, e_scores = exact_top(vectors, q, 10)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        np.testing.assert_array_equal(ids, e_ids)
        np.testing.assert_allclose(scores, e_scores, rtol=1e-5, atol=1e-5)
        assert (np.diff(scores) <= 0).all()


def test_flat_filtered_search_is_exact(tmp_path, data):
    vectors, queries = data
    index = saved(tmp_path, vectors, "flat")
    rng = np.random.default_rng(1)
    for q in queries[:10]:
        mask = rng.random(3000) < 0.05
        ids, scores = index.search(q, 20, mask=mask)
        assert mask[ids].all()
        e_ids, e_scores = exact_top(vectors, q, 20, allowed=mask)
        np.testing.assert_array_equal(ids, e_ids)
        np.testing.assert_allclose(scores, e_scores, rtol=1e-5, atol=1e-5)


def test_depth_beyond_the_corpus_drops_padding(tmp_path, data):
    vectors, queries = data
    index = saved(tmp_path, vectors[:7], "flat")
    ids, scores = index.search(queries[0], 100)
    assert sorted(ids.tolist()) == list(range(7)) and len(scores) == 7
    mask = np.zeros(7, dtype=bool)
    mask[[2, 5]] = True
    assert sorted(index.search(queries[0], 100, mask=mask)[0].tolist()) == [2, 5]
    assert len(index.search(queries[0], 5, mask=np.zeros(7, dtype=bool))[0]) == 0


@pytest.mark.slow
def test_hnsw_recall_and_filters(tmp_path, data, monkeypatch):
    vectors, queries = data
    index = saved(tmp_path, vectors, "hnsw")
    assert index.kind == "hnsw"
    hits = 0
    for q in queries:
        ids, scores = index.search(q, 10)
        hits += len(set(ids.tolist()) & set(exact_top(vectors, q, 10)[0].tolist()))
        assert (np.diff(scores) <= 0).all()
    assert hits / (10 * len(queries)) >= 0.95

    rng = np.random.default_rng(2)
    mask = rng.random(3000) < 0.3
    # Few allowed chunks: exact scan of their vectors.
    for q in queries[:5]:
        ids, _ = index.search(q, 10, mask=mask)
        np.testing.assert_array_equal(ids, exact_top(vectors, q, 10, allowed=mask)[0])
    # Many allowed chunks: HNSW with an IDSelector; only allowed ids come back, near-exact.
    monkeypatch.setattr(dense, "EXACT_FILTER_LIMIT", 0)
    hits = 0
    for q in queries:
        ids, _ = index.search(q, 10, mask=mask)
        assert mask[ids].all() and len(ids) == 10
        hits += len(set(ids.tolist()) & set(exact_top(vectors, q, 10, allowed=mask)[0].tolist()))
    assert hits / (10 * len(queries)) >= 0.9
    # A small share allowed, however many chunks that is: the exact scan again, and the walk's beam widens with 1/share.
    few = rng.random(3000) < 0.03
    for q in queries[:5]:
        ids, _ = index.search(q, 10, mask=few)
        np.testing.assert_array_equal(ids, exact_top(vectors, q, 10, allowed=few)[0])
    assert dense.filtered_ef(10, 1.0) == dense.filtered_ef(10, 0.2) == dense.HNSW_EF_SEARCH_MIN
    assert dense.filtered_ef(10, 0.05) == 4 * dense.HNSW_EF_SEARCH_MIN
    assert dense.filtered_ef(200, 0.001) == dense.FILTER_EF_MAX


def test_hnsw_with_sq8_codes_walks_the_graph_and_scans_the_allowed_rows_codes(tmp_path, data, monkeypatch):
    from rag_service.kernels import native

    if native.retrieve_backend() != "cpp" or native.simd_level() in ("scalar", "none"):
        pytest.skip("the codes' scan is the native SIMD one")
    vectors, queries = data
    graph = build_dense_index(vectors, "hnsw")
    for name in ("plain", "coded"):
        (tmp_path / name).mkdir()
        write_dense(tmp_path / name, graph, vectors, "hnsw")
    dense.write_codes(tmp_path / "coded", vectors, "sq8")
    plain, coded = DenseIndex.load(tmp_path / "plain"), DenseIndex.load(tmp_path / "coded")
    assert coded.codes_kind == "sq8" and coded.sq8 is not None and plain.sq8 is None
    # Unfiltered: the graph answers, as it does without codes (not a scan of the codes).
    for q in queries:
        np.testing.assert_array_equal(coded.search(q, 10)[0], plain.search(q, 10)[0])
    # Filtered to few rows: the scan reads the codes, and the candidates' exact scores give the exact filtered top.
    scans = []

    def spy(*args, **kwargs):
        scans.append(kwargs.get("codes") is not None)
        return real(*args, **kwargs)

    real = native.dense_top
    monkeypatch.setattr(native, "dense_top", spy)
    mask = np.random.default_rng(3).random(len(vectors)) < 0.05
    for q in queries[:10]:
        ids, scores = coded.search(q, 10, mask=mask)
        e_ids, e_scores = exact_top(vectors, q, 10, allowed=mask)
        np.testing.assert_array_equal(ids, e_ids)
        np.testing.assert_allclose(scores, e_scores, rtol=1e-5, atol=1e-5)
        plain.search(q, 10, mask=mask)
    assert scans == [True, False] * 10


def test_vectors_are_memory_mapped_and_rescore(tmp_path, data):
    vectors, queries = data
    index = saved(tmp_path, vectors, "flat")
    np.testing.assert_array_equal(index.vectors, vectors)
    assert isinstance(np.load(tmp_path / dense.VECTORS_FILE, mmap_mode="r"), np.memmap)
    ids = np.array([5, 1, 2999])
    np.testing.assert_allclose(index.rescore(queries[0], ids), vectors[ids] @ queries[0], rtol=1e-6)


def test_bad_queries(tmp_path, data):
    vectors, queries = data
    index = saved(tmp_path, vectors, "flat")
    with pytest.raises(InvalidArgument) as err:
        index.search(np.ones(DIM + 1, dtype=np.float32), 5)
    assert err.value.field == "query"
    with pytest.raises(InvalidArgument):
        index.search(queries[0], 0)
    with pytest.raises(ValueError, match="shape"):
        index.search(queries[0], 5, mask=np.ones(10, dtype=bool))


def test_mismatched_files_are_format_errors(tmp_path, data):
    vectors, _ = data
    write_dense(tmp_path, build_dense_index(vectors, "flat"), vectors[:10], "flat")
    with pytest.raises(IndexFormatError, match="vectors"):
        DenseIndex.load(tmp_path)
    (tmp_path / dense.INDEX_FILE).write_bytes(b"not a faiss index")
    with pytest.raises(IndexFormatError, match="dense"):
        DenseIndex.load(tmp_path)


def test_choose_kind():
    assert choose_kind("auto", 10, hnsw_threshold=100) == "flat"
    assert choose_kind("auto", 100, hnsw_threshold=100) == "hnsw"
    assert choose_kind("flat", 10**7) == "flat"
    assert choose_kind("hnsw", 5) == "hnsw"
    with pytest.raises(ValueError):
        choose_kind("ivf", 5)


def test_search_runs_single_threaded_on_the_calling_thread(tmp_path, data):
    vectors, queries = data
    index = saved(tmp_path, vectors, "flat")
    seen = []

    def run() -> None:
        index.search(queries[0], 5)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [1]
    with omp_threads(2):
        assert faiss.omp_get_max_threads() == 2
        with omp_threads(1):
            assert faiss.omp_get_max_threads() == 1
        assert faiss.omp_get_max_threads() == 2


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_concurrent_searches_agree_with_sequential(tmp_path, data, kind):
    vectors, queries = data
    index = saved(tmp_path, vectors, kind)
    mask = np.random.default_rng(5).random(3000) < 0.5
    calls = [(q, mask if i % 2 else None) for i, q in enumerate(np.concatenate([queries] * 5))]
    expected = [index.search(q, 10, m) for q, m in calls]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda qm: index.search(qm[0], 10, qm[1]), calls))
    for (e_ids, e_scores), (g_ids, g_scores) in zip(expected, got):
        np.testing.assert_array_equal(e_ids, g_ids)
        np.testing.assert_array_equal(e_scores, g_scores)


def test_cheaper_hnsw_construction_is_recorded_and_still_searches(tmp_path, data):
    vectors, queries = data
    index = build_dense_index(vectors, "hnsw", hnsw_m=8, ef_construction=16)
    assert index.hnsw.efConstruction == 16
    write_dense(tmp_path, index, vectors, "hnsw", hnsw_m=8, ef_construction=16)
    params = json.loads((tmp_path / "dense_params.json").read_text())
    assert (params["hnsw_m"], params["ef_construction"]) == (8, 16)
    ids, _ = DenseIndex.load(tmp_path).search(queries[0], 10)
    assert len(set(ids.tolist()) & set(exact_top(vectors, queries[0], 10)[0].tolist())) >= 5
    with pytest.raises(ValueError, match="ef_construction"):
        build_dense_index(vectors, "hnsw", ef_construction=0)
