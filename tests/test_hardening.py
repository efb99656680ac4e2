"""Overload and deadlines, metrics over HTTP, request logs, graceful shutdown and SIGHUP reload: real servers, real
channels, real signals."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from rag_service.api.logs import make_handler
from rag_service.core.config import ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


def _sample(running, name: str, labels: dict | None = None) -> float:
    return running.server.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_queued_work_is_bounded_and_expired_work_is_never_run(one_worker, wait_for):
    running, stub, hold, gate = one_worker
    hold()
    # Admitted, then waits for the busy thread past its deadline.
    late = stub.Search.future(pb.SearchRequest(query="glacier"), timeout=0.5)
    assert wait_for(lambda: running.server.servicer.admission.queued == 1)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(pb.SearchRequest(query="volcano"), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in info.value.details()
    assert time.monotonic() - started < 0.5  # refused at once, not after waiting
    assert late.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _sample(running, "rag_requests_shed_total") == 1
    lexical_calls = []
    bm25 = running.server.servicer.pipeline.index.bm25
    bm25.search = lambda *a, **k: lexical_calls.append(a) or type(bm25).search(bm25, *a, **k)
    try:
        gate.set()
        # The worker reaches the expired request, checks its deadline and drops it before any stage runs.
        assert wait_for(lambda: _sample(running, "rag_deadline_stops_total") == 1)
        admission = running.server.servicer.admission
        assert wait_for(lambda: admission.queued == 0 and admission.in_flight == 0)
        assert lexical_calls == []
    finally:
        del bm25.search
    assert stub.Search(pb.SearchRequest(query="volcano"), timeout=30).contexts  # healthy afterwards


def test_a_pipeline_thread_hands_back_its_answer_or_its_error_and_nothing_to_a_caller_gone():
    from concurrent.futures import ThreadPoolExecutor

    from rag_service.api.server import _hand_back
    from rag_service.core.errors import DeadlineExceeded

    def too_late():
        raise DeadlineExceeded("rerank")

    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        problems: list[dict] = []
        loop.set_exception_handler(lambda _, context: problems.append(context))
        with ThreadPoolExecutor(1) as pool:
            answer = loop.create_future()
            pool.submit(_hand_back, loop, answer, lambda: "served")
            assert await answer == "served"
            failed = loop.create_future()
            pool.submit(_hand_back, loop, failed, too_late)
            with pytest.raises(DeadlineExceeded):
                await failed
            gone = loop.create_future()
            gone.cancel()  # the caller gave up while the search ran: its late answer is dropped quietly
            await asyncio.wrap_future(pool.submit(_hand_back, loop, gone, lambda: "late"))
            await asyncio.sleep(0.05)
        return problems

    assert asyncio.run(main()) == []


def test_a_deadline_passing_mid_pipeline_stops_the_remaining_stages(one_worker, wait_for):
    running, stub, _, _ = one_worker
    pipeline = running.server.servicer.pipeline
    index = pipeline.index
    lexical_calls = []
    original_encode = pipeline.encode

    def slow_encode(query, *args, **kwargs):
        time.sleep(0.6)
        return original_encode(query, *args, **kwargs)

    pipeline.encode = slow_encode
    index.bm25.search = lambda *a, **k: lexical_calls.append(a) or type(index.bm25).search(index.bm25, *a, **k)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(query="glacier"), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: _sample(running, "rag_deadline_stops_total") == 1)
        assert lexical_calls == []
    finally:
        del pipeline.encode, index.bm25.search
    assert stub.Search(pb.SearchRequest(query="glacier"), timeout=30).contexts


def test_drain_reports_not_serving_and_finishes_in_flight_work(built_index, encoder, server_thread, wait_for):
    # The search in flight waits behind the held thread as long as the test takes: not refused for its wait.
    config = ServerConfig(index=built_index, port=0, workers=1, warmup_queries=0, max_queue_wait=0.0)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        gate = threading.Event()
        running.server.executor.submit(gate.wait, 60)
        in_flight = stub.Search.future(pb.SearchRequest(query="coffee"), timeout=60)
        assert wait_for(lambda: running.server.servicer.admission.in_flight == 1)
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(10.0), running.loop)
        assert wait_for(lambda: running.server.servicer.admission.draining)
        status = health.Check(health_pb2.HealthCheckRequest(service="rag.v1.Retriever"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(query="bread"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
        assert not stopping.done()
        gate.set()
        assert in_flight.result().contexts[0].doc_id == "coffee"
        stopping.result(timeout=30)


def test_metrics_endpoint_serves_prometheus_text(built_index, encoder, server_thread):
    config = ServerConfig(index=built_index, port=0, warmup_queries=0, metrics={"port": 0})
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for query in ("volcano", "dna helix", "bridge cables"):
            stub.Search(pb.SearchRequest(query=query), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Search(pb.SearchRequest(query=""), timeout=30)
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics", timeout=10).read()
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    names = {name for name, _ in samples}
    assert samples[("rag_requests_total", (("code", "OK"), ("method", "Search")))] == 3
    assert samples[("rag_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Search")))] == 1
    for stage in ("encode", "lexical", "dense", "fusion", "queue"):
        assert samples[("rag_stage_seconds_count", (("stage", stage),))] == 3
    assert samples[("rag_pipeline_threads_busy", ())] == 0  # nothing runs between requests
    assert {"rag_requests_in_flight", "rag_requests_queued", "rag_requests_shed_total", "rag_index_documents",
            "rag_index_chunks", "rag_index_info", "rag_build_info", "rag_deadline_stops_total",
            "rag_request_seconds_bucket"} <= names
    assert samples[("rag_index_documents", ())] == 12
    info = next(labels for name, labels in samples if name == "rag_index_info")
    assert dict(info)["version"] == running.server.servicer.pipeline.version
    assert all(name.startswith("rag_") for name in names)


def test_one_json_log_line_per_request_with_request_id(served_index):
    stream = io.StringIO()
    handler = make_handler("json", stream)
    access = logging.getLogger("rag_service.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            _, call = stub.Search.with_call(pb.SearchRequest(query="secret question about volcanoes"),
                                            metadata=(("x-request-id", "req-42"),), timeout=30)
            assert ("x-request-id", "req-42") in call.trailing_metadata()
            with pytest.raises(grpc.RpcError):
                stub.Search(pb.SearchRequest(query="bad depth", depth=0), timeout=30)
            forged_id = 'bad id "forged" ' + "x" * 200
            stub.Search(pb.SearchRequest(query="x"), metadata=(("x-request-id", forged_id),), timeout=30)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    ok, invalid, forged = lines
    assert ok["request_id"] == "req-42" and ok["method"] == "Search" and ok["code"] == "OK" and ok["ms"] > 0
    assert ok["level"] == "INFO" and "time" in ok
    assert invalid["code"] == "INVALID_ARGUMENT" and re.fullmatch(r"[0-9a-f]{32}", invalid["request_id"])
    assert re.fullmatch(r"[0-9a-f]{32}", forged["request_id"])  # an unusable caller id is replaced
    assert invalid["request_id"] != forged["request_id"]  # ids the server makes are distinct
    assert "secret question" not in stream.getvalue() and "query" not in ok


# rag-serve as a process: SIGHUP reloads, SIGTERM drains with a NOT_SERVING notice, JSON logs, /metrics ------------


@pytest.mark.slow
def test_rag_serve_sighup_reload_metrics_port_json_logs_and_sigterm_notice(tmp_path, encoder, write_corpus, wait_for):
    from rag_service.index.build import build_index

    docs = [{"_id": "tea", "title": "Tea", "text": "Green tea is steeped from leaves of Camellia sinensis."},
            {"_id": "rust", "title": "Rust", "text": "Iron rusts when oxygen and water oxidise it to iron oxide."}]
    root = tmp_path / "idx"
    first = build_index(write_corpus(tmp_path / "a.jsonl", docs), root, encoder=encoder, progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAG_SHUTDOWN_NOTICE_SECONDS": "2", "RAG_WARMUP_QUERIES": "1"}
    server = subprocess.Popen([sys.executable, "-m", "rag_service.cli.serve", "--index", str(root), "--port", "0",
                               "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    log: list[str] = []  # read as it comes, so the server never blocks on a full pipe
    reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
    reader.start()
    try:
        line = server.stdout.readline()
        match = re.search(r"SERVING .* on [\d.]+:(\d+); metrics on http://[\d.]+:(\d+)/metrics", line)
        assert match, (line, server.wait(timeout=10), reader.join(timeout=10), "".join(log))
        port, metrics_port = match.groups()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert stub.Search(pb.SearchRequest(query="tea leaves"), timeout=30).index_version.endswith(
                first.name.split("-")[-1])
            second = build_index(write_corpus(tmp_path / "b.jsonl", docs + [
                {"_id": "kite", "title": "Kites", "text": "A kite flies on the wind, held by a string."}]),
                root, encoder=encoder, progress=False)
            server.send_signal(signal.SIGHUP)
            assert wait_for(lambda: stub.Search(pb.SearchRequest(query="kite wind string"), timeout=30)
                             .contexts[0].doc_id == "kite", timeout=60)
            assert second.name.endswith(stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30).version)
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            assert 'rag_index_reloads_total{result="ok"} 1.0' in scrape
            assert re.search(r'rag_index_info\{.*version="' + re.escape(second.name[2:]), scrape)

            server.send_signal(signal.SIGTERM)
            check = health_pb2.HealthCheckRequest()
            assert wait_for(lambda: health.Check(check, timeout=5).status ==
                             health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
            # During the notice the server still answers, so traffic moves away without errors.
            assert stub.Search(pb.SearchRequest(query="iron oxide"), timeout=10).contexts[0].doc_id == "rust"
            assert server.wait(timeout=60) == 0
        reader.join(timeout=30)
        records = [json.loads(line) for line in log if line.startswith("{")]
        messages = [r["message"] for r in records]
        assert any("SIGHUP" in m for m in messages) and any("draining" in m for m in messages)
        searches = [r for r in records if r.get("method") == "Search"]
        assert len(searches) >= 4 and all(r["code"] == "OK" and r["request_id"] for r in searches)
        assert not any("tea leaves" in json.dumps(r) for r in records)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_body_that_is_not_a_valid_message_is_invalid_argument(served_index):
    """Bad UTF-8 in a string field and corrupt wire format: the caller's mistake, named, not gRPC's INTERNAL."""
    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        raw = channel.unary_unary("/rag.v1.Retriever/Search", request_serializer=None, response_deserializer=None)
        for body, problem in ((b"\x0a\x02\xff\xfe", "UTF-8"), (b"\xff\xff\xff", "corrupt")):
            with pytest.raises(grpc.RpcError) as info:
                raw(body, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("request: ") and problem in info.value.details()
            assert "rag.v1.SearchRequest" in info.value.details()
        assert pb_grpc.RetrieverStub(channel).Search(pb.SearchRequest(query="volcano"), timeout=30).contexts
