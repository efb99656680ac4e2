from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rag_service.core.errors import IndexFormatError, InvalidArgument
from rag_service.index.chunking import Chunk, Document
from rag_service.index.store import DocStore, metadata_value_str, write_store

DOCS = [
    Document("d1", "Café Ünïcode 日本語", "naïve text 🙂 with emoji", {"lang": "fr", "year": 2020, "tags": ["a", "b"]}),
    Document("d2", "", "second", {"lang": "en", "year": 2021, "draft": True}),
    Document("d/3#x", "Third", "", {}),
    Document("d4", "Fourth", "long document body", {"lang": "en", "year": "2020", "nested": {"k": 1.5}}),
]
# d4 has two chunks; d3 has one empty chunk.
CHUNKS = [
    Chunk(0, 0, 0, 24, "naïve text 🙂 with emoji"),
    Chunk(1, 0, 0, 6, "second"),
    Chunk(2, 0, 0, 0, ""),
    Chunk(3, 0, 0, 13, "long document"),
    Chunk(3, 1, 5, 18, "document body"),
]


@pytest.fixture
def store(tmp_path):
    write_store(tmp_path, DOCS, CHUNKS)
    return DocStore.load(tmp_path)


def test_round_trip_with_unicode(store):
    assert (store.n_docs, store.n_chunks) == (4, 5)
    assert [store.chunk_text(i) for i in range(5)] == [c.text for c in CHUNKS]
    assert [store.chunk_doc(i) for i in range(5)] == [0, 1, 2, 3, 3]
    assert [store.chunk_id(i) for i in range(5)] == ["d1#0", "d2#0", "d/3#x#0", "d4#0", "d4#1"]
    assert store.chunk_span(4) == (5, 18)
    assert [store.doc_id(d) for d in range(4)] == ["d1", "d2", "d/3#x", "d4"]
    assert store.doc_title(0) == "Café Ünïcode 日本語"
    assert store.doc_title(1) == ""


def test_metadata_keeps_json_types_and_stringifies_for_filters(store):
    assert store.doc_metadata_raw(0) == {"lang": "fr", "year": 2020, "tags": ["a", "b"]}
    assert store.doc_metadata(0) == {"lang": "fr", "year": "2020", "tags": '["a", "b"]'}
    assert store.doc_metadata(1) == {"lang": "en", "year": "2021", "draft": "true"}
    assert store.doc_metadata(2) == {}
    assert store.doc_metadata(3)["nested"] == '{"k": 1.5}'
    assert store.metadata_fields == ["draft", "lang", "nested", "tags", "year"]


def test_metadata_value_str():
    assert metadata_value_str("x") == "x"
    assert metadata_value_str(3) == "3"
    assert metadata_value_str(2.5) == "2.5"
    assert metadata_value_str(False) == "false"
    assert metadata_value_str(None) == "null"
    assert metadata_value_str({"b": 1, "a": "é"}) == '{"a": "é", "b": 1}'


def test_filter_masks(store):
    assert store.filter_mask({}) is None
    assert store.filter_mask(None) is None
    np.testing.assert_array_equal(store.filter_mask({"lang": "en"}), [False, True, False, True, True])
    # int 2020 and string "2020" compare equal as strings
    np.testing.assert_array_equal(store.filter_mask({"year": "2020"}), [True, False, False, True, True])
    np.testing.assert_array_equal(store.filter_mask({"lang": "en", "year": "2020"}), [False, False, False, True, True])
    np.testing.assert_array_equal(store.filter_mask({"draft": "true"}), [False, True, False, False, False])
    np.testing.assert_array_equal(store.filter_mask({"tags": '["a", "b"]'}), [True, False, False, False, False])
    unseen = store.filter_mask({"lang": "de"})
    assert unseen.dtype == np.bool_ and unseen.shape == (5,) and not unseen.any()


def test_unknown_filter_field_is_invalid_argument(store):
    with pytest.raises(InvalidArgument) as err:
        store.filter_mask({"lang": "en", "colour": "red"})
    assert err.value.field == "filters[colour]"
    assert "unknown metadata field" in str(err.value)
    assert "lang" in str(err.value) and "year" in str(err.value)


def test_store_without_metadata(tmp_path):
    write_store(tmp_path, [Document("a", "", "x")], [Chunk(0, 0, 0, 1, "x")])
    store = DocStore.load(tmp_path)
    assert store.metadata_fields == []
    assert store.doc_metadata(0) == {}
    with pytest.raises(InvalidArgument, match=r"known: \(none\)"):
        store.filter_mask({"lang": "en"})


def test_out_of_range_lookups_raise(store):
    with pytest.raises(IndexError):
        store.chunk_text(5)
    with pytest.raises(IndexError):
        store.doc_id(-1)


def test_truncated_blob_is_a_format_error(tmp_path):
    write_store(tmp_path, DOCS, CHUNKS)
    blob = tmp_path / "chunk_text.bin"
    blob.write_bytes(blob.read_bytes()[:-3])
    with pytest.raises(IndexFormatError, match="chunk_text.bin"):
        DocStore.load(tmp_path)


def test_missing_file_is_a_format_error(tmp_path):
    write_store(tmp_path, DOCS, CHUNKS)
    (tmp_path / "chunk_doc.npy").unlink()
    with pytest.raises(IndexFormatError, match="chunk_doc.npy"):
        DocStore.load(tmp_path)


def test_concurrent_reads(store):
    def read(i: int) -> tuple[str, str, dict[str, str]]:
        c = i % store.n_chunks
        return store.chunk_text(c), store.chunk_id(c), store.doc_metadata(store.chunk_doc(c))

    expected = [read(i) for i in range(500)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(read, range(500))) == expected
