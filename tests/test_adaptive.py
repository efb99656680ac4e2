"""The adaptive pipeline: each route (full, light, confident, fused, shallow, lexical) taken for its reason, on a real
index."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rag_service.core.params import SearchParams
from rag_service.search.adaptive import (
    CONFIDENT,
    FULL,
    FUSED,
    LEXICAL,
    LIGHT,
    SHALLOW,
    SHALLOW_DEPTH,
    AdaptiveConfig,
    AdaptivePolicy,
    agreement,
)
from rag_service.search.pipeline import Pipeline

QUERY = "ice cores record past climate in glaciers"
NO_CONFIDENCE = AdaptiveConfig(confidence=False)
# Lexical route tests: the encode measurement the pipeline() helper feeds in stays recent for as long as a test runs.
LEXICAL_TESTS = AdaptiveConfig(confidence=False, lexical_probe_s=600.0)
# An encode the budget cannot pay for (50 ms of a 30 ms budget), a BM25 stage it can (1 ms).
SLOW_ENCODE = {"encode": 50.0, "lexical": 1.0, "dense": 1.0, "rerank_per_candidate": 0.01}


@pytest.fixture(scope="module")
def index(built_index):
    from rag_service.index.load import load_index

    return load_index(built_index)


def pipeline(index, encoder, config: AdaptiveConfig = NO_CONFIDENCE, **costs_ms) -> Pipeline:
    """A pipeline whose policy believes the given stage costs (ms), so the routes do not depend on this machine."""
    policy = AdaptivePolicy(config)
    for _ in range(200):  # enough samples for the moving means to converge on the given costs
        policy.observe({k: int(v * 1000) for k, v in costs_ms.items() if k != "rerank_per_candidate"}
                       | ({"rerank": int(costs_ms["rerank_per_candidate"] * 10_000)}
                          if "rerank_per_candidate" in costs_ms else {}), 10)
    return Pipeline(index, encoder, policy=policy)


def test_index_can_rerank(index):
    assert index.windows is not None  # otherwise every route below would be "fused" for want of windows


def test_no_budget_is_the_full_route(index, encoder):
    result = pipeline(index, encoder).search(SearchParams(query=QUERY, top_k=3))
    assert (result.route, result.route_reason) == (FULL, "no latency budget")
    assert result.contexts[0].doc_id == "glacier" and result.contexts[0].rerank_score is not None


def test_rerank_not_requested_is_the_fused_route(index, encoder):
    result = pipeline(index, encoder).search(SearchParams(query=QUERY, top_k=3, rerank=False))
    assert (result.route, result.route_reason) == (FUSED, "rerank not requested")
    assert result.contexts[0].rerank_score is None


def test_generous_budget_stays_full(index, encoder):
    result = pipeline(index, encoder, rerank_per_candidate=0.01).search(
        SearchParams(query=QUERY, top_k=3, budget_ms=600_000))
    assert result.route == FULL and result.contexts[0].rerank_score is not None


def test_budget_that_affords_part_of_the_rerank_is_the_light_route(index, encoder):
    # 1 s per candidate and a 10 s budget: a handful of the asked candidates fit -> light (with seconds to spare for
    # a first stage slowed down by a loaded machine).
    assert index.n_chunks >= 12
    config = AdaptiveConfig(confidence=False, light_min=2)
    result = pipeline(index, encoder, config, rerank_per_candidate=1000.0).search(
        SearchParams(query=QUERY, top_k=2, rerank_depth=100, budget_ms=10_000))
    assert result.route == LIGHT, result.route_reason
    assert "ms left: rerank" in result.route_reason
    assert result.contexts[0].rerank_score is not None


def test_budget_too_small_for_any_rerank_is_the_fused_route(index, encoder):
    result = pipeline(index, encoder, rerank_per_candidate=50.0).search(
        SearchParams(query=QUERY, top_k=3, budget_ms=200))
    assert result.route == FUSED and "would need" in result.route_reason
    assert result.contexts and result.contexts[0].rerank_score is None


def test_budget_below_the_first_stage_is_the_shallow_route(index, encoder):
    policy_costs = {"lexical": 500.0, "dense": 500.0}
    p = pipeline(index, encoder, **policy_costs)
    plan = p.policy.plan(SearchParams(query=QUERY, depth=200, budget_ms=100), None, 1, False, True)
    assert plan.route == SHALLOW and plan.params.depth == SHALLOW_DEPTH
    result = p.search(SearchParams(query=QUERY, top_k=3, depth=200, budget_ms=100))
    assert result.route == SHALLOW and f"depth 200 -> {SHALLOW_DEPTH}" in result.route_reason
    assert result.contexts and result.contexts[0].rerank_score is None


def test_budget_counts_from_arrival(index, encoder):
    """Time queued before a pipeline thread picks the request up is spent from its budget, as from a deadline."""
    import time

    # No lexical route here: with 5 ms left it would also fit, and this test is about the budget's start.
    p = pipeline(index, encoder, AdaptiveConfig(confidence=False, lexical=False), lexical=2.0, dense=2.0, encode=5.0,
                 rerank_per_candidate=0.01)
    params = SearchParams(query=QUERY, budget_ms=100)
    now = time.monotonic()
    fresh = p.policy.plan(params, None, 1, False, True, arrival=now)
    assert fresh.route == FULL and fresh.budget_end == pytest.approx(now + 0.1, abs=0.01)
    waited = p.policy.plan(params, None, 1, False, True, arrival=now - 0.095)  # 95 of its 100 ms spent queued
    assert waited.budget_end == pytest.approx(now + 0.005, abs=0.01)
    assert waited.route == SHALLOW
    result = p.search(params, arrival=time.monotonic() - 0.095)
    assert result.route == SHALLOW


def _counting_plans(p: Pipeline) -> list[str]:
    routes: list[str] = []
    real = p.policy.plan

    def plan(*args, **kwargs):
        made = real(*args, **kwargs)
        routes.append(made.route)
        return made

    p.policy.plan = plan  # type: ignore[method-assign]
    return routes


def test_a_plan_within_its_budget_by_far_is_not_made_again_after_the_encode(index, encoder):
    costs = {"lexical": 2.0, "dense": 2.0, "encode": 5.0, "rerank_per_candidate": 0.01}
    p = pipeline(index, encoder, AdaptiveConfig(confidence=False, lexical=False), **costs)
    routes = _counting_plans(p)
    result = p.search(SearchParams(query=QUERY, top_k=3, depth=200, budget_ms=600_000))
    assert result.route == FULL and routes == [FULL]
    # No budget at all: nothing to plan again either.
    routes.clear()
    assert p.search(SearchParams(query=QUERY, top_k=3)).route == FULL and routes == [FULL]


def test_an_encode_that_overruns_a_close_budget_is_planned_again(index, encoder):
    import time

    costs = {"lexical": 2.0, "dense": 2.0, "encode": 5.0, "rerank_per_candidate": 0.01}
    p = pipeline(index, encoder, AdaptiveConfig(confidence=False, lexical=False), **costs)
    routes = _counting_plans(p)
    real_encode = p.encode

    def slow_encode(query, deadline=None, idle=None):
        time.sleep(0.06)  # 60 ms against the 5 ms the policy expects, in a budget of 40
        return real_encode(query, deadline, idle)

    p.encode = slow_encode  # type: ignore[method-assign]
    # The budget counts from arrival, as a server's request's does.
    result = p.search(SearchParams(query=QUERY, top_k=3, depth=200, budget_ms=40), arrival=time.monotonic())
    assert routes == [FULL, SHALLOW] and result.route == SHALLOW, result.route_reason


def _no_encode(*args, **kwargs):
    pytest.fail("the lexical route encoded the query")


def test_budget_too_small_for_the_encode_is_the_lexical_route(index, encoder):
    p = pipeline(index, encoder, LEXICAL_TESTS, **SLOW_ENCODE)
    p.encode = _no_encode
    params = SearchParams(query=QUERY, top_k=3, budget_ms=30)
    plan = p.plan(params)
    assert plan.route == LEXICAL, plan.reason
    assert "encode + first stage need ~5" in plan.reason and "BM25 alone" in plan.reason
    result = p.search(params)
    assert result.route == LEXICAL and "BM25 alone" in result.route_reason
    assert "encode" not in result.stage_us and "dense" not in result.stage_us and "rerank" not in result.stage_us
    # BM25's order and scores; nothing from the dense retriever or the reranker.
    ids, scores = index.bm25.search(QUERY, 3, index.filter_mask({}))
    assert [c.chunk for c in result.contexts] == [int(i) for i in ids]
    assert [c.bm25_score for c in result.contexts] == pytest.approx([float(x) for x in scores])
    assert result.contexts[0].doc_id == "glacier"
    for c in result.contexts:
        assert c.dense_score is None and c.rerank_score is None and c.features is None
    # The same costs and a budget that pays for the encode: the full pipeline again.
    assert p.plan(replace_budget(params, 600_000)).route == FULL


def replace_budget(params: SearchParams, budget_ms: float) -> SearchParams:
    import dataclasses

    return dataclasses.replace(params, budget_ms=budget_ms)


def test_lexical_route_is_planned_only_when_bm25_fits_and_the_encode_is_still_to_do(index, encoder):
    params = SearchParams(query=QUERY, top_k=3, depth=200, budget_ms=30)
    # BM25 alone would not fit either: the shallow route, as before.
    slow_bm25 = pipeline(index, encoder, LEXICAL_TESTS, encode=50.0, lexical=100.0, dense=1.0)
    assert slow_bm25.plan(params).route == SHALLOW
    p = pipeline(index, encoder, LEXICAL_TESTS, **SLOW_ENCODE)
    # The caller has the query vector already: the encode is paid, so no reason to drop the dense retriever.
    assert p.plan(params, encoded=True).route == FULL
    # A pipeline that cannot answer from BM25 alone (the shard router) never gets it.
    assert p.policy.plan(params, None, 1, False, True).route != LEXICAL
    # Adaptive routing off, or the lexical route off: not planned.
    assert pipeline(index, encoder, AdaptiveConfig(enabled=False, lexical_probe_s=600.0), **SLOW_ENCODE) \
        .plan(params).route == FULL
    assert pipeline(index, encoder, AdaptiveConfig(confidence=False, lexical=False), **SLOW_ENCODE) \
        .plan(params).route != LEXICAL
    # No recent measurement of the encode (lexical requests do not make any): this request encodes and measures.
    stale = pipeline(index, encoder, AdaptiveConfig(confidence=False, lexical_probe_s=0.0), **SLOW_ENCODE)
    assert stale.plan(params).route != LEXICAL
    assert pipeline(index, encoder, LEXICAL_TESTS, lexical=1.0).plan(params).route != LEXICAL  # encode never seen


def test_lexical_answers_skip_the_cache_encode_and_are_not_kept(index, encoder):
    from rag_service.core.config import CacheConfig
    from rag_service.core.metrics import Metrics
    from rag_service.search.cache import MISS, CachedSearch

    p = pipeline(index, encoder, LEXICAL_TESTS, **SLOW_ENCODE)
    p.encode = _no_encode  # neither the cache's encode (semantic lookup) nor the pipeline's
    cache = CachedSearch(CacheConfig(), Metrics())
    params = SearchParams(query=QUERY, top_k=3, budget_ms=30)
    for _ in range(2):
        served = cache.run(p, params)
        assert served.served_from == MISS and served.result.route == LEXICAL
        assert served.result.contexts[0].doc_id == "glacier"
    assert len(cache.store) == 0


def test_load_takes_the_light_route(index, encoder):
    p = pipeline(index, encoder, AdaptiveConfig(confidence=False, busy_in_flight=2, busy_rerank_depth=5))
    for _ in range(3):  # three other searches in flight
        p.policy.enter()
    try:
        result = p.search(SearchParams(query=QUERY, top_k=3, rerank_depth=100, budget_ms=600_000))
    finally:
        for _ in range(3):
            p.policy.leave()
    assert result.route == LIGHT and "4 searches in flight" in result.route_reason
    assert p.policy.in_flight == 0


def test_agreeing_retrievers_take_the_confident_route(index, encoder):
    config = AdaptiveConfig(confidence=True, agree_top=3, agree_min=1)
    result = pipeline(index, encoder, config).search(SearchParams(query=QUERY, top_k=3))
    assert result.route == CONFIDENT and "agree on" in result.route_reason
    assert result.contexts[0].doc_id == "glacier" and result.contexts[0].rerank_score is None
    # A rule no query can meet (more agreement than the top holds) never skips the rerank.
    strict = AdaptiveConfig(confidence=True, agree_top=3, agree_min=4)
    assert pipeline(index, encoder, strict).search(SearchParams(query=QUERY, top_k=3)).route == FULL


def test_agreement_counts_shared_top_chunks():
    assert agreement(np.array([1, 2, 3, 4]), np.array([3, 9, 1, 7]), 3) == 2
    assert agreement(np.array([1, 2]), np.array([], dtype=np.int64), 5) == 0


def test_cost_model_follows_observed_timings():
    policy = AdaptivePolicy()
    for _ in range(300):
        policy.observe({"encode": 7000, "rerank": 20_000}, 100)
    est = policy.estimates()
    assert est["encode"] == pytest.approx(7.0, rel=0.01)
    assert est["rerank_per_candidate"] == pytest.approx(0.2, rel=0.01)


def test_route_and_reason_reach_the_grpc_reply(served_index):
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        off = stub.Search(pb.SearchRequest(query=QUERY, top_k=3, rerank=False, cache=pb.CACHE_BYPASS),
                          timeout=30)
        budget = stub.Search(pb.SearchRequest(query=QUERY, top_k=3, budget_ms=60_000, cache=pb.CACHE_BYPASS),
                             timeout=30)
    assert (off.route, off.route_reason) == ("fused", "rerank not requested")
    assert budget.route in ("full", "confident") and budget.route_reason


def test_lexical_route_reaches_the_grpc_reply(server_thread, built_index, encoder):
    from rag_service.core.config import ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    config = ServerConfig(index=built_index, port=0, warmup_queries=0)
    with server_thread(config, encoder) as running:
        served = running.server.servicer.pipeline
        served.policy = pipeline(served.index, encoder, LEXICAL_TESTS, **SLOW_ENCODE).policy
        served.encode = _no_encode
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            replies = [stub.Search(pb.SearchRequest(query=QUERY, top_k=3, budget_ms=30, debug=True), timeout=30)
                       for _ in range(2)]
    for reply in replies:
        assert reply.route == "lexical" and "BM25 alone" in reply.route_reason
        assert reply.served_from == pb.SERVED_FROM_MISS  # the first answer was not kept for the second
        assert reply.contexts[0].doc_id == "glacier"
        assert "encode" not in reply.stage_time_us and "dense" not in reply.stage_time_us
        for c in reply.contexts:
            assert c.HasField("bm25_score") and not c.HasField("dense_score") and not c.HasField("rerank_score")


# Brownout: the dimmer -------------------------------------------------------------------------------------------------

def test_dimmer_lowers_the_full_share_while_the_tail_is_over_target_and_raises_it_after():
    from rag_service.search.adaptive import Dimmer

    dimmer = Dimmer(target=0.5, window=20, period=10, gain=0.25)
    assert dimmer.level == 1.0 and all(dimmer.admit_full() for _ in range(50))
    for _ in range(10):
        dimmer.observe(1.0)  # every request used its whole budget: twice the target
    assert dimmer.level == pytest.approx(0.75) and dimmer.tail == pytest.approx(1.0)
    admitted = sum(dimmer.admit_full() for _ in range(400))
    assert admitted == 300  # error diffusion: exactly the level's share, no randomness
    for _ in range(30):
        dimmer.observe(3.0)  # far over: the step is capped at the gain, the level at 0
    assert dimmer.level == pytest.approx(0.0)
    assert not any(dimmer.admit_full() for _ in range(100))
    for _ in range(30):
        # Half the target: once the window holds only these (the second update), the level climbs by half the gain.
        dimmer.observe(0.25)
    assert dimmer.level == pytest.approx(0.25)
    for _ in range(200):
        dimmer.observe(0.1)
    assert dimmer.level == 1.0  # never above 1


def test_dimmer_level_moves_only_every_period():
    from rag_service.search.adaptive import Dimmer

    dimmer = Dimmer(target=0.5, window=40, period=10, gain=0.25)
    for _ in range(9):
        dimmer.observe(5.0)
    assert dimmer.level == 1.0
    dimmer.observe(5.0)
    assert dimmer.level == pytest.approx(0.75)


@pytest.mark.parametrize("kwargs", [dict(target=0.0), dict(target=1.5), dict(window=0), dict(period=0),
                                    dict(gain=0.0)])
def test_dimmer_rejects_bad_settings(kwargs):
    from rag_service.search.adaptive import Dimmer

    settings = dict(target=0.5, window=40, period=10, gain=0.25) | kwargs
    with pytest.raises(ValueError, match="brownout"):
        Dimmer(**settings)


def _overrun(policy: AdaptivePolicy, requests: int, share: float, budget_ms: float = 30.0) -> None:
    """`requests` budgeted requests that each took `share` of their budget (planned, then finished)."""
    import time

    for _ in range(requests):
        policy.enter()
        plan = policy.plan(SearchParams(query=QUERY, budget_ms=budget_ms), None, 1, False, True,
                           arrival=time.monotonic() - share * budget_ms / 1000.0)
        policy.leave(plan)


def test_sustained_overrun_sends_budgeted_requests_down_the_lexical_route(index, encoder):
    p = pipeline(index, encoder, NO_CONFIDENCE, encode=1.0, lexical=1.0, dense=1.0, rerank_per_candidate=0.001)
    params = SearchParams(query=QUERY, top_k=3, budget_ms=60_000)
    assert p.plan(params).route == FULL  # a cheap encode and a huge budget: nothing else would go lexical
    _overrun(p.policy, 40, share=0.95)  # the recent tail at 95% of the budget, target 50%
    level = p.policy.brownout_level()
    assert 0.0 < level < 1.0
    # Alone in the pipeline a request is never dimmed: the full pipeline delays nobody.
    assert all(p.plan(params).route == FULL for _ in range(20))
    p.policy.enter()  # another search in flight from here on
    routes = [p.plan(params) for _ in range(40)]
    lexical = [r for r in routes if r.route == LEXICAL]
    assert abs(len(lexical) - 40 * (1 - level)) <= 1
    assert "brownout" in lexical[0].reason and "BM25 alone" in lexical[0].reason
    # Searches take those routes: with another search in flight, some go lexical and never encode.
    results = [p.search(params) for _ in range(8)]
    lexical_results = [r for r in results if r.route == LEXICAL]
    assert lexical_results and all("encode" not in r.stage_us for r in lexical_results)
    assert all("encode" in r.stage_us for r in results if r.route != LEXICAL)
    # Requests without any budget are never dimmed; nor is a caller that has the query vector already.
    assert all(p.plan(SearchParams(query=QUERY, top_k=3)).route == FULL for _ in range(20))
    assert all(p.plan(params, encoded=True).route != LEXICAL for _ in range(20))
    # A tail well under target brings the full pipeline back to every request.
    _overrun(p.policy, 200, share=0.05)
    assert p.policy.brownout_level() == 1.0
    assert all(p.plan(params).route == FULL for _ in range(20))


def test_brownout_off_or_lexical_off_never_dims(index, encoder):
    for config in (AdaptiveConfig(confidence=False, brownout=False), AdaptiveConfig(confidence=False, lexical=False),
                   AdaptiveConfig(confidence=False, enabled=False)):
        p = pipeline(index, encoder, config, encode=1.0, lexical=1.0, dense=1.0)
        _overrun(p.policy, 40, share=0.95)
        p.policy.enter()
        assert all(p.plan(SearchParams(query=QUERY, top_k=3, budget_ms=60_000)).route != LEXICAL
                   for _ in range(20)), config


def test_failed_requests_count_against_the_budget_too(index, encoder):
    import time

    from rag_service.core.errors import DeadlineExceeded

    p = pipeline(index, encoder, NO_CONFIDENCE, encode=1.0, lexical=1.0, dense=1.0)
    for _ in range(20):
        with pytest.raises(DeadlineExceeded):
            # Already past its deadline on arrival: stopped before its first stage, and still observed.
            p.search(SearchParams(query=QUERY, top_k=3), deadline=time.monotonic() - 0.01,
                     arrival=time.monotonic() - 0.02)
    assert p.policy.brownout_level() < 1.0


def test_brownout_reaches_the_grpc_reply_and_the_metric(server_thread, built_index, encoder):
    from rag_service.core.config import ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    config = ServerConfig(index=built_index, port=0, warmup_queries=0, adaptive={"brownout_target": 0.4})
    with server_thread(config, encoder) as running:
        policy = running.server.servicer.pipeline.policy
        assert policy.config.brownout and policy.config.brownout_target == 0.4
        _overrun(policy, 80, share=2.0)  # long past the budget: the dimmer closes
        assert policy.brownout_level() == 0.0
        policy.enter()  # a search in flight besides the ones below
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            dimmed = stub.Search(pb.SearchRequest(query=QUERY, top_k=3, budget_ms=60_000, debug=True), timeout=30)
            unbudgeted = stub.Search(pb.SearchRequest(query=QUERY, top_k=3, cache=pb.CACHE_BYPASS), timeout=None)
        metrics = running.server.metrics
        share = metrics.registry.get_sample_value("rag_adaptive_full_share")
    assert dimmed.route == "lexical" and "brownout" in dimmed.route_reason
    assert "encode" not in dimmed.stage_time_us and dimmed.contexts[0].doc_id == "glacier"
    assert unbudgeted.route in ("full", "confident")
    assert share == 0.0


def test_the_query_analysis_counts_as_lexical_work_in_the_cost_model():
    # The native path times the analysis as its own stage; the model must see the same lexical cost as the
    # stage-by-stage path, which times it inside "lexical".
    split, whole = AdaptivePolicy(), AdaptivePolicy()
    for _ in range(50):
        split.observe({"analyze": 400, "lexical": 600, "dense": 1000}, 0)
        whole.observe({"lexical": 1000, "dense": 1000}, 0)
    assert split.estimates()["lexical"] == whole.estimates()["lexical"]
    assert abs(split.estimates()["lexical"] - 1.0) < 0.01  # ms: 50 samples of 1.0 pull the mean from 2.0 to ~1.0


class IdleRecorder:
    """The session's encoder, recording whether each encode was told the cores are idle."""

    def __init__(self, inner) -> None:
        self.inner, self.idle = inner, []
        self.name, self.dim = inner.name, inner.dim

    def encode_queries(self, texts, idle: bool = False):
        self.idle.append(idle)
        return self.inner.encode_queries(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)


def test_a_search_alone_encodes_on_the_idle_cores_and_one_under_load_does_not(index, encoder):
    recorder = IdleRecorder(encoder)
    p = Pipeline(index, recorder, policy=AdaptivePolicy(NO_CONFIDENCE))
    p.search(SearchParams(query=QUERY, top_k=3))
    p.policy.enter()  # another search in flight
    try:
        p.search(SearchParams(query=QUERY, top_k=3))
    finally:
        p.policy.leave()
    assert recorder.idle == [True, False]


def test_a_search_is_alone_only_when_the_server_has_been_idle_lately():
    admitted = [1]
    policy = AdaptivePolicy(NO_CONFIDENCE, load=lambda: admitted[0])
    assert policy.alone()
    admitted[0] = 2  # a second search admitted (running or queued)
    assert not any(policy.alone() for _ in range(10))
    admitted[0] = 1
    # Alone this instant, but most recent searches had company: a busy server, not an idle one.
    later = [policy.alone() for _ in range(40)]
    assert not later[0] and later[-1]
    policy.enter()
    policy.enter()  # two searches inside the pipeline count even when the server reports one
    assert not policy.alone()
