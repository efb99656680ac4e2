"""search_core: the first stage, the confidence rule and the rerank in one native call give the same results as
the two-call path (native retrieve, policy.rerank_depth, RerankCore.rerank), and its C++ equals its NumPy
composition."""

from __future__ import annotations

import time

import numpy as np
import pytest

from rag_service.core.params import SearchParams
from rag_service.core.timing import StageTimer
from rag_service.index.load import load_index
from rag_service.kernels import native
from rag_service.search import adaptive
from rag_service.search import rerank as rerank_mod
from rag_service.search.adaptive import AdaptiveConfig, AdaptivePolicy, Plan
from rag_service.search.pipeline import Pipeline

pytestmark = pytest.mark.skipif(native.retrieve_backend("auto") != "cpp", reason="needs the C++ extension")

WORDS = ["glacier", "ice", "valley", "volcano", "lava", "ash", "earthquake", "fault", "plant", "sunlight", "dna",
         "helix", "roman", "water", "printing", "press", "light", "speed", "gravity", "mass", "bridge", "cable",
         "coffee", "bean", "bread", "yeast", "unknownword", "the", "of", "a"]
FILTERS = (None, {"topic": "geology"}, {"topic": "no such topic"})


@pytest.fixture(scope="module")
def index(built_index):
    return load_index(built_index)


def queries(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 7)))) for _ in range(n)] + ["", "zzzz"]


def pipelines(index, encoder, config: AdaptiveConfig) -> tuple[Pipeline, Pipeline]:
    one = Pipeline(index, encoder, policy=AdaptivePolicy(config))
    two = Pipeline(index, encoder, policy=AdaptivePolicy(config))
    two.native_one_call = False
    return one, two


class Calls:
    """Counts the native entry points a request goes through."""

    def __init__(self, monkeypatch) -> None:
        self.names: list[str] = []
        for owner, name in ((native, "search_core"), (native, "retrieve"), (rerank_mod, "rerank")):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._wrap(name, real))
        # The pipeline's prepared form of the one call counts as it.
        monkeypatch.setattr(native.SearchCall, "__call__", self._wrap("search_core", native.SearchCall.__call__))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.names.append(name)
            return real(*args, **kwargs)
        return call

    def take(self) -> list[str]:
        names, self.names = self.names, []
        return names


def same_result(got, want) -> None:
    assert (got.route, got.route_reason) == (want.route, want.route_reason)
    # repr: every field exactly, NaN features included (NaN != NaN).
    assert [repr(c) for c in got.contexts] == [repr(c) for c in want.contexts]
    assert got.context_tokens == want.context_tokens


def rank(pipe: Pipeline, plan: Plan, vector) -> object:
    return pipe._rank(plan, vector, None, StageTimer())


CONFIGS = {
    "default": AdaptiveConfig(),
    "always confident": AdaptiveConfig(agree_top=3, agree_min=0),
    "often confident": AdaptiveConfig(agree_top=3, agree_min=1),
    "never confident": AdaptiveConfig(agree_top=5, agree_min=99),
    "no confidence rule": AdaptiveConfig(confidence=False),
    "adaptive off": AdaptiveConfig(enabled=False),
    "busy": AdaptiveConfig(busy_in_flight=0, busy_rerank_depth=3, confidence=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_call_gives_the_two_call_results(index, encoder, monkeypatch, name):
    one, two = pipelines(index, encoder, CONFIGS[name])
    calls = Calls(monkeypatch)
    routes = set()
    for i, query in enumerate(queries(hash(name) % 1000, 10)):
        vector = encoder.encode_queries(query)[0]
        for filt in FILTERS:
            for top_k, depth, rerank_depth in ((5, 30, 10), (20, 40, 8), (3, 7, 100), (1, 1, 1)):
                params = SearchParams(query=query, top_k=top_k, depth=depth, rerank_depth=rerank_depth, filters=filt,
                                      fusion="rrf" if i % 2 else "weighted")
                plan = one.policy.plan(params, None, 1, True, True)
                got = rank(one, plan, vector)
                assert calls.take() == ["search_core"]
                want = rank(two, plan, vector)
                assert calls.take()[0] == "retrieve"
                same_result(got, want)
                routes.add(got.route)
    expected = {"always confident": {adaptive.CONFIDENT}, "never confident": {adaptive.FULL},
                "busy": {adaptive.LIGHT, adaptive.FULL}}.get(name)
    if expected is not None:
        assert routes == expected
    if name == "often confident":
        assert {adaptive.CONFIDENT, adaptive.FULL} <= routes


def test_search_with_a_given_vector_takes_one_call(index, encoder, monkeypatch):
    one, two = pipelines(index, encoder, AdaptiveConfig())
    calls = Calls(monkeypatch)
    for query in queries(7, 8):
        vector = encoder.encode_queries(query)[0]
        params = SearchParams(query=query, top_k=4)
        got = one.search(params, query_vector=vector)
        assert calls.take() == ["search_core"]
        same_result(got, two.search(params, query_vector=vector))
        calls.take()
        assert {"analyze", "lexical", "dense", "fusion", "call"} <= set(got.stage_us)
        assert ("rerank" in got.stage_us) == (got.route in (adaptive.FULL, adaptive.LIGHT))


def test_lexical_fused_and_budgeted_requests_keep_today_s_path(index, encoder, monkeypatch):
    one, two = pipelines(index, encoder, AdaptiveConfig())
    calls = Calls(monkeypatch)
    params = SearchParams(query="glacier valley ice", top_k=5)
    vector = encoder.encode_queries(params.query)[0]
    lexical = Plan(params, adaptive.LEXICAL, "test: BM25 alone", None, 1)
    same_result(rank(one, lexical, None), rank(two, lexical, None))
    assert calls.take() == ["retrieve", "retrieve"]
    fused = one.policy.plan(SearchParams(query=params.query, rerank=False), None, 1, True, True)
    assert fused.route == adaptive.FUSED
    same_result(rank(one, fused, vector), rank(two, fused, vector))
    assert calls.take() == ["retrieve", "retrieve"]
    # A budget that could shrink the rerank decides its depth from the time left after the first stage: two calls.
    tight = one.policy.plan(SearchParams(query=params.query, budget_ms=40), None, 1, True, True)
    assert tight.budget_end is not None and one.policy.budget_may_bind(tight)
    rank(one, tight, vector)
    assert "search_core" not in calls.take()
    # One that cannot (a deadline of seconds, as most callers set) takes the one call, with the same answer.
    slack = one.policy.plan(SearchParams(query=params.query), time.monotonic() + 10.0, 1, True, True)
    assert slack.budget_end is not None and not one.policy.budget_may_bind(slack)
    same_result(rank(one, slack, vector), rank(two, slack, vector))
    assert calls.take()[:2] == ["search_core", "retrieve"]  # the two-call path: retrieve, then rerank


def test_rerank_plan_finish_matches_rerank_depth():
    rng = np.random.default_rng(3)
    for _ in range(300):
        config = AdaptiveConfig(enabled=bool(rng.random() < 0.9), confidence=bool(rng.random() < 0.7),
                                agree_top=int(rng.integers(0, 6)), agree_min=int(rng.integers(0, 6)),
                                busy_in_flight=int(rng.integers(0, 4)), busy_rerank_depth=int(rng.integers(1, 40)))
        policy = AdaptivePolicy(config)
        params = SearchParams(query="q", top_k=int(rng.integers(1, 30)), rerank_depth=int(rng.integers(0, 80)))
        route = str(rng.choice([adaptive.FULL, adaptive.FULL, adaptive.FUSED, adaptive.SHALLOW, adaptive.LEXICAL]))
        plan = Plan(params, route, "planned", None, int(rng.integers(1, 6)))
        bm25 = rng.permutation(40)[: int(rng.integers(0, 12))]
        dense = rng.permutation(40)[: int(rng.integers(0, 12))]
        available = int(rng.integers(0, 100))
        early = policy.rerank_plan(plan)
        agree = adaptive.agreement(bm25, dense, early.confidence[0]) if early.confidence else 0
        assert early.finish(agree, available) == policy.rerank_depth(plan, bm25, dense, available)
        depth = early.finish(agree, available)[0]
        assert depth == (0 if early.skip or depth == 0 else min(early.limit, available))


@pytest.mark.parametrize("seed", range(6))
def test_cpp_equals_the_numpy_composition(index, encoder, seed):
    pipe = Pipeline(index, encoder)
    store, model = pipe.rerank_store, pipe.rerank_model
    bm25, dense = index.bm25, index.dense
    rng = np.random.default_rng(seed)
    for query in queries(seed, 6):
        vector = encoder.encode_queries(query)[0]
        terms = bm25.term_ids(bm25.analyzer.tokens(query))
        qt, qc, qi = store.terms_of(terms)
        masks = [None, np.zeros(index.n_chunks, bool), rng.random(index.n_chunks) < 0.5]
        for mask in masks:
            for confidence in (None, (3, 1), (0, 0), (5, 99)):
                args = dict(mask=mask, vectors=dense.vectors, query=dense.query_row(vector),
                            method=str(rng.choice(["rrf", "weighted"])), top_k=int(rng.integers(1, 30)),
                            rerank_query=vector, query_terms=qt, query_counts=qc, query_idf=qi,
                            columns=model.columns, weights=model.weights, bias=model.bias,
                            rerank_depth=int(rng.integers(0, 25)), confidence=confidence)
                depth = int(rng.integers(1, 40))
                got = native.search_core(store.core, bm25.postings, terms, depth, backend="cpp", **args)
                want = native.search_core(store.core, bm25.postings, terms, depth, backend="numpy", **args)
                np.testing.assert_array_equal(got.first.fused.ids, want.first.fused.ids)
                assert (got.confident, got.agreement) == (want.confident, want.agreement)
                np.testing.assert_array_equal(got.ids, want.ids)
                np.testing.assert_array_equal(got.order, want.order)
                np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(got.features, want.features, rtol=1e-4, atol=1e-5)
                expected = 0 if got.confident else min(args["rerank_depth"], len(got.first.fused.ids))
                assert len(got.ids) == expected


@pytest.mark.parametrize("seed", range(4))
def test_the_prepared_call_equals_search_core(index, encoder, seed):
    pipe = Pipeline(index, encoder)
    store, model = pipe.rerank_store, pipe.rerank_model
    bm25, dense = index.bm25, index.dense
    codes = native.sq8_quantize(dense.vectors)
    rng = np.random.default_rng(seed)
    model_args = dict(columns=model.columns, weights=model.weights, bias=model.bias)
    for scan, oversample, by_table in ((True, 0, True), (True, 3, False), (False, 0, True), (False, 0, False)):
        call = native.SearchCall(store.core, bm25.postings, vectors=dense.vectors if scan else None,
                                 codes=codes if oversample else None, oversample=oversample,
                                 idf_table=store.idf if by_table else None, **model_args)
        for query in queries(seed, 4):
            vector = dense.query_row(encoder.encode_queries(query)[0])
            terms = bm25.term_ids(bm25.analyzer.tokens(query))
            given = store.terms_of(terms)
            for mask in (None, rng.random(index.n_chunks) < 0.5):
                depth, top_k = int(rng.integers(1, 40)), int(rng.integers(1, 30))
                hits = None if scan else native.dense_top(dense.vectors, vector, depth, mask=mask)
                confidence = [None, (3, 1), (5, 99)][int(rng.integers(0, 3))]
                fusion = dict(method=str(rng.choice(["rrf", "weighted"])), dense_weight=float(rng.random()),
                              top_k=top_k, rrf_k=60.0)
                rerank_depth = int(rng.integers(0, 25))
                got = call(terms, vector, depth, mask=mask, dense=hits, rerank_depth=rerank_depth,
                           confidence=confidence, query_terms=None if by_table else given, **fusion)
                terms_args = dict(idf_table=store.idf) if by_table else dict(
                    query_terms=given[0], query_counts=given[1], query_idf=given[2])
                want = native.search_core(
                    store.core, bm25.postings, terms, depth, mask=mask, vectors=dense.vectors if scan else None,
                    query=vector if scan else None, codes=codes if oversample else None, oversample=oversample,
                    dense=hits, rerank_query=vector, rerank_depth=rerank_depth, confidence=confidence,
                    backend="cpp", **fusion, **terms_args, **model_args)
                for a, b in zip(got.first.bm25 + got.first.dense + tuple(got.first.fused),
                                want.first.bm25 + want.first.dense + tuple(want.first.fused), strict=True):
                    np.testing.assert_array_equal(a, b)
                assert (got.confident, got.agreement) == (want.confident, want.agreement)
                for a, b in ((got.ids, want.ids), (got.scores, want.scores), (got.features, want.features),
                             (got.order, want.order)):
                    np.testing.assert_array_equal(a, b)
                # Part of the scan and the rerank on the core's worker thread changes nothing.
                halved = call(terms, vector, depth, mask=mask, dense=hits, rerank_depth=rerank_depth,
                              confidence=confidence, query_terms=None if by_table else given, helper=True,
                              **fusion)
                for a, b in ((halved.ids, got.ids), (halved.scores, got.scores),
                             (halved.features, got.features), (halved.order, got.order)):
                    np.testing.assert_array_equal(a, b)


def test_the_prepared_call_names_a_bad_argument(index, encoder):
    pipe = Pipeline(index, encoder)
    store, model = pipe.rerank_store, pipe.rerank_model
    bm25, dense = index.bm25, index.dense
    call = native.SearchCall(store.core, bm25.postings, vectors=dense.vectors, codes=None, oversample=0,
                             idf_table=store.idf, columns=model.columns, weights=model.weights, bias=model.bias)
    vector = dense.query_row(encoder.encode_queries("glacier ice")[0])
    terms = bm25.term_ids(bm25.analyzer.tokens("glacier ice"))
    fusion = dict(method="rrf", dense_weight=0.5, top_k=5, rrf_k=60.0, rerank_depth=5, confidence=None)
    assert len(call(terms, vector, 10, **fusion).ids) == 5
    for args, kwargs, message in (
            ((terms.astype(np.int32), vector, 10), {}, "term_ids must have dtype int64"),
            ((terms, vector[:5], 10), {}, "query must have"),
            ((terms, vector.astype(np.float64), 10), {}, "query must have dtype float32"),
            ((terms, vector, 10), {"mask": np.ones(index.n_chunks, np.uint8)}, "mask must have dtype bool"),
            ((terms, vector, 10), {"mask": np.ones(3, bool)}, "mask must have one entry per chunk"),
            ((terms, vector, 10), {"method": "max"}, "method")):
        with pytest.raises(ValueError, match=message):
            call(*args, **{**fusion, **kwargs})
    with pytest.raises(ValueError, match="rerank_depth must be >= 0"):
        call(terms, vector, 10, **{**fusion, "rerank_depth": -1})
    # The codes' sign bits reach the extension (these have a word too few per row): the prepared call refuses them
    # as it is made, at load, search_core per call.
    codes = native.sq8_quantize(dense.vectors)
    codes = codes._replace(bits=native.sign_bits(dense.vectors)[:, :0])
    index_args = dict(idf_table=store.idf, columns=model.columns, weights=model.weights, bias=model.bias)
    with pytest.raises(ValueError, match="code_bits must have shape"):
        native.SearchCall(store.core, bm25.postings, vectors=dense.vectors, codes=codes, oversample=2, **index_args)
    with pytest.raises(ValueError, match="code_bits must have shape"):
        native.search_core(store.core, bm25.postings, terms, 10, vectors=dense.vectors, query=vector, codes=codes,
                           oversample=2, rerank_query=vector, backend="cpp", **fusion, **index_args)
    # The index's other arguments are named as the call is prepared too.
    postings = bm25.postings
    for changed, message in (
            (dict(vectors=dense.vectors[:-1]), "vectors must have one row per chunk"),
            (dict(vectors=dense.vectors.astype(np.float64)), "vectors must have dtype float32"),
            (dict(weights=model.weights[:-1]), "columns and weights must have the same length"),
            (dict(idf_table=store.idf[:, None]), "idf_table must be 1-D"),
            (dict(postings=postings._replace(n_docs=postings.n_docs + 1), vectors=None), "one token stream per chunk")):
        args = dict(postings=postings, vectors=dense.vectors, codes=None, oversample=0, **index_args)
        args.update(changed)
        with pytest.raises(ValueError, match=message):
            native.SearchCall(store.core, args.pop("postings"), **args)
    # A prepared call without a table needs the query's terms.
    no_table = native.SearchCall(store.core, postings, vectors=dense.vectors, codes=None, oversample=0,
                                 **{**index_args, "idf_table": None})
    with pytest.raises(ValueError, match="needs query_terms"):
        no_table(terms, vector, 10, **fusion)
    assert len(no_table(terms, vector, 10, query_terms=store.terms_of(terms), **fusion).ids) == 5


def test_bad_input_names_the_field(index, encoder):
    from rag_service import _native

    pipe = Pipeline(index, encoder)
    store, model = pipe.rerank_store, pipe.rerank_model
    bm25, dense = index.bm25, index.dense
    vector = encoder.encode_queries("glacier")[0]
    terms = bm25.term_ids(bm25.analyzer.tokens("glacier"))
    qt, qc, qi = store.terms_of(terms)
    p = bm25.postings
    base = dict(core=store.core._native, indptr=p.indptr, docs=p.docs, weights=p.weights, n_docs=int(p.n_docs),
                term_ids=terms, mask=None, depth=10, vectors=dense.vectors, query=dense.query_row(vector), codes=None,
                code_scale=None, code_base=None, oversample=0, dense_ids=None, dense_scores=None, method="rrf",
                dense_weight=0.5, top_k=10, rrf_k=60.0, rerank_query=vector, query_terms=qt, query_counts=qc,
                query_idf=qi, columns=model.columns, model_weights=model.weights, bias=float(model.bias),
                rerank_depth=5, confidence=True, agree_top=5, agree_min=4)
    assert len(_native.search_core(**base)) == 7
    for field, value, message in (
            ("rerank_query", vector[:5], "rerank_query must have"),
            ("rerank_query", vector.astype(np.float64), "rerank_query"),
            ("query_idf", qi.astype(np.float32), "query_idf"),
            ("query_counts", qc[:0] if len(qc) else np.zeros(1), "query_terms, query_counts and query_idf"),
            ("rerank_depth", -1, "rerank_depth must be >= 0"),
            ("agree_top", -2, "agree_top must be >= 0"),
            ("model_weights", model.weights[:1], "columns and weights"),
            ("n_docs", int(p.n_docs) + 1, "n_docs"),
            ("term_ids", terms.astype(np.int32), "term_ids"),
            ("method", "max", "method")):
        with pytest.raises(ValueError, match=message):
            _native.search_core(**{**base, field: value})
    with pytest.raises(ValueError, match="rerank_depth"):
        native.search_core(store.core, p, terms, 10, rerank_query=vector, query_terms=qt, query_counts=qc,
                           query_idf=qi, columns=model.columns, weights=model.weights, bias=model.bias,
                           rerank_depth=-1, backend="numpy")


@pytest.mark.parametrize("seed", range(4))
def test_query_terms_derived_in_the_call_equal_the_given_ones(index, encoder, seed):
    from rag_service.kernels.reference import distinct_query_terms

    pipe = Pipeline(index, encoder)
    store, model = pipe.rerank_store, pipe.rerank_model
    bm25, dense = index.bm25, index.dense
    assert store.idf is not None  # lucene idf: the table the pipeline passes
    rng = np.random.default_rng(seed)
    for query in queries(seed, 8) + ["glacier glacier ice glacier", "the of a"]:
        vector = encoder.encode_queries(query)[0]
        terms = bm25.term_ids(bm25.analyzer.tokens(query))
        given = store.terms_of(terms)
        for got, want in zip(distinct_query_terms(terms, store.idf), given, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        args = dict(vectors=dense.vectors, query=dense.query_row(vector), top_k=int(rng.integers(1, 30)),
                    rerank_query=vector, columns=model.columns, weights=model.weights, bias=model.bias,
                    rerank_depth=int(rng.integers(1, 25)))
        want = native.search_core(store.core, bm25.postings, terms, 40, backend="cpp", query_terms=given[0],
                                  query_counts=given[1], query_idf=given[2], **args)
        for backend in ("cpp", "numpy"):
            got = native.search_core(store.core, bm25.postings, terms, 40, backend=backend, idf_table=store.idf,
                                     **args)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.features, want.features, rtol=1e-5, atol=1e-6)


def test_derived_query_terms_check_their_inputs(index, encoder):
    pipe = Pipeline(index, encoder)
    store, model = pipe.rerank_store, pipe.rerank_model
    bm25 = index.bm25
    vector = encoder.encode_queries("glacier ice")[0]
    terms = bm25.term_ids(bm25.analyzer.tokens("glacier ice"))
    qt, qc, qi = store.terms_of(terms)
    args = dict(vectors=index.dense.vectors, query=index.dense.query_row(vector), rerank_query=vector,
                columns=model.columns, weights=model.weights, bias=model.bias, rerank_depth=5)
    for backend in ("cpp", "numpy"):
        call = dict(args, backend=backend)
        with pytest.raises(ValueError, match="query_terms .* or idf_table"):
            native.search_core(store.core, bm25.postings, terms, 10, **call)
        with pytest.raises(ValueError, match="query_terms .* or idf_table"):
            native.search_core(store.core, bm25.postings, terms, 10, query_terms=qt, query_counts=qc, query_idf=qi,
                               idf_table=store.idf, **call)
        short = store.idf[: int(terms.max())]  # the query's largest id falls outside
        with pytest.raises(ValueError, match=r"term_ids must be in \[0, "):
            native.search_core(store.core, bm25.postings, terms, 10, idf_table=short, **call)
    with pytest.raises(ValueError, match="idf_table must have dtype float64"):
        native.search_core(store.core, bm25.postings, terms, 10, idf_table=store.idf.astype(np.float32),
                           backend="cpp", **args)


def test_a_search_alone_in_the_server_hands_part_of_its_work_to_the_worker(index, encoder, monkeypatch):
    pipe = Pipeline(index, encoder)
    helpers: list[bool] = []
    real = native.SearchCall.__call__

    def spy(self, *args, **kwargs):
        helpers.append(kwargs.get("helper", False))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(native.SearchCall, "__call__", spy)
    params = SearchParams(query="glacier ice valley", top_k=5, rerank_depth=30)
    alone = pipe.search(params)  # encoded here: the policy says whether the search is alone (it is)
    assert helpers == [True]
    # The worker's wake-up is a stage of its own, so the stages still add up to the request.
    assert "rouse" in alone.stage_us
    monkeypatch.setattr(pipe.policy, "alone", lambda: False)
    with_company = pipe.search(params)
    assert helpers == [True, False]
    assert "rouse" not in with_company.stage_us
    same_result(alone, with_company)
    # A caller that brings its own vector (a batch, a benchmark) keeps the search on its thread.
    pipe.search(params, query_vector=encoder.encode_queries(params.query)[0])
    assert helpers[-1] is False
