"""The adaptive pipeline: each route (full, light, confident, fused, shallow) taken for its reason, on a real index."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rag_service.adaptive import (CONFIDENT, FULL, FUSED, LIGHT, SHALLOW, SHALLOW_DEPTH, AdaptiveConfig,
                                  AdaptivePolicy, agreement)
from rag_service.pipeline import Pipeline, SearchParams

QUERY = "ice cores record past climate in glaciers"
NO_CONFIDENCE = AdaptiveConfig(confidence=False)


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

    p = pipeline(index, encoder, lexical=2.0, dense=2.0, encode=5.0, rerank_per_candidate=0.01)
    params = SearchParams(query=QUERY, budget_ms=100)
    now = time.monotonic()
    fresh = p.policy.plan(params, None, 1, False, True, arrival=now)
    assert fresh.route == FULL and fresh.budget_end == pytest.approx(now + 0.1, abs=0.01)
    waited = p.policy.plan(params, None, 1, False, True, arrival=now - 0.095)  # 95 of its 100 ms spent queued
    assert waited.budget_end == pytest.approx(now + 0.005, abs=0.01)
    assert waited.route == SHALLOW
    result = p.search(params, arrival=time.monotonic() - 0.095)
    assert result.route == SHALLOW


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
