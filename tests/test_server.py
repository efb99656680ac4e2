"""End to end over a real channel: an index built by the build code from a small corpus, a real server on port 0."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rag_service.api.server import RagServer
from rag_service.client import RetrieverClient, RetrieverError
from rag_service.core.config import SearchDefaults, ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def client(served_index):
    with RetrieverClient(f"127.0.0.1:{served_index.port}", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served_index):
    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        yield pb_grpc.RetrieverStub(channel)


def test_search_finds_the_document_about_the_query(client):
    result = client.search("how do volcanoes erupt with lava and magma", top_k=5)
    assert result.contexts[0].doc_id == "volcano"
    assert len(result.contexts) == 5
    scores = [c.score for c in result.contexts]
    assert scores == sorted(scores, reverse=True)
    top = result.contexts[0]
    assert top.title == "Volcanoes"
    assert "magma" in top.text
    assert top.metadata == {"topic": "geology", "year": "2001"}
    assert top.chunk_id == "volcano#0"
    assert result.server_time_us > 0
    assert result.stage_time_us == {}
    assert top.bm25_score is None and top.dense_score is None and top.fused_score is None


def test_debug_reports_scores_and_stage_timings(client):
    result = client.search("photosynthesis in green plants chlorophyll", top_k=3, debug=True)
    top = result.contexts[0]
    assert top.doc_id == "photosynthesis"
    # rerank is on by default: the ranking's score is the reranker's, the fusion score is reported beside it
    assert top.rerank_score == pytest.approx(top.score) and top.fused_score is not None
    assert top.bm25_score > 0 and 0 < top.dense_score <= 1.0001
    assert {"validate", "queue", "filter", "encode", "lexical", "dense", "fusion", "assemble"} <= set(
        result.stage_time_us)
    assert sum(result.stage_time_us.values()) <= result.server_time_us + 1000 * len(result.stage_time_us)


def test_profile_reports_stage_timings_and_nothing_else_of_debug(client):
    query = "glaciers carve valleys and move downhill"
    plain = client.search(query, top_k=4, cache="bypass")
    profiled = client.search(query, top_k=4, cache="bypass", profile=True)
    debugged = client.search(query, top_k=4, cache="bypass", debug=True)
    assert [(c.chunk_id, c.score, c.text) for c in profiled.contexts] == [
        (c.chunk_id, c.score, c.text) for c in plain.contexts]
    assert all(c.bm25_score is None and c.fused_score is None and c.rerank_score is None for c in profiled.contexts)
    stages = set(profiled.stage_time_us)
    assert {"validate", "queue", "encode", "lexical", "dense", "fusion", "rerank", "assemble", "handback"} <= stages
    # Debug's own work (explanations) is a stage of its own that a profiled request does not run.
    assert stages < set(debugged.stage_time_us)
    assert sum(profiled.stage_time_us.values()) <= profiled.server_time_us + 1000 * len(stages)
    assert plain.stage_time_us == {}


def test_dense_weight_extremes_follow_one_retriever(client):
    # rerank off and no MMR/dedup: the contexts are fusion's ranking as it is
    plain = {"rerank": False, "mmr_lambda": 1.0, "dedup_threshold": 1.0}
    bm25_only = client.search("ancient roman aqueducts carried water", top_k=8, dense_weight=0.0, debug=True,
                              **plain)
    # Min-max normalisation puts the weakest BM25 hit at 0, level with chunks BM25 did not return: compare above 0.
    bm25_scores = [c.bm25_score for c in bm25_only.contexts if c.score > 0]
    assert len(bm25_scores) >= 3 and bm25_scores == sorted(bm25_scores, reverse=True)
    dense_only = client.search("ancient roman aqueducts carried water", top_k=8, dense_weight=1.0, debug=True,
                               **plain)
    dense_scores = [c.dense_score for c in dense_only.contexts if c.score > 0]
    assert len(dense_scores) >= 3 and dense_scores == sorted(dense_scores, reverse=True)
    assert bm25_only.contexts[0].doc_id == dense_only.contexts[0].doc_id == "aqueduct"


def test_rrf_fusion(client):
    result = client.search("the speed of light in a vacuum", top_k=4, fusion="rrf", debug=True, rerank=False)
    assert result.contexts[0].doc_id == "light"
    top = result.contexts[0]
    # Rank 1 in both lists with the default weight 0.5.
    k = SearchDefaults().rrf_k
    assert top.score == pytest.approx(0.5 / (k + 1) + 0.5 / (k + 1), rel=1e-5)


def test_long_document_is_split_into_chunks_that_keep_its_metadata(client):
    result = client.search("glacier ice sheet moraine", top_k=20)
    chunks = [c for c in result.contexts if c.doc_id == "glacier"]
    assert len({c.chunk_id for c in chunks}) >= 2
    assert all(c.metadata["topic"] == "geology" and c.title == "Glaciers" for c in chunks)


def test_filters_restrict_results(client):
    result = client.search("history of engineering and science", top_k=20, filters={"topic": "geology"})
    assert result.contexts
    assert {c.metadata["topic"] for c in result.contexts} == {"geology"}
    two = client.search("history", top_k=20, filters={"topic": "geology", "year": "2001"})
    assert {c.doc_id for c in two.contexts} == {"volcano"}
    assert client.search("history", filters={"topic": "no such topic"}).contexts == []


def test_top_k_above_default_depth(client, served_index):
    result = client.search("water", top_k=150)
    assert len(result.contexts) == served_index.n_chunks  # the whole small corpus is a candidate


def test_index_info(client, served_index):
    info = client.index_info()
    assert info.name == "testidx"
    assert info.document_count == served_index.n_docs
    assert info.chunk_count == served_index.n_chunks > info.document_count
    assert info.embedding_model == "all-MiniLM-L6-v2" and info.embedding_dim == 384
    assert info.format_version == 1
    assert set(info.metadata_fields) == {"topic", "year"}
    assert info.build_params["chunk_tokens"] == "64"
    assert info.build_time.seconds > 1_700_000_000
    assert info.fusion_backend in ("cpp", "numpy")
    assert info.version == client.search("water").index_version


def test_health_is_serving(served_index):
    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rag.v1.Retriever"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_services(served_index):
    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="rag.v1.Retriever"),
        ]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"rag.v1.Retriever", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


def _search_error(stub, **fields) -> grpc.RpcError:
    filters = fields.pop("filters", {})
    request = pb.SearchRequest(**fields)
    request.filters.update(filters)
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request, timeout=10)
    return info.value


@pytest.mark.parametrize("fields, field_name", [
    ({"query": ""}, "query"),
    ({"query": "   \n\t"}, "query"),
    ({"query": "x" * 4097}, "query"),
    ({"query": "bad\x00byte"}, "query"),
    ({"query": "ok", "top_k": 0}, "top_k"),
    ({"query": "ok", "top_k": 5000}, "top_k"),
    ({"query": "ok", "depth": 0}, "depth"),
    ({"query": "ok", "depth": 100000}, "depth"),
    ({"query": "ok", "fusion": 7}, "fusion"),
    ({"query": "ok", "dense_weight": 1.5}, "dense_weight"),
    ({"query": "ok", "dense_weight": -0.1}, "dense_weight"),
    ({"query": "ok", "dense_weight": math.nan}, "dense_weight"),
    ({"query": "ok", "filters": {"color": "red"}}, "filters[color]"),
    ({"query": "ok", "filters": {f"f{i}": "v" for i in range(17)}}, "filters"),
    ({"query": "ok", "filters": {"topic": "v" * 2000}}, "filters[topic]"),
    ({"query": "ok", "rerank_depth": 0}, "rerank_depth"),
    ({"query": "ok", "rerank_depth": 100000}, "rerank_depth"),
    ({"query": "ok", "max_context_tokens": 2_000_000}, "max_context_tokens"),
    ({"query": "ok", "mmr_lambda": 1.5}, "mmr_lambda"),
    ({"query": "ok", "mmr_lambda": math.nan}, "mmr_lambda"),
    ({"query": "ok", "dedup_threshold": 0.0}, "dedup_threshold"),
    ({"query": "ok", "dedup_threshold": 1.01}, "dedup_threshold"),
    ({"query": "ok", "budget_ms": 0}, "budget_ms"),
    ({"query": "ok", "cache": 9}, "cache"),
])
def test_bad_input_is_invalid_argument_naming_the_field(stub, fields, field_name):
    error = _search_error(stub, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(field_name + ":"), error.details()


def test_expired_deadline_is_deadline_exceeded_not_a_late_answer(one_worker):
    # gRPC keeps deadlines in whole milliseconds and a small index can answer within one, so the encode is held
    # past the deadline: the answer is then certainly late, and the client must see DEADLINE_EXCEEDED, not it.
    running, stub, _, _ = one_worker
    pipeline = running.server.servicer.pipeline
    original_encode = pipeline.encode

    def slow_encode(query, *args, **kwargs):
        time.sleep(0.05)
        return original_encode(query, *args, **kwargs)

    pipeline.encode = slow_encode
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(query="how are lists sorted"), timeout=1e-4)
    finally:
        del pipeline.encode
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_oversized_request_is_refused_by_the_transport(stub):
    error = _search_error(stub, query="word " * 300_000)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_raises_typed_errors(client):
    with pytest.raises(RetrieverError) as info:
        client.search("ok", top_k=0)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in info.value.details
    with pytest.raises(ValueError, match="fusion"):
        client.search("ok", fusion="sum")  # type: ignore[arg-type]
    assert client.health() == "SERVING"


def test_server_is_unavailable_and_not_serving_until_the_index_is_loaded(served_index):
    async def scenario():
        server = RagServer(ServerConfig(index=served_index.root, port=0))
        await server.listen()  # answering RPCs, but the index is not loaded
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.RetrieverStub(channel).Search(pb.SearchRequest(query="water"), timeout=5)
            return health.status, info.value
        finally:
            await server.stop(0)

    status, error = asyncio.run(scenario())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()


def test_admission_control_sheds_load_past_max_in_flight(built_index, encoder, server_thread):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    config = ServerConfig(index=built_index, port=0, workers=1, max_in_flight=1, warmup_queries=0)
    with server_thread(config, encoder) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        stub.Search(pb.SearchRequest(query="warm up"), timeout=30)
        barrier = Barrier(16)

        def call(i: int) -> grpc.StatusCode:
            barrier.wait()
            try:
                stub.Search(pb.SearchRequest(query=f"glacier ice number {i}", top_k=50), timeout=30)
                return grpc.StatusCode.OK
            except grpc.RpcError as error:
                assert "in flight" in error.details()
                return error.code()

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(call, range(16)))
        assert grpc.StatusCode.OK in codes
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        shed = running.server.metrics.registry.get_sample_value("rag_requests_shed_total")
        assert shed == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        # Shedding is immediate and leaves the server healthy.
        assert stub.Search(pb.SearchRequest(query="water"), timeout=30).contexts
