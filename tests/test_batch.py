"""SearchBatch on a real server over a real channel: order, per-query statuses, the batch limit, answers equal to
Search's, the cache, auth, overload and the deadline."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from rag_service.api import batch as batch_module
from rag_service.client import RetrieverClient, RetrieverError, SearchResult
from rag_service.core.config import ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

READER = "reader-token-0123456789abcdef"
LIMIT = 6


@contextlib.contextmanager
def serve(server_thread, encoder, index, **settings):
    # No load-driven routes: answers compared across calls must not depend on how many searches overlapped.
    config = ServerConfig(index=index, port=0, warmup_queries=0, adaptive={"busy_in_flight": 1000},
                          limits={"max_batch": LIMIT}, **settings)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        running.stub = pb_grpc.RetrieverStub(channel)
        running.client = RetrieverClient(f"127.0.0.1:{running.port}", timeout=60, channel=channel)
        yield running


@pytest.fixture(scope="module")
def running(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index) as r:
        yield r


def batch(running, *requests: pb.SearchRequest, timeout: float = 60, **kwargs) -> pb.SearchBatchResponse:
    return running.stub.SearchBatch(pb.SearchBatchRequest(requests=list(requests)), timeout=timeout, **kwargs)


def ranked(response: pb.SearchResponse) -> list[tuple[str, str]]:
    return [(c.doc_id, c.chunk_id) for c in response.contexts]


def sample(running, name: str, **labels) -> float:
    value = running.server.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_answers_come_in_request_order_with_per_query_errors_inside(running):
    queries = ["how does a volcano erupt", "what carved the u-shaped valleys", "who printed books with movable type"]
    reply = batch(running, pb.SearchRequest(query=queries[0], cache=pb.CACHE_BYPASS),
                  pb.SearchRequest(query=queries[1], top_k=0),
                  pb.SearchRequest(query=queries[2], cache=pb.CACHE_BYPASS))
    assert len(reply.results) == 3
    first, bad, last = reply.results
    assert first.code == 0 and not first.message and first.response.contexts
    assert first.response.contexts[0].doc_id == "volcano"
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not bad.HasField("response")
    assert bad.message.startswith("requests[1].top_k: must be between 1 and"), bad.message
    assert last.code == 0 and last.response.contexts[0].doc_id == "printing"
    assert sample(running, "rag_batch_queries_total", code="INVALID_ARGUMENT") >= 1


def test_a_profiled_query_of_a_batch_carries_its_own_stage_timings(running):
    reply = batch(running, pb.SearchRequest(query="how do glaciers carve valleys", cache=pb.CACHE_BYPASS, profile=True),
                  pb.SearchRequest(query="how do glaciers carve valleys", cache=pb.CACHE_BYPASS))
    profiled, plain = (r.response for r in reply.results)
    assert {"encode", "dense", "rerank"} <= set(profiled.stage_time_us) and not plain.stage_time_us
    assert ranked(profiled) == ranked(plain) and not any(c.HasField("fused_score") for c in profiled.contexts)


def test_every_kind_of_bad_request_is_its_own_status(running):
    reply = batch(running, pb.SearchRequest(query="   "), pb.SearchRequest(query="ok", depth=10**6),
                  pb.SearchRequest(query="ok", page_token="not a token"),
                  pb.SearchRequest(query="sourdough starter", cache=pb.CACHE_BYPASS))
    codes = [r.code for r in reply.results]
    assert codes[:3] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3 and codes[3] == 0
    assert reply.results[0].message.startswith("requests[0].query:")
    assert reply.results[1].message.startswith("requests[1].depth:")
    assert reply.results[2].message.startswith("requests[2].page_token:")


def test_a_batch_over_the_limit_is_refused_naming_requests(running):
    with pytest.raises(grpc.RpcError) as info:
        batch(running, *[pb.SearchRequest(query=f"query {i}") for i in range(LIMIT + 1)])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("requests: has 7 entries; the limit is 6"), info.value.details()
    assert len(batch(running, *[pb.SearchRequest(query=f"query {i}", cache=pb.CACHE_BYPASS)
                                for i in range(LIMIT)]).results) == LIMIT


def test_an_empty_batch_has_an_empty_answer(running):
    assert len(batch(running).results) == 0


REQUESTS = [
    pb.SearchRequest(query="glacier ice flows and erodes rock", debug=True),
    pb.SearchRequest(query="speed of light in a vacuum", top_k=3, debug=True),
    pb.SearchRequest(query="geology of the earth", filters={"topic": "geology"}, debug=True),
    pb.SearchRequest(query="caffeine stimulant", rerank=False, fusion=pb.FUSION_WEIGHTED, dense_weight=0.7,
                     debug=True),
    pb.SearchRequest(query="ancient roman water", group_by_doc=True, top_k=2, highlight=True, debug=True),
]


def _comparable(response: pb.SearchResponse) -> list[tuple]:
    return [(c.doc_id, c.chunk_id, c.text, c.tokens) for c in response.contexts]


def _scores(response: pb.SearchResponse) -> list[float]:
    return [x for c in response.contexts for x in (c.score, c.fused_score, c.bm25_score, c.dense_score, c.rerank_score)]


def test_answers_equal_single_searches(running):
    fresh = [pb.SearchRequest() for _ in REQUESTS]
    for request, copy in zip(REQUESTS, fresh, strict=True):
        copy.CopyFrom(request)
        copy.cache = pb.CACHE_BYPASS
    singles = [running.stub.Search(r, timeout=60) for r in fresh]
    reply = batch(running, *fresh)
    for single, result in zip(singles, reply.results, strict=True):
        assert result.code == 0, result.message
        got = result.response
        assert _comparable(got) == _comparable(single)
        # One encoder batch pads its queries together: a vector differs from the lone query's in the last bits.
        assert _scores(got) == pytest.approx(_scores(single), rel=1e-4, abs=1e-5)
        assert (got.route, list(got.legs), got.index_version, got.context_tokens, got.served_from) == \
            (single.route, list(single.legs), single.index_version, single.context_tokens, single.served_from)
        assert [(g.doc_id, g.first, g.count) for g in got.groups] == [(g.doc_id, g.first, g.count)
                                                                      for g in single.groups]
        assert [(h.start, h.end) for c in got.contexts for h in c.highlights] == \
            [(h.start, h.end) for c in single.contexts for h in c.highlights]
        assert "encode" in got.stage_time_us  # its share of the batch's encode
    assert "queue" in reply.results[0].response.stage_time_us


def test_a_batch_fills_the_cache_and_searches_after_it_are_exact_hits(running):
    queries = ["which bridge hangs its deck from cables", "double helix of nucleotide bases",
               "what does chlorophyll do in leaves"]
    requests = [pb.SearchRequest(query=q) for q in queries]
    first = batch(running, *requests, requests[0])  # the repeat is searched once and shared
    assert [r.response.served_from for r in first.results] == [pb.SERVED_FROM_MISS] * 3 + [pb.SERVED_FROM_EXACT]
    assert ranked(first.results[3].response) == ranked(first.results[0].response)
    for request, answered in zip(requests, first.results, strict=False):
        single = running.stub.Search(request, timeout=60)
        assert single.served_from == pb.SERVED_FROM_EXACT
        assert ranked(single) == ranked(answered.response)
        assert [c.score for c in single.contexts] == [c.score for c in answered.response.contexts]
    misses = sample(running, "rag_cache_misses_total", mode="default")
    again = batch(running, *requests)
    assert [r.response.served_from for r in again.results] == [pb.SERVED_FROM_EXACT] * 3
    assert sample(running, "rag_cache_misses_total", mode="default") == misses  # no search ran


def test_a_search_fills_the_cache_for_a_batch(running):
    request = pb.SearchRequest(query="Newton and Einstein on the force that attracts masses")
    single = running.stub.Search(request, timeout=60)
    reply = batch(running, request, pb.SearchRequest(query="fermented flour and water"))
    assert reply.results[0].response.served_from == pb.SERVED_FROM_EXACT
    assert ranked(reply.results[0].response) == ranked(single)
    assert reply.results[1].response.served_from == pb.SERVED_FROM_MISS


def test_joined_and_field_by_field_batch_replies_say_the_same(running):
    servicer = running.server.servicer
    requests = [pb.SearchRequest(query=q, cache=pb.CACHE_BYPASS, debug=d)
                for q, d in (("earthquake fault slip", False), ("suspension bridge towers", True))]
    replies = []
    try:
        for joined in (True, False):
            servicer.joined_replies = joined
            replies.append(batch(running, *requests, pb.SearchRequest(query="")))
    finally:
        servicer.joined_replies = True
    for reply in replies:
        for result in reply.results:
            result.response.server_time_us = 0
            result.response.stage_time_us.clear()
    assert replies[0] == replies[1]


def test_the_client_returns_results_and_errors_in_order(running):
    answers = running.client.search_batch(["volcano magma", "gravity", pb.SearchRequest(query="dna", top_k=0)],
                                          top_k=2, cache="bypass")
    assert [type(a) for a in answers] == [SearchResult, SearchResult, RetrieverError]
    assert all(len(a.contexts) == 2 for a in answers[:2] if isinstance(a, SearchResult))
    error = answers[2]
    assert isinstance(error, RetrieverError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.details.startswith("requests[2].top_k:")
    with pytest.raises(RetrieverError) as info:
        running.client.search_batch([f"q{i}" for i in range(LIMIT + 1)])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.details.startswith("requests:")


def test_a_batch_needs_the_search_token(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index, auth={"search_token": READER}) as secured:
        request = pb.SearchBatchRequest(requests=[pb.SearchRequest(query="coffee beans")])
        with pytest.raises(grpc.RpcError) as info:
            secured.stub.SearchBatch(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            secured.stub.SearchBatch(request, timeout=30, metadata=(("authorization", "Bearer wrong"),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = secured.stub.SearchBatch(request, timeout=30, metadata=(("authorization", f"Bearer {READER}"),))
        assert reply.results[0].response.contexts[0].doc_id == "coffee"


def test_overload_refuses_a_batch_at_once_and_the_deadline_stops_one(server_thread, encoder, built_index,
                                                                         wait_for):
    # The queued Search waits behind the held thread as long as the test takes: not refused for its wait.
    with serve(server_thread, encoder, built_index, workers=1, max_queued=1, max_queue_wait=0.0) as busy:
        admission = busy.server.servicer.admission
        gate = threading.Event()
        busy.server.executor.submit(gate.wait, 60)  # the one pipeline thread is taken
        try:
            # A batch waiting for the thread holds its slot and queue place until its deadline stops it.
            with pytest.raises(grpc.RpcError) as info:
                batch(busy, pb.SearchRequest(query="glaciers retreat"), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_for(lambda: admission.queued == 0 and admission.in_flight == 0, timeout=10)
            # A queued Search fills the queue: the next batch is refused at once, not left waiting.
            waiting = busy.stub.Search.future(pb.SearchRequest(query="lava and ash"), timeout=60)
            assert wait_for(lambda: admission.queued == 1, timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                batch(busy, pb.SearchRequest(query="gutenberg"), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            gate.set()
        assert waiting.result().contexts
        assert batch(busy, pb.SearchRequest(query="gutenberg")).results[0].response.contexts


@pytest.mark.parametrize("invariant", [True, False])
def test_one_encoder_call_only_where_vectors_do_not_depend_on_the_batch(running, monkeypatch, invariant):
    encoder = running.server.servicer.pipeline.encoder
    calls: list[tuple[int, list[str]]] = []
    encode = encoder.encode_queries

    def counted(texts, *args, **kwargs):
        texts = [texts] if isinstance(texts, str) else list(texts)
        calls.append((len(texts), texts))
        return encode(texts, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_queries", counted)
    monkeypatch.setattr(encoder, "batch_invariant", invariant, raising=False)
    monkeypatch.setattr(batch_module, "ENCODE_CALL", 2)
    requests = [pb.SearchRequest(query=q, cache=pb.CACHE_BYPASS)
                for q in ("lava from a vent", "elastic strain and seismic waves", "wild yeast")]
    reply = batch(running, *requests)
    # Longest first, ENCODE_CALL queries a call: the two longest padded together, then the short one.
    assert [(n, sorted(t)) for n, t in calls] == ([(2, sorted([requests[0].query, requests[1].query])),
                                                  (1, [requests[2].query])] if invariant
                                                 else [(1, [r.query]) for r in requests])
    if not invariant:  # each query encoded alone, as Search encodes it: the very same answer
        for request, result in zip(requests, reply.results, strict=True):
            single = running.stub.Search(request, timeout=60)
            assert [(c.doc_id, c.chunk_id, c.score) for c in result.response.contexts] == \
                [(c.doc_id, c.chunk_id, c.score) for c in single.contexts]


def test_rag_bench_batch_sends_the_same_queries_one_by_one_and_in_batches(running):
    from rag_service.bench.batch import BatchBenchConfig, format_table, run_batch_bench

    queries = ["volcano", "glacier moraine", "speed of light", "coffee caffeine", "gravity", "dna helix"]
    report = run_batch_bench(BatchBenchConfig(target=f"127.0.0.1:{running.port}", queries=queries, sizes=(2, 6),
                                              clients=(1, 2), rounds=2))
    assert [row["mode"] for row in report["rows"]] == ["search", "batch 2", "batch 6", "search x2", "batch 2 x2",
                                                       "batch 6 x2"]
    for row in report["rows"]:
        assert row["failed"] == 0 and row["qps"] > 0 and row["same_as_search"] == 1.0 and len(row["qps_rounds"]) == 2
    assert report["rows"][0]["ratio"] == 1.0
    assert "| batch 6 x2 |" in format_table(report)


def test_rag_bench_batch_refuses_bad_arguments(tmp_path):
    from click.testing import CliRunner

    from rag_service.cli.bench import main

    (tmp_path / "qrels").mkdir()
    (tmp_path / "queries.jsonl").write_text('{"_id": "1", "text": "q"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td\t1\n")
    result = CliRunner().invoke(main, ["batch", "--target", "127.0.0.1:1", "--data", str(tmp_path), "--sizes", "0"])
    assert result.exit_code != 0 and "--sizes" in result.output
    result = CliRunner().invoke(main, ["batch", "--data", str(tmp_path)])
    assert result.exit_code != 0 and "exactly one of --target and --index" in result.output


def test_the_deadline_stops_a_running_batch_between_its_queries(running, monkeypatch, wait_for):
    pipeline = running.server.servicer.pipeline
    search = pipeline.search
    ran: list[str] = []

    def slow(params, **kwargs):
        ran.append(params.query)
        time.sleep(0.3)
        return search(params, **kwargs)

    monkeypatch.setattr(pipeline, "search", slow)
    requests = [pb.SearchRequest(query=f"a batch its deadline stops, query {i}", cache=pb.CACHE_BYPASS)
                for i in range(LIMIT)]
    with pytest.raises(grpc.RpcError) as info:
        batch(running, *requests, timeout=0.8)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    admission = running.server.servicer.admission
    assert wait_for(lambda: admission.in_flight == 0 and admission.queued == 0, timeout=10)
    time.sleep(2.0)  # unstopped, every query would have started by now (6 x 0.3 s)
    assert 1 <= len(ran) <= 4, ran  # those started before the deadline (0.8 s), and none after it
