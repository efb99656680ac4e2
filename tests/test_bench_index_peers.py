"""The peers built from a rag-service index's own parts (rag_service.bench.index_peers): the same parts in process and
Postgres + pgvector, on the tests' twelve-document index. Known-item questions must find their document; Postgres
must be gone, files and all, after close; a missing package is a skip with its reason, not a failure."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import psutil
import pytest

from rag_service.bench import index_peers
from rag_service.kernels.reference import fuse_reference

# Questions over tests/conftest.py SERVER_DOCS with one right answer each.
KNOWN = {"volcanic eruption of lava and ash": "volcano", "how plants make sugar from sunlight": "photosynthesis",
         "Roman stone arches carrying water": "aqueduct", "double helix genetic code": "dna",
         "how fast does light travel": "light", "wild yeast fermented bread starter": "bread"}


@pytest.fixture(scope="module")
def chunks(built_index):
    return index_peers.read_index_chunks(built_index)


@pytest.fixture(scope="module")
def int8_encoder(built_index):
    return index_peers.index_encoder(built_index)


def test_index_chunks_are_the_index_own(built_index, chunks):
    from rag_service.index.load import load_index

    index = load_index(built_index)
    assert len(chunks) == index.n_chunks and chunks.vectors.shape == (index.n_chunks, index.model["dim"])
    assert np.array_equal(chunks.vectors, np.load(index.path / "vectors.npy"))
    first = int(chunks.chunk_docs[0])
    assert chunks.texts[0] == f"{index.store.doc_title(first)} {index.store.chunk_text(0)}"
    assert set(chunks.doc_ids) == set(KNOWN.values()) | {"glacier", "earthquake", "printing", "gravity", "bridge",
                                                          "coffee"}
    assert (chunks.k1, chunks.b) == (index.bm25.k1, index.bm25.b)


def test_minmax_fuse_ranks_as_the_pipeline_weighted_fusion():
    rng = np.random.default_rng(7)
    for case in range(200):
        n_bm25, n_dense = rng.integers(0, 12, size=2)
        bm25_ids = rng.choice(30, size=n_bm25, replace=False).astype(np.int64)
        dense_ids = rng.choice(30, size=n_dense, replace=False).astype(np.int64)
        # Few distinct values, so ties (and lists of one equal score) are common.
        bm25 = np.sort(rng.integers(0, 4, size=n_bm25).astype(np.float32))[::-1].copy()
        dense = np.sort(rng.integers(0, 3, size=n_dense).astype(np.float32) / 4)[::-1].copy()
        w = float(rng.choice([0.0, 0.3, 0.5, 1.0]))
        limit = int(rng.integers(1, 25))
        got = index_peers.minmax_fuse(bm25_ids, bm25, dense_ids, dense, w, limit)
        if not n_bm25 and not n_dense:
            assert got.size == 0
            continue
        want = fuse_reference(bm25_ids, bm25, dense_ids, dense, method="weighted", dense_weight=w, top_k=limit)
        # Same float64 arithmetic in the same order, so ties break alike (by id).
        assert got.tolist() == want.ids.tolist(), case


def test_first_documents_keeps_the_first_chunk_of_each_document():
    chunk_docs = np.array([0, 0, 1, 2, 1], dtype=np.int64)
    assert index_peers.first_documents([1, 0, 4, 3], chunk_docs, ["a", "b", "c"], 10) == ["a", "b", "c"]
    assert index_peers.first_documents([4, 0, 1], chunk_docs, ["a", "b", "c"], 1) == ["b"]
    assert index_peers.first_documents([], chunk_docs, ["a", "b", "c"], 3) == []


def test_same_parts_finds_known_items_with_the_index_int8_encoder(chunks, int8_encoder):
    assert int8_encoder.backend == "onnx-int8" and int8_encoder.threads == 1
    peer = index_peers.SamePartsPeer(chunks, int8_encoder)
    for query, doc in KNOWN.items():
        ranking = peer.search(query, 5)
        assert ranking[0] == doc, (query, ranking)
        assert len(ranking) == len(set(ranking)) <= 5
    # A query of stop words only has no lexical side; the dense side still answers.
    assert len(peer.search("the of and", 3)) == 3
    with pytest.raises(ValueError, match="dense_weight"):
        index_peers.SamePartsPeer(chunks, int8_encoder, dense_weight=1.5)


def test_vector_literal_is_pgvector_text_form():
    assert index_peers.vector_literal(np.array([0.5, -1.0, 0.25], dtype=np.float32)) == "[0.5,-1.0,0.25]"


def test_hybrid_sql_names_a_bad_match():
    assert "plainto_tsquery('english', %(query)s) AS query" in index_peers.hybrid_sql("all")
    with pytest.raises(ValueError, match="match must be one of any, all"):
        index_peers.hybrid_sql("some")


@pytest.mark.slow
def test_pgvector_finds_known_items_and_leaves_nothing_behind(chunks, int8_encoder):
    pytest.importorskip("pgserver")
    pytest.importorskip("psycopg")
    with index_peers.PgvectorPeer(chunks, int8_encoder) as peer:
        (pid,) = peer.postgres_pids()
        assert psutil.pid_exists(pid)
        workdir = peer.workdir
        assert workdir.is_dir()
        assert peer.pgvector_version.startswith("0.8")
        for query, doc in KNOWN.items():
            ranking = peer.search(query, 5)
            assert ranking[0] == doc, (query, ranking)
            assert len(ranking) == len(set(ranking)) <= 5
        # Every word must match: a question none of whose chunks holds all its words is answered by the vector side.
        assert peer.search("volcanic eruption of lava and ash", 5, match="all")[0] == "volcano"
        assert peer.search("volcanic eruption under glaciers", 5, match="all")
        # Only stop words: an empty tsquery matches nothing, the vector side still answers.
        for match in ("any", "all"):
            assert len(peer.search("the of and", 3, match)) == 3
        # Both statements run as server-side prepared statements.
        with peer.connection.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%%WITH semantic AS%%'")
            assert cur.fetchone()[0] == 2
    assert peer.connection is None and peer.server is None
    # pg_ctl stop -w has waited for the shutdown; the postmaster's pid may take a moment more to go.
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(pid)
    assert not workdir.exists()
    peer.close()  # twice is harmless


@pytest.mark.slow
def test_compare_skips_a_peer_whose_package_is_missing_and_says_why(built_index, tmp_path, monkeypatch):
    from rag_service.bench.compare import CompareConfig, format_table, run_compare

    corpus = built_index.parent / "corpus.jsonl"
    queries = {f"q{i}": q for i, q in enumerate(KNOWN)}
    qrels = {f"q{i}": {doc: 1} for i, doc in enumerate(KNOWN.values())}
    monkeypatch.setitem(sys.modules, "pgserver", None)  # import pgserver raises ImportError
    report = run_compare(CompareConfig(corpus=corpus, queries=queries, qrels=qrels, index=built_index,
                                       systems=["same-parts", "pgvector", "pgvector (all words)"], warmup=1,
                                       cache_dir=tmp_path / "cache"))
    assert list(report["systems"]) == ["same-parts"]
    assert report["systems"]["same-parts"]["ndcg@10"] >= 0.9
    assert list(report["skipped"]) == ["pgvector", "pgvector (all words)"]
    for reason in report["skipped"].values():
        assert "pgserver" in reason and "not installed" in reason
    table = format_table(report)
    assert "pgvector                 skipped: not installed: pgserver" in table, table
    json.dumps(report)
    # Without a local index there is nothing to build them from.
    report = run_compare(CompareConfig(corpus=corpus, queries=queries, qrels=qrels, systems=["same-parts", "bm25s"],
                                       warmup=0, cache_dir=tmp_path / "cache"))
    assert list(report["systems"]) == ["bm25s"]
    assert "needs --index" in report["skipped"]["same-parts"]
