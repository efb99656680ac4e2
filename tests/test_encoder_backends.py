"""The query encoder's backends against the fp32 export, the derived (fused) model's cache, and the one-query feeds."""

from __future__ import annotations

import os

import numpy as np
import pytest

from rag_service.core.config import EncoderSettings
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import OnnxEncoder, load_index_encoder

# Lengths from one word to past a SciFact claim, each encoded alone as the server does.
QUERIES = [
    "DNA",
    "what causes glaciers to retreat",
    "aspirin reduces the risk of heart attack in older adults",
    "effect of caffeine on sleep quality",
    "microRNA regulation of tumour suppressor genes in breast cancer cell lines",
    "0-dimensional biomaterials show inductive properties.",
    "how do suspension bridges carry their load between the towers and the anchorages at each end of the span",
]
# The stated tolerance: each query's vector from a faster backend against the fp32 export's.
MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def export_dir():
    return onnx_export.cached_export()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Derived models go here, not into the user's cache, for this module's tests."""
    path = tmp_path_factory.mktemp("derived")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_ONNX_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def fp32(export_dir):
    return OnnxEncoder(export_dir, "onnx-fp32")


@pytest.fixture(scope="module")
def fused(export_dir, cache):
    return OnnxEncoder(export_dir, "onnx-int8-fused", threads=2)


@pytest.mark.parametrize("kind", ["onnx-int8", "onnx-int8-fused"])
def test_backend_vectors_match_fp32_query_by_query(kind, export_dir, fp32, fused):
    enc = fused if kind == "onnx-int8-fused" else OnnxEncoder(export_dir, kind)
    for query in QUERIES:
        got = enc.encode_queries(query)
        want = fp32.encode_queries(query)
        assert got.shape == want.shape == (1, 384) and got.dtype == np.float32
        assert np.isclose(np.linalg.norm(got), 1.0, atol=1e-4)
        cosine = float((got * want).sum())
        assert cosine >= MIN_COSINE, f"{kind} on {query!r}: cosine {cosine:.4f} to fp32"


def test_fused_batch_matches_fp32_and_the_fused_fp32_graph_masks_padding(fused, fp32, export_dir, tmp_path):
    # Dynamic int8 scales each activation tensor as a whole, so a row depends on its batch-mates (~0.99 to the
    # same query alone, as with onnx-int8): a batch is held to the fp32 tolerance instead.
    batch = fused.encode_queries(QUERIES)
    assert (batch * fp32.encode_queries(QUERIES)).sum(1).min() >= MIN_COSINE
    # Without quantization the fused graph must give each padded row its own vector: its attention masks padding.
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = onnx_export.attention_shape(export_dir / onnx_export.FP32_FILE)
    optimize_model(str(export_dir / onnx_export.FP32_FILE), model_type="bert", num_heads=heads, hidden_size=hidden,
                   opt_level=0).save_model_to_file(str(tmp_path / "fused.onnx"))
    plain = OnnxEncoder(export_dir, "onnx-fp32")
    import onnxruntime as ort

    plain._session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    alone = np.concatenate([plain.encode_queries(q) for q in QUERIES])
    assert (plain.encode_queries(QUERIES) * alone).sum(1).min() >= 0.9999
    assert (alone * fp32.encode_queries(QUERIES)).sum(1).min() >= 0.9999


def test_fused_model_is_derived_once_outside_the_export(export_dir, cache, fused):
    before = sorted(os.listdir(export_dir))
    assert fused.model_file.is_relative_to(cache) and fused.model_file.name == onnx_export.FUSED_INT8_FILE
    stamp = fused.model_file.stat().st_mtime_ns
    again = OnnxEncoder(export_dir, "onnx-int8-fused")
    assert again.model_file == fused.model_file and again.model_file.stat().st_mtime_ns == stamp
    assert sorted(os.listdir(export_dir)) == before
    assert not [p for p in fused.model_file.parent.iterdir() if p.name.startswith(".")]  # no half-written file


def test_an_export_holding_the_fused_file_is_used_as_it_is(export_dir, fused, tmp_path):
    onnx_export.copy_export(export_dir, tmp_path)
    os.link(fused.model_file, tmp_path / onnx_export.FUSED_INT8_FILE)
    assert onnx_export.derived_model(tmp_path, "onnx-int8-fused") == tmp_path / onnx_export.FUSED_INT8_FILE
    with pytest.raises(ValueError, match="kind must be one of"):
        onnx_export.derived_model(tmp_path, "onnx-int8")


def test_a_model_that_cannot_be_derived_falls_back_to_int8(export_dir, tmp_path, monkeypatch, caplog):
    (tmp_path / "index").mkdir()
    onnx_export.copy_export(export_dir, tmp_path / "index")

    def refuse(fp32_path, out_path):
        raise ValueError("the transformer optimizer fused no attention")

    monkeypatch.setenv("RAG_ONNX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnx_export, "fuse_and_quantize", refuse)
    with caplog.at_level("WARNING", logger="rag_service.encoder.encode"):
        enc = load_index_encoder("onnx-int8-fused", tmp_path / "index")
    assert isinstance(enc, OnnxEncoder) and enc.backend == "onnx-int8"
    assert "cannot derive the onnx-int8-fused query encoder" in caplog.text


def test_one_query_feeds_equal_the_tokenizers_batch_arrays(fp32):
    for query in QUERIES:
        feeds = fp32._feeds([query])
        (enc,) = fp32._tokenizer.encode_batch([query])
        for name, values in (("input_ids", enc.ids), ("attention_mask", enc.attention_mask),
                             ("token_type_ids", enc.type_ids)):
            assert feeds[name].dtype == np.int64 and feeds[name].flags.c_contiguous
            np.testing.assert_array_equal(feeds[name], np.asarray([values], dtype=np.int64), err_msg=name)
    # Truncated at the model's length like a batch would be.
    long = fp32._feeds(["word " * 1000])
    assert long["input_ids"].shape == (1, fp32.max_seq_length)


def test_config_selects_the_backend():
    assert EncoderSettings(backend="onnx-int8-fused").backend == "onnx-int8-fused"
    assert EncoderSettings.model_fields["backend"].description
    with pytest.raises(ValueError, match="backend"):
        EncoderSettings(backend="openvino")


# A lone search's encode on the idle cores (OnnxEncoder idle_threads; searcher.encode decides) ------------------------

@pytest.mark.parametrize("kind", ["onnx-int8", "onnx-int8-fused"])
def test_an_idle_encode_gives_the_vector_of_a_plain_one(kind, export_dir, cache):
    enc = OnnxEncoder(export_dir, kind, threads=1, idle_threads=2)
    assert enc._idle_session is not enc._session
    for query in QUERIES:
        idle, plain = enc.encode_queries(query, idle=True), enc.encode_queries(query)
        assert idle.shape == plain.shape == (1, 384)
        # The same integer products split over two threads: the vector of the one-thread session.
        assert float((idle * plain).sum()) >= 0.99999, query
    # A batch is never idle work: it keeps to the plain session.
    batch = enc.encode_queries(QUERIES[:3], idle=True)
    assert np.allclose(batch, enc.encode_queries(QUERIES[:3]))


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
                    or not os.path.isdir("/proc/self/task"), reason="needs Linux and 2 allowed CPUs")
def test_the_idle_encode_workers_are_held_to_the_cpus_given(export_dir):
    allowed = sorted(os.sched_getaffinity(0))
    before = _threads()
    enc = OnnxEncoder(export_dir, "onnx-int8", threads=1, idle_threads=3, idle_cpus=[allowed[-1]])
    workers = _threads() - before
    # Two workers (the caller is the third thread), each on the one CPU given, in turn. (Counted among the threads
    # that appeared, so that one another library starts meanwhile cannot fail the test.)
    assert sum(os.sched_getaffinity(int(t)) == {allowed[-1]} for t in workers) == 2
    assert enc.encode_queries(QUERIES[0], idle=True).shape == (1, 384)
    before = _threads()
    unpinned = OnnxEncoder(export_dir, "onnx-int8", threads=1, idle_threads=2)
    free = _threads() - before
    assert unpinned.idle_threads == 2
    assert free and all(os.sched_getaffinity(int(t)) == set(allowed) for t in free)


def test_without_idle_threads_there_is_one_session(export_dir):
    enc = OnnxEncoder(export_dir, "onnx-int8", threads=2, idle_threads=1)
    assert enc._idle_session is enc._session and enc.idle_threads == 2


def test_only_fp32_encoders_say_a_batch_leaves_vectors_as_they_are(export_dir, fp32, fused):
    # SearchBatch encodes its queries in one call only for an encoder that says so (api/batch.py).
    assert fp32.batch_invariant and not fused.batch_invariant
    assert not OnnxEncoder(export_dir, "onnx-int8").batch_invariant
    alone = np.concatenate([fp32.encode_queries(q) for q in QUERIES])
    assert np.abs(fp32.encode_queries(QUERIES) - alone).max() < 1e-5
