"""Tracing, the RPC wrapper and the admission gate, on real servers over real channels.

Each server gets its own SDK provider with an in-memory exporter (RagServer's tracer_provider), so no test touches
OpenTelemetry's process-wide provider.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from rag_service.core import tracing
from rag_service.core.config import ServerConfig, TracingConfig
from rag_service.core.timing import StageTimer
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc
from rag_service.pb.rag.v1 import shard_pb2 as spb
from rag_service.pb.rag.v1 import shard_pb2_grpc as spb_grpc

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7


def traceparent(trace_id: int = TRACE_ID, span_id: int = CALLER_SPAN_ID, sampled: bool = True) -> tuple:
    return (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"),)


def recorder() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def spans_of(exporter: InMemorySpanExporter, trace_id: int) -> list:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def count(running, method: str, code: str) -> float:
    return running.server.metrics.registry.get_sample_value(
        "rag_requests_total", {"method": method, "code": code}) or 0.0


@pytest.fixture(scope="module")
def traced(built_index, encoder, server_thread):
    provider, exporter = recorder()
    config = ServerConfig(index=built_index, port=0, warmup_queries=0)
    with server_thread(config, encoder, tracer_provider=provider) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        running.exporter = exporter
        running.channel = channel
        yield running, pb_grpc.RetrieverStub(channel)
    provider.shutdown()


def test_the_callers_traceparent_is_the_parent_of_the_rpc_span_and_stages_are_its_children(traced, wait_for):
    running, stub = traced
    reply = stub.Search(pb.SearchRequest(query="how do glaciers carve valleys", debug=True), timeout=30,
                        metadata=traceparent())
    assert reply.contexts
    assert wait_for(lambda: any(s.kind == SpanKind.SERVER for s in spans_of(running.exporter, TRACE_ID)))
    spans = spans_of(running.exporter, TRACE_ID)
    (rpc_span,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert rpc_span.name == "rag.v1.Retriever/Search"
    assert rpc_span.parent.span_id == CALLER_SPAN_ID and rpc_span.parent.is_remote
    assert rpc_span.attributes["rpc.method"] == "Search" and rpc_span.attributes["rpc.grpc.status_code"] == 0
    stages = [s for s in spans if s is not rpc_span]
    assert {"encode", "lexical", "dense", "fusion", "assemble"} <= {s.name for s in stages}
    # Every stage (run on a pipeline thread) is a direct child of the RPC span, inside its time.
    assert all(s.parent.span_id == rpc_span.context.span_id for s in stages)
    assert all(rpc_span.start_time <= s.start_time <= s.end_time <= rpc_span.end_time for s in stages)
    # The stages the reply reports are the stages traced.
    assert {s.name for s in stages} <= set(reply.stage_time_us)


def test_a_trace_the_caller_did_not_sample_records_nothing(traced):
    running, stub = traced
    trace_id = TRACE_ID + 1
    assert stub.Search(pb.SearchRequest(query="sourdough starter"), timeout=30,
                       metadata=traceparent(trace_id, sampled=False)).contexts
    stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)  # a later call, so the Search's spans had time to end
    assert spans_of(running.exporter, trace_id) == []


def test_a_call_without_trace_context_starts_a_trace(traced, wait_for):
    running, stub = traced
    running.exporter.clear()
    stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    assert wait_for(lambda: running.exporter.get_finished_spans())
    (span,) = running.exporter.get_finished_spans()
    assert span.name == "rag.v1.Retriever/GetIndexInfo" and span.parent is None


def test_domain_errors_are_mapped_counted_and_traced_by_the_wrapper(traced, wait_for):
    running, stub = traced
    before = count(running, "Search", "INVALID_ARGUMENT")
    trace_id = TRACE_ID + 2
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(pb.SearchRequest(query="volcano", top_k=0), timeout=30, metadata=traceparent(trace_id))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("top_k: ")
    assert count(running, "Search", "INVALID_ARGUMENT") == before + 1
    assert wait_for(lambda: spans_of(running.exporter, trace_id))
    (span,) = spans_of(running.exporter, trace_id)
    assert span.status.status_code == StatusCode.ERROR and "INVALID_ARGUMENT" in span.status.description
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_an_unexpected_failure_is_internal_with_a_generic_message(traced, monkeypatch, caplog):
    running, stub = traced

    def broken(*args):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(running.server.servicer.collections, "searcher", broken)
    before = count(running, "GetIndexInfo", "INTERNAL")
    with pytest.raises(grpc.RpcError) as info:
        stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (RuntimeError); see the server log"
    assert count(running, "GetIndexInfo", "INTERNAL") == before + 1
    assert "secret detail" in caplog.text  # the traceback is in the server's log, not the reply


def test_the_shard_service_uses_the_same_wrapper(traced, wait_for):
    running, _ = traced
    trace_id = TRACE_ID + 3
    with pytest.raises(grpc.RpcError) as info:  # a whole index is not a shard
        spb_grpc.ShardStub(running.channel).GetShardInfo(spb.GetShardInfoRequest(), timeout=30,
                                                         metadata=traceparent(trace_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is not a shard" in info.value.details()
    assert count(running, "GetShardInfo", "FAILED_PRECONDITION") == 1
    assert wait_for(lambda: spans_of(running.exporter, trace_id))
    (span,) = spans_of(running.exporter, trace_id)
    assert span.name == "rag.v1.Shard/GetShardInfo" and span.parent.span_id == CALLER_SPAN_ID


def test_unary_calls_are_timed(traced):
    running, stub = traced
    stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    assert running.server.metrics.registry.get_sample_value("rag_request_seconds_count",
                                                            {"method": "GetIndexInfo"}) >= 1


# -- admission ------------------------------------------------------------------------------------------------------

def test_a_stream_search_final_counts_against_the_queue_like_a_search(one_worker, wait_for):
    running, stub, hold, gate = one_worker
    admission = running.server.servicer.admission
    hold()
    queued = stub.Search.future(pb.SearchRequest(query="glacier ice cores"), timeout=30)
    assert wait_for(lambda: admission.queued == 1)
    final = pb.QueryDraft(request=pb.SearchRequest(query="volcano magma"), final=True)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamSearch(iter([final]), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in info.value.details()
    registry = running.server.metrics.registry
    assert registry.get_sample_value("rag_requests_shed_total") == 1
    assert count(running, "StreamSearch", "RESOURCE_EXHAUSTED") == 1
    gate.set()
    assert queued.result().contexts
    # With the queue empty again the same stream is admitted, and counted as one answer.
    assert wait_for(lambda: admission.queued == 0 and admission.in_flight == 0)
    (answer,) = stub.StreamSearch(iter([final]), timeout=30)
    assert answer.contexts and count(running, "StreamSearch", "OK") == 1


def test_a_draining_server_refuses_prefetch_and_stream_drafts(one_worker):
    running, stub, _, _ = one_worker
    running.server.servicer.admission.draining = True
    with pytest.raises(grpc.RpcError) as info:
        stub.Prefetch(pb.PrefetchRequest(requests=[pb.SearchRequest(query="dna")]), timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    draft = pb.QueryDraft(request=pb.SearchRequest(query="dna"), final=False)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamSearch(iter([draft]), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    running.server.servicer.admission.draining = False


# -- the pieces -----------------------------------------------------------------------------------------------------

def test_stages_open_spans_only_inside_a_traced_request_in_its_context():
    provider, exporter = recorder()
    tracer = tracing.tracer(provider)
    timer = StageTimer()
    with timer.stage("outside"):
        pass
    with tracing.server_span(tracer, "rag.v1.Retriever", "Search", traceparent()) as rpc_span:
        # On a worker thread, as the pipeline runs: the context travels with `carry`.
        thread = threading.Thread(target=tracing.carry(_stage, timer, "inside"))
        thread.start()
        thread.join()
        untraced = threading.Thread(target=_stage, args=(timer, "lost"))
        untraced.start()
        untraced.join()
    names = {s.name: s for s in exporter.get_finished_spans()}
    assert set(names) == {"inside", "rag.v1.Retriever/Search"}
    assert names["inside"].parent.span_id == rpc_span.get_span_context().span_id
    assert set(timer.us) == {"outside", "inside", "lost"}


def _stage(timer: StageTimer, name: str) -> None:
    with timer.stage(name):
        pass


def test_outgoing_metadata_carries_the_trace_context():
    provider, _ = recorder()
    tracer = tracing.tracer(provider)
    auth = (("authorization", "Bearer t"),)
    assert tracing.outgoing(auth, None) == auth  # no trace: nothing added
    with tracing.server_span(tracer, "rag.v1.Retriever", "Search", traceparent()):
        span = tracing.client_span("rag.v1.Shard", "Candidates", {"rag.shard": "0@here"})
        metadata = dict(tracing.outgoing(auth, span))
        span.end()
    assert metadata["authorization"] == "Bearer t"
    assert metadata["traceparent"] == f"00-{TRACE_ID:032x}-{span.get_span_context().span_id:016x}-01"


def test_an_unsampled_callers_decision_reaches_the_shards():
    provider, exporter = recorder()
    unsampled = traceparent(sampled=False)
    with tracing.server_span(tracing.tracer(provider), "rag.v1.Retriever", "Search", unsampled) as span:
        assert tracing.request_tracer() is None  # nothing records: no stage or shard spans
        assert tracing.client_span("rag.v1.Shard", "Candidates", {}) is None
        metadata = dict(tracing.outgoing(None, None))
    assert metadata["traceparent"] == f"00-{TRACE_ID:032x}-{span.get_span_context().span_id:016x}-00"
    assert exporter.get_finished_spans() == ()


def test_a_server_without_a_provider_opens_no_spans(one_worker):
    running, stub, _, _ = one_worker
    assert tracing.installed_provider() is None  # no test sets OpenTelemetry's global provider
    assert running.server.servicer.rpc.tracer is None and running.server.shard_servicer.rpc.tracer is None
    assert stub.Search(pb.SearchRequest(query="dna helix"), timeout=30, metadata=traceparent()).contexts


def test_an_otlp_endpoint_makes_an_exporting_provider():
    assert tracing.provider_from(TracingConfig()) is None
    provider = tracing.provider_from(TracingConfig(otlp_endpoint="http://127.0.0.1:4317", service_name="rag-test"))
    try:
        assert provider.resource.attributes["service.name"] == "rag-test"
        assert tracing.tracer(provider).start_span("probe").is_recording()
    finally:
        provider.shutdown()


def test_tracing_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RAG_TRACING__OTLP_ENDPOINT", "http://collector:4317")
    config = ServerConfig()
    assert config.tracing.otlp_endpoint == "http://collector:4317" and config.tracing.service_name == "rag-service"


# -- the router's fan-out -------------------------------------------------------------------------------------------

DOCS = [{"_id": f"d{i}", "title": f"Doc {i}", "text": text} for i, text in enumerate([
    "Glaciers carve U-shaped valleys and leave moraines behind as they retreat.",
    "A volcano erupts when magma rises through the crust and lava escapes.",
    "Sourdough bread is leavened by wild yeast in a fermented starter.",
    "The speed of light in a vacuum is a universal physical constant.",
    "Roman aqueducts carried water by gravity across stone arches.",
    "Green plants turn sunlight, water and carbon dioxide into sugar.",
])]


def test_the_router_traces_each_shard_call_and_the_shards_continue_the_trace(tmp_path, encoder, write_corpus,
                                                                             server_thread, wait_for):
    from rag_service.cli.index import cli

    corpus = write_corpus(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "sharded"
    result = CliRunner().invoke(cli, ["build", "--input", str(corpus), "--output", str(out), "--shards", "2",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    provider, exporter = recorder()
    with server_thread(ServerConfig(index=out / "shard-0", port=0, warmup_queries=0), encoder,
                       tracer_provider=provider) as shard0, \
            server_thread(ServerConfig(index=out / "shard-1", port=0, warmup_queries=0), encoder,
                          tracer_provider=provider) as shard1:
        shards = [f"127.0.0.1:{shard0.port}", f"127.0.0.1:{shard1.port}"]
        config = ServerConfig(index=out / "router", port=0, warmup_queries=0, router={"shards": shards})
        with server_thread(config, encoder,
                           tracer_provider=provider) as router, \
                grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            exporter.clear()  # the router's start asked each shard for its info
            reply = pb_grpc.RetrieverStub(channel).Search(pb.SearchRequest(query="volcano magma"), timeout=30,
                                                          metadata=traceparent())
            assert len(reply.shards_answered) == 2
            assert wait_for(lambda: len([s for s in spans_of(exporter, TRACE_ID)
                                         if s.name == "rag.v1.Retriever/Search"]) == 1)
    spans = spans_of(exporter, TRACE_ID)
    by_id = {s.context.span_id: s for s in spans}
    (rpc_span,) = [s for s in spans if s.name == "rag.v1.Retriever/Search"]
    (fan_out,) = [s for s in spans if s.name == "shards"]
    assert fan_out.parent.span_id == rpc_span.context.span_id
    calls = [s for s in spans if s.name == "rag.v1.Shard/Candidates" and s.kind == SpanKind.CLIENT]
    assert len(calls) == 2 and all(c.parent.span_id == fan_out.context.span_id for c in calls)
    assert {c.attributes["rag.shard"].split("@")[1] for c in calls} == set(shards)
    served = [s for s in spans if s.name == "rag.v1.Shard/Candidates" and s.kind == SpanKind.SERVER]
    assert len(served) == 2
    assert {s.parent.span_id for s in served} == {c.context.span_id for c in calls}
    assert all(by_id[s.parent.span_id].kind == SpanKind.CLIENT for s in served)
