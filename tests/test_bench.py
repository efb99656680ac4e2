"""rag-bench end to end on tiny corpora: latency against real servers, quality on BEIR folders written here, and the
peer comparison with every system. Figures are never asserted (bench/README.md holds them); shapes, counts and the
open-loop accounting are."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench import latency as lat

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rag_service.cli.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def write_beir(folder: Path, corpus: Path | None, queries: dict[str, str], qrels: dict[str, dict[str, int]],
               split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    if corpus is not None:
        shutil.copy(corpus, folder / "corpus.jsonl")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for doc, grade in docs.items():
                f.write(f"{qid}\t{doc}\t{grade}\n")
    return folder


# The served test index's corpus (tests/conftest.py SERVER_DOCS) and questions with one right answer each.
QUERIES = {"q1": "volcanic eruption of lava and ash", "q2": "how plants make sugar from sunlight",
           "q3": "Roman stone arches carrying water", "q4": "double helix genetic code",
           "q5": "how fast does light travel", "q6": "wild yeast fermented bread starter"}
QRELS = {"q1": {"volcano": 1}, "q2": {"photosynthesis": 1}, "q3": {"aqueduct": 2}, "q4": {"dna": 1},
         "q5": {"light": 1}, "q6": {"bread": 1}}


def served_corpus(built_index: Path) -> Path:
    corpus = built_index.parent / "corpus.jsonl"  # where the built_index fixture wrote the corpus it indexed
    assert corpus.is_file(), corpus
    return corpus


# Schedules --------------------------------------------------------------------------------------------------------


def test_schedules_are_fixed_in_advance_and_seeded():
    constant = lat.schedule(50, 2.0, "constant", np.random.default_rng(0))
    assert len(constant) == 100 and np.allclose(np.diff(constant), 0.02)
    a = lat.schedule(200, 5.0, "poisson", np.random.default_rng(7))
    b = lat.schedule(200, 5.0, "poisson", np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert 800 < len(a) < 1200 and a.max() < 5.0 and np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="rate"):
        lat.schedule(0, 1.0, "constant", np.random.default_rng(0))
    with pytest.raises(ValueError, match="arrival"):
        lat.schedule(10, 1.0, "bursty", np.random.default_rng(0))


# Open loop: a stall is charged to every request scheduled during it ----------------------------------------------


class StallingHealth(health_pb2_grpc.HealthServicer):
    """Answers at once, except that one call holds the only worker thread for `stall` seconds."""

    def __init__(self, stall_on: int, stall: float) -> None:
        self.calls = 0
        self.stall_on, self.stall = stall_on, stall
        self.lock = threading.Lock()

    def Check(self, request, context):
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == self.stall_on:
            time.sleep(self.stall)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_open_loop_charges_a_server_stall_to_every_request_scheduled_during_it():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(StallingHealth(stall_on=20, stall=0.3), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        offsets = lat.schedule(100, 1.0, "constant", np.random.default_rng(0)).tolist()
        task = lat.WorkerTask(target=f"127.0.0.1:{port}", kind="floor", offsets=offsets, query_ids=[0] * 100,
                              queries=["unused"], warmup_s=0.0, start_at=time.monotonic() + 0.5,
                              options=lat.RequestOptions(timeout_s=5.0, budget_ms=100))
        part = lat.run_worker(task)
    finally:
        server.stop(0)
    histogram = lat.decode(part["latency"])
    assert part["ok"] == part["sent"] == 100 and not part["errors"]
    # Requests 20..49 were scheduled while call 20 held the server: measured from their scheduled send times, about
    # 30 of them wait 0.3 s down to a few ms. A closed-loop client would have recorded one slow call and 99 fast ones.
    values = [(item.value_iterated_to, item.count_at_value_iterated_to)
              for item in histogram.get_recorded_iterator()]
    slow = sum(count for value, count in values if value >= 100_000)
    assert histogram.get_max_value() >= 280_000
    assert slow >= 15, values
    assert histogram.get_value_at_percentile(50) < 200_000  # most requests were not behind the stall
    # Answered within the 100 ms budget, from the scheduled send: every request but the ones the stall delayed past
    # it (the histogram's buckets are approximate near 100 ms, the worker's count is exact).
    assert abs(part["within_budget"] - (100 - slow)) <= 2 and part["within_budget"] < 100


def test_latency_requests_carry_the_budget_only_when_given():
    def requests(**options):
        task = lat.WorkerTask(target="unused", kind="search", offsets=[0.0, 0.1], query_ids=[0, 1],
                              queries=["first query", "second query"], warmup_s=0.0, start_at=0.0,
                              options=lat.RequestOptions(**options))
        return lat._search_requests(task)

    assert all(r.HasField("budget_ms") and r.budget_ms == 25 for r in requests(budget_ms=25))
    assert not any(r.HasField("budget_ms") for r in requests())
    # Stage timings by default, without debug's per-context work; debug only when asked.
    assert all(r.profile and not r.debug for r in requests())
    assert all(r.debug and not r.profile for r in requests(debug=True, profile=False))


# Latency against a real server ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_latency_merges_client_processes_and_reports_floor_and_stages(served_index, tmp_path):
    from rag_service.bench.plots import latency_plots

    config = lat.LatencyConfig(target=f"127.0.0.1:{served_index.port}", queries=list(QUERIES.values()),
                               rates=[20.0, 40.0], duration_s=1.0, warmup_s=0.3, processes=2, seed=3)
    seen = []
    report = lat.run_latency(config, progress=lambda done, total: seen.append((done, total)))
    assert report["processes"] == 2 and [r["offered_qps"] for r in report["rates"]] == [20.0, 40.0]
    for row in report["rates"]:
        for kind in ("floor", "search"):
            r = row[kind]
            assert r["sent"] == round(row["offered_qps"] * 1.0), r  # measured window only, both processes merged
            assert r["ok"] + sum(r["errors"].values()) == r["sent"]
            ms = r["latency_ms"]
            assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["p99.9"] <= ms["max"]
            assert lat.decode(r["histogram"]).get_total_count() == r["ok"]
        assert {"encode", "lexical", "dense", "fusion"} <= set(row["search"]["stages_ms"])
        assert set(row["ratio_to_floor"]) == {"p50", "p99", "p99.9"}
    assert seen[-1][0] == seen[-1][1] == sum(round(r * 1.3) for r in (20, 40)) * 2
    table = lat.format_table(report)
    assert re.search(r"^\s+20 search\s+\d", table, re.M) and "server-side stages" in table
    for path in latency_plots(report, tmp_path):
        assert path.read_bytes().startswith(PNG)


@pytest.mark.slow
def test_rag_bench_latency_serves_an_index_and_writes_json_table_and_plots(built_index, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES.values()) + "\n")  # plain lines work as well as BEIR queries.jsonl
    out = tmp_path / "latency.json"
    result = run_cli("latency", "--index", str(built_index), "--queries", str(queries), "--qps", "10,20,30",
                     "--duration", "1", "--warmup", "0.3", "--json", str(out), "--plots", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [r["offered_qps"] for r in report["rates"]] == [10, 20, 30]
    assert all(r["search"]["ok"] > 0 and r["floor"]["ok"] > 0 for r in report["rates"])
    assert report["request"]["cache"] == "bypass" and report["queries"] == len(QUERIES)
    for rate in ("10", "20", "30"):
        assert re.search(rf"^\s+{rate} floor .*\n\s+{rate} search ", result.stdout, re.M), result.stdout
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latency_distribution.png",
                                                                       "latency_percentiles.png"]


def test_rag_bench_latency_refuses_bad_arguments(tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("a query\n")
    result = run_cli("latency", "--target", "127.0.0.1:1", "--queries", str(queries), "--qps", "10,-5")
    assert result.returncode == 2 and "--qps" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("latency", "--queries", str(queries))
    assert result.returncode == 2 and "--target" in result.stderr


# Quality ----------------------------------------------------------------------------------------------------------


def test_paired_tests_agree_with_scipy():
    from scipy import stats

    from rag_service.bench.quality import paired_tests

    rng = np.random.default_rng(0)
    a, b = rng.random(40), rng.random(40)
    values = {"x": {"nDCG@10": {str(i): float(v) for i, v in enumerate(a)}},
              "y": {"nDCG@10": {str(i): float(v) for i, v in enumerate(b)}}}
    t = paired_tests(values, "x", "y")["nDCG@10"]
    assert t["ttest_p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert t["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert t["mean_diff"] == pytest.approx(float(np.mean(a - b)))
    assert t["wins"] + t["losses"] == 40
    same = paired_tests({"x": values["x"], "z": values["x"]}, "x", "z")["nDCG@10"]
    assert same["ttest_p"] == same["wilcoxon_p"] == 1.0 and same["mean_diff"] == 0


def test_method_specs_name_the_bad_part():
    from rag_service.bench.quality import parse_method

    assert parse_method("fused").kind == "fused"
    method = parse_method("shallow=pipeline:rerank=off,depth=50,mmr_lambda=0.7,fusion=rrf")
    assert method.name == "shallow" and method.overrides == {"rerank": False, "depth": 50, "mmr_lambda": 0.7,
                                                              "fusion": "rrf"}
    for spec, message in (("magic", "expected bm25"), ("x=pipeline:colour=red", "colour"),
                          ("x=pipeline:rerank=maybe", "on/off"), ("x=pipeline:depth=deep", "number")):
        with pytest.raises(ValueError, match=message):
            parse_method(spec)


@pytest.mark.slow
def test_rag_bench_quality_several_datasets_pipeline_rows_and_significance(built_index, tmp_path):
    first = write_beir(tmp_path / "first", None, dict(list(QUERIES.items())[:3]), dict(list(QRELS.items())[:3]))
    second = write_beir(tmp_path / "second", None, QUERIES, QRELS)
    out = tmp_path / "quality.json"
    result = run_cli("quality", "--dataset", f"first={built_index}:{first}", "--dataset",
                     f"second={built_index}:{second}", "--method", "bm25", "--method", "fused", "--method",
                     "pipeline", "--method", "narrow=pipeline:depth=2,top_k=1", "--significance", "fused,bm25",
                     "--per-query", "--encoder", "onnx-int8", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["datasets"]) == ["first", "second"]
    # The fast path's quantized encoder, from the ONNX export rag-index put inside the index.
    assert all(d["encoder_kind"] == "onnx-int8" and "onnx-int8" in d["encoder"] for d in report["datasets"].values())
    assert report["datasets"]["first"]["queries"] == 3 and report["datasets"]["second"]["queries"] == 6
    for data in report["datasets"].values():
        assert list(data["results"]) == ["bm25", "fused", "pipeline", "narrow"]
        assert data["methods"]["narrow"] == {"kind": "pipeline", "overrides": {"depth": 2, "top_k": 1}}
        assert all(0.0 <= v <= 1.0 for row in data["results"].values() for v in row.values())
        assert data["results"]["pipeline"]["nDCG@10"] > 0.5
        # top_k 1 leaves one document per query: recall@100 can be no better than the full pipeline's.
        assert data["results"]["narrow"]["R@100"] <= data["results"]["pipeline"]["R@100"]
        (test,) = data["significance"]
        assert set(test) == {"nDCG@10", "R@100", "RR@10"}
        assert all(0.0 <= t["ttest_p"] <= 1.0 and 0.0 <= t["wilcoxon_p"] <= 1.0 for t in test.values())
        assert len(data["per_query"]["fused"]["nDCG@10"]) == data["queries"]
    assert result.stdout.count("fused vs bm25 nDCG@10") == 2
    assert re.search(r"^narrow\s+[01]\.\d{4}", result.stdout, re.M)

    bad = run_cli("quality", "--dataset", f"first={built_index}:{tmp_path / 'missing'}")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


# Peers side by side -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_runs_every_system_interleaved_on_the_same_queries(served_index, built_index, tmp_path):
    from rag_service.bench.compare import SYSTEMS, CompareConfig, format_table, run_compare
    from rag_service.bench.plots import compare_plots

    beir = write_beir(tmp_path / "tiny", served_corpus(built_index), QUERIES, QRELS)
    config = CompareConfig(corpus=beir, queries=QUERIES, qrels=QRELS, index=built_index,
                           target=f"127.0.0.1:{served_index.port}", warmup=2, cache_dir=tmp_path / "cache")
    report = run_compare(config)
    assert list(report["systems"]) == list(SYSTEMS)
    assert report["queries"] == report["judged_queries"] == len(QUERIES)
    for name, row in report["systems"].items():
        assert lat.decode(row["histogram"]).get_total_count() == len(QUERIES), name
        assert row["latency_ms"]["p50"] > 0 and row["qps_one_client"] > 0
        # Six unambiguous questions over twelve documents: every system finds most answers.
        assert row["ndcg@10"] >= 0.6, (name, row)
        assert row["build_seconds"] is not None and row["disk_mib"] is not None
        assert set(row["ratio_to_rag_service"]) == {"p50", "p99", "qps"}
    assert report["systems"]["rag-service"]["ratio_to_rag_service"]["p50"] == 1.0
    assert not report["document_encode"]["cached"]
    assert (tmp_path / "cache" / "embeddings").is_dir()
    # A second run reuses the cached document vectors.
    again = run_compare(CompareConfig(corpus=beir, queries=QUERIES, qrels=QRELS, systems=["bm25s"], warmup=0,
                                      cache_dir=tmp_path / "cache"))
    assert again["document_encode"]["cached"] and list(again["systems"]) == ["bm25s"]
    assert "ratio_to_rag_service" not in again["systems"]["bm25s"]
    table = format_table(report)
    for name in SYSTEMS:
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d\d", table, re.M), table
    for path in compare_plots(report, tmp_path / "plots"):
        assert path.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="unknown"):
        run_compare(CompareConfig(corpus=beir, queries=QUERIES, systems=["elasticsearch"]))


# Scale runs -------------------------------------------------------------------------------------------------------


def test_synthetic_corpora_are_seeded_and_hash_embeddings_deterministic(tmp_path):
    from rag_service.bench import synthetic
    from rag_service.bench.data import load_qrels, load_queries

    a = synthetic.generate(tmp_path / "a", 300, queries=20, seed=5, vocab_size=2000)
    b = synthetic.generate(tmp_path / "b", 300, queries=20, seed=5, vocab_size=2000)
    assert (a / "corpus.jsonl").read_bytes() == (b / "corpus.jsonl").read_bytes()
    lines = (a / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == 300
    queries, qrels = load_queries(a / "queries.jsonl"), load_qrels(a / "qrels" / "test.tsv")
    assert len(queries) == 20 and set(qrels) == set(queries)
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in lines}
    for qid, text in queries.items():
        (doc,) = qrels[qid]
        assert set(text.split()) <= set(corpus[doc].split())  # a known item: its words come from its passage
    vectors = synthetic.hash_embed(["alpha beta", "alpha beta", "gamma", ""])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.array_equal(vectors[0], vectors[1]) and np.isclose(np.linalg.norm(vectors[2]), 1.0)
    assert not vectors[3].any()


@pytest.mark.slow
def test_scale_run_builds_a_hashed_index_and_times_the_peers(tmp_path, encoder):
    from rag_service.bench.plots import scale_plot
    from rag_service.bench.scale import format_table, run_scale
    from rag_service.index.load import load_index

    report = run_scale([80, 160], tmp_path, systems=["bm25s", "ensemble", "lancedb (vector given)"], queries=8,
                       warmup=1, encoder=encoder, log=lambda line: None, excluded={"ensemble": "measured: too big"})
    assert [run["passages"] for run in report["runs"]] == [80, 160]
    for run in report["runs"]:
        assert run["corpus"]["documents"] == run["passages"] and run["queries"] == 8
        assert list(run["systems"]) == ["bm25s", "lancedb (vector given)"]
        assert run["did_not_fit"] == {"ensemble": "measured: too big"}
        assert run["dense_recall"] is None  # a flat index at this size: exact by construction
        # Hashed document vectors against model-encoded queries: latency is real, the rankings are not judged here.
        assert all(0.0 <= row["recall@10"] <= 1.0 for row in run["systems"].values())
        assert "hash_embed" in run["embeddings"]
    index = load_index(tmp_path / "synthetic" / "idx-n160-s0")
    assert index.n_docs == 160
    assert "160" in format_table(report) and "ensemble did not fit: measured: too big" in format_table(report)
    assert scale_plot(report, tmp_path / "scale.png").read_bytes().startswith(PNG)


def test_hash_embed_equals_the_word_by_word_definition():
    import zlib

    from rag_service.bench import synthetic

    texts = ["Alpha beta alpha", "", "gamma  delta\tEPSILON", "alpha"] * 3 + [f"w{i} x{i % 7}" for i in range(50)]
    expected = np.zeros((len(texts), 384), np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            h = zlib.crc32(word.encode())
            expected[row, h % 384] += 1.0 if (h >> 16) & 1 else -1.0
    expected /= np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-12)
    assert np.array_equal(synthetic.hash_embed(texts), expected)


def test_compare_times_its_systems_with_the_setup_s_objects_frozen(built_index, tmp_path, monkeypatch):
    """The objects made before the timed loop (corpus, indexes, model) are not scanned by the collections the loop
    starts: gc is frozen while the systems are timed, and thawed after."""
    import gc

    from rag_service.bench import peers as peers_mod
    from rag_service.bench.compare import CompareConfig, run_compare

    beir = write_beir(tmp_path / "tiny", served_corpus(built_index), QUERIES, QRELS)
    frozen: list[int] = []
    real = peers_mod.Bm25sPeer.search

    def search(self, query, k):
        frozen.append(gc.get_freeze_count())
        return real(self, query, k)

    monkeypatch.setattr(peers_mod.Bm25sPeer, "search", search)
    run_compare(CompareConfig(corpus=beir, queries=QUERIES, qrels=QRELS, systems=["bm25s"], warmup=1,
                              cache_dir=tmp_path / "cache"))
    assert frozen and min(frozen) > 0
    assert gc.get_freeze_count() == 0


def test_dense_recall_compares_hnsw_with_exact_search(tmp_path):
    from rag_service.bench.scale import dense_recall
    from rag_service.retrievers import dense as dense_mod

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for kind, folder in (("hnsw", tmp_path / "h"), ("flat", tmp_path / "f")):
        folder.mkdir()
        index = dense_mod.build_dense_index(vectors, kind, hnsw_m=4, ef_construction=8)
        dense_mod.write_dense(folder, index, vectors, kind, hnsw_m=4, ef_construction=8)
    assert dense_recall(tmp_path / "f", vectors[:20]) is None
    queries = vectors[:50] + 0.1 * rng.standard_normal((50, 32)).astype(np.float32)
    recall = dense_recall(tmp_path / "h", queries, block=300)  # exact top 100 merged over 7 blocks
    assert (recall["hnsw_m"], recall["ef_construction"], recall["queries"]) == (4, 8, 50)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")
    graph = dense_mod.DenseIndex.load(tmp_path / "h")
    for k in (10, 100):
        found = [graph.search(q, k)[0] for q in queries]
        expected = np.mean([len(set(f.tolist()) & set(e[:k].tolist())) / k for f, e in zip(found, exact)])
        assert recall[f"recall@{k}"] == pytest.approx(expected, abs=1e-4) and expected < 1.0  # a weak graph misses some
    assert recall["ef_search@100"] == 128


def test_scale_cli_rejects_a_malformed_did_not_fit():
    result = run_cli("scale", "--sizes", "100", "--did-not-fit", "nosuchsystem=reason")
    assert result.returncode == 2 and "--did-not-fit" in result.stderr


def test_latency_names_an_unreachable_target():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = lat.LatencyConfig(target=f"127.0.0.1:{port}", queries=["q"], rates=[10.0], duration_s=0.5,
                               connect_timeout_s=1.0)
    with pytest.raises(ValueError, match="target: no gRPC server answered"):
        lat.run_latency(config)


def test_serve_builds_starts_each_build_and_answers_through_its_stub(built_index):
    from rag_service.bench.serve import serve_builds
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb

    with serve_builds(built_index, {"a": None, "b": None}) as stubs:
        assert list(stubs) == ["a", "b"]
        replies = [stubs[name].Search(pb.SearchRequest(query="volcano lava", top_k=2), timeout=120) for name in stubs]
    assert [len(r.contexts) for r in replies] == [2, 2]
    assert replies[0].contexts[0].chunk_id == replies[1].contexts[0].chunk_id
