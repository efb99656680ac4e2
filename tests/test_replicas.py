"""Replicas (issue 8): identical rag-serve processes behind gRPC's own round_robin, each naming itself in its replies
(x-served-by), and a rolling switch to a new index version that loses no request. Real processes, real channels,
real small indexes built here."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from rag_service.client import RetrieverClient, RetrieverError, replica_target, service_config
from rag_service.index.load import resolve_version_dir
from rag_service.index.manifest import MANIFEST_FILE
from rag_service.index.publish import CURRENT

# Tests import in importlib mode (no tests/ on sys.path): load the harness beside this file by its path.
if "netlab" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("netlab", Path(__file__).with_name("netlab.py"))
    sys.modules["netlab"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["netlab"])
netlab = sys.modules["netlab"]

ADMIN = "replicas-admin-token"
# Only the new version holds this document: a reply's top hit says which version produced it.
ONLY_IN_NEW = {"_id": "zeppelin", "title": "Zeppelins", "text": "A zeppelin is a rigid airship whose hydrogen-filled "
               "gas cells hang inside an aluminium frame, flown across the Atlantic in the 1930s."}
PROBE = "rigid airship hydrogen zeppelin"


def test_service_config_is_round_robin_with_retries_on_unavailable():
    config = json.loads(service_config(load_balancing="round_robin", retries=2))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Search", "SearchBatch", "StreamSearch", "GetIndexInfo",
                                                     "Prefetch", "ListCollections"}
    assert all(n["service"] == "rag.v1.Retriever" for n in method["name"])
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert "methodConfig" not in json.loads(service_config(retries=0))
    with pytest.raises(ValueError, match="retries"):
        service_config(retries=5)
    with pytest.raises(ValueError, match="load_balancing"):
        service_config(load_balancing="least_request")  # type: ignore[arg-type]  # the bad value under test
    with pytest.raises(ValueError, match="not both"):
        RetrieverClient("localhost:1", retries=1, options=[("grpc.service_config", "{}")])
    with pytest.raises(ValueError, match="keepalive"):
        RetrieverClient("localhost:1", keepalive=0)


def test_replica_target():
    assert replica_target(["10.0.0.5:50051", " 10.0.0.6:50051"]) == "ipv4:///10.0.0.5:50051,10.0.0.6:50051"
    assert replica_target(["[fd00::5]:50051", "[fd00::6]:50051"]) == "ipv6:///[fd00::5]:50051,[fd00::6]:50051"
    with pytest.raises(ValueError, match="mix"):
        replica_target(["10.0.0.5:1", "[fd00::6]:1"])
    with pytest.raises(ValueError, match="at least one"):
        replica_target([" "])


def test_replies_name_the_replica(served_index, caplog):
    """In-process server: the default name is host:pid, in replies, in errors and in the request log."""
    import socket

    caplog.set_level(logging.INFO, logger="rag_service.access")
    name = f"{socket.gethostname()}:{os.getpid()}"
    with RetrieverClient(f"127.0.0.1:{served_index.port}", load_balancing="round_robin", retries=1) as client:
        assert client.search("glacier ice", top_k=1).served_by == name
        with pytest.raises(RetrieverError) as error:
            client.search("glacier", top_k=0)
    assert error.value.code.name == "INVALID_ARGUMENT" and error.value.served_by == name
    # An aborted call's status reaches the client before the server's log line is written: give it a moment.
    deadline = time.monotonic() + 10
    while True:
        logged = [(r.code, r.served_by) for r in caplog.records if r.name == "rag_service.access"]
        if ("INVALID_ARGUMENT", name) in logged or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert ("OK", name) in logged and ("INVALID_ARGUMENT", name) in logged


def _version(version_dir: Path) -> str:
    return json.loads((version_dir / MANIFEST_FILE).read_text())["version"]


@pytest.fixture
def versioned_root(built_index, tmp_path) -> Path:
    """An index root whose CURRENT is the shared test index's version (the "old" version)."""
    root = tmp_path / "idx"
    root.mkdir()
    old = resolve_version_dir(built_index)
    shutil.copytree(old, root / old.name)
    os.symlink(old.name, root / CURRENT)
    return root


@pytest.mark.slow
def test_rolling_reload_across_replicas_loses_no_request(versioned_root, built_index, encoder, write_corpus, tmp_path):
    from rag_service.index.build import BuildConfig, build_index

    names = ["r1", "r2", "r3"]
    replicas = [netlab.rag_serve(name, ["--index", str(versioned_root), "--port", "0", "--workers", "1"],
                                 env={"RAG_AUTH__ADMIN_TOKEN": ADMIN, "RAG_WARMUP_QUERIES": "1"}, log_dir=tmp_path)
                for name in names]
    try:
        addresses = [r.wait_serving() for r in replicas]
        old_version = _version(resolve_version_dir(versioned_root))
        outcomes: list[tuple[float, str, str, str, str]] = []  # (sent, status, served_by, version, top doc)
        lock, stop = threading.Lock(), threading.Event()
        client = RetrieverClient(replica_target(addresses), load_balancing="round_robin", retries=2, timeout=30)

        def load() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.search(PROBE, top_k=3)
                    outcome = (sent, "OK", r.served_by, r.index_version, r.contexts[0].doc_id)
                except RetrieverError as error:
                    outcome = (sent, error.code.name, error.served_by, error.details, "")
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            # Publish the new version while the replicas serve the old one (CURRENT moves; nobody reloads yet).
            docs = [json.loads(line) for line in (built_index.parent / "corpus.jsonl").read_text().splitlines()]
            corpus = write_corpus(tmp_path / "corpus_new.jsonl", [*docs, ONLY_IN_NEW])
            new_dir = build_index(corpus, versioned_root, BuildConfig(chunk_tokens=64, chunk_overlap=16),
                                  encoder=encoder, progress=False)
            new_version = _version(new_dir)
            reloaded_at: dict[str, float] = {}
            for name, replica, address in zip(names, replicas, addresses):
                time.sleep(0.5)
                if name == "r3":  # the other way an operator reloads: SIGHUP, then watch the replica's version
                    replica.proc.send_signal(signal.SIGHUP)
                    with RetrieverClient(address, timeout=10) as one:
                        deadline = time.monotonic() + 60
                        while one.index_info().version != new_version:
                            assert time.monotonic() < deadline, "SIGHUP reload did not finish"
                            time.sleep(0.05)
                else:
                    with RetrieverClient(address, admin_token=ADMIN, timeout=60) as one:
                        reply = one.reload("")  # "" follows CURRENT anew: the version just published
                    assert (reply.previous_version, reply.version) == (old_version, new_version)
                reloaded_at[name] = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
            client.close()
    finally:
        codes = [r.stop() for r in replicas]
    assert codes == [0, 0, 0], [r.log_path.read_text()[-2000:] for r in replicas]

    failures = [o for o in outcomes if o[1] != "OK"]
    assert not failures, failures[:5]
    # round_robin spread the load over every replica, about evenly.
    spread = Counter(o[2] for o in outcomes)
    assert set(spread) == set(names), spread
    assert min(spread.values()) >= len(outcomes) / len(names) / 3, spread
    # Both versions answered during the roll, and each reply came wholly from the version it names.
    assert Counter(o[3] for o in outcomes).keys() == {old_version, new_version}
    for _, _, _, version, top in outcomes:
        assert (top == ONLY_IN_NEW["_id"]) == (version == new_version), (version, top)
    # A request sent to a replica after its reload returned was answered by the new version.
    for sent, _, served_by, version, _ in outcomes:
        if sent > reloaded_at[served_by]:
            assert version == new_version, (served_by, version)
    assert sum(1 for o in outcomes if o[0] > max(reloaded_at.values())) > 0
