"""Index lifecycle on a running server: ReloadIndex under continuous load, and corrupt indexes refused at load and at
reload while the current index keeps serving. Real indexes built by the build code, a real server, real channels."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest

from rag_service.api.loader import load_searcher
from rag_service.core.config import ServerConfig
from rag_service.core.errors import IndexFormatError
from rag_service.index.load import resolve_version_dir
from rag_service.index.manifest import MANIFEST_FILE
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

ADMIN = "reload-admin-token"
AUTH = (("authorization", f"Bearer {ADMIN}"),)

# Version B adds a document that only it holds: the query below finds it first on B and cannot find it on A.
ONLY_IN_B = {"_id": "zeppelin", "title": "Zeppelins", "text": "A zeppelin is a rigid airship whose hydrogen-filled "
             "gas cells hang inside an aluminium frame, flown across the Atlantic in the 1930s."}
PROBE = "rigid airship hydrogen zeppelin"


@pytest.fixture(scope="module")
def two_versions(built_index, encoder, write_corpus, tmp_path_factory):
    """An index root holding version A (a copy of the shared test index) and version B (A's documents + one)."""
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("reload")
    root = work / "idx"
    root.mkdir()
    a = resolve_version_dir(built_index)
    shutil.copytree(a, root / a.name)
    # The shared fixture writes its corpus beside the index root.
    docs = [json.loads(line) for line in (built_index.parent / "corpus.jsonl").read_text().splitlines()] + [ONLY_IN_B]
    corpus = write_corpus(work / "corpus_b.jsonl", docs)
    b = build_index(corpus, root, BuildConfig(chunk_tokens=64, chunk_overlap=16), encoder=encoder, progress=False)
    versions = {}
    for d in (root / a.name, b):
        versions[d.name] = json.loads((d / MANIFEST_FILE).read_text())["version"]
    return root, root / a.name, b, versions


@pytest.fixture(scope="module")
def reloading(two_versions, encoder, server_thread):
    root, a, _, _ = two_versions
    config = ServerConfig(index=a, index_root=root, port=0, workers=2, warmup_queries=1, auth={"admin_token": ADMIN})
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, pb_grpc.RetrieverStub(channel)


@pytest.mark.slow
def test_reload_under_continuous_load_fails_no_request(reloading, two_versions):
    running, stub = reloading
    _, a, b, versions = two_versions
    stop = threading.Event()
    outcomes: list[tuple[str, str, str]] = []  # (status, index_version, top doc)
    lock = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            try:
                reply = stub.Search(pb.SearchRequest(query=PROBE, top_k=3), timeout=60)
                outcome = ("OK", reply.index_version, reply.contexts[0].doc_id)
            except grpc.RpcError as error:
                outcome = (error.code().name, error.details(), "")
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    swaps = []
    try:
        for i in range(8):
            target = (b if i % 2 == 0 else a).name
            reply = stub.ReloadIndex(pb.ReloadIndexRequest(path=target), metadata=AUTH, timeout=120)
            swaps.append((reply.previous_version, reply.version))
            assert reply.version == versions[target]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failures = [o for o in outcomes if o[0] != "OK"]
    assert not failures, failures[:5]
    labels = Counter(version for _, version, _ in outcomes)
    assert set(labels) <= set(versions.values()) and len(labels) == 2, labels
    # Each answer came wholly from the version it names: only B knows the zeppelin.
    for _, version, top in outcomes:
        assert (top == "zeppelin") == (version == versions[b.name]), (version, top)
    assert [s[1] for s in swaps[:-1]] == [s[0] for s in swaps[1:]]  # every swap started from the previous one
    assert running.server.metrics.registry.get_sample_value("rag_index_reloads_total", {"result": "ok"}) >= 8
    assert stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30).version == versions[a.name]


def test_in_flight_requests_finish_on_the_index_they_started_on(reloading, two_versions, hold_next_search):
    """A request that picked its pipeline before the swap is answered by that pipeline even if it runs after."""
    running, stub = reloading
    _, a, b, versions = two_versions
    stub.ReloadIndex(pb.ReloadIndexRequest(path=a.name), metadata=AUTH, timeout=120)
    with hold_next_search(running.server.servicer) as entered:
        future = stub.Search.future(pb.SearchRequest(query=PROBE), timeout=60)
        assert entered.wait(30)
        reply = stub.ReloadIndex(pb.ReloadIndexRequest(path=b.name), metadata=AUTH, timeout=120)
        assert reply.version == versions[b.name]
    assert future.result().index_version == versions[a.name]
    assert stub.Search(pb.SearchRequest(query=PROBE), timeout=30).index_version == versions[b.name]


# Integrity --------------------------------------------------------------------------------------------------------


def _truncate(d: Path) -> str:
    path = d / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-100])
    return "vectors.npy: size mismatch"


def _flip(d: Path) -> str:
    path = d / "chunk_text.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    return "chunk_text.bin: checksum mismatch"


def _delete(d: Path) -> str:
    (d / "bm25_weights.npy").unlink()
    return "bm25_weights.npy: missing"


def _edit_manifest(d: Path, **changes) -> None:
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))


def _format(d: Path) -> str:
    _edit_manifest(d, format_version=99)
    return "manifest.json: unknown format_version 99"


def _model(d: Path) -> str:
    _edit_manifest(d, model={"name": "sentence-transformers/some-other-model"})
    return "manifest.json: index was built with model 'sentence-transformers/some-other-model'"


CORRUPTIONS = {"truncated": _truncate, "flipped byte": _flip, "deleted file": _delete, "format version": _format,
               "model mismatch": _model}


@pytest.fixture(scope="module")
def corrupt_versions(two_versions):
    """One corrupt copy of version A per kind of damage, inside the served index root."""
    root, a, _, _ = two_versions
    made = {}
    for kind, corrupt in CORRUPTIONS.items():
        d = root / f"v-corrupt-{kind.replace(' ', '-')}"
        shutil.copytree(a, d)
        made[kind] = (d, corrupt(d))
    return made


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_index_fails_to_load_naming_the_file(corrupt_versions, encoder, kind):
    d, expected = corrupt_versions[kind]
    with pytest.raises(IndexFormatError) as info:
        load_searcher(ServerConfig(index=d, warmup_queries=0), encoder)
    assert str(d / expected.split(":")[0]) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_reload_is_refused_and_the_current_index_keeps_serving(reloading, corrupt_versions, two_versions,
                                                                        kind):
    running, stub = reloading
    _, a, _, versions = two_versions
    stub.ReloadIndex(pb.ReloadIndexRequest(path=a.name), metadata=AUTH, timeout=120)
    d, expected = corrupt_versions[kind]
    with pytest.raises(grpc.RpcError) as info:
        stub.ReloadIndex(pb.ReloadIndexRequest(path=d.name), metadata=AUTH, timeout=120)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in info.value.details()
    reply = stub.Search(pb.SearchRequest(query="volcano magma"), timeout=30)
    assert reply.index_version == versions[a.name] and reply.contexts[0].doc_id == "volcano"
    assert running.server.metrics.registry.get_sample_value("rag_index_reloads_total", {"result": "failed"}) >= 1
