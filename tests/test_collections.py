"""Many collections in one server: named indexes, the default one, aliases, per-collection failure, health, the cache
per collection, and the encoder shared per model. Real indexes built by the build code, real servers on free ports."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.api.collections import ALIASES_FILE, collection_specs, read_aliases, update_aliases
from rag_service.client import RetrieverClient, RetrieverError
from rag_service.core.config import ServerConfig
from rag_service.index.load import resolve_version_dir
from rag_service.pb.rag.v1 import retrieval_pb2 as pb

ADMIN = "collections-admin-token"
# Only the "extra" corpus holds this document: the probe finds it first there and cannot find it elsewhere.
ZEPPELIN = {"_id": "zeppelin", "title": "Zeppelins", "text": "A zeppelin is a rigid airship whose hydrogen-filled gas "
            "cells hang inside an aluminium frame, flown across the Atlantic in the 1930s."}
PROBE = "rigid airship hydrogen zeppelin"


def _copy_index(source: Path, destination: Path) -> Path:
    """An index root at `destination` holding `source`'s current version (a collection of the same model)."""
    version = resolve_version_dir(source)
    destination.mkdir(parents=True)
    shutil.copytree(version, destination / version.name)
    (destination / "CURRENT").symlink_to(version.name)
    return destination


@pytest.fixture(scope="module")
def root(built_index, encoder, write_corpus, tmp_path_factory) -> Path:
    """An index root: `manuals-v1` (the shared test index), `manuals-v2` (its documents and one more, built in a
    folder of its own) and `docs` (a copy of v1: same model, same data, another collection)."""
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("collections")
    root = work / "root"
    _copy_index(built_index, root / "manuals-v1")
    docs = [json.loads(line) for line in (built_index.parent / "corpus.jsonl").read_text().splitlines()]
    corpus = write_corpus(work / "corpus_v2.jsonl", [*docs, ZEPPELIN])
    build_index(corpus, root / "manuals-v2", BuildConfig(chunk_tokens=64, chunk_overlap=16), encoder=encoder,
                progress=False)
    _copy_index(built_index, root / "docs")
    return root


def _config(root: Path, **settings) -> ServerConfig:
    return ServerConfig(collections_root=root, port=0, warmup_queries=1, auth={"admin_token": ADMIN},
                        **settings)


@pytest.fixture(scope="module")
def serving(root, encoder, server_thread):
    # Room to queue every load thread's request: a shed request (RESOURCE_EXHAUSTED) is not what the swap tests count.
    with server_thread(_config(root, default_collection="manuals-v1", max_queued=8), encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as client:
        yield running, client


def _health(client: RetrieverClient, service: str) -> str:
    return client.health(service)


# -- the configuration -------------------------------------------------------------------------------------------------

def _fake_index(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": folder.name}))
    return folder


def test_an_index_root_serves_each_index_folder_by_its_name(tmp_path):
    for name in ("b", "a"):
        _fake_index(tmp_path / name)
    (tmp_path / "notes").mkdir()  # not an index: skipped
    _fake_index(tmp_path / "bad name")  # not a collection name: skipped with a warning
    specs, default = collection_specs(ServerConfig(collections_root=tmp_path))
    assert [s.name for s in specs] == ["a", "b"] and default is None
    # A plain index given explicitly is served beside them, and is the default.
    plain = _fake_index(tmp_path / "elsewhere" / "manual")
    specs, default = collection_specs(ServerConfig(collections_root=tmp_path, index=plain,
                                                   collections={"x": tmp_path / "a"}))
    assert [s.name for s in specs] == ["manual", "x", "a", "b"] and default == "manual"
    with pytest.raises(ValueError, match="two collections named 'a'"):
        collection_specs(ServerConfig(collections_root=tmp_path, collections={"a": plain}))
    with pytest.raises(ValueError, match="not a collection name"):
        ServerConfig(collections={"no/slash": plain})


def test_the_printed_configuration_loads_to_the_same_collections(tmp_path):
    from rag_service.core.config import load_config, to_toml

    _fake_index(tmp_path / "a")
    config = load_config(None, collections_root=tmp_path)
    (tmp_path / "printed.toml").write_text(to_toml(config))
    again = load_config(tmp_path / "printed.toml")
    assert collection_specs(again) == collection_specs(config) and [s.name for s in collection_specs(again)[0]] == ["a"]


def test_rag_serve_index_options_take_names_and_one_plain_path():
    from rag_service.cli.serve import _index_options

    assert _index_options(("a=/x", "/y", "b=c=d")) == (Path("/y"), {"a": Path("/x"), "b": Path("c=d")})
    assert _index_options(("/path/with=sign",)) == (Path("/path/with=sign"), {})
    import click

    with pytest.raises(click.BadParameter, match="one plain PATH"):
        _index_options(("/x", "/y"))


def test_the_aliases_file_is_replaced_whole(tmp_path):
    assert read_aliases(tmp_path) == {}
    update_aliases(tmp_path, lambda a: a.update(manuals="manuals-v1", docs="docs-v3"))
    update_aliases(tmp_path, lambda a: a.__setitem__("manuals", "manuals-v2"))
    assert read_aliases(tmp_path) == {"docs": "docs-v3", "manuals": "manuals-v2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".aliases.lock", ALIASES_FILE]  # no temporary left


def test_rag_index_alias_sets_and_removes_an_alias(tmp_path):
    from rag_service.cli.index import cli

    _fake_index(tmp_path / "manuals-v1")
    runner = CliRunner()
    result = runner.invoke(cli, ["alias", str(tmp_path), "manuals", "manuals-v1"])
    assert result.exit_code == 0 and "manuals -> manuals-v1" in result.output, result.output
    assert read_aliases(tmp_path) == {"manuals": "manuals-v1"}
    for args, message in ((["manuals", "missing"], "not an index"), (["manuals-v1", "manuals-v1"], "exists"),
                          (["other", "manuals"], "is an alias"), (["bad/name", "manuals-v1"], "NAME")):
        result = runner.invoke(cli, ["alias", str(tmp_path), *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    result = runner.invoke(cli, ["alias", str(tmp_path), "manuals", "--delete"])
    assert result.exit_code == 0 and read_aliases(tmp_path) == {}


# -- collections on a server -------------------------------------------------------------------------------------------

def test_each_collection_answers_from_its_own_index(serving, root):
    _, client = serving
    v1 = client.search(PROBE, top_k=3, collection="manuals-v1")
    v2 = client.search(PROBE, top_k=3, collection="manuals-v2")
    default = client.search(PROBE, top_k=3)
    assert v2.contexts[0].doc_id == "zeppelin" and v2.collection == "manuals-v2"
    assert "zeppelin" not in [c.doc_id for c in v1.contexts] and v1.collection == "manuals-v1"
    assert default.collection == "manuals-v1" and default.index_version == v1.index_version != v2.index_version
    infos, aliases = client.list_collections()
    assert [(c.name, c.status, c.is_default) for c in infos] == [
        ("docs", "SERVING", False), ("manuals-v1", "SERVING", True), ("manuals-v2", "SERVING", False)]
    by_name = {c.name: c for c in infos}
    assert by_name["manuals-v2"].document_count == by_name["manuals-v1"].document_count + 1
    info = client.index_info(collection="manuals-v2")
    assert info.collection == "manuals-v2" and info.version == v2.index_version and info.document_count == 13


def test_an_unknown_collection_is_not_found_naming_the_field(serving):
    running, client = serving
    for call in (lambda: client.search("volcano", collection="nope"),
                 lambda: client.index_info(collection="nope"),
                 lambda: list(client.stream_search([("volcano", True)], collection="nope"))):
        with pytest.raises(RetrieverError) as error:
            call()
        assert error.value.code == grpc.StatusCode.NOT_FOUND and error.value.details.startswith("collection: ")
    with pytest.raises(RetrieverError) as error:
        client.prefetch([pb.SearchRequest(query="dna"), pb.SearchRequest(query="dna", collection="nope")])
    assert error.value.code == grpc.StatusCode.NOT_FOUND and "requests[1].collection" in error.value.details
    with pytest.raises(RetrieverError) as error:
        client.search("volcano", collection="no/such name")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_health_reports_each_collection_and_the_server(serving):
    _, client = serving
    assert [_health(client, s) for s in ("", "rag.v1.Retriever", "docs", "manuals-v2")] == ["SERVING"] * 4
    with pytest.raises(RetrieverError) as error:
        _health(client, "nope")
    assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_collections_of_one_model_share_one_query_encoder(serving):
    running, _ = serving
    collections = running.server.collections.collections
    encoders = {name: c.searcher.encoder for name, c in collections.items()}
    assert encoders["docs"] is encoders["manuals-v1"] is encoders["manuals-v2"]
    assert len(running.server.encoders) == 1


def test_the_cache_keeps_collections_apart_and_a_delete_drops_only_its_own(root, encoder, server_thread, tmp_path):
    extra = _copy_index(root / "docs", tmp_path / "root" / "extra")
    _copy_index(root / "docs", tmp_path / "root" / "docs")
    with server_thread(_config(tmp_path / "root", default_collection="docs"), encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as client:
        store = running.server.servicer.cache.store
        first = client.search("how do glaciers carve valleys", collection="docs")
        assert first.served_from == "miss"
        # The same query, the same data and version, another collection: not the other's entry.
        other = client.search("how do glaciers carve valleys", collection="extra")
        assert other.served_from == "miss" and other.index_version == first.index_version
        assert client.search("how do glaciers carve valleys", collection="extra").served_from == "exact"
        assert len(store) == 2
        assert client.delete_collection("extra", remove_files=True) == other.index_version
        assert len(store) == 1 and not extra.exists()
        assert client.search("how do glaciers carve valleys", collection="docs").served_from == "exact"
        with pytest.raises(RetrieverError) as error:
            client.search("how do glaciers carve valleys", collection="extra")
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert client.health("extra") == "SERVICE_UNKNOWN"
        # Reloading one collection keeps the other's entries.
        client.search("sourdough starter", collection="docs")
        assert client.reload(collection="docs").version == first.index_version
        assert client.search("sourdough starter", collection="docs").served_from == "exact"


def test_a_corrupt_collection_fails_alone_and_the_others_serve(root, encoder, server_thread, tmp_path):
    base = tmp_path / "root"
    _copy_index(root / "docs", base / "good")
    broken = _copy_index(root / "docs", base / "broken")
    text = resolve_version_dir(broken) / "chunk_text.bin"
    data = bytearray(text.read_bytes())
    data[len(data) // 2] ^= 0x20
    text.write_bytes(bytes(data))
    with server_thread(_config(base), encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as client:
        assert client.search("volcano magma", collection="good").contexts[0].doc_id == "volcano"
        with pytest.raises(RetrieverError) as error:
            client.search("volcano magma", collection="broken")
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "broken" in error.value.details and "chunk_text.bin: checksum mismatch" in error.value.details
        infos = {c.name: c for c in client.list_collections()[0]}
        assert infos["broken"].status == "FAILED" and "chunk_text.bin" in infos["broken"].error
        assert infos["good"].status == "SERVING"
        assert (client.health(""), client.health("good"), client.health("broken")) == \
            ("SERVING", "SERVING", "NOT_SERVING")
        # No default: two collections and none named the default.
        with pytest.raises(RetrieverError) as error:
            client.search("volcano magma")
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and error.value.details.startswith("collection:")
        # Repaired and reloaded, it serves.
        text.write_bytes((resolve_version_dir(base / "good") / "chunk_text.bin").read_bytes())
        client.reload(collection="broken")
        assert client.search("volcano magma", collection="broken").collection == "broken"
        assert client.health("broken") == "SERVING"


def test_a_server_with_no_loadable_collection_does_not_start(root, encoder, tmp_path):
    from rag_service.api.server import create_server
    from rag_service.core.errors import IndexFormatError

    broken = _copy_index(root / "docs", tmp_path / "root" / "only")
    (resolve_version_dir(broken) / "bm25_weights.npy").unlink()
    with pytest.raises(IndexFormatError, match="bm25_weights.npy: missing"):
        asyncio.run(create_server(_config(tmp_path / "root"), encoder=encoder))


def test_reload_loads_a_new_folder_of_the_root_as_a_new_collection(root, encoder, server_thread, tmp_path):
    base = tmp_path / "root"
    _copy_index(root / "docs", base / "docs")
    with server_thread(_config(base), encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as client:
        _copy_index(root / "manuals-v2", base / "late")
        with pytest.raises(RetrieverError) as error:
            client.search(PROBE, collection="late")
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert client.reload(collection="late").previous_version == ""
        assert client.search(PROBE, collection="late").contexts[0].doc_id == "zeppelin"
        with pytest.raises(RetrieverError) as error:
            client.reload(collection="outside", path=str(tmp_path))
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "outside the index root" in error.value.details


# -- aliases --------------------------------------------------------------------------------------------------------

def test_aliases_move_atomically_persist_and_guard_deletes(root, encoder, server_thread, tmp_path):
    base = tmp_path / "root"
    for name in ("manuals-v1", "manuals-v2"):
        _copy_index(root / name, base / name)
    config = _config(base)
    with server_thread(config, encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as client:
        assert client.set_alias("manuals", "manuals-v1") == ""
        for _ in range(3):  # a miss, an exact hit, a replay of the request's bytes
            assert client.search(PROBE, collection="manuals").collection == "manuals-v1"
        assert client.health("manuals") == "SERVING"
        assert client.set_alias("manuals", "manuals-v2") == "manuals-v1"
        reply = client.search(PROBE, collection="manuals")
        assert reply.collection == "manuals-v2" and reply.contexts[0].doc_id == "zeppelin"
        assert client.index_info(collection="manuals").aliases == ["manuals"]
        for call, code in ((lambda: client.set_alias("manuals-v1", "manuals-v2"), "INVALID_ARGUMENT"),
                           (lambda: client.set_alias("x", "manuals"), "INVALID_ARGUMENT"),
                           (lambda: client.set_alias("x", "nope"), "NOT_FOUND"),
                           (lambda: client.delete_collection("manuals-v2"), "FAILED_PRECONDITION"),
                           (lambda: client.delete_alias("nope"), "NOT_FOUND")):
            with pytest.raises(RetrieverError) as error:
                call()
            assert error.value.code.name == code, error.value
        # Admin RPCs need the admin token.
        with RetrieverClient(f"127.0.0.1:{running.port}", timeout=30) as anonymous, \
                pytest.raises(RetrieverError) as error:
            anonymous.set_alias("manuals", "manuals-v1")
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert read_aliases(base) == {"manuals": "manuals-v2"}
    # A restarted server comes back with the alias.
    with server_thread(config, encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", admin_token=ADMIN, timeout=60) as client:
        assert client.list_collections()[1] == {"manuals": "manuals-v2"}
        assert client.search(PROBE, collection="manuals").collection == "manuals-v2"
        assert client.delete_alias("manuals") == "manuals-v2"
        assert client.delete_collection("manuals-v2") != ""
        assert read_aliases(base) == {}
        assert [c.name for c in client.list_collections()[0]] == ["manuals-v1"]


def test_an_alias_swap_under_load_fails_no_request(serving):
    running, client = serving
    versions = {c.name: c.version for c in client.list_collections()[0]}
    client.set_alias("live", "manuals-v1")
    stop = threading.Event()
    outcomes: list[tuple[str, str, str, str]] = []  # (status, collection, version, top doc)
    lock = threading.Lock()

    def load(n: int) -> None:
        with RetrieverClient(f"127.0.0.1:{running.port}", timeout=60) as own:
            i = 0
            while not stop.is_set():
                i += 1
                try:  # distinct queries: most are misses that run the pipeline, not cache hits
                    reply = own.search(f"{PROBE} {n} {i}", top_k=3, collection="live")
                    outcome = ("OK", reply.collection, reply.index_version, reply.contexts[0].doc_id)
                except RetrieverError as error:
                    outcome = (error.code.name, error.details, "", "")
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            time.sleep(0.05)
            client.set_alias("live", "manuals-v2" if i % 2 == 0 else "manuals-v1")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        client.delete_alias("live")
    failures = [o for o in outcomes if o[0] != "OK"]
    assert not failures, failures[:5]
    served = Counter(collection for _, collection, _, _ in outcomes)
    assert set(served) == {"manuals-v1", "manuals-v2"}, served
    for _, collection, version, top in outcomes:  # each answer came wholly from the collection it names
        assert version == versions[collection] and (top == "zeppelin") == (collection == "manuals-v2")


def test_a_request_in_flight_finishes_on_the_collection_it_resolved(serving, hold_next_search):
    running, client = serving
    client.set_alias("held", "manuals-v1")
    stub_client = RetrieverClient(f"127.0.0.1:{running.port}", timeout=60)
    with hold_next_search(running.server.servicer) as entered:
        future = stub_client._stub.Search.future(pb.SearchRequest(query=PROBE + " held", collection="held"),
                                                  timeout=60)
        assert entered.wait(30)
        client.set_alias("held", "manuals-v2")
        assert client.search(PROBE + " after", collection="held").collection == "manuals-v2"
    assert future.result().collection == "manuals-v1"
    stub_client.close()
    client.delete_alias("held")


def test_health_watch_of_an_alias_follows_its_collection(serving):
    running, client = serving
    client.set_alias("watched", "manuals-v2")
    stub = health_pb2_grpc.HealthStub(client.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service="watched"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    client.delete_alias("watched")
    assert client.health("watched") == "SERVICE_UNKNOWN"


# -- two models --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second real model, made offline: the packaged MiniLM cut to its first 3 transformer layers (other weights in
    use, other vectors; the same 384 dimensions)."""
    from sentence_transformers import SentenceTransformer

    from rag_service.encoder.encode import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu")
    transformer = model[0].auto_model
    transformer.encoder.layer = transformer.encoder.layer[:3]
    transformer.config.num_hidden_layers = 3
    out = tmp_path_factory.mktemp("models") / "minilm-l3"
    model.save(str(out))
    return out


@pytest.mark.slow
def test_two_collections_with_different_models_answer_independently(root, other_model, encoder, server_thread,
                                                                      tmp_path, write_corpus):
    import numpy as np

    from rag_service.encoder.encode import Encoder
    from rag_service.index.build import BuildConfig, build_index

    base = tmp_path / "root"
    _copy_index(root / "manuals-v1", base / "stock")
    _copy_index(root / "docs", base / "stock-copy")
    docs = [json.loads(line) for line in (root.parent / "corpus_v2.jsonl").read_text().splitlines()]
    build_index(write_corpus(tmp_path / "corpus.jsonl", docs), base / "small-model",
                BuildConfig(chunk_tokens=64, chunk_overlap=16), encoder=Encoder(str(other_model)), progress=False)
    # The int8 graphs the indexes carry: the small model's collection cannot borrow the test's torch encoder.
    with server_thread(_config(base, encoder={"backend": "onnx-int8"}), encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", timeout=60) as client:
        infos = {c.name: c for c in client.list_collections()[0]}
        assert infos["small-model"].embedding_model == "minilm-l3"
        assert infos["stock"].embedding_model == infos["stock-copy"].embedding_model == encoder.name
        searchers = {name: c.searcher for name, c in running.server.collections.collections.items()}
        assert searchers["stock"].encoder is searchers["stock-copy"].encoder is not searchers["small-model"].encoder
        assert searchers["small-model"].encoder.name == "minilm-l3" and len(running.server.encoders) == 2
        a, b = (searchers[n].encoder.encode_queries([PROBE])[0] for n in ("stock", "small-model"))
        assert float(np.dot(a, b)) < 0.99  # two models, two vectors for one query
        small = client.search(PROBE, top_k=3, collection="small-model", debug=True)
        stock = client.search(PROBE, top_k=3, collection="stock", debug=True)
        assert small.contexts[0].doc_id == "zeppelin" and "zeppelin" not in [c.doc_id for c in stock.contexts]
        assert small.served_from == stock.served_from == "miss"
        assert small.contexts[0].dense_score != stock.contexts[0].dense_score
        assert client.index_info(collection="small-model").embedding_model == "minilm-l3"


def test_sighup_loads_new_folders_and_takes_the_aliases_file(root, encoder, server_thread, tmp_path):
    """`rag-index build` + `rag-index alias` + SIGHUP (RagServer.reload_all) switch an alias with no RPC."""
    base = tmp_path / "root"
    _copy_index(root / "manuals-v1", base / "manuals-v1")
    update_aliases(base, lambda a: a.__setitem__("manuals", "manuals-v1"))
    with server_thread(_config(base, default_collection="manuals"), encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", timeout=60) as client:
        assert client.search(PROBE).collection == "manuals-v1"
        _copy_index(root / "manuals-v2", base / "manuals-v2")
        update_aliases(base, lambda a: a.__setitem__("manuals", "manuals-v2"))
        before = running.server.collections.collections["manuals-v1"].searcher
        asyncio.run_coroutine_threadsafe(running.server.reload_all(), running.loop).result(timeout=300)
        reply = client.search(PROBE)
        assert reply.collection == "manuals-v2" and reply.contexts[0].doc_id == "zeppelin"
        # manuals-v1's CURRENT did not move: it was not loaded again.
        assert running.server.collections.collections["manuals-v1"].searcher is before


def test_the_cache_store_holds_collections_of_two_vector_sizes_and_drops_one_alone():
    """Collections of models of different sizes share one store: each size its own embedding matrix; a new version or
    a delete of one collection drops its entries only."""
    import numpy as np

    from rag_service.core.config import CacheConfig
    from rag_service.core.params import SearchResult
    from rag_service.search.cache import CacheStore, Entry

    store = CacheStore(CacheConfig())

    def put(collection: str, version: str, query: str, vector: list[float]) -> Entry:
        scope = (collection, version)
        store.use_version(collection, version)
        unit = np.asarray(vector, dtype=np.float32) / np.linalg.norm(vector)
        entry = Entry(key=(scope, query, ()), group=(scope, ()),
                      result=SearchResult(contexts=[], index_version=version, stage_us={}), vector=unit,
                      lexical=np.zeros(0, np.int64), terms={}, polarity=(), signature=(query,), nbytes=1000,
                      inserted=store.clock())
        assert store.put(entry)
        return entry

    small = put("small", "v1", "q", [1, 0, 0, 0])
    big = put("big", "w1", "q", [0, 1, 0, 0, 0, 0, 0, 0])
    assert [e for e, _ in store.nearest(small.group, small.vector, 0.9, 4)] == [small]
    assert [e for e, _ in store.nearest(big.group, big.vector, 0.9, 4)] == [big]
    assert store.nearest(small.group, big.vector, 0.9, 4) == []  # another group: nothing, whatever the size
    store.use_version("small", "v2")  # a reload of one collection
    assert len(store) == 1 and store.get(big.key) is big
    put("small", "v2", "q", [1, 0, 0, 0])
    assert store.drop("big") == 1 and len(store) == 1 and store.get(big.key) is None
