"""The command-line tools as a user runs them: separate processes, real signals, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from rag_service.client import RetrieverClient, RetrieverError

pytestmark = pytest.mark.slow


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_rag_index_build_then_rag_serve_answers_and_drains_on_sigterm(tmp_path, write_corpus):
    corpus = write_corpus(tmp_path / "corpus.jsonl", [
        {"_id": "tea", "title": "Tea", "text": "Green tea is steeped from unoxidised leaves of Camellia sinensis.",
         "metadata": {"lang": "en"}},
        {"_id": "rust", "title": "Rust", "text": "Iron rusts when oxygen and water oxidise it to iron oxide.",
         "metadata": {"lang": "en"}},
        {"_id": "kite", "title": "Kites", "text": "A kite flies on the wind, held by a string from the ground.",
         "metadata": {"lang": "de"}},
    ])
    built = run_cli("rag_service.cli.index", "build", "--input", str(corpus), "--output", str(tmp_path / "idx"),
                    "--no-progress")
    assert built.returncode == 0, built.stderr
    info = run_cli("rag_service.cli.index", "info", str(tmp_path / "idx"))
    assert info.returncode == 0 and "3" in info.stdout

    server = subprocess.Popen(
        [sys.executable, "-m", "rag_service.cli.serve", "--index", str(tmp_path / "idx"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # Read the log as it comes: one JSON line per request would fill the pipe and stall the server's logging.
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
    reader.start()
    try:
        line = server.stdout.readline()  # printed once the index is loaded, warm and SERVING
        match = re.search(r"SERVING .* on [\d.]+:(\d+)", line)
        assert match, (line, server.wait(timeout=10), reader.join(timeout=10), "".join(log))
        with RetrieverClient(f"127.0.0.1:{match.group(1)}", timeout=10) as client:
            assert client.health() == "SERVING"
            result = client.search("why does iron rust", top_k=2)
            assert result.contexts[0].doc_id == "rust"
            assert [c.doc_id for c in client.search("tea", filters={"lang": "de"}).contexts] == ["kite"]
            # SIGTERM under load: requests in flight finish, later ones are refused as UNAVAILABLE, exit code 0.
            outcomes: list[str] = []

            def load() -> None:
                while True:
                    try:
                        client.search("iron oxide", top_k=3, timeout=10)
                        outcomes.append("OK")
                    except RetrieverError as error:
                        outcomes.append(error.code.name)
                        return

            threads = [threading.Thread(target=load) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=30) == 0
            for t in threads:
                t.join(timeout=30)
        assert outcomes.count("OK") > 3
        assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
        reader.join(timeout=30)
        assert "draining" in "".join(log)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_rag_serve_fails_clearly_on_a_missing_index(tmp_path):
    result = run_cli("rag_service.cli.serve", "--index", str(tmp_path / "nothing"), "--port", "0", timeout=120)
    assert result.returncode != 0
    assert "nothing" in result.stderr and "Traceback" not in result.stderr


def test_rag_bench_quality_reports_each_method(tmp_path, built_index):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in [
        {"_id": "q1", "text": "volcanic eruption of lava"},
        {"_id": "q2", "text": "how plants make sugar from sunlight"},
        {"_id": "q3", "text": "Roman water supply"},
        {"_id": "q4", "text": "not judged"},
    ]) + "\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\tvolcano\t1\nq2\tphotosynthesis\t1\nq3\taqueduct\t2\n")
    report = tmp_path / "report.json"
    started = time.monotonic()
    result = run_cli("rag_service.cli.bench", "quality", "--index", str(built_index), "--queries", str(queries),
                     "--qrels", str(qrels), "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "3 judged queries" in result.stdout
    for method in ("bm25", "dense", "fused"):
        assert re.search(rf"^{method}\s+[01]\.\d{{4}}", result.stdout, re.M), result.stdout
    data = json.loads(report.read_text())
    assert data["queries"] == 3
    assert set(data["results"]) == {"bm25", "dense", "fused"}
    assert data["results"]["fused"]["nDCG@10"] == pytest.approx(1.0)
    assert all(0.0 <= v <= 1.0 for row in data["results"].values() for v in row.values())
    assert time.monotonic() - started < 300


def test_demo_corpus_is_written_from_the_standard_library(tmp_path):
    from rag_service.demo import write_demo_corpus

    n = write_demo_corpus(tmp_path / "demo.jsonl", modules=("json", "csv"))
    docs = [json.loads(line) for line in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert n == len(docs) >= 6
    assert len({d["_id"] for d in docs}) == n
    assert {"json", "json.dumps", "csv.Sniffer"} <= {d["_id"] for d in docs}
    assert all(d["metadata"]["module"] in ("json", "csv") and d["text"] for d in docs)
