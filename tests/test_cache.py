"""The exact and semantic cache: unit checks of keys and the store, then end to end on a real server over a real
channel (served_from, strict mode, bypass, reload invalidation, TTL, memory bound, single flight)."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client import generate_latest

from rag_service.client import RetrieverClient
from rag_service.core.config import CacheConfig, ServerConfig
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams, SearchResult
from rag_service.index.build import BuildConfig, build_index
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc
from rag_service.search.cache import CachedSearch, answer_agreement, normalise, params_key, strict_signature

MISS, EXACT, SEMANTIC, PREFETCHED = (pb.SERVED_FROM_MISS, pb.SERVED_FROM_EXACT, pb.SERVED_FROM_SEMANTIC,
                                     pb.SERVED_FROM_PREFETCHED)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowCountingPipeline:
    """Delegates to a real pipeline; counts searches and makes each one slow enough for requests to pile up."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.calls = inner, delay, 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, params, **kwargs):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return self.inner.search(params, **kwargs)


@contextlib.contextmanager
def serve(server_thread, encoder, index, **cache):
    # No load-driven routes: answers compared across requests must not depend on how many searches overlapped.
    config = ServerConfig(index=index, port=0, warmup_queries=0, adaptive={"busy_in_flight": 1000},
                          cache=CacheConfig(**cache))
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        running.stub = pb_grpc.RetrieverStub(channel)
        running.servicer = running.server.servicer
        yield running


@pytest.fixture(scope="module")
def running(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index) as r:
        yield r


def search(stub, query: str, **fields) -> pb.SearchResponse:
    return stub.Search(pb.SearchRequest(query=query, **fields), timeout=30)


def chunks(response: pb.SearchResponse) -> list[str]:
    return [c.chunk_id for c in response.contexts]


def metric(running, name: str, **labels) -> float:
    running.settle()
    value = running.servicer.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# -- keys and the store, without a server --------------------------------------------------------------------------


def test_normalise_folds_what_a_user_cannot_tell_apart():
    assert normalise("  What  is\tDNA?\n") == "what is dna?"
    # ASCII takes a short way; it must fold as NFKC + casefold would.
    for text in ("MiXeD Case 123 !?", " tabs\tand\x0bvertical\x1fseparators ", "".join(map(chr, range(128)))):
        assert normalise(text) == re.sub(r"\s+", " ", unicodedata.normalize(
            "NFKC", unicodedata.normalize("NFKC", text).casefold())).strip()
    assert normalise("ＤＮＡ ﬁles") == normalise("dna files")  # NFKC: full-width letters, ligatures
    assert normalise("Straße") == normalise("STRASSE")  # case folding, not just lower()
    assert normalise("dna?") != normalise("dna")  # punctuation is not normalised away: that is the semantic cache's


def test_every_result_changing_parameter_is_in_the_key():
    base = SearchParams(query="q")
    changed = [SearchParams(query="q", top_k=5), SearchParams(query="q", depth=50),
               SearchParams(query="q", fusion="rrf"),
               SearchParams(query="q", dense_weight=0.3), SearchParams(query="q", rrf_k=20.0),
               SearchParams(query="q", filters={"topic": "geology"}), SearchParams(query="q", rerank=False),
               SearchParams(query="q", rerank_depth=50), SearchParams(query="q", max_context_tokens=256),
               SearchParams(query="q", mmr_lambda=0.5), SearchParams(query="q", dedup_threshold=0.9),
               SearchParams(query="q", budget_ms=20.0)]
    keys = {params_key(p) for p in changed}
    assert params_key(base) not in keys and len(keys) == len(changed)
    assert params_key(SearchParams(query="q", cache="strict")) == params_key(base)
    assert params_key(SearchParams(query="q", filters={"a": "1", "b": "2"})) == \
        params_key(SearchParams(query="q", filters={"b": "2", "a": "1"}))


def test_strict_signature_keeps_order_negation_and_prepositions():
    assert strict_signature("Flights from New York to Florida") != strict_signature("flights from Florida to New York")
    assert strict_signature("Is the drug effective?") == strict_signature("is drug effective")
    assert strict_signature("the drug is effective") != strict_signature("the drug is not effective")
    assert strict_signature("glaciers carving valleys") == strict_signature("glacier carves valley")  # stemmed


def test_store_evicts_least_recently_used_and_expires_by_insertion_time(served_index, encoder):
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    pipeline = Pipeline(load_index(served_index.root), encoder)
    clock = FakeClock()
    probe = CachedSearch(CacheConfig(), Metrics(), clock)
    probe.run(pipeline, SearchParams(query="volcano lava", cache="exact_only"))
    one_entry = probe.store.bytes
    cache = CachedSearch(CacheConfig(max_bytes=int(one_entry * 2.5), ttl_seconds=60), Metrics(), clock)
    queries = ["volcano lava", "glacier ice", "coffee beans"]
    for q in queries[:2]:
        assert cache.run(pipeline, SearchParams(query=q, cache="exact_only")).served_from == "miss"
    assert cache.run(pipeline, SearchParams(query="VOLCANO  lava", cache="exact_only")).served_from == "exact"
    cache.run(pipeline, SearchParams(query=queries[2], cache="exact_only"))  # evicts "glacier ice", used least lately
    assert cache.store.bytes <= cache.config.max_bytes and len(cache.store) == 2
    assert cache.run(pipeline, SearchParams(query="volcano lava", cache="exact_only")).served_from == "exact"
    clock.now += 59
    assert cache.run(pipeline, SearchParams(query="coffee beans", cache="exact_only")).served_from == "exact"
    clock.now += 2  # "volcano lava" was inserted 61 s ago: its hits did not extend its life
    assert cache.run(pipeline, SearchParams(query="volcano lava", cache="exact_only")).served_from == "miss"
    assert cache.metrics.registry.get_sample_value("rag_cache_expired_total") >= 1
    assert cache.metrics.registry.get_sample_value("rag_cache_evictions_total", {"reason": "lru"}) >= 1


def test_a_kept_reply_and_request_count_toward_the_budget_and_leave_with_their_entry(served_index, encoder):
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    pipeline = Pipeline(load_index(served_index.root), encoder)
    clock = FakeClock()
    cache = CachedSearch(CacheConfig(ttl_seconds=60), Metrics(), clock)
    params = SearchParams(query="volcano lava", cache="exact_only")
    assert cache.run(pipeline, params).served_from == "miss"
    hit = cache.run(pipeline, params)
    entry = hit.entry
    assert hit.served_from == "exact" and entry is not None and entry.reply is None
    scope = entry.key[0]
    request, reply = (b"wire bytes", "caller"), b"r" * 5000
    assert cache.replay(request, scope) is None  # nothing kept yet
    before = cache.store.bytes
    cache.keep_reply(entry, reply, request)
    assert entry.reply is reply and cache.store.bytes >= before + 5000
    assert cache.replay(request, scope) == (reply, "exact")
    # Another caller scope, or the same name now leading to another collection or version: not this entry's.
    assert cache.replay((b"wire bytes", "another caller"), scope) is None
    assert cache.replay(request, (scope[0], "another version")) is None
    # Kept once: a second encoding of the same entry is not counted again.
    counted = cache.store.bytes
    cache.keep_reply(entry, b"s" * 5000, None)
    assert entry.reply is reply and cache.store.bytes == counted
    clock.now += 61  # the entry expires, and what it kept goes with it
    assert cache.replay(request, scope) is None
    assert cache.run(pipeline, params).served_from == "miss"
    assert cache.store.bytes < counted
    # An entry that has left the cache keeps nothing new.
    cache.keep_reply(entry, reply, (b"later", "caller"))
    assert cache.replay((b"later", "caller"), scope) is None


def test_answers_cut_short_by_load_or_budget_are_served_but_not_kept(served_index, encoder):
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    index = load_index(served_index.root)

    class Degraded(Pipeline):  # the adaptive pipeline took the light route (load) for this answer
        def _rank(self, *args, **kwargs):
            result = super()._rank(*args, **kwargs)
            result.route, result.route_reason = "light", "busy"
            return result

    degraded, real = Degraded(index, encoder), Pipeline(index, encoder)
    cache = CachedSearch(CacheConfig(), Metrics())
    params = SearchParams(query="earthquake fault slip seismic waves")
    first = cache.run(degraded, params)
    assert first.served_from == "miss" and not first.result.complete
    assert cache.run(degraded, params).served_from == "miss" and len(cache.store) == 0
    assert cache.run(real, params).served_from == "miss"
    assert cache.run(real, params).served_from == "exact"


def test_an_answer_its_retrievers_disagreed_on_serves_no_semantic_hit(served_index, encoder):
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    pipeline = Pipeline(load_index(served_index.root), encoder)
    # On this 14-chunk index the two retrievers' top lists share 3 of BM25's 4 chunks for this query.
    cached_query = "roman aqueducts carried water from springs to cities"
    asked_query = "roman aqueducts carried water from cities to springs"
    first = CachedSearch(CacheConfig(), Metrics()).run(pipeline, SearchParams(query=cached_query))
    agreement = answer_agreement(first.result)  # the answer's BM25/dense overlap@10
    assert first.result.signals is not None and agreement == first.result.signals[2]
    assert 0.0 < agreement < 1.0
    # A floor at the answer's agreement serves the hit, one just above refuses it: the refusal is the agreement
    # check's and no other part of the guard's.
    for floor, served in ((0.0, "semantic"), (agreement, "semantic"), (agreement + 0.05, "miss")):
        cache = CachedSearch(CacheConfig(guard_min_agreement=floor), Metrics())
        cache.run(pipeline, SearchParams(query=cached_query))
        asked = cache.run(pipeline, SearchParams(query=asked_query))
        assert asked.served_from == served, floor
        if served == "semantic":
            assert [c.chunk for c in asked.result.contexts] == [c.chunk for c in first.result.contexts]
        else:
            assert cache.metrics.registry.get_sample_value("rag_cache_guard_rejections_total",
                                                           {"mode": "default"}) == 1


# -- end to end ----------------------------------------------------------------------------------------------------


def test_repeated_query_is_an_exact_hit(running):
    first = search(running.stub, "how does a suspension bridge hang its deck")
    assert first.served_from == MISS and not first.HasField("cache_similarity")
    again = search(running.stub, "  How does a SUSPENSION bridge hang its deck ")
    assert again.served_from == EXACT
    assert chunks(again) == chunks(first) and [c.score for c in again.contexts] == [c.score for c in first.contexts]
    assert again.index_version == first.index_version
    # Another parameter that changes the result is another entry.
    assert search(running.stub, "how does a suspension bridge hang its deck", top_k=3).served_from == MISS
    assert metric(running, "rag_cache_hits_total", kind="exact") >= 1
    exposed = generate_latest(running.servicer.metrics.registry).decode()
    assert 'rag_cache_hits_total{kind="exact"}' in exposed and "rag_cache_bytes" in exposed


def test_a_repeated_request_is_replayed_without_being_validated_again(running, monkeypatch):
    from rag_service.api import server as server_module

    validated: list[str] = []
    real = server_module.request_params

    def counting(request, *args, **kwargs):
        validated.append(request.query)
        return real(request, *args, **kwargs)

    monkeypatch.setattr(server_module, "request_params", counting)
    query = "what keeps a glacier moving downhill"
    first = search(running.stub, query)
    hit = search(running.stub, query)  # encodes the entry's reply once and keeps it with the request's bytes
    assert (first.served_from, hit.served_from, len(validated)) == (MISS, EXACT, 2)
    replayed = search(running.stub, query)
    assert replayed.served_from == EXACT and len(validated) == 2 and replayed.server_time_us > 0
    for reply in (first, hit, replayed):
        reply.server_time_us = 0
        reply.served_from = MISS
    assert replayed == hit == first and len(first.contexts) > 0
    # Another spelling of the query is the same entry, found the usual way the first time.
    assert search(running.stub, query.upper()).served_from == EXACT and len(validated) == 3
    assert search(running.stub, query.upper()).served_from == EXACT and len(validated) == 3
    # Debug replies carry per-call stage times: never replayed.
    assert [search(running.stub, query, debug=True).served_from for _ in range(3)] == [MISS, EXACT, EXACT]
    assert len(validated) == 6
    # A profiled request is the plain request's entry, and each of its replies carries its own stage timings:
    # a replay too, whose one stage is the cache's.
    profiled = [search(running.stub, query, profile=True) for _ in range(3)]
    assert [r.served_from for r in profiled] == [EXACT, EXACT, EXACT] and len(validated) == 7
    assert all(set(r.stage_time_us) >= {"cache"} and r.stage_time_us["cache"] > 0 for r in profiled)
    assert set(profiled[2].stage_time_us) == {"cache"} and "validate" in profiled[0].stage_time_us
    for r in profiled:
        r.stage_time_us.clear()
        r.server_time_us = 0
        r.served_from = MISS
    assert profiled[0] == profiled[2] == first
    # Nor is a request the cache bypasses.
    assert [search(running.stub, query, cache=pb.CACHE_BYPASS).served_from for _ in range(2)] == [MISS, MISS]
    assert len(validated) == 9


def test_paraphrase_passing_the_guard_is_a_semantic_hit(running):
    # Both with debug: a debug reply carries explanations, so it is cached apart from a plain one.
    cached = search(running.stub, "how do volcanoes erupt with lava and magma", debug=True)
    asked = search(running.stub, "how do volcanoes erupt with magma and lava", debug=True)
    assert asked.served_from == SEMANTIC
    assert asked.cache_similarity >= running.servicer.config.cache.semantic_min_cosine
    assert chunks(asked) == chunks(cached)
    assert "cache_semantic" in asked.stage_time_us and "lexical" not in asked.stage_time_us  # pipeline not run
    # Exact-only requests never take a semantic hit.
    exact_only = search(running.stub, "how do volcanoes erupt with magma and lava", cache=pb.CACHE_EXACT_ONLY)
    assert exact_only.served_from == MISS
    # An unrelated question is not served from the cache.
    assert search(running.stub, "sourdough starter yeast bacteria").served_from == MISS


def test_strict_mode_refuses_the_word_order_pair(running):
    search(running.stub, "heat flows from the volcano to the glacier")
    swapped = "heat flows from the glacier to the volcano"
    assert search(running.stub, swapped, cache=pb.CACHE_STRICT).served_from == MISS
    # Near-verbatim (an article, case, punctuation) is still a strict semantic hit.
    search(running.stub, "why do glaciers carve valleys")
    near = search(running.stub, "Why do the glaciers carve valleys?", cache=pb.CACHE_STRICT)
    assert near.served_from == SEMANTIC and near.cache_similarity > 0.9


def test_default_mode_serves_the_word_order_pair_when_retrieval_agrees(running):
    # For a retriever the swapped pair retrieves the same contexts (the guard checks the BM25 candidates agree), so
    # the default mode may serve it; strict mode above is for callers that cache answers.
    first = search(running.stub, "roman aqueducts carried water from springs to cities")
    swapped = search(running.stub, "roman aqueducts carried water from cities to springs")
    assert swapped.served_from == SEMANTIC and chunks(swapped) == chunks(first)


def test_reversed_claim_is_not_served_from_the_cache(server_thread, encoder, built_index, running):
    claim = "caffeine in roasted coffee beans increases alertness as a stimulant"
    reversed_claim = "caffeine in roasted coffee beans reduces alertness as a stimulant"
    # With the looser thresholds the guard had before (cosine 0.98, BM25 top 100) and without the word and
    # differing-term checks, the reversed claim is a hit (cosine 0.986, the same BM25 candidates): the trap is real
    # on this index, and the refusals below are the guard's.
    loose = {"semantic_min_cosine": 0.98, "guard_depth": 100}
    with serve(server_thread, encoder, built_index, **loose, guard_polarity_words=False,
               guard_max_differing_idf=float("inf")) as r:
        search(r.stub, claim)
        assert search(r.stub, reversed_claim).served_from == SEMANTIC
    with serve(server_thread, encoder, built_index, **loose) as r:
        first = search(r.stub, claim)
        assert search(r.stub, reversed_claim).served_from == MISS
        assert metric(r, "rag_cache_guard_rejections_total", mode="default") == 1
        # Its own answer was stored, and a case and punctuation variant of the claim still hits the claim's entry.
        assert search(r.stub, reversed_claim).served_from == EXACT
        again = search(r.stub, "Caffeine in roasted coffee beans increases alertness as a stimulant.")
        assert again.served_from == SEMANTIC and chunks(again) == chunks(first)
    # And with the defaults.
    search(running.stub, claim)
    assert search(running.stub, reversed_claim).served_from == MISS


def test_bypass_never_reads_or_writes(running):
    query = "printing press movable type literacy"
    running.settle()  # an earlier test's last store is in
    entries = running.servicer.cache.store.__len__()
    assert search(running.stub, query, cache=pb.CACHE_BYPASS).served_from == MISS
    assert len(running.servicer.cache.store) == entries
    assert search(running.stub, query).served_from == MISS  # the bypassed search wrote nothing
    assert search(running.stub, query).served_from == EXACT
    assert search(running.stub, query, cache=pb.CACHE_BYPASS).served_from == MISS  # and reads nothing


def test_invalid_cache_mode_names_the_field(running):
    with pytest.raises(grpc.RpcError) as error:
        running.stub.Search(pb.SearchRequest(query="dna", cache=17), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache" in error.value.details()


def test_ttl_expiry_with_a_controllable_clock(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index, ttl_seconds=100) as r:
        clock = FakeClock()
        r.servicer.cache.clock = clock
        query = "speed of light in a vacuum"
        assert search(r.stub, query).served_from == MISS
        r.settle()  # the answer is stored (at clock 0) before the clock moves
        clock.now += 99
        assert search(r.stub, query).served_from == EXACT
        assert search(r.stub, query).served_from == EXACT  # replayed from the request's bytes
        clock.now += 2  # 101 s after insertion: a hit at 99 s did not extend it, nor does a replay outlive it
        assert search(r.stub, query).served_from == MISS
        assert metric(r, "rag_cache_expired_total") == 1  # (metric() settles: stored again at 101)
        # A paraphrase of an expired entry is no semantic hit either.
        clock.now += 101
        assert search(r.stub, "speed of light in vacuum").served_from == MISS


def test_memory_bound_holds_under_a_flood_of_distinct_queries(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index, max_bytes=60_000) as r:
        store = r.servicer.cache.store
        words = ["glacier", "volcano", "coffee", "bridge", "gravity", "light", "bread", "dna", "printing", "aqueduct"]
        queries = [f"{words[i % 10]} {words[(i * 3 + 1) % 10]} question {i}" for i in range(40)]
        peak = 0
        for q in queries:
            assert search(r.stub, q, cache=pb.CACHE_EXACT_ONLY).served_from == MISS
            r.settle()
            peak = max(peak, store.bytes)
            assert r.servicer.metrics.registry.get_sample_value("rag_cache_bytes") == store.bytes
        assert 0 < peak <= 60_000
        assert metric(r, "rag_cache_evictions_total", reason="lru") >= 30
        assert 1 <= len(store) < 10
        assert search(r.stub, queries[-1], cache=pb.CACHE_EXACT_ONLY).served_from == EXACT
        assert search(r.stub, queries[0], cache=pb.CACHE_EXACT_ONLY).served_from == MISS  # evicted long ago


def test_identical_concurrent_searches_do_the_work_once(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index) as r:
        slow = SlowCountingPipeline(r.servicer.pipeline, delay=0.5)
        r.servicer.pipeline = slow
        request = pb.SearchRequest(query="chlorophyll turns sunlight into sugar")
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: r.stub.Search(request, timeout=30), range(12)))
        assert slow.calls == 1
        served = sorted(reply.served_from for reply in replies)
        assert served.count(MISS) == 1 and served.count(EXACT) == 11
        assert len({tuple(chunks(reply)) for reply in replies}) == 1
        assert metric(r, "rag_cache_hits_total", kind="coalesced") + metric(r, "rag_cache_hits_total", kind="exact") \
            == 11


def test_a_miss_is_stored_after_its_reply_and_before_the_next_request(server_thread, encoder, built_index,
                                                                      monkeypatch, caplog):
    """The store of a miss's answer runs on the event loop once the reply is out: a slow store does not delay the
    reply, and a request sent after the reply is an exact hit; a store that fails costs the hit, not the answer."""
    with serve(server_thread, encoder, built_index) as r:
        cache = r.servicer.cache
        store = cache._store
        stored = threading.Event()
        search(r.stub, "a first search warms the pipeline")
        r.settle()

        def slow_store(*args, **kwargs):
            time.sleep(2.0)
            store(*args, **kwargs)
            stored.set()

        monkeypatch.setattr(cache, "_store", slow_store)
        started = time.perf_counter()
        first = search(r.stub, "how does a suspension bridge hang its deck")
        assert first.served_from == MISS
        assert time.perf_counter() - started < 1.5 and not stored.is_set()
        again = search(r.stub, "how does a suspension bridge hang its deck")
        assert stored.is_set() and again.served_from == EXACT and chunks(again) == chunks(first)

        def failing_store(*args, **kwargs):
            raise RuntimeError("no room")

        monkeypatch.setattr(cache, "_store", failing_store)
        with caplog.at_level("ERROR", logger="rag_service.search.cache"):
            assert search(r.stub, "why do glaciers move downhill").served_from == MISS
            r.settle()
        assert "storing an answer in the cache failed" in caplog.text
        assert search(r.stub, "why do glaciers move downhill").served_from == MISS


def test_leader_past_its_deadline_does_not_fail_the_others(server_thread, encoder, built_index):
    with serve(server_thread, encoder, built_index) as r:
        slow = SlowCountingPipeline(r.servicer.pipeline, delay=0.6)
        r.servicer.pipeline = slow
        request = pb.SearchRequest(query="wild yeast lactic acid bacteria")
        leader = r.stub.Search.future(request, timeout=0.3)
        time.sleep(0.1)
        follower = r.stub.Search.future(request, timeout=30)
        with pytest.raises(grpc.RpcError) as error:
            leader.result()
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert follower.result().contexts[0].doc_id == "bread"


RELOAD_DOCS = [
    {"_id": "tides", "title": "Tides",
     "text": "Tides are the rise and fall of sea levels caused by the Moon's gravity."},
    {"_id": "comets", "title": "Comets",
     "text": "A comet is an icy body that grows a tail of gas and dust near the Sun."},
    {"_id": "coral", "title": "Coral reefs", "text": "Coral reefs are built by colonies of tiny animals in warm seas."},
]


@pytest.mark.slow
def test_reload_drops_every_entry_of_the_old_version(server_thread, encoder, write_corpus, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", RELOAD_DOCS)
    root = tmp_path / "idx"
    build_index(corpus, root, BuildConfig(), encoder=encoder, progress=False)
    config = ServerConfig(index=root, port=0, warmup_queries=0, auth={"admin_token": "secret"})
    with server_thread(config, encoder) as r, RetrieverClient(f"127.0.0.1:{r.port}", admin_token="secret",
                                                               timeout=60) as client:
        stub = pb_grpc.RetrieverStub(client.channel)
        cache = r.server.servicer.cache
        first = search(stub, "why does the sea rise and fall")
        for _ in range(2):  # the second hit is replayed from the request's bytes
            assert search(stub, "why does the sea rise and fall").served_from == EXACT
        assert len(cache.store) == 1
        time.sleep(1.1)  # versions are named by build time
        build_index(corpus, root, BuildConfig(), encoder=encoder, progress=False)
        reloaded = client.reload()
        assert reloaded.previous_version == first.index_version != reloaded.version
        # Dropped at the swap.
        assert len(cache.store) == 0 and cache.store.versions[first.collection] == reloaded.version
        registry = r.server.metrics.registry
        assert registry.get_sample_value("rag_cache_evictions_total", {"reason": "version"}) == 1
        again = search(stub, "why does the sea rise and fall")
        assert again.served_from == MISS and again.index_version == reloaded.version
        assert search(stub, "why does the sea rise and fall").served_from == EXACT


@pytest.mark.parametrize("seed", range(4))
def test_nearest_entries_are_the_brute_force_ones(seed):
    """The semantic look-up's scan of the stored query vectors (one native call) against a brute-force NumPy scan:
    only the group's live rows, cosine >= the floor, best first, ties by row, at most k; freed rows never."""
    from rag_service.search.cache import CacheStore, Entry

    rng = np.random.default_rng(seed)
    store = CacheStore(CacheConfig())
    store.use_version("c", "v1")
    store.use_version("gone", "v1")
    groups = [(("c", "v1"), (g,)) for g in range(3)]
    base = rng.normal(size=(5, 16)).astype(np.float32)  # near-duplicate vectors make ties and close calls
    entries = []
    for i in range(150):
        vector = base[int(rng.integers(0, 5))] + (rng.normal(size=16) * 0.05 if i % 3 else 0.0)
        vector = (vector / np.linalg.norm(vector)).astype(np.float32)
        # Every 7th entry belongs to a collection dropped below: its rows are freed, among the others'.
        group = (("gone", "v1"), (0,)) if i % 7 == 0 else groups[int(rng.integers(0, 3))]
        entry = Entry(key=(group[0], f"q{i}", group[1]), group=group,
                      result=SearchResult(contexts=[], index_version="v1", stage_us={}), vector=vector,
                      lexical=np.zeros(0, np.int64), terms={}, polarity=(), signature=(f"q{i}",), nbytes=100,
                      inserted=store.clock())
        assert store.put(entry)
        entries.append(entry)
    assert store.drop("gone") == len(entries[::7])
    live = [e for i, e in enumerate(entries) if i % 7]
    for _ in range(30):
        query = base[int(rng.integers(0, 5))] + rng.normal(size=16).astype(np.float32) * 0.1
        query = (query / np.linalg.norm(query)).astype(np.float32)
        group, floor, k = groups[int(rng.integers(0, 3))], float(rng.uniform(0.5, 0.99)), int(rng.integers(1, 9))
        members = [e for e in live if e.group == group]
        sims = [float(np.float32(e.vector @ query)) for e in members]
        ranked = sorted(((s, e.slot, e) for s, e in zip(sims, members, strict=True)), key=lambda t: (-t[0], t[1]))
        want = [(e, s) for s, _, e in ranked[:k] if s >= floor]
        got = store.nearest(group, query, floor, k)
        assert [e.key for e, _ in got] == [e.key for e, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5, atol=1e-6)


def test_nearest_in_a_cache_of_one_group_is_the_brute_force_one_before_and_after_rows_are_freed():
    """One collection and one set of parameters (the usual cache) is scanned without a mask; once rows are freed, or
    another group moves in, with one: the entries found are the brute-force ones either way."""
    from rag_service.search.cache import CacheStore, Entry

    rng = np.random.default_rng(7)
    store = CacheStore(CacheConfig())
    store.use_version("c", "v1")
    store.use_version("d", "v1")
    group, other = (("c", "v1"), (0,)), (("d", "v1"), (0,))
    base = rng.normal(size=(6, 32)).astype(np.float32)

    def put(i: int, where: tuple) -> Entry:
        vector = base[i % 6] + rng.normal(size=32).astype(np.float32) * 0.05
        entry = Entry(key=(where[0], f"q{i}", where[1]), group=where,
                      result=SearchResult(contexts=[], index_version="v1", stage_us={}),
                      vector=(vector / np.linalg.norm(vector)).astype(np.float32), lexical=np.zeros(0, np.int64),
                      terms={}, polarity=(), signature=(f"q{i}",), nbytes=100, inserted=store.clock())
        assert store.put(entry)
        return entry

    def check(members: list) -> None:
        for _ in range(20):
            query = base[int(rng.integers(0, 6))] + rng.normal(size=32).astype(np.float32) * 0.1
            query = (query / np.linalg.norm(query)).astype(np.float32)
            k = int(rng.integers(1, 9))
            ranked = sorted(members, key=lambda e: (-float(np.float32(e.vector @ query)), e.slot))[:k]
            got = store.nearest(group, query, 0.0, k)
            assert [e.key for e, _ in got] == [e.key for e in ranked]

    entries = [put(i, group) for i in range(120)]
    check(entries)  # every row is the group's: the unmasked scan
    others = [put(1000 + i, other) for i in range(30)]
    check(entries)  # another group's rows among them
    assert store.drop("d") == len(others)
    check(entries)  # freed rows among them
    entries += [put(2000 + i, group) for i in range(40)]  # the freed rows taken again, and more
    check(entries)


def _vector_entry(store, where: tuple, i: int, vector: np.ndarray):
    from rag_service.search.cache import Entry

    entry = Entry(key=(where[0], f"q{i}", where[1]), group=where,
                  result=SearchResult(contexts=[], index_version="v1", stage_us={}), vector=vector,
                  lexical=np.zeros(0, np.int64), terms={}, polarity=(), signature=(f"q{i}",), nbytes=100,
                  inserted=store.clock())
    assert store.put(entry)
    return entry


@pytest.mark.parametrize("seed", range(3))
def test_the_prefilter_finds_what_the_full_scan_finds_bit_for_bit(seed, monkeypatch):
    """The semantic look-up's prefilter (projections on a fitted basis) against the same store's scan without it:
    the same entries and the same scores, bit for bit, with floors drawn at random, at the kernel's own scores and a
    hair either side, over clusters of near-duplicates, other groups' rows and freed rows."""
    from rag_service.search import cache as cache_module
    from rag_service.search.cache import CacheStore

    monkeypatch.setattr(cache_module, "PREFILTER_ROWS", 64)
    rng = np.random.default_rng(seed)
    stores = {name: CacheStore(CacheConfig()) for name in ("prefilter", "full")}
    for store in stores.values():
        store.use_version("c", "v1")
        store.use_version("d", "v1")
    group, other = (("c", "v1"), (0,)), (("d", "v1"), (0,))
    dim = 48
    centres = rng.normal(size=(12, dim)).astype(np.float32)
    vectors = []
    for i in range(400):
        v = centres[i % 12] + rng.normal(size=dim).astype(np.float32) * float(rng.choice([0.002, 0.02, 0.2]))
        vectors.append((v / np.linalg.norm(v)).astype(np.float32))
    for name, store in stores.items():
        if name == "full":
            monkeypatch.setattr(cache_module, "PREFILTER_ROWS", 10**9)
        for i, v in enumerate(vectors):
            _vector_entry(store, other if i % 5 == 0 else group, i, v)
        store.drop("d")  # freed rows among the group's
        for i, v in enumerate(vectors[:40]):  # some taken again
            _vector_entry(store, group, 1000 + i, v)
    assert stores["prefilter"]._matrices[dim].basis is not None and stores["full"]._matrices[dim].basis is None
    for _ in range(60):
        q = centres[int(rng.integers(0, 12))] + rng.normal(size=dim).astype(np.float32) * 0.01
        q = (q / np.linalg.norm(q)).astype(np.float32)
        k = int(rng.integers(1, 9))
        ranked = stores["full"].nearest(group, q, -1.0, 50)
        floors = [float(rng.uniform(0.9, 1.0)), 0.992, 0.5, -1.0]  # low floors leave too many rows to gather
        for _, sim in ranked[:3]:  # at a score the kernel gave, and a float32 step either side
            floors += [sim, float(np.nextafter(np.float32(sim), np.float32(2))),
                       float(np.nextafter(np.float32(sim), np.float32(-2)))]
        for floor in floors:
            want = stores["full"].nearest(group, q, floor, k)
            got = stores["prefilter"].nearest(group, q, floor, k)
            assert [(e.key, s) for e, s in got] == [(e.key, s) for e, s in want]


def test_the_prefilter_skips_the_scan_when_no_row_can_reach_the_floor(monkeypatch):
    from rag_service.kernels import native
    from rag_service.search import cache as cache_module
    from rag_service.search.cache import CacheStore

    monkeypatch.setattr(cache_module, "PREFILTER_ROWS", 64)
    rng = np.random.default_rng(11)
    store = CacheStore(CacheConfig())
    store.use_version("c", "v1")
    group = (("c", "v1"), (0,))
    for i in range(200):
        v = rng.normal(size=64).astype(np.float32)
        _vector_entry(store, group, i, (v / np.linalg.norm(v)).astype(np.float32))
    scans = []
    real = native.dense_above
    monkeypatch.setattr(native, "dense_above", lambda *a, **kw: scans.append(len(a[0])) or real(*a, **kw))
    far = rng.normal(size=64).astype(np.float32)
    assert store.nearest(group, (far / np.linalg.norm(far)).astype(np.float32), 0.992, 4) == []
    assert scans == []  # random unit vectors in 64 dimensions are nowhere near cosine 0.992
    near = store._matrices[64].vectors[17] + np.float32(0.001)
    found = store.nearest(group, (near / np.linalg.norm(near)).astype(np.float32), 0.992, 4)
    assert [e.key[1] for e, _ in found] == ["q17"]
    assert len(scans) == 1 and scans[0] < 10  # a few rows scanned, not 200


def test_principal_directions_are_orthonormal_repeatable_and_span_the_rows_best_directions():
    from rag_service.search.cache import principal_directions

    rng = np.random.default_rng(5)
    # 300 rows in 40 dimensions, most of their spread along 6 directions.
    spread = rng.normal(size=(6, 40))
    rows = (rng.normal(size=(300, 6)) * 5.0) @ spread + rng.normal(size=(300, 40)) * 0.1
    basis = principal_directions(rows.astype(np.float32), 6)
    assert basis.shape == (6, 40) and basis.dtype == np.float64
    np.testing.assert_allclose(basis @ basis.T, np.eye(6), atol=1e-12)
    np.testing.assert_array_equal(basis, principal_directions(rows.astype(np.float32), 6))
    centred = rows - rows.mean(axis=0)
    _, _, best = np.linalg.svd(centred, full_matrices=False)
    assert np.linalg.norm(centred @ basis.T) ** 2 >= 0.999 * np.linalg.norm(centred @ best[:6].T) ** 2


def test_a_cache_matrix_holds_what_its_budget_allows_without_growing():
    from rag_service.search.cache import CacheStore

    # An entry counts its vector at least twice: a budget of 100 x 2 x 64 floats holds at most 100 rows of 64.
    store = CacheStore(CacheConfig(max_bytes=100 * 2 * 64 * 4))
    store.use_version("c", "v1")
    rng = np.random.default_rng(2)
    first = None
    for i in range(100):
        v = rng.normal(size=64).astype(np.float32)
        _vector_entry(store, (("c", "v1"), (0,)), i, (v / np.linalg.norm(v)).astype(np.float32))
        matrix = store._matrices[64]
        first = first if first is not None else matrix.vectors
        assert matrix.vectors is first  # never copied to grow
    assert len(first) == 101


def test_a_hit_gets_a_copy_that_equals_the_dataclass_copy_and_leaves_the_entry_alone():
    import dataclasses

    from rag_service.core.params import ContextResult
    from rag_service.search.cache import _copy

    # _copy copies the instance's fields directly: right only while every field is an __init__ field and nothing
    # runs after __init__, which is what dataclasses.replace would honour.
    assert all(f.init for f in dataclasses.fields(SearchResult))
    assert not hasattr(SearchResult, "__post_init__")
    context = ContextResult(chunk=3, doc_id="d", chunk_id="d#0", title="t", text="x", metadata={}, score=1.5,
                            bm25_score=None, dense_score=0.5)
    kept = SearchResult(contexts=[context], index_version="v1", stage_us={"encode": 7}, context_tokens=4,
                        route="full", route_reason="r", legs=("bm25",), signals=(1.0, 0.5, 0.3), complete=True,
                        shards_answered=["a"])
    hit = _copy(kept, {"cache": 2})
    assert hit == dataclasses.replace(kept, contexts=list(kept.contexts), stage_us={"cache": 2})
    assert type(hit) is SearchResult and hit is not kept
    hit.contexts.append(context)
    hit.stage_us["more"] = 1
    assert kept.contexts == [context] and kept.stage_us == {"encode": 7}


def test_a_plain_answer_is_kept_packed_and_each_hit_unpacks_an_equal_answer_of_its_own(served_index, encoder):
    import dataclasses
    import gc

    from rag_service.index.load import load_index
    from rag_service.search.cache import PackedResult
    from rag_service.search.pipeline import Pipeline

    pipeline = Pipeline(load_index(served_index.root), encoder)
    cache = CachedSearch(CacheConfig(), Metrics())
    params = SearchParams(query="volcano lava", top_k=5, cache="exact_only")
    miss = cache.run(pipeline, params)
    assert miss.served_from == "miss" and len(miss.result.contexts) == 5
    (entry,) = cache.store._lru.values()
    assert isinstance(entry.result, PackedResult)
    gc.collect(0)
    # Flat tuples of numbers and strings: the collector's first pass over them stops tracking them.
    packed = entry.result
    assert not any(gc.is_tracked(t) for t in (packed.contexts.values, packed.contexts.featured, packed.contexts.names))
    assert len(packed.contexts.values) == 5 * 7 and packed.contexts.features.shape[0] == 5
    gc.collect(1)  # the result's values hold tuples of their own (legs, signals): a pass later
    assert not gc.is_tracked(packed.values)
    # A hit's contexts are unpacked when first read: a plain reply to a hit sends the bytes kept with its entry.
    unread = cache.run(pipeline, params).result
    assert "contexts" not in vars(unread)
    assert dataclasses.replace(unread, stage_us={}) == dataclasses.replace(miss.result, stage_us={})
    assert "contexts" in vars(unread) and len(unread.contexts) == 5
    hits = [cache.run(pipeline, params) for _ in range(2)]
    for hit in hits:
        assert hit.served_from == "exact"
        assert hit.result == dataclasses.replace(miss.result, stage_us=hit.result.stage_us)
        assert dataclasses.replace(hit.result, stage_us={}) == dataclasses.replace(miss.result, stage_us={})
        assert [dict(c.features or {}) for c in hit.result.contexts] == \
            [dict(c.features or {}) for c in miss.result.contexts]
        assert type(hit.result.shards_answered) is list
    assert not {id(c) for c in hits[0].result.contexts} & {id(c) for c in hits[1].result.contexts}
    assert hits[0].result.contexts[0].title  # one hit reading its fields leaves the next hit's contexts unread
    assert not cache.run(pipeline, params).result.contexts[0].resolved


def test_contexts_that_hold_more_than_their_scores_are_not_packed(served_index, encoder):
    import dataclasses

    from rag_service.core.params import ContextResult
    from rag_service.index.load import load_index
    from rag_service.search.cache import PackedResult, _pack
    from rag_service.search.pipeline import Pipeline
    from rag_service.search.searcher import pack_contexts, replace_context

    pipeline = Pipeline(load_index(served_index.root), encoder)
    result = pipeline.search(SearchParams(query="volcano lava", top_k=3))
    assert pack_contexts(result.contexts) is not None
    assert pack_contexts([]).unpack() == []
    plain = ContextResult(chunk=1, doc_id="d", chunk_id="d#0", title="t", text="x", metadata={}, score=1.0,
                          bm25_score=None, dense_score=0.5)
    other = Pipeline(pipeline.index, encoder).search(SearchParams(query="glacier ice", top_k=1)).contexts
    read = pipeline.search(SearchParams(query="volcano lava", top_k=3)).contexts
    assert read[1].title and read[1].resolved
    for contexts in ([*result.contexts, plain], [replace_context(result.contexts[0], highlights=((0, 1, "v"),))],
                     [*result.contexts, *other], read):
        assert pack_contexts(contexts) is None
    shaped = dataclasses.replace(result, shaped=True)
    for kept_whole in (shaped, dataclasses.replace(result, groups=[]), dataclasses.replace(result, contexts=read)):
        kept = _pack(kept_whole)
        assert not isinstance(kept, PackedResult) and kept == dataclasses.replace(kept_whole, stage_us={})


def test_a_cache_entry_adds_a_few_tracked_objects_to_the_heap(served_index, encoder):
    import gc

    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    pipeline = Pipeline(load_index(served_index.root), encoder)
    cache = CachedSearch(CacheConfig(), Metrics())
    cache.run(pipeline, SearchParams(query="volcano lava warm up"))
    gc.collect()
    before = len(gc.get_objects())
    n = 60
    for i in range(n):  # distinct queries, distinct words: a miss and a store each
        cache.run(pipeline, SearchParams(query=f"volcano lava eruption{i} basalt{i}x"))
    for _ in range(3):
        gc.collect()
    assert len(cache.store) == n + 1
    # Ten live contexts with their features and readers were ~50 tracked objects an entry; packed, 3.
    assert (len(gc.get_objects()) - before) / n < 6
