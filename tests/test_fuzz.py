"""Property-based fuzzing of every request against a real server: each answer is OK or one of the documented error
statuses, never INTERNAL/UNKNOWN, and the server is healthy afterwards.

A few hundred cases run in the suite; RAG_FUZZ_EXAMPLES=10000 (or more) is the long mode (figures in
bench/README.md). Cases are derandomised: a failure reproduces on every run."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_service.core.config import ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("RAG_FUZZ_EXAMPLES", "200"))
ADMIN = "fuzz-admin"

# The contract: what a caller may get back for any request (README "Errors").
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any text a protobuf string can carry (no lone surrogates), biased toward the characters validation cares about.
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=64) | st.sampled_from(
    ["", " ", "\t\n", "a\x00b", "\x1b[31mred", "glacier ice", "\u202e\u0645\u0631\u062d\u0628\u0627", "x" * 5000])
u32 = st.integers(0, 2**32 - 1) | st.integers(0, 3000)
f32 = st.floats(width=32) | st.floats(-0.5, 1.5, width=32)
enum = st.integers(-3, 8)


# Structured filters: the served index's fields (topic keyword, year integer) and others, every condition kind, any
# bounds (NaN and infinities included), nesting beyond the depth limit.
keys = st.sampled_from(["topic", "year", "", "colour"]) | text
bound = st.floats() | st.integers(-5, 3000).map(float)
date_text = st.sampled_from(["2020-01-01", "2020-02-30", "2001-01-01T00:00:00Z", "yesterday", ""]) | text


@st.composite
def conditions(draw, filters) -> pb.Condition:
    kind = draw(st.sampled_from(["match", "any", "range", "date_range", "exists", "is_empty", "filter", "none"]))
    c = pb.Condition(key=draw(keys))
    if kind == "match":
        which = draw(st.sampled_from(["keyword", "integer", "boolean", "number"]))
        value = {"keyword": text, "integer": st.integers(-2**63, 2**63 - 1), "boolean": st.booleans(),
                 "number": st.floats()}[which]
        setattr(c.match, which, draw(value))
    elif kind == "any":
        c.any.keywords.extend(draw(st.lists(text, max_size=3)))
        c.any.integers.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=3)))
        c.any.SetInParent()
    elif kind in ("range", "date_range"):
        target = getattr(c, kind)
        target.SetInParent()
        for name in ("gt", "gte", "lt", "lte"):
            if draw(st.booleans()):
                setattr(target, name, draw(bound if kind == "range" else date_text))
    elif kind in ("exists", "is_empty"):
        setattr(c, kind, draw(st.booleans()))
    elif kind == "filter":
        c.filter.CopyFrom(draw(filters))
    return c


def _filter_of(children) -> st.SearchStrategy[pb.Filter]:
    return st.builds(lambda must, should, must_not, min_should: pb.Filter(
        must=must, should=should, must_not=must_not, **({} if min_should is None else {"min_should": min_should})),
        st.lists(children, max_size=3), st.lists(children, max_size=3), st.lists(children, max_size=2),
        st.none() | st.integers(0, 4))


filter_messages = st.recursive(_filter_of(conditions(st.just(pb.Filter()))),
                               lambda inner: _filter_of(conditions(inner)), max_leaves=12)


@st.composite
def search_requests(draw) -> pb.SearchRequest:
    request = pb.SearchRequest(query=draw(text), fusion=draw(enum), debug=draw(st.booleans()), cache=draw(enum),
                               filters=draw(st.dictionaries(text, text, max_size=3)))
    for name, values in (("top_k", u32), ("depth", u32), ("dense_weight", f32), ("rerank", st.booleans()),
                         ("rerank_depth", u32), ("max_context_tokens", u32), ("mmr_lambda", f32),
                         ("dedup_threshold", f32), ("budget_ms", u32), ("group_by_doc", st.booleans()),
                         ("group_size", u32), ("offset", u32), ("page_token", text), ("min_score", f32),
                         ("highlight", st.booleans())):
        if draw(st.booleans()):
            setattr(request, name, draw(values))
    if draw(st.booleans()):
        request.decay.CopyFrom(draw(decays()))
    if draw(st.booleans()):
        request.filter.CopyFrom(draw(filter_messages))
    return request


# Seconds as a Duration or Timestamp may carry them: the proto's range, and around zero.
seconds = st.integers(-315576000000, 315576000000) | st.integers(-5, 10**9)


@st.composite
def decays(draw) -> pb.Decay:
    """Recency decays, on known fields (year holds numbers, topic strings) and any text."""
    decay = pb.Decay(field=draw(text | st.sampled_from(["year", "topic"])), function=draw(enum),
                     weight=draw(f32))
    for name in ("origin", "scale", "offset"):
        if draw(st.booleans()):
            getattr(decay, name).seconds = draw(seconds)
            getattr(decay, name).nanos = draw(st.integers(0, 999_999_999))
    if draw(st.booleans()):
        decay.decay = draw(f32)
    return decay


@pytest.fixture(scope="module")
def fuzzed(built_index, encoder, server_thread, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "idx"
    shutil.copytree(built_index, root, symlinks=True)
    config = ServerConfig(index=root, port=0, warmup_queries=0, auth={"admin_token": ADMIN}, max_in_flight=8)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, channel
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert pb_grpc.RetrieverStub(channel).Search(pb.SearchRequest(query="volcano"), timeout=30).contexts
        assert running.server.metrics.registry.get_sample_value(
            "rag_requests_total", {"method": "Search", "code": "INTERNAL"}) is None


def _status(call, request, **kwargs) -> grpc.StatusCode:
    try:
        call(request, timeout=30, **kwargs)
    except grpc.RpcError as error:
        assert error.code() in DOCUMENTED, (error.code(), error.details(), request)
        assert error.details(), request  # every refusal says why
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_fuzz_search(fuzzed):
    stub = pb_grpc.RetrieverStub(fuzzed[1])

    @FUZZ
    @given(search_requests())
    def check(request):
        _status(stub.Search, request)

    check()


def test_fuzz_filters(fuzzed):
    """Filters on a valid query, so that every one reaches the filter's checks and, when valid, its evaluation."""
    stub = pb_grpc.RetrieverStub(fuzzed[1])
    seen = set()

    @FUZZ
    @given(filter_messages, st.sampled_from(["glacier ice", "volcano"]))
    def check(message, query):
        seen.add(_status(stub.Search, pb.SearchRequest(query=query, filter=message, cache=pb.CACHE_BYPASS)))

    check()
    assert seen == {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def test_fuzz_raw_bytes(fuzzed):
    """Arbitrary bytes as the body of every unary method: corrupt wire format and bad UTF-8 included."""
    channel = fuzzed[1]
    calls = [channel.unary_unary(f"/rag.v1.Retriever/{m}", request_serializer=None, response_deserializer=None)
             for m in ("Search", "GetIndexInfo", "Prefetch", "ReloadIndex")]
    bodies = st.binary(max_size=256) | search_requests().map(lambda r: r.SerializeToString()).map(
        lambda b: b[:-1] if b else b"\xff")

    @FUZZ
    @given(st.sampled_from(calls), bodies)
    def check(call, body):
        _status(call, body)

    check()


def test_fuzz_other_requests(fuzzed):
    stub = pb_grpc.RetrieverStub(fuzzed[1])
    admin = (("authorization", f"Bearer {ADMIN}"),)
    paths = text | st.sampled_from(["..", "../..", "/", "/etc/passwd", "CURRENT/../..", "v-nope", "./", "\x00"])

    @settings(FUZZ, max_examples=max(EXAMPLES // 4, 25))
    @given(st.one_of(
        paths.map(lambda p: ("reload", pb.ReloadIndexRequest(path=p))),
        st.lists(search_requests(), max_size=4).map(lambda rs: ("prefetch", pb.PrefetchRequest(requests=rs))),
        st.just(("info", pb.GetIndexInfoRequest())),
    ))
    def check(case):
        kind, request = case
        if kind == "reload":
            _status(stub.ReloadIndex, request, metadata=admin)
        elif kind == "prefetch":
            _status(stub.Prefetch, request)
        else:
            _status(stub.GetIndexInfo, request)

    check()
