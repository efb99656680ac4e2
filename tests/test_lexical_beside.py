"""BM25 beside the encode: a lone search whose query terms have many postings ranks its BM25 on the beside thread
while its query is encoded on one core, and gets the answer the search with BM25 in the one native call gets. The
native calls take a BM25 list ranked beforehand as it is."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rag_service.core.params import SearchParams
from rag_service.core.timing import StageTimer
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.kernels.reference import retrieve_reference
from rag_service.search import adaptive
from rag_service.search import pipeline as pipeline_module
from rag_service.search.adaptive import AdaptiveConfig, AdaptivePolicy, Plan
from rag_service.search.pipeline import LexicalAhead, Pipeline

pytestmark = pytest.mark.skipif(native.retrieve_backend("auto") != "cpp", reason="needs the C++ extension")

WORDS = ["glacier", "ice", "valley", "volcano", "lava", "ash", "earthquake", "fault", "plant", "sunlight", "dna",
         "helix", "roman", "water", "printing", "press", "light", "speed", "gravity", "mass", "bridge", "cable",
         "unknownword", "the", "of", "a"]
FILTERS = (None, {"topic": "geology"}, {"topic": "no such topic"})


@pytest.fixture(scope="module")
def index(built_index):
    return load_index(built_index)


@pytest.fixture(autouse=True)
def small_indexes_qualify(monkeypatch):
    """The test index is tiny: let it take BM25 beside the encode as a large one does."""
    monkeypatch.setattr(pipeline_module, "BESIDE_MIN_CHUNKS", 1)


@pytest.fixture
def beside():
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-beside")
    yield executor
    executor.shutdown(wait=True)


class SpyEncoder:
    """The encoder, with the `idle` of every query encode recorded."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder
        self.idle: list[bool] = []

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_queries(self, texts, idle=False):
        self.idle.append(idle)
        return self._encoder.encode_queries(texts)


class BM25Threads:
    """The thread each bm25_top call ran on."""

    def __init__(self, monkeypatch) -> None:
        self.names: list[str] = []
        real = native.bm25_top

        def spy(*args, **kwargs):
            self.names.append(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(native, "bm25_top", spy)


def queries(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 7)))) for _ in range(n)] + ["", "zzzz"]


def same_result(got, want) -> None:
    assert (got.route, got.route_reason) == (want.route, want.route_reason)
    assert [repr(c) for c in got.contexts] == [repr(c) for c in want.contexts]  # repr: NaN features included
    assert got.context_tokens == want.context_tokens


CONFIGS = {
    "default": AdaptiveConfig(lexical_beside_postings=1),
    "never confident": AdaptiveConfig(lexical_beside_postings=1, agree_top=5, agree_min=99),
    "always confident": AdaptiveConfig(lexical_beside_postings=1, agree_top=3, agree_min=0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bm25_beside_gives_the_one_call_answer(index, encoder, beside, monkeypatch, name):
    spy = SpyEncoder(encoder)
    with_beside = Pipeline(index, spy, policy=AdaptivePolicy(CONFIGS[name]), beside=beside)
    without = Pipeline(index, encoder, policy=AdaptivePolicy(CONFIGS[name]))
    threads = BM25Threads(monkeypatch)
    ran_beside = 0
    for i, query in enumerate(queries(11, 8)):
        for filt in FILTERS:
            for top_k, depth, rerank_depth in ((5, 30, 10), (3, 7, 100), (1, 1, 1)):
                params = SearchParams(query=query, top_k=top_k, depth=depth, rerank_depth=rerank_depth, filters=filt,
                                      fusion="rrf" if i % 2 else "weighted", rerank=i % 3 != 2)
                got = with_beside.search(params)
                beside_calls, threads.names = threads.names, []
                same_result(got, without.search(params))
                threads.names = []
                # A query with postings ranks BM25 on the beside thread, and its encode keeps to one core.
                postings = with_beside.index.bm25.search(query, depth, None)[0].size > 0
                assert beside_calls == (["test-beside_0"] if postings else [])
                assert spy.idle.pop() is (not postings)
                if postings:
                    ran_beside += 1
                    assert got.stage_us["lexical"] >= 0
    assert ran_beside > 20


def test_the_threshold_and_company_keep_bm25_in_the_call(index, encoder, beside, monkeypatch):
    threads = BM25Threads(monkeypatch)
    spy = SpyEncoder(encoder)
    params = SearchParams(query="glacier valley ice", top_k=5)
    high = Pipeline(index, spy, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=10**9)), beside=beside)
    same_result(high.search(params), Pipeline(index, encoder).search(params))
    assert threads.names == [] and spy.idle == [True]
    # A search with company: no thread beside it, and no idle cores for its encode.
    busy = Pipeline(index, spy, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1), lambda: 2),
                    beside=beside)
    busy.search(params)
    assert threads.names == [] and spy.idle == [True, False]
    # Off (0), and no beside thread: BM25 stays in the call.
    for pipe in (Pipeline(index, spy, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=0)),
                          beside=beside),
                 Pipeline(index, spy, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1)))):
        pipe.search(params)
    assert threads.names == []


def test_a_small_index_makes_nothing_before_the_encode(index, encoder, beside, monkeypatch):
    monkeypatch.setattr(pipeline_module, "BESIDE_MIN_CHUNKS", index.bm25.postings.n_docs + 1)
    pipe = Pipeline(index, encoder, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1)), beside=beside)
    params = SearchParams(query="glacier valley ice", top_k=5)
    timer = StageTimer()
    assert pipe._before_encode(pipe.policy.plan(params, None, 1, False, True), True, timer) is None
    assert timer.us == {}  # a semantic hit then pays for no analysis it does not use


def test_a_busy_beside_thread_leaves_bm25_in_the_call(index, encoder, beside, monkeypatch):
    """A BM25 still running beside (a search gave up on it) is not waited for: the next search ranks its own."""
    threads = BM25Threads(monkeypatch)
    spy = SpyEncoder(encoder)
    pipe = Pipeline(index, spy, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1)), beside=beside)
    params = SearchParams(query="glacier valley ice", top_k=5)
    release = threading.Event()
    pipe._beside_last = beside.submit(release.wait, 30)
    try:
        same_result(pipe.search(params), Pipeline(index, encoder).search(params))
        assert threads.names == [] and spy.idle == [True]
    finally:
        release.set()
    pipe._beside_last.result(timeout=30)
    pipe.search(params)
    assert threads.names == ["test-beside_0"] and spy.idle == [True, False]


def test_a_plan_with_another_depth_ranks_its_own_bm25(index, encoder, beside):
    config = AdaptiveConfig(lexical_beside_postings=1)
    pipe = Pipeline(index, encoder, policy=AdaptivePolicy(config), beside=beside)
    reference = Pipeline(index, encoder, policy=AdaptivePolicy(config))
    params = SearchParams(query="volcano lava ash glacier", top_k=5, depth=40)
    timer = StageTimer()
    ahead = pipe._before_encode(pipe.policy.plan(params, None, 1, False, True), True, timer)
    assert isinstance(ahead, LexicalAhead) and ahead.beside
    vector = encoder.encode_queries(params.query)[0]
    # As a plan made again after the encode could: a shallower depth, which the list ranked beside does not serve.
    shallow = SearchParams(query=params.query, top_k=5, depth=6)
    assert ahead.hits(6, StageTimer(), None) is None
    plan = pipe.policy.plan(shallow, None, 1, True, True)
    same_result(pipe._rank(plan, vector, None, StageTimer(), ahead),
                reference._rank(plan, vector, None, StageTimer()))
    deep = pipe.policy.plan(params, None, 1, True, True)
    same_result(pipe._rank(deep, vector, None, timer, ahead), reference._rank(deep, vector, None, StageTimer()))
    assert "lexical" in timer.us


def test_an_error_beside_reaches_the_caller(index, encoder, beside, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("term_ids[0] = -1 is outside [0, 5)")

    monkeypatch.setattr(native, "bm25_top", broken)
    pipe = Pipeline(index, encoder, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1)), beside=beside)
    with pytest.raises(ValueError, match="term_ids"):
        pipe.search(SearchParams(query="glacier ice", top_k=3))


def test_the_lexical_route_runs_nothing_beside(index, encoder, beside, monkeypatch):
    threads = BM25Threads(monkeypatch)
    pipe = Pipeline(index, encoder, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1)), beside=beside)
    lexical = Plan(SearchParams(query="glacier ice", top_k=3), adaptive.LEXICAL, "test", None, 1)
    monkeypatch.setattr(pipe.policy, "plan", lambda *args, **kwargs: lexical)
    result = pipe.search(lexical.params)
    assert result.route == adaptive.LEXICAL and result.contexts
    assert threads.names == []


@pytest.mark.parametrize("seed", range(4))
def test_native_calls_take_a_given_bm25_list(index, encoder, seed):
    pipe = Pipeline(index, encoder)
    bm25_index, dense_index = index.bm25, index.dense
    rng = np.random.default_rng(seed)
    store, call = pipe.rerank_store, pipe._search_call
    assert store is not None and call is not None
    for query in queries(seed, 6):
        terms = bm25_index.term_ids(bm25_index.analyzer.tokens(query))
        mask = None if rng.random() < 0.5 else rng.random(bm25_index.postings.n_docs) < 0.7
        depth = int(rng.integers(1, 30))
        given = native.bm25_top(bm25_index.postings, terms, depth, mask=mask, backend="cpp")
        vector = dense_index.query_row(encoder.encode_queries(query)[0])
        kwargs = dict(mask=mask, vectors=dense_index.vectors, query=vector, method="rrf", top_k=8)
        for backend in ("cpp", "numpy"):
            want = native.retrieve(bm25_index.postings, terms, depth, backend=backend, **kwargs)
            # The given list stands in for the terms' own: the call does not rank them again.
            got = native.retrieve(bm25_index.postings, np.zeros(0, np.int64), depth, backend=backend, bm25=given,
                                  **kwargs)
            for a, b in zip((got.bm25, got.dense, got.fused), (want.bm25, want.dense, want.fused), strict=True):
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
            if backend == "cpp":
                assert got.times_ns[0] == 0
        one = call(terms, vector, depth, mask=mask, method="weighted", dense_weight=0.5, top_k=8, rrf_k=60.0,
                   rerank_depth=5, confidence=None)
        two = call(terms, vector, depth, mask=mask, method="weighted", dense_weight=0.5, top_k=8, rrf_k=60.0,
                   rerank_depth=5, confidence=None, bm25=given)
        for x, y in ((one.ids, two.ids), (one.scores, two.scores), (one.first.fused.ids, two.first.fused.ids)):
            np.testing.assert_array_equal(x, y)
    reference = retrieve_reference(bm25_index.postings, np.zeros(0, np.int64), None, 5,
                                   bm25=(np.array([3, 1]), np.array([2.0, 1.0], np.float32)))
    np.testing.assert_array_equal(reference.bm25[0], [3, 1])


def test_a_given_bm25_list_is_checked(index):
    postings = index.bm25.postings
    terms = np.zeros(0, np.int64)
    with pytest.raises(ValueError, match="bm25_scores"):
        native.retrieve(postings, terms, 5, bm25=(np.array([1, 2]), np.array([1.0], np.float32)), backend="cpp")
    with pytest.raises(ValueError, match="bm25_ids"):
        native._native.retrieve(postings.indptr, postings.docs, postings.weights, int(postings.n_docs), terms, None,
                                5, None, None, None, None, None, 0, None, None, "rrf", 0.5, 5, 60.0, "",
                                np.array([1, 2]), None)
    with pytest.raises(ValueError, match="bm25_scores"):
        retrieve_reference(postings, terms, None, 5, bm25=(np.array([1, 2]), np.array([1.0], np.float32)))


def test_through_a_server_bm25_beside_answers_as_the_call_does(built_index, encoder, server_thread):
    """Over a real channel: the same contexts with BM25 beside the encode as with it in the call, the beside thread
    held off the home CPU where placement is on."""
    import os

    import grpc

    from rag_service.core.config import AdaptiveSettings, ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    answers = {}
    for postings in (1, 0):
        config = ServerConfig(index=built_index, port=0, warmup_queries=0,
                              adaptive=AdaptiveSettings(lexical_beside_postings=postings))
        with server_thread(config, encoder) as running, \
                grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            replies = [stub.Search(pb.SearchRequest(query=q, top_k=5, debug=True, cache=pb.CACHE_BYPASS), timeout=30)
                       for q in ("glacier ice valley", "volcano lava", "printing press of the roman")]
            answers[postings] = [[(c.chunk_id, c.score) for c in r.contexts] for r in replies]
            assert all(r.contexts and "lexical" in r.stage_time_us for r in replies)
            threads = list(running.server._beside._threads)
            assert len(threads) == (1 if postings else 0)
            placement = running.server.placement
            if threads and placement.enabled and hasattr(os, "sched_getaffinity"):
                assert os.sched_getaffinity(threads[0].native_id) == set(placement.encode_cpus())
    assert answers[1] == answers[0]


def test_concurrent_searches_with_a_beside_thread_get_their_own_answers(index, encoder, beside):
    """Searches that overlap (some alone, some with company; the beside thread taken or busy) each get the answer a
    pipeline without the thread gives."""
    # Routes fixed (no load-based light route), so that company changes nothing but where BM25 runs.
    config = AdaptiveConfig(enabled=False, lexical_beside_postings=1)
    pipe = Pipeline(index, encoder, policy=AdaptivePolicy(config), beside=beside)
    reference = Pipeline(index, encoder, policy=AdaptivePolicy(config))
    cases = [SearchParams(query=q, top_k=4, depth=20, filters=FILTERS[i % 2]) for i, q in enumerate(queries(5, 10))]
    want = [reference.search(p) for p in cases]
    with ThreadPoolExecutor(max_workers=3) as pool:
        for _ in range(3):
            got = list(pool.map(pipe.search, cases))
            for g, w in zip(got, want, strict=True):
                assert [c.chunk_id for c in g.contexts] == [c.chunk_id for c in w.contexts]
                assert [c.score for c in g.contexts] == [c.score for c in w.contexts]


@pytest.fixture(scope="module")
def graph_index(built_graph_index):
    index = load_index(built_graph_index)
    assert not index.dense.native_scan
    return index


class Timeline:
    """When each query encode ended and each bm25_top began (perf_counter), and on which thread BM25 ran."""

    def __init__(self, encoder, monkeypatch) -> None:
        import time

        self.events: list[tuple[str, float, str]] = []
        self.idle: list[bool] = []
        self._encoder = encoder
        real = native.bm25_top

        def spy(*args, **kwargs):
            self.events.append(("bm25", time.perf_counter(), threading.current_thread().name))
            return real(*args, **kwargs)

        monkeypatch.setattr(native, "bm25_top", spy)
        self._clock = time.perf_counter

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_queries(self, texts, idle=False):
        self.idle.append(idle)
        out = self._encoder.encode_queries(texts)
        self.events.append(("encoded", self._clock(), threading.current_thread().name))
        return out


def test_on_a_graph_index_bm25_runs_beside_the_graph_search_after_a_two_core_encode(graph_index, encoder, beside,
                                                                                     monkeypatch):
    spy = Timeline(encoder, monkeypatch)
    config = AdaptiveConfig(lexical_beside_postings=1)
    with_beside = Pipeline(graph_index, spy, policy=AdaptivePolicy(config), beside=beside)
    without = Pipeline(graph_index, encoder, policy=AdaptivePolicy(config))
    ran_beside = 0
    for i, query in enumerate(queries(5, 8)):
        for filt in FILTERS:
            params = SearchParams(query=query, top_k=5, depth=30, rerank_depth=10, filters=filt,
                                  fusion="rrf" if i % 2 else "weighted", rerank=i % 3 != 2)
            spy.events.clear()
            got = with_beside.search(params)
            events = list(spy.events)
            same_result(got, without.search(params))
            postings = graph_index.bm25.search(query, 30, None)[0].size > 0
            # The encode keeps both cores; BM25 starts on the beside thread once the encode is done.
            assert spy.idle.pop() is True
            if postings:
                ran_beside += 1
                assert [e[0] for e in events] == ["encoded", "bm25"] and events[1][2] == "test-beside_0"
                assert events[1][1] >= events[0][1]
            else:
                assert [e[0] for e in events] == ["encoded"]
    assert ran_beside > 10


def test_on_a_graph_index_a_busy_beside_thread_leaves_bm25_in_the_call(graph_index, encoder, beside, monkeypatch):
    spy = Timeline(encoder, monkeypatch)
    pipe = Pipeline(graph_index, spy, policy=AdaptivePolicy(AdaptiveConfig(lexical_beside_postings=1)),
                    beside=beside)
    params = SearchParams(query="glacier valley ice", top_k=5)
    release = threading.Event()
    pipe._beside_last = beside.submit(release.wait, 30)
    try:
        same_result(pipe.search(params), Pipeline(graph_index, encoder).search(params))
        assert [e[0] for e in spy.events] == ["encoded"]  # ranked in the call, which the spy does not see
    finally:
        release.set()
    pipe._beside_last.result(timeout=30)
    spy.events.clear()
    pipe.search(params)
    assert [(e[0], e[2]) for e in spy.events][1:] == [("bm25", "test-beside_0")]
