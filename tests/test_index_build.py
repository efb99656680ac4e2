"""Build -> publish -> load, end to end with the real encoder on small corpora."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rag_service.cli.index import cli
from rag_service.core.errors import BuildError, IndexFormatError, InvalidArgument
from rag_service.encoder.encode import cpu_has_amx_bf16
from rag_service.index import publish
from rag_service.index.build import BuildConfig, build_index, markdown_title
from rag_service.index.chunking import Chunker, Document, dense_text
from rag_service.index.load import load_index, resolve_version_dir
from rag_service.index.manifest import MANIFEST_FILE, sha256_file, verify

REPO = Path(__file__).resolve().parents[1]

LONG_TEXT = " ".join(
    f"In {1940 + i} engineers built machine number {i}, which stored programs in memory and computed "
    f"ballistic tables, payrolls and weather forecasts faster than machine {i - 1} ever could."
    for i in range(40)
)

DOCS = [
    {"_id": "volcano", "title": "Volcanoes",
     "text": "A volcano erupts when magma rises through the crust and spills out as lava, ash and gas.",
     "metadata": {"topic": "geology", "year": 2020, "lang": "en"}},
    {"_id": "ocean", "title": "Oceans",
     "text": "Oceans cover most of the planet; deep sea currents carry heat and salt around the globe.",
     "metadata": {"topic": "geography", "year": 2021, "lang": "en"}},
    {"_id": "photosynthesis", "title": "Photosynthesis",
     "text": "Plants turn sunlight, water and carbon dioxide into sugar and oxygen in their leaves.",
     "metadata": {"topic": "biology", "year": 2020, "lang": "en"}},
    {"_id": "bread", "title": "Baking bread",
     "text": "Yeast ferments the dough, producing carbon dioxide bubbles that make bread rise in the oven.",
     "metadata": {"topic": "cooking", "lang": "en"}},
    {"_id": "café-ü", "title": "Café Ünïcode 日本語",
     "text": "Le café naïf 🙂 est servi à Zürich avec des croissants et du thé.",
     "metadata": {"topic": "cooking", "lang": "fr", "draft": True}},
    {"_id": "notitle", "text": "Glaciers are slow rivers of ice that carve valleys into mountains."},
    {"_id": "long", "title": "History of computing", "text": LONG_TEXT,
     "metadata": {"topic": "history", "year": 1999, "lang": "en"}},
]

TINY = [
    {"_id": "a", "title": "Alpha", "text": "The first tiny document about apples."},
    {"_id": "b", "title": "Beta", "text": "The second tiny document about bananas."},
]

VERSION_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}(-\d+)?$")


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder, write_corpus):
    base = tmp_path_factory.mktemp("built")
    corpus = write_corpus(base / "corpus.jsonl", DOCS)
    root = base / "myindex"
    version_dir = build_index(corpus, root, BuildConfig(), encoder=encoder, progress=False)
    return root, version_dir


@pytest.fixture(scope="module")
def index(built):
    return load_index(built[0])


def tmp_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")]


# Encoder ----------------------------------------------------------------------------------------------------------


def test_encoder_attributes(encoder):
    assert (encoder.name, encoder.dim, encoder.max_seq_length) == ("all-MiniLM-L6-v2", 384, 256)
    assert encoder.tokenizer.is_fast
    assert encoder.count_tokens("Hello world.") == 3  # no [CLS]/[SEP]
    assert encoder.count_tokens("word " * 1000) == 1000  # not truncated


@pytest.mark.slow
def test_encode_documents_keeps_input_order_and_normalises(encoder):
    texts = ["short", LONG_TEXT[:900], "a medium length sentence about volcanoes", LONG_TEXT[:300], ""]
    batched = encoder.encode_documents(texts, batch_size=2)
    assert batched.dtype == np.float32 and batched.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([encoder.encode_documents([t]) for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)
    queries = encoder.encode_queries(["volcano", "bread"])
    assert queries.shape == (2, 384) and queries.dtype == np.float32
    assert encoder.encode_queries([]).shape == (0, 384)


def test_encoder_is_thread_safe(encoder):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"query number {i} about {w}" for i, w in enumerate(["lava", "ice", "bread", "genes"] * 6)]
    expected = encoder.encode_queries(texts)
    counts = [encoder.count_tokens(t) for t in texts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        vectors = list(pool.map(lambda t: encoder.encode_queries([t])[0], texts))
        got_counts = list(pool.map(encoder.count_tokens, texts))
        spans = list(pool.map(encoder.token_spans, texts))
    np.testing.assert_allclose(np.stack(vectors), expected, atol=1e-4)
    assert got_counts == counts == [len(s) for s in spans]


# Chunking ---------------------------------------------------------------------------------------------------------


def test_short_document_is_one_chunk_with_its_full_text(encoder):
    chunker = Chunker(encoder, 256, 64)
    doc = Document("d", "Title", "  A short text.  ", {"k": "v"})
    [chunk] = chunker.chunk_one(0, doc, encoder.token_spans(doc.text))
    assert (chunk.no, chunk.text, chunk.start, chunk.end) == (0, doc.text, 0, len(doc.text))


def test_long_document_is_split_into_overlapping_substrings(encoder):
    chunker = Chunker(encoder, chunk_tokens=40, chunk_overlap=10)
    doc = Document("d", "", LONG_TEXT)
    spans = encoder.token_spans(doc.text)
    chunks = chunker.chunk_one(3, doc, spans)
    assert len(chunks) > 5
    assert [c.no for c in chunks] == list(range(len(chunks)))
    assert all(c.doc == 3 for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(doc.text)
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text
        assert encoder.count_tokens(c.text) <= 40
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev.start < nxt.start < prev.end  # overlapping, moving forward
        shared = encoder.count_tokens(doc.text[nxt.start : prev.end])
        assert 10 <= shared <= 20  # the configured overlap, grown only to reach a word boundary


def test_chunks_end_on_word_boundaries(encoder):
    chunker = Chunker(encoder, chunk_tokens=24, chunk_overlap=6)
    text = "internationalization and antidisestablishmentarianism meet electroencephalography daily " * 8
    chunks = chunker.chunk_one(0, Document("d", "", text), encoder.token_spans(text))
    assert len(chunks) > 4
    for c in chunks:
        assert c.start == 0 or not text[c.start - 1].isalnum()
        assert c.end == len(text) or not text[c.end].isalnum()
        # whole words re-tokenise to exactly the counted tokens
        assert encoder.count_tokens(c.text) <= 24


def test_a_word_longer_than_the_window_is_cut_inside(encoder):
    chunker = Chunker(encoder, chunk_tokens=8, chunk_overlap=2)
    text = "Pneumonoultramicroscopicsilicovolcanoconiosis " * 3
    chunks = chunker.chunk_one(0, Document("d", "", text), encoder.token_spans(text))
    assert len(chunks) > 3
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    assert all(a.start < b.start for a, b in zip(chunks, chunks[1:]))


def test_title_prefix_counts_against_the_window(encoder):
    title = "A fairly long title about the history of computing machinery"
    chunker = Chunker(encoder, chunk_tokens=48, chunk_overlap=8)
    doc = Document("d", title, LONG_TEXT)
    chunks = chunker.chunk_one(0, doc, encoder.token_spans(doc.text))
    assert len(chunks) > 3
    for c in chunks:
        assert encoder.count_tokens(dense_text(title, c.text)) <= 48


def test_default_window_leaves_room_for_special_tokens(encoder):
    chunker = Chunker(encoder)
    assert encoder.max_seq_length == 256 and encoder.num_special_tokens == 2
    assert chunker.effective_chunk_tokens == 254


def test_bad_chunk_settings(encoder):
    with pytest.raises(ValueError):
        Chunker(encoder, chunk_tokens=10, chunk_overlap=10)
    with pytest.raises(BuildError, match="chunk_overlap"):
        BuildConfig(chunk_tokens=64, chunk_overlap=64).validate()


@pytest.mark.parametrize("kwargs,match", [
    ({"k1": -0.1}, "k1"), ({"b": 1.1}, "b must"), ({"idf": "tfidf"}, "idf"), ({"dense_index": "ivf"}, "dense_index"),
    ({"batch_size": 0}, "batch_size"), ({"keep": 0}, "keep"), ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"stemmer": "klingon"}, "klingon"), ({"hnsw_m": 1}, "hnsw_m"),
    ({"hnsw_ef_construction": 0}, "hnsw_ef_construction"),
])
def test_config_is_validated(kwargs, match):
    with pytest.raises(BuildError, match=match):
        BuildConfig(**kwargs).validate()


# Build + load -----------------------------------------------------------------------------------------------------


def test_manifest_contents(built, index):
    root, version_dir = built
    manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    assert manifest["name"] == "myindex"
    assert VERSION_RE.match(manifest["version"])
    assert version_dir.name == f"v-{manifest['version']}"
    assert datetime.fromisoformat(manifest["created_at"].replace("Z", "+00:00")).tzinfo is not None
    assert manifest["build_seconds"] > 0
    assert manifest["model"] == {"name": "all-MiniLM-L6-v2", "dim": 384, "max_seq_length": 256}
    assert manifest["analyzer"]["stemmer"] == "english" and manifest["analyzer"]["stopwords"] == "english"
    params = manifest["params"]
    assert (params["chunk_tokens"], params["chunk_overlap"], params["k1"], params["b"], params["idf"]) == (
        256, 64, 0.9, 0.4, "lucene")
    assert params["dense_index"] == "flat" and params["hnsw_m"] == 32
    counts = manifest["counts"]
    assert counts["documents"] == len(DOCS) == index.n_docs
    assert counts["chunks"] == index.n_chunks > len(DOCS)  # the long document was split
    assert counts["vocabulary"] == len(index.bm25.vocab)
    assert counts["postings"] == len(index.bm25.docs)
    assert manifest["metadata_fields"] == ["draft", "lang", "topic", "year"] == index.metadata_fields
    on_disk = {p.name for p in version_dir.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (version_dir / name).stat().st_size
        assert entry["sha256"] == sha256_file(version_dir / name)
    assert verify(version_dir) == manifest
    assert (index.name, index.version, index.manifest) == ("myindex", manifest["version"], manifest)
    assert index.path == version_dir.resolve()


def test_published_layout(built):
    root, version_dir = built
    assert (root / "CURRENT").is_symlink()
    assert os.readlink(root / "CURRENT") == version_dir.name  # relative, so the root can move
    assert resolve_version_dir(root) == version_dir.resolve()
    assert resolve_version_dir(version_dir) == version_dir.resolve()
    assert tmp_dirs(root) == []


def test_store_round_trip(index):
    store = index.store
    by_id = {store.doc_id(d): d for d in range(store.n_docs)}
    assert set(by_id) == {d["_id"] for d in DOCS}
    cafe = by_id["café-ü"]
    assert store.doc_title(cafe) == "Café Ünïcode 日本語"
    assert store.doc_metadata(cafe) == {"topic": "cooking", "lang": "fr", "draft": "true"}
    assert store.doc_metadata_raw(cafe)["draft"] is True
    assert store.doc_metadata(by_id["volcano"])["year"] == "2020"
    assert store.doc_metadata(by_id["notitle"]) == {} and store.doc_title(by_id["notitle"]) == ""
    texts = {d["_id"]: d["text"] for d in DOCS}
    for i in range(store.n_chunks):
        doc_id = store.doc_id(store.chunk_doc(i))
        assert store.chunk_text(i) in texts[doc_id]
        start, end = store.chunk_span(i)
        assert texts[doc_id][start:end] == store.chunk_text(i)
    long_chunks = [i for i in range(store.n_chunks) if store.doc_id(store.chunk_doc(i)) == "long"]
    assert len(long_chunks) >= 3
    assert [store.chunk_id(i) for i in long_chunks] == [f"long#{n}" for n in range(len(long_chunks))]
    for i in long_chunks:  # every chunk keeps its document's title and metadata
        assert store.doc_title(store.chunk_doc(i)) == "History of computing"
        assert store.doc_metadata(store.chunk_doc(i))["topic"] == "history"


def test_filter_masks(index):
    store = index.store
    assert index.filter_mask({}) is None
    mask = index.filter_mask({"lang": "en", "year": "2020"})
    chosen = {store.doc_id(store.chunk_doc(i)) for i in np.flatnonzero(mask)}
    assert chosen == {"volcano", "photosynthesis"}
    assert not index.filter_mask({"lang": "de"}).any()
    with pytest.raises(InvalidArgument) as err:
        index.filter_mask({"colour": "red"})
    assert err.value.field == "filters[colour]"
    assert "known: draft, lang, topic, year" in str(err.value)


def test_bm25_search_through_the_index(index):
    ids, scores = index.bm25.search("How do volcanoes erupt lava?", depth=5)
    assert index.store.doc_id(index.store.chunk_doc(int(ids[0]))) == "volcano"
    mask = index.filter_mask({"topic": "cooking"})
    ids, _ = index.bm25.search("carbon dioxide", depth=10, mask=mask)
    assert [index.store.doc_id(index.store.chunk_doc(int(i))) for i in ids] == ["bread"]


@pytest.mark.slow
def test_dense_search_finds_a_document_by_its_own_text(index, encoder):
    store = index.store
    for doc in DOCS[:6]:
        query = encoder.encode_queries([doc["text"]])[0]
        ids, scores = index.dense.search(query, depth=3)
        assert store.doc_id(store.chunk_doc(int(ids[0]))) == doc["_id"]
        assert scores[0] > 0.5


def test_filtered_dense_search_returns_only_allowed_chunks(index, encoder):
    mask = index.filter_mask({"lang": "en", "year": "2020"})
    query = encoder.encode_queries(["bread rising in the oven"])[0]
    ids, scores = index.dense.search(query, depth=50, mask=mask)
    assert set(ids.tolist()) == set(np.flatnonzero(mask).tolist())
    exact = index.dense.vectors[ids] @ query
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)


def test_vectors_match_the_encoder(index, encoder):
    store = index.store
    i = 0
    expected = encoder.encode_documents([dense_text(store.doc_title(store.chunk_doc(i)), store.chunk_text(i))])[0]
    # The build's document encoder is ONNX int8 (cosine ~0.995 to fp32, bench/README.md "Build at the limit") or, on
    # a CPU with AMX, torch in bf16 (cosine >= 0.9999 to fp32).
    assert float(index.dense.vectors[i] @ expected) > (0.9999 if cpu_has_amx_bf16() else 0.99)
    norms = np.linalg.norm(np.asarray(index.dense.vectors), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


# Corruption -------------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of(built, tmp_path):
    copy = tmp_path / built[1].name
    shutil.copytree(built[1], copy)
    return copy


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["bm25_weights.npy", "chunk_text.bin", "vectors.npy", "dense.faiss"])
def test_flipped_byte_is_detected(copy_of, name):
    flip_byte(copy_of / name)
    with pytest.raises(IndexFormatError, match=re.escape(name) + ".*checksum mismatch"):
        verify(copy_of)
    with pytest.raises(IndexFormatError, match=re.escape(name)):
        load_index(copy_of)


def test_size_checks_run_even_without_checksums(copy_of):
    flip_byte(copy_of / "chunk_text.bin")
    load_index(copy_of, verify_checksums=False)  # same size: only a checksum finds it
    path = copy_of / "bm25_docs.npy"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IndexFormatError, match="bm25_docs.npy.*size mismatch"):
        load_index(copy_of, verify_checksums=False)


def test_missing_file_is_detected(copy_of):
    (copy_of / "doc_id.bin").unlink()
    with pytest.raises(IndexFormatError, match="doc_id.bin: missing"):
        load_index(copy_of, verify_checksums=False)


def test_unknown_format_version(copy_of):
    manifest = json.loads((copy_of / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format_version 99"):
        load_index(copy_of)


def test_resolve_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="does not exist"):
        resolve_version_dir(tmp_path / "nope")
    with pytest.raises(IndexFormatError, match="not an index"):
        resolve_version_dir(tmp_path)
    os.symlink("v-gone", tmp_path / "CURRENT")
    with pytest.raises(IndexFormatError, match="CURRENT"):
        resolve_version_dir(tmp_path)


# Input ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines,match", [
    (['{"_id": "a", "text": "x"}', '{"_id": "b", "text": "y"', '{"_id": "c", "text": "z"}'], r":2: bad JSON"),
    (['{"_id": "a", "text": "x"}', '{"_id": "b", "text": "y"}', '{"_id": "a", "text": "z"}'],
     r":3: duplicate _id 'a' \(first on line 1\)"),
    (['{"_id": "a", "text": "x"}', '{"text": "y"}'], r":2: missing or empty '_id'"),
    (['{"_id": "a"}'], r":1: document 'a': missing 'text'"),
    (['{"_id": "a", "text": "x", "metadata": [1]}'], r":1: .*'metadata' must be a JSON object"),
    (['["a"]'], r":1: expected a JSON object"),
    ([], r"no documents"),
])
def test_bad_corpus_lines_are_named(tmp_path, encoder, lines, match):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(BuildError, match=match):
        build_index(corpus, tmp_path / "root", encoder=encoder, progress=False)
    assert tmp_dirs(tmp_path / "root") == []


def test_missing_input(tmp_path, encoder):
    with pytest.raises(BuildError, match="no such file"):
        build_index(tmp_path / "absent.jsonl", tmp_path / "root", encoder=encoder, progress=False)


def test_folder_of_text_files(tmp_path, encoder):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / ".hidden").mkdir()
    (docs / "alpha.md").write_text(
        "Intro line\n\n```\n# not a heading\n```\n## Alpha Title ##\n\nAlpha talks about apples.\n"
    )
    (docs / "sub" / "beta.txt").write_text("# Beta is plain text\nBananas are yellow.\n")
    (docs / "sub" / "gamma.md").write_text("No heading here, just cherries.\n")
    (docs / ".hidden" / "secret.md").write_text("# Secret\n")
    (docs / "notes.rst").write_text("ignored")
    version_dir = build_index(docs, tmp_path / "root", encoder=encoder, progress=False)
    index = load_index(version_dir)
    store = index.store
    got = {store.doc_id(d): (store.doc_title(d), store.doc_metadata(d)) for d in range(store.n_docs)}
    assert got == {
        "alpha.md": ("Alpha Title", {"path": "alpha.md"}),
        "sub/beta.txt": ("beta", {"path": "sub/beta.txt"}),
        "sub/gamma.md": ("gamma", {"path": "sub/gamma.md"}),
    }
    assert index.manifest["source"]["kind"] == "folder"
    mask = index.filter_mask({"path": "sub/beta.txt"})
    assert [store.chunk_id(int(i)) for i in np.flatnonzero(mask)] == ["sub/beta.txt#0"]
    ids, _ = index.bm25.search("bananas", depth=5)
    assert store.chunk_id(int(ids[0])) == "sub/beta.txt#0"


def test_markdown_title():
    assert markdown_title("text\n# Title #\nmore") == "Title"
    assert markdown_title("   ### Deep   \n") == "Deep"
    assert markdown_title("#hashtag\nno heading") is None
    assert markdown_title("~~~\n# code\n~~~\n") is None


@pytest.mark.slow
def test_hnsw_build(tmp_path, encoder, write_corpus):
    corpus = write_corpus(tmp_path / "c.jsonl", DOCS)
    version_dir = build_index(corpus, tmp_path / "root", BuildConfig(dense_index="hnsw"), encoder=encoder,
                              progress=False)
    index = load_index(version_dir)
    assert index.manifest["params"]["dense_index"] == "hnsw" and index.dense.kind == "hnsw"
    query = encoder.encode_queries(["magma and lava"])[0]
    ids, _ = index.dense.search(query, depth=3)
    assert index.store.doc_id(index.store.chunk_doc(int(ids[0]))) == "volcano"
    mask = index.filter_mask({"topic": "cooking"})
    ids, _ = index.dense.search(query, depth=10, mask=mask)
    assert set(ids.tolist()) == set(np.flatnonzero(mask).tolist())
    # An HNSW index keeps sq8 codes for its filtered scans unless told otherwise; a flat one none.
    params = index.manifest["params"]
    assert (params["dense_codes"], params["dense_codes_requested"]) == ("sq8", "auto")
    assert index.dense.codes_kind == "sq8" and (version_dir / "dense_codes.faiss").is_file()
    flat = load_index(build_index(corpus, tmp_path / "flat", BuildConfig(dense_index="flat"), encoder=encoder,
                                  progress=False))
    assert flat.manifest["params"]["dense_codes"] == "none" and flat.dense.codes_kind == "none"
    bare = load_index(build_index(corpus, tmp_path / "bare", BuildConfig(dense_index="hnsw", dense_codes="none"),
                                  encoder=encoder, progress=False))
    assert bare.dense.codes_kind == "none" and bare.dense.sq8 is None


def test_okapi_and_custom_bm25_params_are_recorded(tmp_path, encoder, write_corpus):
    corpus = write_corpus(tmp_path / "c.jsonl", TINY)
    config = BuildConfig(k1=1.2, b=0.75, idf="okapi", chunk_tokens=128, chunk_overlap=16, name="custom")
    index = load_index(build_index(corpus, tmp_path / "root", config, encoder=encoder, progress=False))
    params = index.manifest["params"]
    assert (index.name, params["k1"], params["b"], params["idf"], params["chunk_tokens"]) == (
        "custom", 1.2, 0.75, "okapi", 128)
    assert (index.bm25.k1, index.bm25.b, index.bm25.idf_kind) == (1.2, 0.75, "okapi")


# Atomic publishing ------------------------------------------------------------------------------------------------


@pytest.fixture
def published(tmp_path, encoder, write_corpus):
    """An index root with one good published version."""
    root = tmp_path / "root"
    version_dir = build_index(write_corpus(tmp_path / "good.jsonl", TINY), root, encoder=encoder, progress=False)
    return root, version_dir


def assert_intact(root: Path, version_dir: Path) -> None:
    assert os.readlink(root / "CURRENT") == version_dir.name
    verify(version_dir)
    index = load_index(root)
    assert index.path == version_dir.resolve()
    assert index.n_docs == len(TINY)


@pytest.mark.parametrize("bad_line", ['{"_id": "z", "text": ', '{"_id": "a", "text": "again"}'])
def test_failed_build_leaves_the_published_index_alone(tmp_path, encoder, published, bad_line):
    root, version_dir = published
    many = [{"_id": f"d{i}", "text": f"document number {i}"} for i in range(50)]
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("\n".join([json.dumps(TINY[0])] + [json.dumps(d) for d in many] + [bad_line]) + "\n")
    with pytest.raises(BuildError, match=":52: "):
        build_index(corpus, root, encoder=encoder, progress=False)
    assert_intact(root, version_dir)
    assert tmp_dirs(root) == []
    assert [p.name for p in publish.version_dirs(root)] == [version_dir.name]


@pytest.mark.slow
def test_failure_after_writing_started_leaves_no_trace(tmp_path, encoder, published, write_corpus, monkeypatch):
    root, version_dir = published
    from rag_service.retrievers import dense

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(dense, "build_dense_index", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_index(write_corpus(tmp_path / "c.jsonl", DOCS), root, encoder=encoder, progress=False)
    assert_intact(root, version_dir)
    assert tmp_dirs(root) == []


@pytest.mark.slow
def test_rebuild_publishes_a_new_version_and_keep_prunes(tmp_path, encoder, write_corpus):
    root = tmp_path / "root"
    corpus = write_corpus(tmp_path / "c.jsonl", TINY)
    versions = [build_index(corpus, root, BuildConfig(keep=2), encoder=encoder, progress=False) for _ in range(3)]
    assert len({v.name for v in versions}) == 3  # same data, same second: still distinct versions
    assert os.readlink(root / "CURRENT") == versions[-1].name
    assert sorted(p.name for p in publish.version_dirs(root)) == sorted(v.name for v in versions[1:])
    assert not versions[0].exists()
    assert load_index(root).version == versions[-1].name.removeprefix("v-")
    assert tmp_dirs(root) == []


def test_prune_never_deletes_current(tmp_path):
    root = tmp_path
    for i, stamp in enumerate(["2026-01-01T00:00:00.000000Z", "2026-01-02T00:00:00.000000Z",
                               "2026-01-03T00:00:00.000000Z"]):
        (root / f"v-{i}").mkdir()
        (root / f"v-{i}" / MANIFEST_FILE).write_text(json.dumps({"created_at": stamp}))
    os.symlink("v-0", root / "CURRENT")  # rolled back to the oldest
    publish.prune(root, keep=1)
    assert sorted(p.name for p in publish.version_dirs(root)) == ["v-0", "v-2"]


@pytest.mark.slow
def test_stale_tmp_dirs_of_dead_builds_are_cleaned(tmp_path, encoder, published, write_corpus):
    root, _ = published
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f".tmp-{dead.pid}-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "junk.npy").write_bytes(b"x")
    live = root / f".tmp-{os.getppid()}-cafebabe"  # a running process: maybe a concurrent build, left alone
    live.mkdir()
    build_index(write_corpus(tmp_path / "c.jsonl", TINY), root, encoder=encoder, progress=False)
    assert not stale.exists()
    assert live.exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_build_killed_midway_leaves_the_published_index_alone(tmp_path, encoder, published, write_corpus):
    root, version_dir = published
    words = ["protein", "cell", "gene", "tissue", "signal", "membrane", "receptor", "enzyme", "pathway", "mutation"]
    rng = np.random.default_rng(0)
    big = [{"_id": f"d{i}", "title": f"Doc {i}", "text": " ".join(rng.choice(words, 150))} for i in range(800)]
    corpus = write_corpus(tmp_path / "big.jsonl", big)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rag_service.cli.index", "build", "--input", str(corpus), "--output", str(root),
         "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not [p for p in tmp_dirs(root) if p.name.startswith(f".tmp-{proc.pid}-")]:
            assert proc.poll() is None, f"build ended before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no temp directory appeared"
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the build: chunking / encoding
        assert proc.poll() is None, "build finished before it could be killed; make the corpus bigger"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert_intact(root, version_dir)
    [stale] = tmp_dirs(root)
    assert stale.name.startswith(f".tmp-{proc.pid}-")

    new_version = build_index(write_corpus(tmp_path / "c.jsonl", TINY), root, encoder=encoder, progress=False)
    assert tmp_dirs(root) == []
    assert os.readlink(root / "CURRENT") == new_version.name != version_dir.name


# CLI --------------------------------------------------------------------------------------------------------------


def test_cli_build_info_verify(tmp_path, encoder, write_corpus, monkeypatch):
    import rag_service.encoder.encode

    monkeypatch.setattr(rag_service.encoder.encode, "Encoder", lambda *args, **kwargs: encoder)
    corpus = write_corpus(tmp_path / "c.jsonl", TINY)
    root = tmp_path / "cli-index"
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "--input", str(corpus), "--output", str(root), "--no-progress",
                                 "--chunk-tokens", "128", "--chunk-overlap", "32", "--keep", "2"])
    assert result.exit_code == 0, result.output
    assert "chunks" in result.output and "cli-index" in result.output
    result = runner.invoke(cli, ["info", str(root)])
    assert result.exit_code == 0, result.output
    assert "documents  2" in result.output and "(CURRENT)" in result.output
    result = runner.invoke(cli, ["verify", str(root)])
    assert result.exit_code == 0 and result.output.startswith("OK ")

    flip_byte(resolve_version_dir(root) / "bm25_docs.npy")
    result = runner.invoke(cli, ["verify", str(root)])
    assert result.exit_code == 1
    assert "bm25_docs.npy: checksum mismatch" in result.output
    assert "Traceback" not in result.output


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                                 "--chunk-overlap", "300"])
    assert result.exit_code == 1
    assert "chunk_overlap" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "not an index" in result.output
