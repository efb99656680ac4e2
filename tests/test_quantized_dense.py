"""Quantized dense first stage (int8 scalar / binary codes) with exact rescoring from the float vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag_service.core.errors import BuildError, IndexFormatError
from rag_service.retrievers import dense as dense_mod


def clustered(n: int, dim: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres: neighbours are close, like sentence embeddings of related texts."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    v = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    vectors = clustered(3000)
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, len(vectors), 40)] + 0.3 * rng.standard_normal((40, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, queries.astype(np.float32)


def write(directory, vectors, kind, oversample=None):
    dense_mod.write_dense(directory, dense_mod.build_dense_index(vectors, "flat"), vectors, "flat")
    if kind != "none":
        dense_mod.write_codes(directory, vectors, kind, oversample)
    return dense_mod.DenseIndex.load(directory)


@pytest.mark.parametrize("kind, ratio, oversample, min_recall", [("sq8", 4, 2, 0.99), ("binary", 32, 10, 0.8)])
def test_codes_are_smaller_and_rescored_results_match_the_float_index(tmp_path, data, kind, ratio, oversample,
                                                                       min_recall):
    vectors, queries = data
    (tmp_path / "float").mkdir()
    (tmp_path / kind).mkdir()
    exact = write(tmp_path / "float", vectors, "none")
    quantized = write(tmp_path / kind, vectors, kind, oversample)
    assert quantized.codes_kind == kind and quantized.oversample == oversample
    assert exact.searched_bytes / quantized.searched_bytes == ratio
    recalls = []
    for q in queries:
        ids, scores = quantized.search(q, 50)
        want, _ = exact.search(q, 50)
        recalls.append(len(set(ids.tolist()) & set(want.tolist())) / 50)
        # Rescored exactly: the scores are the float inner products, in the float index's order.
        np.testing.assert_allclose(scores, vectors[ids] @ q, rtol=1e-5, atol=1e-6)
        assert (np.diff(scores) <= 0).all()
    assert np.mean(recalls) >= min_recall, np.mean(recalls)


def test_more_oversampling_never_loses_recall(tmp_path, data):
    vectors, queries = data
    exact = write(tmp_path, vectors, "binary", 1)
    truth = [set(dense_mod.DenseIndex.load(tmp_path, use_codes=False).search(q, 20)[0].tolist()) for q in queries]
    recall = {}
    for factor in (1, 4, 16, 150):  # 150 x 20 covers all 3000 vectors: exact
        index = dense_mod.DenseIndex.load(tmp_path, oversample=factor)
        recall[factor] = np.mean([len(t & set(index.search(q, 20)[0].tolist())) for q, t in zip(queries, truth)])
    assert recall[1] < recall[4] <= recall[16] <= recall[150] == 20
    assert exact.codes_kind == "binary"


def test_filtered_search_is_exact_with_codes(tmp_path, data):
    vectors, queries = data
    index = write(tmp_path, vectors, "sq8")
    mask = np.zeros(len(vectors), bool)
    mask[::7] = True
    ids, scores = index.search(queries[0], 10, mask=mask)
    allowed = np.flatnonzero(mask)
    best = allowed[np.argsort(-(vectors[allowed] @ queries[0]), kind="stable")[:10]]
    np.testing.assert_array_equal(ids, best)


def test_bad_codes_and_options_are_refused(tmp_path, data):
    vectors, _ = data
    write(tmp_path, vectors, "sq8")
    with pytest.raises(ValueError, match="oversample"):
        dense_mod.DenseIndex.load(tmp_path, oversample=0)
    with pytest.raises(ValueError, match="sq8, binary"):
        dense_mod.build_codes(vectors, "pq")
    # Codes of another vector set (a different count) are a format error naming the file.
    dense_mod.write_codes(tmp_path, vectors[:100], "sq8")
    with pytest.raises(IndexFormatError, match="dense_codes.faiss"):
        dense_mod.DenseIndex.load(tmp_path)


@pytest.mark.slow
def test_build_option_records_codes_in_the_manifest_and_serves_them(tmp_path, write_corpus, encoder):
    from rag_service.core.params import SearchParams
    from rag_service.index.build import BuildConfig, build_index
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    docs = [{"_id": f"d{i}", "title": f"Topic {i}", "text": text} for i, text in enumerate([
        "Glaciers are rivers of ice that move slowly down mountain valleys.",
        "Volcanoes erupt molten rock, ash and gas from the mantle.",
        "Coffee contains caffeine, a stimulant of the central nervous system.",
        "The printing press spread literacy across fifteenth-century Europe.",
        "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    ])]
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    with pytest.raises(BuildError, match="dense_codes"):
        build_index(corpus, tmp_path / "bad", BuildConfig(dense_codes="pq"), encoder=encoder, progress=False)
    version = build_index(corpus, tmp_path / "idx", BuildConfig(dense_codes="binary", window_sentences=0),
                          encoder=encoder, progress=False)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["params"]["dense_codes"] == "binary"
    assert {"dense_codes.faiss", "dense_codes.json"} <= set(manifest["files"])
    index = load_index(version)
    assert index.dense.codes_kind == "binary"
    result = Pipeline(index, encoder).search(SearchParams(query="slow rivers of mountain ice", top_k=2))
    assert result.contexts[0].doc_id == "d0"
    # The dense score in the reply is the exact float one, not a Hamming estimate.
    np.testing.assert_allclose(result.contexts[0].dense_score,
                               float(index.dense.vectors[result.contexts[0].chunk]
                                     @ encoder.encode_queries("slow rivers of mountain ice")[0]), rtol=1e-4)


@pytest.mark.skipif(dense_mod.gpu_available(), reason="checks the fallback of a host without a GPU")
@pytest.mark.parametrize("use_gpu", [None, True])
@pytest.mark.parametrize("kind", ["none", "sq8", "binary"])
def test_a_host_without_gpu_searches_on_the_cpu(tmp_path, data, use_gpu, kind):
    """faiss-cpu has no StandardGpuResources: asking for the GPU (or leaving it to auto) must give the CPU index,
    the codes included, with the same results."""
    vectors, queries = data
    write(tmp_path, vectors, kind)
    reference = dense_mod.DenseIndex.load(tmp_path, use_gpu=False)
    index = dense_mod.DenseIndex.load(tmp_path, use_gpu=use_gpu)
    assert index.device == "cpu" and index._gpu_index is None
    assert type(index.codes) is type(reference.codes)
    for q in queries[:5]:
        ids, scores = index.search(q, 20)
        want, want_scores = reference.search(q, 20)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_allclose(scores, want_scores)
