"""Sharded serving: `rag-index build --shards`, shard servers as separate `rag-serve` processes, the router.

The contract (issue 8): a router over 3 shards answers every query with the same chunks in the same order, scores
within 1e-5, as one server of an index built from the same corpus; a shard that does not answer leaves the reply
partial, or fails it when the request asks for completeness.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from rag_service.bench.serve import stop_processes
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc
from rag_service.pb.rag.v1 import shard_pb2 as spb
from rag_service.pb.rag.v1 import shard_pb2_grpc as spb_grpc
from rag_service.retrievers import lexical

REPO = Path(__file__).resolve().parent.parent
N_SHARDS = 3
TOPICS = {
    "geology": "magma lava crust volcano eruption basalt tectonic plate fault earthquake seismic glacier moraine",
    "biology": "cell protein gene dna enzyme mitochondria membrane bacteria virus immune antibody neuron",
    "history": "empire roman aqueduct medieval castle printing press revolution treaty dynasty pharaoh trade",
    "physics": "light photon gravity quantum electron relativity energy mass velocity particle magnet field",
    "food": "coffee bean bread yeast flour cheese ferment sugar roast spice vinegar wine",
}
FILLER = ["the", "of", "and", "in", "a", "to", "is", "was", "for", "with", "by", "on", "as", "from", "that", "which",
          "were", "are"]


def corpus_docs() -> list[dict]:
    """A seeded corpus: short and multi-chunk documents, metadata, and two exact duplicates (equal scores, so ties
    must break by global chunk id as in one index)."""
    rng = random.Random(8)
    docs = []
    for n in range(60):
        topic = list(TOPICS)[n % len(TOPICS)]
        words = TOPICS[topic].split()
        sentences = []
        for _ in range(rng.randint(2, 14 if n % 7 == 0 else 5)):
            picked = [rng.choice(words if rng.random() < 0.55 else FILLER) for _ in range(rng.randint(6, 16))]
            sentences.append(" ".join(picked).capitalize() + ".")
        docs.append({"_id": f"d{n:03d}", "title": f"{topic.title()} note {n}", "text": " ".join(sentences),
                     "metadata": {"topic": topic, "even": n % 2 == 0, "n": n,
                                  "day": f"20{10 + n % 12:02d}-0{1 + n % 9}-15",
                                  "tags": [list(TOPICS)[(n + k) % len(TOPICS)] for k in range(n % 3)],
                                  "published": f"{2010 + n % 15}-{1 + n % 12:02d}-15"}})
    docs.append({**docs[3], "_id": "dup-a"})
    docs.append({**docs[3], "_id": "dup-b"})
    return docs


def queries() -> list[str]:
    rng = random.Random(80)
    out = []
    for topic, words in TOPICS.items():
        w = words.split()
        out += [" ".join(rng.sample(w, k)) for k in (1, 2, 3, 5)]
        out.append(f"what is the role of {w[0]} and {w[1]} in {topic}")
    return out + ["Geology note 3", "printing press spread of books", "zzz unknown words only"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, encoder, write_corpus):
    """(single index root, sharded build root): the same corpus, built once whole and once by build --shards 3."""
    from rag_service.cli.index import cli
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("shards")
    corpus = write_corpus(work / "corpus.jsonl", corpus_docs())
    single = work / "single"
    build_index(corpus, single, BuildConfig(chunk_tokens=64, chunk_overlap=16), encoder=encoder, progress=False)
    out = work / "sharded"
    result = CliRunner().invoke(cli, ["build", "--input", str(corpus), "--output", str(out), "--shards",
                                      str(N_SHARDS), "--chunk-tokens", "64", "--chunk-overlap", "16",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "router" in result.output
    return single, out


# -- the split itself -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_shards_are_normal_indexes_with_global_statistics(sharded):
    from rag_service.index.load import load_index
    from rag_service.search import rerank

    single_root, out = sharded
    single = load_index(single_root)
    shards = [load_index(out / f"shard-{i}") for i in range(N_SHARDS)]
    seen_docs = set()
    total_chunks = 0
    store_s = rerank.RerankStore.create(single.windows, single.bm25, single.dense.vectors)
    q = single.dense.vectors[0]
    for i, shard in enumerate(shards):
        info = shard.manifest["shard"]
        assert (info["index"], info["count"]) == (i, N_SHARDS)
        assert info["corpus"] == {"documents": single.n_docs, "chunks": single.n_chunks}
        assert info["stats_sha256"] == shards[0].manifest["shard"]["stats_sha256"]
        ids = np.load(shard.path / info["chunk_ids"])
        docs = {shard.store.doc_id(d) for d in range(shard.n_docs)}
        assert not docs & seen_docs  # a document lives in exactly one shard
        seen_docs |= docs
        total_chunks += shard.n_chunks
        # Same chunks, same texts, same vectors; BM25 impacts and statistics are the corpus'.
        assert [shard.store.chunk_id(c) for c in range(shard.n_chunks)] == [single.store.chunk_id(int(g)) for g in ids]
        np.testing.assert_array_equal(shard.dense.vectors, single.dense.vectors[ids])
        assert shard.bm25.avgdl == single.bm25.avgdl and shard.bm25.corpus_chunks == single.n_chunks
        np.testing.assert_array_equal(shard.bm25.df, single.bm25.df)
        for query in queries():
            tokens = single.analyzer.tokens(query)
            np.testing.assert_array_equal(shard.bm25.score_all(tokens), single.bm25.score_all(tokens)[ids])
            # The corpus's words and their ids come along with the vocabulary they index.
            np.testing.assert_array_equal(shard.bm25.query_term_ids(query), single.bm25.query_term_ids(query))
        assert (shard.path / lexical.WORDS_FILE).read_bytes() == (single.path / lexical.WORDS_FILE).read_bytes()
        store = rerank.RerankStore.create(shard.windows, shard.bm25, shard.dense.vectors)
        assert (store.avg_title, store.avg_window) == (store_s.avg_title, store_s.avg_window)
        for query in queries()[:6]:
            np.testing.assert_array_equal(rerank.local_features(store, query, q, np.arange(shard.n_chunks)),
                                          rerank.local_features(store_s, query, q, ids))
    assert seen_docs == {single.store.doc_id(d) for d in range(single.n_docs)}
    assert total_chunks == single.n_chunks
    dup = {i for i, s in enumerate(shards) for d in range(s.n_docs) if s.store.doc_id(d) in ("dup-a", "dup-b")}
    assert dup  # the duplicates are somewhere; whether together or apart, ties must still break by global id


@pytest.mark.slow
def test_split_refuses_a_shard_and_too_many_shards(sharded, tmp_path):
    from rag_service.core.errors import BuildError
    from rag_service.shard.split import split_index

    single_root, out = sharded
    with pytest.raises(BuildError, match="is itself a shard"):
        split_index(out / "shard-0", tmp_path / "again", 2)
    with pytest.raises(BuildError, match="without a chunk"):
        split_index(single_root, tmp_path / "many", 500)
    from rag_service.index.update import update_index

    with pytest.raises(BuildError, match="is shard 0 of 3"):  # an update would break the global statistics
        update_index(out / "shard-0", delete=["d000"])


# -- shard servers as processes, the router in this process ---------------------------------------------------------

def start_serve(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as err:  # a file, not a pipe nobody reads: a full pipe would stall the server
        return subprocess.Popen([sys.executable, "-m", "rag_service.cli.serve", "--port", "0", "--log-level",
                                 "WARNING", *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env)


def wait_serving(proc: subprocess.Popen, log: Path) -> int:
    line = proc.stdout.readline()  # printed once the index is loaded, warm and SERVING; "" if it exited
    match = re.search(r"SERVING .* on [\d.]+:(\d+)", line)
    if match is None:
        proc.kill()
        raise AssertionError(f"rag-serve did not start: {line!r}\n{log.read_text()[-3000:]}")
    return int(match.group(1))


@pytest.fixture(scope="module")
def cluster(sharded, tmp_path_factory, server_thread, encoder):
    """Three shard processes, a router and a single-index server (both in this process, on real channels)."""
    from rag_service.core.config import ServerConfig

    single_root, out = sharded
    logs = tmp_path_factory.mktemp("shard-logs")
    procs = [start_serve(["--index", str(out / f"shard-{i}")], logs / f"shard-{i}.log") for i in range(N_SHARDS)]
    try:
        ports = [wait_serving(p, logs / f"shard-{i}.log") for i, p in enumerate(procs)]
        addresses = [f"127.0.0.1:{port}" for port in ports]
        router_config = ServerConfig(index=out / "router", port=0, warmup_queries=1,
                                     router={"shards": addresses, "shard_timeout_seconds": 5.0})
        with server_thread(ServerConfig(index=single_root, port=0, warmup_queries=1), None) as single, \
                server_thread(router_config, None) as router, grpc.insecure_channel(f"127.0.0.1:{single.port}") as cs, \
                    grpc.insecure_channel(f"127.0.0.1:{router.port}") as cr:
            yield {"single": pb_grpc.RetrieverStub(cs), "router": pb_grpc.RetrieverStub(cr), "procs": procs,
                   "addresses": addresses, "out": out, "router_server": router}
    finally:
        stop_processes(procs)


SETTINGS = [
    {},  # the defaults: rerank on
    {"rerank": False},
    {"mmr_lambda": 0.7, "dedup_threshold": 0.9, "max_context_tokens": 200, "top_k": 8},
    {"fusion": pb.FUSION_RRF, "depth": 30, "top_k": 15, "rerank_depth": 20},
    {"filters": {"topic": "geology"}},
    {"filters": {"even": "true"}, "rerank": False, "depth": 12},
    # Structured filters: every condition type, typed as in one index (the split keeps the corpus' types).
    {"filter": pb.Filter(must=[pb.Condition(key="n", range=pb.Range(gte=10, lt=45)),
                               pb.Condition(key="day", date_range=pb.DateRange(gte="2013-01-01"))],
                         must_not=[pb.Condition(key="tags", any=pb.MatchAny(keywords=["food", "physics"]))])},
    {"filter": pb.Filter(should=[pb.Condition(key="topic", match=pb.Match(keyword="history")),
                                 pb.Condition(key="tags", match=pb.Match(keyword="biology")),
                                 pb.Condition(key="even", match=pb.Match(boolean=True))], min_should=2),
     "filters": {"even": "true"}, "rerank": False},
    {"filter": pb.Filter(must=[pb.Condition(key="tags", is_empty=True),
                               pb.Condition(filter=pb.Filter(should=[pb.Condition(key="n", any=pb.MatchAny(
                                   integers=[3, 10, 17, 24, 31])), pb.Condition(key="topic", exists=False)]))])},
]


QUERY_API_SETTINGS = [
    {"group_by_doc": True, "top_k": 5},
    {"group_by_doc": True, "group_size": 2, "top_k": 4, "offset": 2},
    {"offset": 5, "top_k": 5},
    {"offset": 3, "top_k": 4, "rerank": False, "fusion": pb.FUSION_RRF},
    {"min_score": 0.5, "top_k": 8},
    {"highlight": True, "top_k": 5},
    {"decay": pb.Decay(field="published", function=pb.DECAY_GAUSS, weight=0.5,
                       origin=Timestamp(seconds=1735689600), scale=Duration(seconds=3 * 365 * 86400)),
     "top_k": 6},
]


@pytest.mark.slow
def test_router_answers_the_query_api_as_one_index(cluster):
    """Groups, pages, floors, decay, highlights and explanations through the router equal one index's (the best
    sentence window aside: the router picks it by matched terms, the window vectors staying on the shards)."""
    compared = 0
    for settings in QUERY_API_SETTINGS:
        for query in queries():
            request = pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS, debug=True, **settings)
            want = cluster["single"].Search(request, timeout=30)
            got = cluster["router"].Search(request, timeout=30)
            assert [c.chunk_id for c in got.contexts] == [c.chunk_id for c in want.contexts], (settings, query)
            np.testing.assert_allclose([c.score for c in got.contexts], [c.score for c in want.contexts], atol=1e-5)
            assert [(g.doc_id, g.first, g.count) for g in got.groups] == \
                [(g.doc_id, g.first, g.count) for g in want.groups]
            np.testing.assert_allclose([g.score for g in got.groups], [g.score for g in want.groups], atol=1e-5)
            assert got.below_min_score == want.below_min_score and got.offset == want.offset
            assert bool(got.next_page_token) == bool(want.next_page_token)
            assert list(got.legs) == list(want.legs) and got.degraded == want.degraded
            for a, b in zip(got.contexts, want.contexts):
                assert [(h.start, h.end, h.term) for h in a.highlights] == \
                    [(h.start, h.end, h.term) for h in b.highlights]
                ea, eb = a.explanation, b.explanation
                for name in ("bm25_rank", "dense_rank"):
                    assert ea.HasField(name) == eb.HasField(name) and getattr(ea, name) == getattr(eb, name)
                for name in ("bm25_contribution", "dense_contribution", "decay_factor", "fused_score"):
                    assert getattr(ea, name) == pytest.approx(getattr(eb, name), abs=1e-5), name
                for name, value in eb.rerank_contributions.items():
                    assert ea.rerank_contributions[name] == pytest.approx(value, abs=1e-5), name
            compared += len(want.contexts)
    assert compared > 200
    # A page token continues through the router as it does on one index.
    first = cluster["router"].Search(pb.SearchRequest(query="magma lava", top_k=3, offset=0), timeout=30)
    second = cluster["router"].Search(pb.SearchRequest(query="magma lava", top_k=3,
                                                       page_token=first.next_page_token), timeout=30)
    whole = cluster["single"].Search(pb.SearchRequest(query="magma lava", top_k=6), timeout=30)
    assert [c.chunk_id for c in (*first.contexts, *second.contexts)] == [c.chunk_id for c in whole.contexts]


@pytest.mark.slow
def test_router_equals_single_index(cluster):
    compared = 0
    for settings in SETTINGS:
        for query in queries():
            request = pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS, debug=True, **settings)
            want = cluster["single"].Search(request, timeout=30)
            got = cluster["router"].Search(request, timeout=30)
            assert not got.partial and len(got.shards_answered) == N_SHARDS and not got.shards_missing
            assert [c.chunk_id for c in got.contexts] == [c.chunk_id for c in want.contexts], (settings, query)
            assert [c.doc_id for c in got.contexts] == [c.doc_id for c in want.contexts]
            np.testing.assert_allclose([c.score for c in got.contexts], [c.score for c in want.contexts], atol=1e-5)
            for a, b in zip(got.contexts, want.contexts):
                assert (a.text, a.title, dict(a.metadata), a.tokens) == (b.text, b.title, dict(b.metadata), b.tokens)
                assert a.HasField("rerank_score") == b.HasField("rerank_score")
                for name, value in b.features.items():
                    assert a.features[name] == pytest.approx(value, abs=1e-5), name
            assert got.context_tokens == want.context_tokens and got.route == want.route
            compared += len(want.contexts)
    assert compared > 300
    # The version names the shard set and every shard's version.
    reply = cluster["router"].Search(pb.SearchRequest(query="magma"), timeout=30)
    assert reply.index_version.count(",") == N_SHARDS - 1


@pytest.mark.slow
def test_router_validation_names_the_field(cluster):
    router = cluster["router"]
    with pytest.raises(grpc.RpcError) as caught:
        router.Search(pb.SearchRequest(query="magma", filters={"colour": "red"}), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "filters[colour]" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        router.Search(pb.SearchRequest(query="magma", filter=pb.Filter(should=[
            pb.Condition(key="n", exists=True), pb.Condition(key="topic", range=pb.Range(gt=1))])), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'filter.should[1].range: field "topic" is keyword' in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        router.Search(pb.SearchRequest(query="  "), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in caught.value.details()
    info = router.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    assert info.chunk_count > 0 and info.build_params["shards"] == str(N_SHARDS)
    single = cluster["single"].GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    assert list(info.metadata_schema) == list(single.metadata_schema)
    assert {f.name: f.type for f in info.metadata_schema} == {"day": "date", "even": "boolean", "n": "integer",
                                                              "published": "date", "tags": "keyword_list",
                                                              "topic": "keyword"}
    # The shard API checks its inputs too.
    with grpc.insecure_channel(cluster["addresses"][0]) as channel:
        stub = spb_grpc.ShardStub(channel)
        shard = stub.GetShardInfo(spb.GetShardInfoRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Candidates(spb.CandidatesRequest(query="magma", query_vector=b"\0" * 12, depth=10,
                                                  set_id=shard.set_id), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "query_vector" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Candidates(spb.CandidatesRequest(query="magma", query_vector=b"\0" * 4 * shard.embedding_dim,
                                                  depth=10, set_id="another-set"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
def test_router_refuses_an_incomplete_or_foreign_shard_set(cluster, encoder):
    from rag_service.core.errors import IndexFormatError
    from rag_service.shard.router import ShardedPipeline

    with pytest.raises(IndexFormatError, match=r"each of 0\.\.2 exactly once"):
        ShardedPipeline(cluster["out"] / "router", cluster["addresses"][:2], encoder)
    with pytest.raises(IndexFormatError, match="exactly once"):
        ShardedPipeline(cluster["out"] / "router", [cluster["addresses"][0]] * 3, encoder)


@pytest.mark.slow
def test_a_router_fronts_several_sharded_collections_and_local_ones(cluster, sharded, server_thread,
                                                                     tmp_path_factory, write_corpus):
    """One router: the 3-shard set as collection `notes`, another 2-shard set of another corpus as `stars`, and a
    whole index served locally as `single`; each answers from its own data, `notes` as the one-collection router
    does."""
    from rag_service.cli.index import cli
    from rag_service.client import RetrieverClient
    from rag_service.core.config import ServerConfig

    single_root, _ = sharded
    work = tmp_path_factory.mktemp("stars")
    words = ["star", "galaxy", "nebula", "telescope", "orbit", "planet", "comet", "supernova", "pulsar", "quasar"]
    rng = random.Random(17)
    docs = [{"_id": f"s{n:02d}", "title": f"Sky note {n}",
             "text": " ".join(rng.choice(words) for _ in range(24)) + "."} for n in range(16)]
    corpus = write_corpus(work / "corpus.jsonl", docs)
    stars = work / "stars"
    result = CliRunner().invoke(cli, ["build", "--input", str(corpus), "--output", str(stars), "--shards", "2",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    procs = [start_serve(["--index", str(stars / f"shard-{i}")], work / f"shard-{i}.log") for i in range(2)]
    try:
        star_addresses = [f"127.0.0.1:{wait_serving(p, work / f'shard-{i}.log')}" for i, p in enumerate(procs)]
        config = ServerConfig(collections={"notes": cluster["out"] / "router", "stars": stars / "router",
                                           "single": single_root},
                              router={"collections": {"notes": cluster["addresses"], "stars": star_addresses}},
                              default_collection="notes", port=0, warmup_queries=1)
        with server_thread(config, None) as router, \
                RetrieverClient(f"127.0.0.1:{router.port}", timeout=30) as client:
            infos = {c.name: c for c in client.list_collections()[0]}
            assert {n: c.status for n, c in infos.items()} == {"notes": "SERVING", "single": "SERVING",
                                                                 "stars": "SERVING"}
            assert infos["stars"].document_count == len(docs)
            query = "volcano basalt magma eruption"
            notes = client.search(query, collection="notes", top_k=8)
            alone = cluster["router"].Search(pb.SearchRequest(query=query, top_k=8), timeout=30)
            assert [c.chunk_id for c in notes.contexts] == [c.chunk_id for c in alone.contexts]
            assert sorted(notes.shards_answered) == sorted(alone.shards_answered) and not notes.partial
            sky = client.search("supernova pulsar telescope", collection="stars", top_k=5)
            assert sky.collection == "stars" and all(c.doc_id.startswith("s") for c in sky.contexts)
            assert len(sky.shards_answered) == 2
            single = client.search(query, collection="single", top_k=8)
            assert single.collection == "single" and not single.shards_answered
            assert [c.chunk_id for c in single.contexts] == [c.chunk_id for c in notes.contexts]
            # One model: the routers and the local collection share one query encoder.
            searchers = {n: c.searcher for n, c in router.server.collections.collections.items()}
            assert searchers["notes"].encoder is searchers["stars"].encoder is searchers["single"].encoder
    finally:
        stop_processes(procs)


@pytest.mark.slow
def test_a_stopped_shard_gives_a_partial_reply_or_unavailable(cluster):
    """Runs last in this module: it stops shard 1 for good."""
    from rag_service.index.load import load_index

    router = cluster["router"]
    proc = cluster["procs"][1]
    label = f"1@{cluster['addresses'][1]}"
    gone = load_index(cluster["out"] / "shard-1").store
    gone_docs = {gone.doc_id(d) for d in range(gone.n_docs)}
    # A hung shard (stopped, its connection open): the reply is partial and still within the caller's deadline.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = router.Search(pb.SearchRequest(query="magma lava crust", cache=pb.CACHE_BYPASS), timeout=4)
        assert time.monotonic() - started < 4
        assert reply.partial and list(reply.shards_missing) == [label]
        with pytest.raises(grpc.RpcError) as caught:
            router.Search(pb.SearchRequest(query="magma lava crust", require_complete=True), timeout=4)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and label in caught.value.details()
        assert "DEADLINE_EXCEEDED" in caught.value.details()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # Stopped for good: the connection is refused, and the same holds.
    proc.terminate()
    proc.wait(timeout=30)
    for query in queries()[:8]:
        reply = router.Search(pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS), timeout=30)
        assert reply.partial and list(reply.shards_missing) == [label]
        assert sorted(reply.shards_answered) == sorted(f"{i}@{cluster['addresses'][i]}" for i in (0, 2))
        assert reply.contexts and not {c.doc_id for c in reply.contexts} & gone_docs
    with pytest.raises(grpc.RpcError) as caught:
        router.Search(pb.SearchRequest(query="magma lava", require_complete=True), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and label in caught.value.details()
    # A partial reply is not cached: the same request asks the shards again.
    first = router.Search(pb.SearchRequest(query="gravity photon"), timeout=30)
    again = router.Search(pb.SearchRequest(query="gravity photon"), timeout=30)
    assert first.partial and again.partial and again.served_from == pb.SERVED_FROM_MISS


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["with_vectors", "with_details"])
def test_a_shard_failing_after_the_first_stage_leaves_a_partial_reply(sharded, server_thread, encoder, monkeypatch,
                                                                      phase):
    """The shard answers the first stage, then fails the fetch of features and vectors (with_vectors) or of texts and
    token counts (with_details): its candidates leave the reply, which is partial."""
    from contextlib import ExitStack

    from rag_service.core.config import ServerConfig
    from rag_service.core.errors import Unavailable
    from rag_service.core.params import SearchParams
    from rag_service.index.load import load_index
    from rag_service.shard.router import ShardedPipeline

    _, out = sharded
    with ExitStack() as stack:
        servers = [stack.enter_context(server_thread(ServerConfig(index=out / f"shard-{i}", port=0,
                                                                  warmup_queries=0), encoder))
                   for i in range(N_SHARDS)]
        router = ShardedPipeline(out / "router", [f"127.0.0.1:{s.port}" for s in servers], encoder)
        stack.callback(router.close)
        store = load_index(out / "shard-2").store
        held = {store.doc_id(d) for d in range(store.n_docs)}
        params = SearchParams(query="magma lava crust volcano protein gravity coffee", top_k=40)
        full = router.search(params)
        assert not full.partial and {c.doc_id for c in full.contexts} & held

        servicer = servers[2].server.shard_servicer
        original = servicer._fetch

        def failing(request):
            if getattr(request, phase):
                raise Unavailable(f"test: {phase} refused")
            return original(request)

        monkeypatch.setattr(servicer, "_fetch", failing)
        result = router.search(params)
        assert result.partial and result.shards_missing == [f"2@127.0.0.1:{servers[2].port}"]
        assert len(result.shards_answered) == N_SHARDS - 1
        assert result.contexts and not {c.doc_id for c in result.contexts} & held
        if phase == "with_details":
            # Lost after the rerank: what the other shards hold keeps its place in the ranking.
            kept = [c.chunk_id for c in full.contexts if c.doc_id not in held]
            assert [c.chunk_id for c in result.contexts][:len(kept)] == kept
        with pytest.raises(Unavailable, match=f"shard 2@127.0.0.1:{servers[2].port} failed"):
            router.search(dataclasses.replace(params, require_complete=True))

