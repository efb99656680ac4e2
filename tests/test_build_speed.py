"""Window vectors pooled from the chunk pass (windows.POOLINGS "chunk") and the document encoder options of a build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag_service.encoder import onnx_export
from rag_service.encoder.encode import OnnxEncoder
from rag_service.index import windows as windows_mod
from rag_service.index.build import BuildConfig, build_index
from rag_service.index.chunking import dense_text
from rag_service.index.load import load_index
from rag_service.retrievers.analysis import Analyzer

CHUNKS = [
    ("Glacier flow", "Ice moves downhill under its own weight. Snow accumulates yearly. Moraines remain behind."),
    ("", "A text without a title. It has two sentences."),
    ("Only a title", ""),
    ("Lower case", "a wing in a slipstream . the u. s. tests agree . more follows here"),
]


def reference_pooled(encoder, text: str, spans: np.ndarray) -> np.ndarray:
    """The model's last hidden state over `text` by transformers itself, mean over the tokens whose first character
    lies in each span (found by a plain loop over the tokenizer's offsets), L2-normalised."""
    import torch

    model = encoder._model[0].auto_model
    batch = encoder.tokenizer([text], truncation=True, max_length=encoder.max_seq_length,
                              return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
    offsets = batch.pop("offset_mapping")[0].tolist()
    special = batch.pop("special_tokens_mask")[0].tolist()
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state[0].float().numpy()
    out = []
    for start, end in spans:
        rows = [j for j, ((a, _), s) in enumerate(zip(offsets, special)) if not s and start <= a < end]
        v = hidden[rows].astype(np.float64).mean(axis=0)
        out.append(v / np.linalg.norm(v))
    return np.asarray(out)


def plan(chunks=CHUNKS):
    analyzer = Analyzer()
    terms = {t for title, text in chunks for t in analyzer.tokens(f"{title} {text}")}
    vocab = {t: i for i, t in enumerate(sorted(terms))}
    return windows_mod.plan_windows([c[0] for c in chunks], [c[1] for c in chunks], analyzer, vocab, 2)


def test_dense_spans_cut_the_window_texts_out_of_the_encoders_text():
    p = plan()
    row = 0
    for (title, text), spans in zip(CHUNKS, p.dense_spans):
        full = dense_text(title, text)
        for a, b in spans:
            assert full[a:b] == p.texts[row]
            row += 1
    assert row == p.n_windows == p.window_offsets[-1]


def test_pooled_windows_equal_the_reference(encoder):
    p = plan()
    texts = [dense_text(t, x) for t, x in CHUNKS]
    vectors, pooled, found = encoder.encode_documents_pooled(texts, p.dense_spans, batch_size=3)
    # The chunk vectors are what encode_documents gives (same batches).
    np.testing.assert_allclose(vectors, encoder.encode_documents(texts, batch_size=3), atol=1e-5)
    assert found.all() and pooled.shape == (p.n_windows, encoder.dim)
    expected = np.concatenate([reference_pooled(encoder, t, s) for t, s in zip(texts, p.dense_spans)])
    np.testing.assert_allclose(pooled, expected, atol=2e-5)
    # Context matters: a window pooled inside its chunk is not the window's text embedded alone.
    alone = encoder.encode_documents(p.texts)
    assert np.min(np.sum(pooled * alone, axis=1)) < 0.999


def test_onnx_pooled_windows_match_torch(encoder):
    onnx = OnnxEncoder(onnx_export.cached_export(encoder.model_path), "onnx-fp32", threads=1)
    p = plan()
    texts = [dense_text(t, x) for t, x in CHUNKS]
    vectors, pooled, found = onnx.encode_documents_pooled(texts, p.dense_spans, batch_size=2)
    np.testing.assert_allclose(vectors, onnx.encode_documents(texts, batch_size=2), atol=1e-5)
    _, expected, _ = encoder.encode_documents_pooled(texts, p.dense_spans, batch_size=2)
    assert found.all()
    assert np.min(np.sum(pooled * expected, axis=1)) > 0.9999


def test_a_span_past_the_models_input_is_not_found_and_is_embedded_alone(encoder):
    long_title = " ".join(["word"] * 600)
    chunks = [(long_title, "First sentence here. Second sentence there. Third one.")]
    p = plan(chunks)
    vectors, pooled, found = encoder.encode_documents_pooled([dense_text(*chunks[0])], p.dense_spans)
    assert found.tolist() == [True, False, False]
    assert not pooled[~found].any()
    data = windows_mod.pooled_windows(p, pooled, found, encoder, window_sentences=2)
    assert data.params["pooling"] == "chunk" and data.params["encoded_separately"] == 2
    alone = encoder.encode_documents(p.texts[1:])
    got = data.vectors[1:].astype(np.float32) * data.scales[1:, None]
    assert np.min(np.sum(got * alone, axis=1)) > 0.99


def test_bad_spans_are_rejected(encoder):
    with pytest.raises(ValueError, match="spans"):
        encoder.encode_documents_pooled(["one", "two"], [np.zeros((0, 2))])
    p = plan()
    with pytest.raises(ValueError, match="pooled window vectors"):
        windows_mod.pooled_windows(p, np.zeros((1, encoder.dim)), np.ones(1, bool), encoder, window_sentences=2)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", windows_mod.POOLINGS)
def test_build_records_the_pooling_and_stores_the_pooled_vectors(pooling, encoder, tmp_path, write_corpus):
    docs = [{"_id": f"d{i}", "title": title, "text": text} for i, (title, text) in enumerate(CHUNKS)]
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    config = BuildConfig(document_encoder="onnx-fp32", window_pooling=pooling)
    version = build_index(corpus, tmp_path / "idx", config, encoder=encoder, progress=False)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["params"]["window_pooling"] == pooling
    assert manifest["params"]["document_encoder"] == "onnx-fp32"
    assert manifest["windows"]["pooling"] == pooling
    assert manifest["build_config"]["window_pooling"] == pooling
    index = load_index(tmp_path / "idx")
    windows = index.windows
    assert windows is not None and windows.pooling == pooling
    onnx = OnnxEncoder(version, "onnx-fp32")
    p = plan()
    texts = [dense_text(t, x) for t, x in CHUNKS]
    if pooling == "chunk":
        _, expected, _ = onnx.encode_documents_pooled(texts, p.dense_spans)
    else:
        expected = onnx.encode_documents(p.texts)
    got = windows.vectors.astype(np.float32) * np.asarray(windows.scales)[:, None]
    assert np.min(np.sum(got * expected, axis=1)) > 0.999


def test_window_pooling_and_document_encoder_are_validated():
    from rag_service.core.errors import BuildError

    with pytest.raises(BuildError, match="window_pooling"):
        BuildConfig(window_pooling="mean").validate()
    with pytest.raises(BuildError, match="onnx-int8 needs export_onnx"):
        BuildConfig(document_encoder="onnx-int8", export_onnx=False).validate()


def test_windows_of_an_index_built_before_the_choice_read_as_encoded(tmp_path):
    p = plan()
    data = windows_mod._assemble(p, np.zeros((p.n_windows, 4), np.int8), np.ones(p.n_windows, np.float32), 4, 2,
                                 {"unique_windows": p.n_windows})
    data.write(tmp_path)
    loaded = windows_mod.WindowData.load(tmp_path, n_chunks=len(CHUNKS), dim=4)
    assert "pooling" not in loaded.params and loaded.pooling == "encode"


def test_a_ray_encoder_actor_pools_what_the_local_encoder_pools(encoder):
    """The actor's side of a Ray build with pooled windows (index/ray_build.py), without a cluster: spans go in and
    pooled vectors come out as raw bytes per text, and decode to the local encoder's vectors."""
    from rag_service.index.ray_build import _EmbedBatches

    actor = object.__new__(_EmbedBatches)
    actor.encoder = encoder
    p = plan()
    texts = [dense_text(t, x) for t, x in CHUNKS]
    batches = [np.array([2, 0]), np.array([1, 3])]
    batch = {"rows": np.array(batches + [None], dtype=object)[:-1],
             "texts": np.array([[texts[i] for i in b] for b in batches], dtype=object),
             "spans": np.array([[p.dense_spans[i].tobytes() for i in b] for b in batches], dtype=object)}
    out = actor(batch)
    vectors, pooled, _ = encoder.encode_documents_pooled(texts, p.dense_spans, batch_size=2)
    first = np.concatenate([[0], np.cumsum([len(s) for s in p.dense_spans])])
    assert out["row"].tolist() == [2, 0, 1, 3]
    np.testing.assert_allclose(out["vector"], vectors[out["row"]], atol=1e-5)
    for row, raw in zip(out["row"], out["pooled"]):
        got = np.frombuffer(raw, dtype=np.float32).reshape(-1, encoder.dim)
        np.testing.assert_allclose(got, pooled[first[row] : first[row + 1]], atol=1e-5)
