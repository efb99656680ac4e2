"""Model tokens per chunk are build-time data (chunk_tokens.npy): built, listed in the manifest, memory-mapped at
load, counted once for an index built before them, carried into shards, and reported unchanged in replies."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from rag_service.core.errors import IndexFormatError
from rag_service.core.params import SearchParams
from rag_service.index import manifest as manifest_mod
from rag_service.index import tokens as tokens_mod
from rag_service.index.load import load_index, resolve_version_dir
from rag_service.search.pipeline import Pipeline

QUERIES = ["glaciers and ice sheets", "volcano lava", "speed of light", "bread yeast", "printing press books"]


def per_chunk(index, encoder) -> np.ndarray:
    return np.array([encoder.count_tokens(index.store.chunk_text(i)) for i in range(index.n_chunks)], np.int32)


def old_copy(built_index: Path, tmp_path: Path) -> Path:
    """A copy of the built version as an index built before the counts were stored: no file, no manifest entry."""
    old = tmp_path / "old"
    shutil.copytree(resolve_version_dir(built_index), old)
    (old / tokens_mod.TOKENS_FILE).unlink()
    manifest = json.loads((old / manifest_mod.MANIFEST_FILE).read_text(encoding="utf-8"))
    del manifest["files"][tokens_mod.TOKENS_FILE]
    manifest_mod.write_manifest(old, manifest)
    return old


def test_batch_count_equals_the_per_text_count(encoder):
    texts = ["", "Hello world.", "word " * 1000, "naïve café — 東京 🚀 tokens", "  spaced\n\tout  ",
             "Glaciers. " * 40, "x"]
    batch = encoder.count_tokens_batch(texts)
    assert batch.dtype == np.int32
    assert batch.tolist() == [encoder.count_tokens(t) for t in texts]
    assert batch[2] == 1000  # not truncated at max_seq_length
    # count_texts goes through the batch call, in blocks, and through count_tokens for a counter without one.
    many = [f"passage {i} " * (i % 9) for i in range(9000)]
    expected = [encoder.count_tokens(t) for t in many]
    assert tokens_mod.count_texts(many, encoder).tolist() == expected

    class PerText:
        def count_tokens(self, text: str) -> int:
            return encoder.count_tokens(text)

    assert tokens_mod.count_texts(many[:50], PerText()).tolist() == expected[:50]


@pytest.mark.slow
def test_build_stores_counts_listed_in_the_manifest(built_index, encoder):
    directory = resolve_version_dir(built_index)
    manifest = manifest_mod.verify(directory)  # every listed file's size and sha256
    entry = manifest["files"][tokens_mod.TOKENS_FILE]
    assert entry["sha256"] == manifest_mod.sha256_file(directory / tokens_mod.TOKENS_FILE)
    assert "tokens" in manifest["timings"]
    index = load_index(built_index)
    counts = index.chunk_tokens
    assert counts is not None and counts.dtype == np.int32 and counts.shape == (index.n_chunks,)
    assert not counts.flags.writeable  # the mapping, not a copy
    np.testing.assert_array_equal(counts, per_chunk(index, encoder))
    assert counts.min() > 0


@pytest.mark.slow
def test_reply_tokens_are_the_stored_counts(built_index, encoder):
    pipeline = Pipeline(load_index(built_index), encoder)
    for query in QUERIES:
        result = pipeline.search(SearchParams(query=query, top_k=8))
        assert result.contexts
        for c in result.contexts:
            assert c.tokens == encoder.count_tokens(c.text)
        assert result.context_tokens == sum(c.tokens for c in result.contexts)


@pytest.mark.slow
def test_an_index_without_counts_counts_them_once_at_load(built_index, encoder, tmp_path, caplog):
    old = old_copy(built_index, tmp_path)
    manifest_mod.verify(old)
    index = load_index(old)
    assert index.chunk_tokens is None
    with caplog.at_level(logging.INFO, logger="rag_service.index.tokens"):
        pipeline = Pipeline(index, encoder)
        again = Pipeline(index, encoder)  # a reload over the same loaded index counts nothing more
    said = [r.getMessage() for r in caplog.records if tokens_mod.TOKENS_FILE in r.getMessage()]
    assert len(said) == 1 and "counted" in said[0] and "at load in" in said[0]
    np.testing.assert_array_equal(index.chunk_tokens, per_chunk(index, encoder))
    assert [pipeline.chunk_tokens(i) for i in range(index.n_chunks)] == \
        [again.chunk_tokens(i) for i in range(index.n_chunks)]

    new = Pipeline(load_index(built_index), encoder)
    for query in QUERIES:
        a = new.search(SearchParams(query=query, top_k=8))
        b = pipeline.search(SearchParams(query=query, top_k=8))
        assert [(c.chunk_id, c.tokens) for c in a.contexts] == [(c.chunk_id, c.tokens) for c in b.contexts]
        assert a.context_tokens == b.context_tokens


@pytest.mark.slow
def test_counts_of_the_wrong_shape_are_refused(built_index, tmp_path):
    bad = old_copy(built_index, tmp_path)
    n = load_index(bad).n_chunks
    for counts in (np.zeros(n + 1, np.int32), np.zeros(n, np.int64)):
        np.save(bad / tokens_mod.TOKENS_FILE, counts)
        manifest = json.loads((bad / manifest_mod.MANIFEST_FILE).read_text(encoding="utf-8"))
        manifest["files"] = manifest_mod.file_entries(bad)
        manifest_mod.write_manifest(bad, manifest)
        with pytest.raises(IndexFormatError, match=tokens_mod.TOKENS_FILE):
            load_index(bad)


@pytest.mark.slow
@pytest.mark.parametrize("stored", [True, False], ids=["stored", "old-source"])
def test_shards_carry_their_chunks_counts(built_index, encoder, tmp_path, stored):
    from rag_service.shard.split import CHUNKS_FILE, split_index

    source = resolve_version_dir(built_index) if stored else old_copy(built_index, tmp_path)
    expected = per_chunk(load_index(source), encoder)
    shard_set = split_index(source, tmp_path / "sharded", 2)
    seen = 0
    for shard_dir in shard_set.shards:
        manifest = manifest_mod.verify(shard_dir)
        assert tokens_mod.TOKENS_FILE in manifest["files"]
        shard = load_index(shard_dir)
        ids = np.load(shard_dir / CHUNKS_FILE)
        assert shard.chunk_tokens is not None
        np.testing.assert_array_equal(shard.chunk_tokens, expected[ids])
        np.testing.assert_array_equal(shard.chunk_tokens, per_chunk(shard, encoder))
        seen += shard.n_chunks
    assert seen == len(expected)


@pytest.mark.slow
def test_an_update_stores_the_counts_of_its_chunks(built_index, encoder, tmp_path):
    from rag_service.index.chunking import Document
    from rag_service.index.update import update_index

    root = tmp_path / "root"
    shutil.copytree(built_index, root, symlinks=True)
    added = Document(id="tides", title="Tides", text="The Moon's gravity raises two bulges of ocean water; the Earth "
                     "turns beneath them, so most coasts see two high tides a day.", metadata={})
    result = update_index(root, add=[added], delete=["coffee"], encoder=encoder, progress=False)
    manifest = manifest_mod.verify(result.version_dir)
    assert tokens_mod.TOKENS_FILE in manifest["files"]
    index = load_index(result.version_dir)
    assert index.chunk_tokens is not None
    np.testing.assert_array_equal(index.chunk_tokens, per_chunk(index, encoder))
