"""Rerank stage: windows and token streams at build, features, the fitted model, and the stage in the pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rag_service.core.errors import IndexFormatError
from rag_service.core.params import SearchParams
from rag_service.index import windows as windows_mod
from rag_service.index.chunking import lexical_text
from rag_service.index.load import load_index, resolve_version_dir
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.retrievers.analysis import Analyzer
from rag_service.search import rerank as rerank_mod
from rag_service.search.pipeline import Pipeline


@pytest.fixture(scope="module")
def index(built_index):
    return load_index(built_index)


@pytest.fixture(scope="module")
def pipeline(index, encoder):
    return Pipeline(index, encoder)


def model_of(**weights: float) -> rerank_mod.RerankModel:
    return rerank_mod.RerankModel(features=tuple(weights), weights=np.asarray(list(weights.values()), np.float32),
                                  bias=0.0, info={})


# Windows ------------------------------------------------------------------------------------------------------------


def test_sentences_cover_the_text_and_windows_slide_by_one():
    text = "First one here. Second, e.g. with 3.5 mm. Third! \"Fourth\" ends"
    spans = windows_mod.split_sentences(text)
    assert [text[a:b] for a, b in spans] == ["First one here.", "Second, e.g. with 3.5 mm.", "Third!", '"Fourth" ends']
    assert windows_mod.sentence_windows(4, 2) == [(0, 2), (1, 3), (2, 4)]
    assert windows_mod.sentence_windows(1, 2) == [(0, 1)]
    assert windows_mod.sentence_windows(0, 2) == []
    lower = "a wing in a slipstream . the u. s. tests agree . more"
    assert [lower[a:b] for a, b in windows_mod.split_sentences(lower)] == [
        "a wing in a slipstream .", "the u. s. tests agree .", "more"]


def test_chunk_windows_spans_index_the_bm25_token_stream():
    analyzer = Analyzer()
    title, text = "Glacier flow", "Ice moves downhill. Snow accumulates yearly. Moraines remain behind."
    cw = windows_mod.chunk_windows(analyzer, title, text, 2)
    assert cw.tokens == analyzer.tokens(lexical_text(title, text))
    assert cw.texts == [title, "Ice moves downhill. Snow accumulates yearly.",
                        "Snow accumulates yearly. Moraines remain behind."]
    assert cw.title_length == 2
    for window, (a, b) in zip(cw.texts, cw.token_spans):
        assert cw.tokens[a:b] == analyzer.tokens(window)


def test_upper_case_detection_matches_str_isupper():
    for text in ("all lower . here", "One capital", "ÀB c", "abc É", "", "123 ...", "Ⅻ roman", "ǅ titlecase", "ß"):
        assert windows_mod._has_upper(text) == any(c.isupper() for c in text), text


def test_windows_embedded_in_blocks_equal_one_call(monkeypatch):
    from rag_service.bench.synthetic import HashingDocumentEncoder

    analyzer = Analyzer()
    titles = ["Glacier flow", "", "Ice"] * 4
    texts = ["Ice moves downhill. Snow accumulates yearly. Moraines remain behind.", "lower case only . two",
             "One. Two. Three."] * 4
    terms = sorted({t for a, b in zip(titles, texts) for t in analyzer.tokens(f"{a} {b}")})
    vocab = {t: i for i, t in enumerate(terms)}
    encoder = HashingDocumentEncoder(type("Dim", (), {"dim": 384})())
    whole = windows_mod.build_windows(titles, texts, analyzer, vocab, encoder)
    monkeypatch.setattr(windows_mod, "EMBED_BLOCK", 2)
    blocked = windows_mod.build_windows(titles, texts, analyzer, vocab, encoder)
    assert whole.params == blocked.params and whole.params["unique_windows"] > 2
    for name in ("window_offsets", "vectors", "scales", "window_spans", "token_offsets", "tokens", "title_lengths"):
        assert np.array_equal(getattr(whole, name), getattr(blocked, name)), name


def test_quantized_rows_keep_cosines():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q, scales = windows_mod.quantize_rows(v)
    assert q.dtype == np.int8 and scales.dtype == np.float32
    np.testing.assert_allclose((q * scales[:, None]) @ v[0], v @ v[0], atol=5e-3)


def test_build_stores_windows_in_the_manifest(index):
    assert index.windows is not None
    params = index.manifest["windows"]
    assert params["window_sentences"] == 2 and params["storage"] == "int8-rowscale"
    for name in windows_mod.FILES:
        assert name in index.manifest["files"]
    w = index.windows
    assert w.n_chunks == index.n_chunks and w.vectors.shape == (params["windows"], 384)
    # the glacier document (six sentences, small chunks) has several windows per chunk, each starting with its title
    glacier = [c for c in range(index.n_chunks) if index.store.chunk_id(c).startswith("glacier#")]
    assert len(glacier) >= 2
    for c in glacier:
        first, last = w.window_offsets[c], w.window_offsets[c + 1]
        assert last - first >= 2
        assert tuple(w.window_spans[first]) == (0, w.title_lengths[c]) == (0, 1)  # "Glaciers"


def test_corrupt_windows_fail_the_load(built_index, tmp_path):
    copy = tmp_path / "v"
    shutil.copytree(resolve_version_dir(built_index), copy)
    path = copy / windows_mod.WINDOW_VECTORS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="windows_vectors.npy: checksum mismatch"):
        load_index(copy)


def test_inconsistent_windows_fail_the_load_even_without_checksums(index, tmp_path):
    w = index.windows
    bad = windows_mod.WindowData(
        window_offsets=np.asarray(w.window_offsets), vectors=np.asarray(w.vectors), scales=np.asarray(w.scales),
        window_spans=np.asarray(w.window_spans) + 1000, token_offsets=np.asarray(w.token_offsets),
        tokens=np.asarray(w.tokens), title_lengths=np.asarray(w.title_lengths), params=w.params)
    bad.write(tmp_path)
    with pytest.raises(IndexFormatError, match="spans outside"):
        windows_mod.WindowData.load(tmp_path, n_chunks=index.n_chunks, dim=384)
    with pytest.raises(IndexFormatError, match="cover"):
        windows_mod.WindowData.load(tmp_path, n_chunks=index.n_chunks + 1, dim=384)


# Features -----------------------------------------------------------------------------------------------------------


def features_of(pipeline, query):
    params = SearchParams(query=query, top_k=20, depth=20)
    cand = pipeline.retrieve(params)
    x = rerank_mod.compute_features(pipeline.rerank_store, query, cand.query_vector, cand.fused.ids,
                                    cand.fused.scores, cand.bm25[0], cand.dense[0])
    return cand, {name: x[:, j] for j, name in enumerate(rerank_mod.FEATURES)}


def test_features_match_the_index(pipeline, index):
    query = "glacier ice moraines and ancient air in ice cores"
    cand, f = features_of(pipeline, query)
    ids = cand.fused.ids
    # BM25 from the token streams equals the postings' BM25, per query scaled by the best candidate
    bm25 = index.bm25.score_all(index.analyzer.tokens(query))[ids]
    np.testing.assert_allclose(f["bm25"], bm25 / bm25.max(), rtol=1e-5)
    # atol: a cosine near 0 (the native kernel sums in another order than BLAS) has no meaningful relative error
    np.testing.assert_allclose(f["dense"], index.dense.vectors[ids] @ cand.query_vector, rtol=1e-5, atol=1e-6)
    w = index.windows
    for row, c in enumerate(ids.tolist()):
        a, b = w.window_offsets[c], w.window_offsets[c + 1]
        cos = (w.vectors[a:b].astype(np.float32) * w.scales[a:b, None]) @ cand.query_vector
        assert f["win_max"][row] == pytest.approx(cos.max(), abs=1e-5)
        assert f["win_soft"][row] <= f["win_max"][row] + 1e-6
    assert np.all((f["coverage"] >= 0) & (f["coverage"] <= 1))
    # the retrievers' reciprocal ranks: the top BM25 hit gets 1
    assert f["rr_bm25"][ids.tolist().index(int(cand.bm25[0][0]))] == pytest.approx(1.0)


def test_proximity_rewards_adjacent_query_terms(pipeline, index):
    # "ice cores" are adjacent in the glacier text; "lava ... vent" are far apart in the volcano text
    cand, f = features_of(pipeline, "ice cores")
    chunk_ids = [index.store.chunk_id(c) for c in cand.fused.ids.tolist()]
    row = next(i for i, c in enumerate(chunk_ids) if c.startswith("glacier") and f["coverage"][i] == 1.0)
    assert f["proximity"][row] == pytest.approx(1.0)  # 2 terms over a span of 2 tokens


# Model --------------------------------------------------------------------------------------------------------------


def test_shipped_model_loads_and_a_tampered_one_does_not(tmp_path):
    model = rerank_mod.RerankModel.load()
    assert set(model.features) <= set(rerank_mod.FEATURES) and len(model.weights) == len(model.features)
    path = tmp_path / "m.json"
    model.save(path)
    assert rerank_mod.RerankModel.load(path).sha256 == model.sha256
    data = json.loads(path.read_text())
    data["weights"][0] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(rerank_mod.ModelError, match="checksum mismatch"):
        rerank_mod.RerankModel.load(path)
    with pytest.raises(rerank_mod.ModelError, match="unknown features"):
        model_of(nonsense=1.0)


@pytest.mark.parametrize("feature", ["win_max", "bm25_title", "dense"])
def test_reranker_orders_by_what_its_features_say(index, encoder, feature):
    pipe = Pipeline(index, encoder, rerank_model=model_of(**{feature: 1.0}))
    result = pipe.search(SearchParams(query="water carried into cities by gravity", top_k=12, depth=12,
                                      rerank_depth=12))
    values = [c.features[feature] for c in result.contexts]
    assert values == sorted(values, reverse=True)
    assert [c.rerank_score for c in result.contexts] == pytest.approx(values)
    # the opposite weight reverses it (ties aside)
    flipped = Pipeline(index, encoder, rerank_model=model_of(**{feature: -1.0})).search(
        SearchParams(query="water carried into cities by gravity", top_k=12, depth=12, rerank_depth=12))
    assert [c.features[feature] for c in flipped.contexts] == sorted(values)


def test_rerank_false_is_fusion(pipeline):
    params = SearchParams(query="how do glaciers move and carve valleys", top_k=5, rerank=False)
    result = pipeline.search(params)
    fused = pipeline.retrieve(params).fused
    assert [c.chunk for c in result.contexts] == fused.ids.tolist()
    assert [c.score for c in result.contexts] == pytest.approx(fused.scores.tolist())
    assert all(c.rerank_score is None and c.features is None for c in result.contexts)
    assert "rerank" not in result.stage_us


def test_index_without_windows_serves_fusion(index, encoder):
    bare = type(index)(**{**index.__dict__, "windows": None})
    pipe = Pipeline(bare, encoder)
    result = pipe.search(SearchParams(query="coffee beans", top_k=3))
    assert pipe.rerank_store is None and "rerank" not in result.stage_us
    assert all(c.rerank_score is None for c in result.contexts)


def test_debug_reply_carries_every_feature_and_the_rerank_score(served_index):
    import grpc

    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        reply = stub.Search(pb.SearchRequest(query="ice cores record past climate", top_k=4, debug=True), timeout=30)
        plain = stub.Search(pb.SearchRequest(query="ice cores record past climate", top_k=4), timeout=30)
        off = stub.Search(pb.SearchRequest(query="ice cores record past climate", top_k=4, rerank=False,
                                           debug=True), timeout=30)
    assert "rerank" in reply.stage_time_us
    for context in reply.contexts:
        assert set(context.features) == set(rerank_mod.FEATURES)
        assert context.HasField("rerank_score") and context.score == pytest.approx(context.rerank_score)
        assert context.HasField("fused_score")
        assert context.tokens > 0
    assert reply.context_tokens == sum(c.tokens for c in reply.contexts)
    assert [c.chunk_id for c in plain.contexts] == [c.chunk_id for c in reply.contexts]
    assert all(not c.features and not c.HasField("rerank_score") for c in plain.contexts)
    assert all(not c.features and not c.HasField("rerank_score") for c in off.contexts)
    assert "rerank" not in off.stage_time_us


def test_contexts_past_rerank_depth_follow_in_fused_order(pipeline):
    params = SearchParams(query="stone arches carried water", top_k=8, depth=20, rerank_depth=4)
    result = pipeline.search(params)
    fused = pipeline.retrieve(params).fused.ids.tolist()
    assert len(result.contexts) == 8
    assert all(c.rerank_score is not None for c in result.contexts[:4])
    assert all(c.rerank_score is None and c.features is None for c in result.contexts[4:])
    assert sorted(c.chunk for c in result.contexts[:4]) == sorted(fused[:4])
    assert [c.chunk for c in result.contexts[4:]] == fused[4:8]


@pytest.mark.parametrize("seed", range(5))
def test_final_top_is_the_head_of_final_order(seed):
    from rag_service.search.rerank import Reranked, final_order, final_top

    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(0, 30))
        fused_scores = np.sort(rng.random(n).astype(np.float32))[::-1].copy()
        m = int(rng.integers(0, n + 1))
        order = rng.permutation(m).astype(np.int64)
        reranked = Reranked(ids=order.copy(), scores=np.sort(rng.normal(size=m).astype(np.float32))[::-1].copy(),
                            features=np.zeros((m, 1), np.float32), order=order)
        for choice in (None, reranked):
            full, _ = final_order(fused_scores, choice)
            for k in (0, 1, m, n, n + 3, int(rng.integers(1, 12))):
                np.testing.assert_array_equal(final_top(n, choice, k), full[:k])
