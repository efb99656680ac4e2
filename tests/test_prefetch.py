"""Prefetch and StreamSearch on a real server over a real channel."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from rag_service.api.request import search_params
from rag_service.client import RetrieverClient, RetrieverError
from rag_service.core.config import CacheConfig, ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb


@contextlib.contextmanager
def serve(server_thread, encoder, index, **cache):
    # No load-driven routes: answers compared across requests must not depend on how many searches overlapped.
    config = ServerConfig(index=index, port=0, warmup_queries=0, adaptive={"busy_in_flight": 1000},
                          cache=CacheConfig(**cache))
    with server_thread(config, encoder) as running, RetrieverClient(f"127.0.0.1:{running.port}", timeout=30) as c:
        running.client = c
        running.servicer = running.server.servicer
        yield running


def sample(running, name: str, **labels) -> float:
    value = running.servicer.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


class SlowPipeline:
    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, params, **kwargs):
        self.entered.set()
        time.sleep(self.delay)
        return self.inner.search(params, **kwargs)


@pytest.fixture(scope="module")
def running(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index, stream_debounce_ms=20) as r:
        yield r


def test_prefetch_then_search_is_served_prefetched(running):
    client = running.client
    reply = client.prefetch(["how do glaciers form from snow", pb.SearchRequest(query="what is caffeine", top_k=3)])
    assert (reply.accepted, reply.dropped) == (2, 0)
    wait_for(lambda: sample(running, "rag_prefetch_completed_total", outcome="filled") == 2)
    result = client.search("how do glaciers form from snow")
    assert result.served_from == "prefetched"
    assert same(result.contexts, client.search("how do glaciers form from snow", cache="bypass").contexts)
    # Prefetched with its parameters: the same parameters hit, others do not.
    assert client.search("what is caffeine", top_k=3).served_from == "prefetched"
    assert client.search("what is caffeine", top_k=4).served_from == "miss"
    assert sample(running, "rag_prefetch_used_total") == 2
    assert sample(running, "rag_prefetch_accepted_total") == 2


def test_prefetch_requests_are_validated_and_name_the_field(running):
    with pytest.raises(RetrieverError) as error:
        running.client.prefetch([pb.SearchRequest(query="ok"), pb.SearchRequest(query="x", top_k=0)])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "requests[1].top_k" in error.value.details
    with pytest.raises(RetrieverError) as error:
        running.client.prefetch([pb.SearchRequest(query="dna", cache=pb.CACHE_BYPASS)])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "requests[0].cache" in error.value.details
    with pytest.raises(RetrieverError) as error:
        running.client.prefetch([f"query {i}" for i in range(300)])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "requests" in error.value.details


@pytest.mark.slow
def test_prefetch_queue_is_bounded_and_yields_to_live_searches(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index, prefetch_queue=2) as r:
        real = r.servicer.pipeline
        slow = SlowPipeline(real, delay=0.8)
        r.servicer.pipeline = slow
        # Queue bound: what does not fit is dropped at once and counted.
        reply = r.client.prefetch(["volcano one", "volcano two", "volcano three", "volcano four"])
        assert (reply.accepted, reply.dropped) == (2, 2)
        assert sample(r, "rag_prefetch_dropped_total", reason="queue_full") == 2
        wait_for(lambda: sample(r, "rag_prefetch_completed_total", outcome="filled") == 2)
        # Busy: a live search in flight, background work is refused.
        live = r.client._stub.Search.future(pb.SearchRequest(query="busy live search about bridges"), timeout=30)
        wait_for(lambda: r.servicer.admission.in_flight >= 1)
        reply = r.client.prefetch(["bread while busy"])
        assert (reply.accepted, reply.dropped) == (0, 1)
        assert sample(r, "rag_prefetch_dropped_total", reason="busy") == 1
        live.result()
        r.servicer.pipeline = real


def plain(client, query: str, **kw):
    return client.search(query, cache="bypass", **kw)


def same(a, b) -> bool:
    """The same contexts in the same order; scores equal to float noise (batched query encoding pads differently)."""
    return ([c.chunk_id for c in a] == [c.chunk_id for c in b]
            and [c.score for c in a] == pytest.approx([c.score for c in b], rel=1e-4, abs=1e-5))


def typed(query: str, pause: float, final_pause: float):
    """Drafts as a user types word by word, then the final draft."""
    words = query.split()
    for n in range(1, len(words) + 1):
        yield " ".join(words[:n]), False
        time.sleep(pause)
    time.sleep(final_pause)
    yield query, True


def test_stream_search_final_answer_equals_a_plain_search(running):
    client = running.client
    query = "ancient romans built aqueducts of stone arches"
    before = sample(running, "rag_speculative_total", outcome="used")
    servicer = running.servicer
    key = servicer.cache.key(servicer.pipeline, search_params(pb.SearchRequest(query=query), servicer.config.defaults,
                                                              servicer.config.limits))

    def drafts():
        for draft, final in typed(query, pause=0.05, final_pause=0.0):
            # the user presses enter once the last draft's speculative search has finished (it fills the cache)
            if final:
                wait_for(lambda: servicer.cache.store.get(key) is not None)
            # Exact-only: a draft one word short must not be served as a semantic hit for the next one here.
            yield pb.SearchRequest(query=draft, cache=pb.CACHE_EXACT_ONLY), final

    results = list(client.stream_search(drafts()))
    assert len(results) == 1
    assert same(results[0].contexts, plain(client, query).contexts)
    # The final draft matched the last draft, which had been searched speculatively.
    assert results[0].served_from == "prefetched"
    assert sample(running, "rag_speculative_total", outcome="used") == before + 1
    assert sample(running, "rag_speculative_total", outcome="started") >= 1


def test_stream_search_final_that_differs_from_the_drafts_is_searched_at_once(running):
    client = running.client
    drafts = [("gravity attracts", False), ("gravity attracts masses", False),
              ("einstein curvature of spacetime", True)]
    results = list(client.stream_search(drafts))
    assert len(results) == 1 and results[0].served_from == "miss"
    assert same(results[0].contexts, plain(client, "einstein curvature of spacetime").contexts)


def test_stream_search_answers_each_final_and_skips_blank_drafts(running):
    client = running.client
    drafts = [("", False), ("   ", False), ("deoxyribonucleic acid double helix", True),
              (pb.SearchRequest(query="green plants chlorophyll", top_k=2, cache=pb.CACHE_BYPASS), True)]
    results = list(client.stream_search(drafts))
    assert len(results) == 2
    assert results[0].contexts[0].doc_id == "dna"
    assert len(results[1].contexts) == 2
    assert same(results[1].contexts, plain(client, "green plants chlorophyll", top_k=2).contexts)


def test_a_profiled_stream_final_carries_its_stage_timings(running):
    drafts = [("tectonic plates", False),
              (pb.SearchRequest(query="tectonic plates drift apart", cache=pb.CACHE_BYPASS, profile=True), True)]
    (result,) = running.client.stream_search(drafts)
    assert {"encode", "dense", "validate"} <= set(result.stage_time_us)
    assert same(result.contexts, plain(running.client, "tectonic plates drift apart").contexts)


def test_stream_search_with_bypass_still_uses_its_own_speculation(running):
    client = running.client
    query = "sourdough wild yeast starter"
    request = pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS)
    drafts = [(pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS), False)]
    running.settle()  # an earlier test's last store is in
    entries = len(running.servicer.cache.store)
    started = sample(running, "rag_speculative_total", outcome="started")

    def paced():
        yield drafts[0]
        # Enter pressed once the draft's speculative search has started (the final then waits for it).
        wait_for(lambda: sample(running, "rag_speculative_total", outcome="started") > started)
        yield request, True

    results = list(client.stream_search(paced()))
    assert results[0].served_from == "prefetched" and same(results[0].contexts, plain(client, query).contexts)
    assert len(running.servicer.cache.store) == entries  # bypass wrote nothing


def test_stream_search_invalid_final_draft_names_the_field(running):
    with pytest.raises(RetrieverError) as error:
        list(running.client.stream_search([("dna", False), (pb.SearchRequest(query="dna", top_k=0), True)]))
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in error.value.details
