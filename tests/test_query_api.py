"""The query API over a real server: results by document, pages, score floors, recency decay, highlights,
explanations, the degraded flag and the label-free quality metrics (search/shape.py, api/pages.py)."""

from __future__ import annotations

import base64
import json
import time

import grpc
import pytest

from rag_service.bench.quality import doc_run
from rag_service.client import Decay, RetrieverClient, RetrieverError
from rag_service.core.config import ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

TEA = "Tea is brewed from the cured leaves of the Camellia plant and is served hot or iced."
COFFEE_HISTORY = " ".join([
    "Coffee was first brewed in Yemen in the fifteenth century by Sufi monks who drank it to stay awake.",
    "From the Arabian peninsula the coffee trade spread to Persia, Egypt and the Ottoman Empire.",
    "Coffeehouses in Istanbul and later in London became places of debate, news and commerce.",
    "Dutch traders smuggled coffee plants to Java, and French colonists carried them to the Caribbean.",
    "Brazil became the largest coffee producer in the nineteenth century, a position it still holds.",
    "Today coffee is brewed by espresso machines, drip filters and French presses around the world.",
])
DOCS = [
    ("tea-2001", "Tea", TEA, {"date": "2001-03-01", "topic": "drink"}),
    ("tea-2011", "Tea", TEA, {"date": "2011-03-01T08:00:00Z", "topic": "drink"}),
    ("tea-2021", "Tea", TEA, {"date": 1614556800, "topic": "drink"}),  # 2021-03-01 as Unix seconds
    ("coffee-history", "History of coffee", COFFEE_HISTORY, {"date": "1999-01-01", "topic": "drink"}),
    ("cafe", "Café culture", "Les cafés parisiens servent un café noir très serré. In München trinken naïve "
     "Über-Kunden Kaffee. The café brewed coffee for everyone.", {"date": "2020-06-15", "topic": "drink"}),
    ("espresso", "Espresso", "Espresso is coffee brewed by forcing hot water under pressure through finely ground "
     "beans.", {"date": "2015-05-05", "topic": "drink"}),
    ("volcano", "Volcanoes", "A volcano erupts when magma rises through the crust and lava escapes through a vent.",
     {"date": "2005-01-01", "topic": "geology"}),
    ("glacier", "Glaciers", "A glacier is a persistent body of dense ice that moves under its own weight.",
     {"topic": "geology"}),  # no date: a decay's factor is 0
    ("bread", "Sourdough", "Sourdough is leavened by wild yeast and lactic acid bacteria in a fermented starter.",
     {"date": "2019-09-09", "topic": "food"}),
]


@pytest.fixture(scope="module")
def api_index(tmp_path_factory, encoder, write_corpus):
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("query-api")
    corpus = write_corpus(work / "corpus.jsonl", ({"_id": i, "title": t, "text": x, "metadata": m}
                                                   for i, t, x, m in DOCS))
    root = work / "idx"
    build_index(corpus, root, BuildConfig(chunk_tokens=48, chunk_overlap=8), encoder=encoder, progress=False)
    return root


@pytest.fixture(scope="module")
def served(api_index, encoder, server_thread):
    config = ServerConfig(index=api_index, port=0, warmup_queries=1, metrics={"quality_floor": 0.5})
    with server_thread(config, encoder) as running, \
            RetrieverClient(f"127.0.0.1:{running.port}", timeout=30) as client, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, client, pb_grpc.RetrieverStub(channel)


def _ids(result) -> list[str]:
    return [c.chunk_id for c in result.contexts]


def _refused(call, code: grpc.StatusCode, field: str) -> None:
    with pytest.raises(RetrieverError) as caught:
        call()
    assert caught.value.code == code, caught.value
    assert field in caught.value.details, caught.value.details


# -- results by document ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rerank", [True, False])
def test_grouped_documents_come_in_the_evaluators_best_chunk_order(served, rerank):
    _, client, _ = served
    query = "history of brewed coffee and tea"
    ungrouped = client.search(query, top_k=40, depth=40, rerank=rerank, cache="bypass")
    want = list(doc_run(c.doc_id for c in ungrouped.contexts))
    grouped = client.search(query, top_k=5, depth=40, rerank=rerank, group_by_doc=True, cache="bypass")
    assert [g.doc_id for g in grouped.groups] == want[:5]
    assert [c.doc_id for c in grouped.contexts] == want[:5]  # group_size defaults to 1
    best = {}
    for c in ungrouped.contexts:
        best.setdefault(c.doc_id, c)
    for group in grouped.groups:
        (context,) = group.contexts
        assert context.chunk_id == best[group.doc_id].chunk_id
        assert group.score == pytest.approx(best[group.doc_id].score) == context.document_score


def test_group_size_keeps_each_documents_best_chunks_together(served):
    _, client, _ = served
    query = "coffee trade coffeehouses brewed"
    ungrouped = client.search(query, top_k=40, depth=40, cache="bypass")
    grouped = client.search(query, top_k=3, depth=40, group_by_doc=True, group_size=2, cache="bypass")
    assert len(grouped.groups) == 3
    history = [c.chunk_id for c in ungrouped.contexts if c.doc_id == "coffee-history"]
    assert len(history) >= 3  # the long document has several chunks
    seen = []
    for group in grouped.groups:
        ids = [c.chunk_id for c in group.contexts]
        assert 1 <= len(ids) <= 2 and {c.doc_id for c in group.contexts} == {group.doc_id}
        assert ids == [c.chunk_id for c in ungrouped.contexts if c.doc_id == group.doc_id][:2]
        assert group.score == max(c.score for c in group.contexts)
        seen += ids
    assert seen == [c.chunk_id for c in grouped.contexts]  # a document's contexts are contiguous


# -- pages -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"rerank": False, "fusion": "rrf"}, {"rerank_depth": 4},
                                     {"group_by_doc": True}, {"group_by_doc": True, "group_size": 2},
                                     {"mmr_lambda": 0.7, "dedup_threshold": 0.95}])
def test_concatenated_pages_equal_one_request_for_all_of_them(served, options):
    _, client, _ = served
    query = "coffee brewed hot water"
    whole = client.search(query, top_k=6, offset=0, cache="bypass", **options)
    pages = [client.search(query, top_k=2, offset=0, cache="bypass", **options)]
    while pages[-1].next_page_token and len(pages) < 3:
        pages.append(client.search(query, top_k=2, page_token=pages[-1].next_page_token, cache="bypass", **options))
    assert len(pages) == 3 and [p.offset for p in pages] == [0, 2, 4]
    assert [i for p in pages for i in _ids(p)] == _ids(whole)
    assert [c.score for p in pages for c in p.contexts] == pytest.approx([c.score for c in whole.contexts])
    if options.get("group_by_doc"):
        assert [g.doc_id for p in pages for g in p.groups] == [g.doc_id for g in whole.groups]
    # The offset itself gives the same page as the token.
    assert _ids(client.search(query, top_k=2, offset=2, cache="bypass", **options)) == _ids(pages[1])


def test_the_last_page_has_no_token_and_a_plain_request_none(served):
    _, client, _ = served
    assert client.search("sourdough", top_k=3).next_page_token == ""
    last = client.search("sourdough", top_k=50, offset=0)
    assert len(last.contexts) < 50 and last.next_page_token == ""


def test_a_token_of_another_index_version_or_query_is_refused(served):
    _, client, _ = served
    token = client.search("volcano lava", top_k=2, offset=0).next_page_token
    body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    stale = base64.urlsafe_b64encode(json.dumps({**body, "v": "v-19990101T000000Z-0"}).encode()).decode()
    _refused(lambda: client.search("volcano lava", top_k=2, page_token=stale), grpc.StatusCode.FAILED_PRECONDITION,
             "page_token")
    _refused(lambda: client.search("glacier ice", top_k=2, page_token=token), grpc.StatusCode.INVALID_ARGUMENT,
             "page_token")
    _refused(lambda: client.search("volcano lava", top_k=3, page_token=token), grpc.StatusCode.INVALID_ARGUMENT,
             "page_token")
    _refused(lambda: client.search("volcano lava", top_k=2, page_token="not a token"),
             grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    _refused(lambda: client.search("volcano lava", top_k=2, offset=2, page_token=token),
             grpc.StatusCode.INVALID_ARGUMENT, "offset")
    _refused(lambda: client.search("volcano lava", top_k=10, offset=995), grpc.StatusCode.INVALID_ARGUMENT, "offset")
    assert client.search("volcano lava", top_k=2, page_token=token).offset == 2


# -- floors ----------------------------------------------------------------------------------------------------------

def test_min_score_drops_contexts_below_it_and_says_how_many(served):
    _, client, _ = served
    query = "espresso coffee brewed under pressure"
    full = client.search(query, top_k=8, cache="bypass")
    floor = (full.contexts[2].score + full.contexts[3].score) / 2
    floored = client.search(query, top_k=8, min_score=floor, cache="bypass")
    assert _ids(floored) == _ids(full)[:3]
    assert floored.below_min_score == len(full.contexts) - 3
    assert all(c.score >= floor for c in floored.contexts)
    assert client.search(query, top_k=8, min_score=1e9).contexts == []


# -- recency ---------------------------------------------------------------------------------------------------------

YEAR = 365.25 * 86400


def test_decay_weight_zero_leaves_the_ranking_as_it_is(served):
    _, client, _ = served
    for query in ("tea leaves", "coffee history", "volcano"):
        plain = client.search(query, top_k=8, cache="bypass")
        decayed = client.search(query, top_k=8, cache="bypass", decay=Decay(field="date", scale=YEAR, weight=0.0))
        assert _ids(decayed) == _ids(plain)
        assert [c.score for c in decayed.contexts] == pytest.approx([c.score for c in plain.contexts])


@pytest.mark.parametrize("function", ["exp", "linear", "gauss"])
def test_a_strong_decay_orders_ties_by_date(served, function):
    _, client, _ = served
    decay = Decay(field="date", scale=20 * YEAR, weight=100.0, function=function, origin=1735689600.0)  # 2025
    result = client.search(TEA, top_k=20, decay=decay, cache="bypass", debug=True)
    teas = [c for c in result.contexts if c.doc_id.startswith("tea-")]
    assert [c.doc_id for c in teas] == ["tea-2021", "tea-2011", "tea-2001"]
    factors = [c.explanation["decay_factor"] for c in teas]
    assert 0 < factors[2] < factors[1] < factors[0] <= 1
    # Strong enough, the date decides the whole order: the undated document comes last.
    assert result.contexts[-1].doc_id == "glacier" and result.contexts[-1].explanation["decay_factor"] == 0.0


def test_decay_on_a_field_that_is_not_a_date_is_refused(served):
    _, client, _ = served
    _refused(lambda: client.search("tea", decay=Decay(field="topic", scale=YEAR, weight=1.0)),
             grpc.StatusCode.INVALID_ARGUMENT, "decay.field")
    _refused(lambda: client.search("tea", decay=Decay(field="colour", scale=YEAR, weight=1.0)),
             grpc.StatusCode.INVALID_ARGUMENT, "decay.field")
    _refused(lambda: client.search("tea", decay=Decay(field="date", scale=0.0, weight=1.0)),
             grpc.StatusCode.INVALID_ARGUMENT, "decay.scale")
    _refused(lambda: client.search("tea", decay=Decay(field="date", scale=YEAR, weight=-1.0)),
             grpc.StatusCode.INVALID_ARGUMENT, "decay.weight")
    _refused(lambda: client.search("tea", decay=Decay(field="date", scale=YEAR, weight=1.0, decay=1.0)),
             grpc.StatusCode.INVALID_ARGUMENT, "decay.decay")


# -- highlights ------------------------------------------------------------------------------------------------------

def test_highlights_index_non_ascii_text_in_code_points(served):
    _, client, _ = served
    result = client.search("café München brewing", top_k=3, highlight=True)
    cafe = next(c for c in result.contexts if c.doc_id == "cafe")
    words = [(cafe.text[s:e], term) for s, e, term in cafe.highlights]
    assert ("café", "café") in words and ("München", "münchen") in words
    assert ("brewed", "brew") in words  # a stemmed match is a match
    assert ("cafés", "café") in words
    start, end = cafe.best_window
    assert 0 <= start < end <= len(cafe.text)
    assert cafe.text[start:end].strip() and end - start < len(cafe.text)  # a window, not the whole chunk
    for s, e, _ in cafe.highlights:
        assert cafe.text[s:e].isalnum() and s < e
    plain = client.search("café München brewing", top_k=3)
    assert all(c.highlights == [] and c.best_window is None for c in plain.contexts)


# -- explanations ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"rerank": False}, {"rerank": False, "fusion": "rrf"},
                                     {"decay": Decay(field="date", scale=5 * YEAR, weight=0.3)}])
def test_explanations_add_up_to_the_score(served, options):
    _, client, _ = served
    result = client.search("coffee brewed in Yemen", top_k=8, debug=True, cache="bypass", **options)
    assert result.contexts
    for c in result.contexts:
        e = c.explanation
        decay = e.get("decay_contribution", 0.0)
        if "rerank_contributions" in e:
            total = e["rerank_bias"] + sum(e["rerank_contributions"].values()) + decay
            assert set(e["rerank_contributions"]) <= set(c.features)
        else:
            total = e.get("bm25_contribution", 0.0) + e.get("dense_contribution", 0.0) + decay
            assert e["fused_score"] == pytest.approx(total - decay, abs=1e-5)
        assert total == pytest.approx(c.score, abs=1e-4), e
        assert e["fused_score"] == pytest.approx(c.fused_score)
        for leg in ("bm25", "dense"):
            if f"{leg}_rank" in e:
                assert e[f"{leg}_rank"] >= 1 and e[f"{leg}_normalized"] >= 0


def test_legs_and_the_degraded_flag(served, monkeypatch):
    running, client, stub = served
    full = client.search("volcano magma", cache="bypass")
    assert full.legs == ["bm25", "dense", "rerank"] and not full.degraded
    assert client.search("volcano magma", rerank=False, cache="bypass").legs == ["bm25", "dense"]
    # The adaptive policy sends a request whose budget cannot pay for the encode (as it now measures it) to the
    # lexical route: dense and rerank are skipped.
    policy = running.server.servicer.pipeline.policy
    monkeypatch.setitem(policy._stage_ms, "encode", 500.0)
    monkeypatch.setattr(policy, "_encode_seen", time.monotonic() + 3600)
    lexical = stub.Search(pb.SearchRequest(query="volcano magma", budget_ms=100, cache=pb.CACHE_BYPASS), timeout=30)
    assert lexical.route == "lexical"
    assert list(lexical.legs) == ["bm25"] and lexical.degraded
    assert lexical.contexts and lexical.contexts[0].doc_id == "volcano"


# -- metrics ---------------------------------------------------------------------------------------------------------

def test_quality_metrics_move(served):
    running, client, _ = served
    registry = running.server.metrics.registry
    labels = {"index": "idx"}

    def value(name: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = {n: value(n) for n in ("rag_quality_replies_total", "rag_quality_empty_replies_total",
                                    "rag_quality_top1_fused_score_count", "rag_quality_retriever_overlap_at10_count",
                                    "rag_quality_below_floor_replies_total")}
    replies = [client.search("espresso coffee beans"),
               client.search("glacier", filters={"topic": "no such topic"}, cache="bypass"),
               client.search("zzzz qqqq", cache="bypass")]  # nothing matches well: a weak best score
    assert client.search("espresso coffee beans").served_from == "exact"  # a hit: already counted
    assert value("rag_quality_replies_total") == before["rag_quality_replies_total"] + 3
    assert value("rag_quality_empty_replies_total") == before["rag_quality_empty_replies_total"] + 1
    assert value("rag_quality_top1_fused_score_count") == before["rag_quality_top1_fused_score_count"] + 2
    assert value("rag_quality_retriever_overlap_at10_count") == before["rag_quality_retriever_overlap_at10_count"] + 2
    below = sum(1 for r in replies if r.contexts and r.contexts[0].score < 0.5)  # the server's quality_floor
    assert below >= 1
    assert value("rag_quality_below_floor_replies_total") == before["rag_quality_below_floor_replies_total"] + below


# -- cache keys ------------------------------------------------------------------------------------------------------

def test_requests_differing_only_by_a_query_api_option_never_share_a_cache_entry(served):
    _, client, _ = served
    query = "sourdough wild yeast starter"
    variants = [{}, {"group_by_doc": True}, {"group_by_doc": True, "group_size": 2}, {"offset": 0},
                {"offset": 1}, {"min_score": -5.0}, {"highlight": True}, {"debug": True},
                {"decay": Decay(field="date", scale=YEAR, weight=0.5, origin=0.0)},
                {"decay": Decay(field="date", scale=YEAR, weight=0.7, origin=0.0)}]
    for options in variants:
        assert client.search(query, **options).served_from == "miss", options
    for options in variants:
        assert client.search(query, **options).served_from == "exact", options


# -- validation (no server) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, named", [
    ({"group_size": 2}, "group_size"),
    ({"group_by_doc": True, "group_size": 0}, "group_size"),
    ({"group_by_doc": True, "group_size": 101}, "group_size"),
    ({"offset": 995, "top_k": 10}, "offset"),
    ({"page_token": "%%%"}, "page_token"),
    ({"page_token": "e30"}, "page_token"),  # "{}": base64 of JSON, not a token
    ({"min_score": float("nan")}, "min_score"),
    ({"min_score": float("inf")}, "min_score"),
    ({"decay": pb.Decay(scale={"seconds": 60}, weight=1.0)}, "decay.field"),
    ({"decay": pb.Decay(field="date", weight=1.0)}, "decay.scale"),
    ({"decay": pb.Decay(field="date", scale={"seconds": -60})}, "decay.scale"),
    ({"decay": pb.Decay(field="date", scale={"seconds": 60}, offset={"seconds": -1})}, "decay.offset"),
    ({"decay": pb.Decay(field="date", scale={"seconds": 60}, decay=0.0)}, "decay.decay"),
    ({"decay": pb.Decay(field="date", scale={"seconds": 60}, weight=float("nan"))}, "decay.weight"),
    ({"decay": pb.Decay(field="date", scale={"seconds": 60}, function=7)}, "decay.function"),
    ({"decay": pb.Decay(field="date", scale={"seconds": 60}, origin={"seconds": 10**12})}, "decay.origin"),
])
def test_bad_query_api_values_name_their_field(fields, named):
    from rag_service.api.request import search_params
    from rag_service.core.config import Limits, SearchDefaults
    from rag_service.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as caught:
        search_params(pb.SearchRequest(query="tea", **fields), SearchDefaults(), Limits())
    assert caught.value.field == named


def test_a_page_ranks_the_window_it_is_cut_from():
    from rag_service.api.request import search_params
    from rag_service.core.config import Limits, SearchDefaults

    page = search_params(pb.SearchRequest(query="tea", top_k=40, offset=80), SearchDefaults(), Limits())
    whole = search_params(pb.SearchRequest(query="tea", top_k=120), SearchDefaults(), Limits())
    assert (page.depth, page.rerank_depth) == (whole.depth, whole.rerank_depth) == (120, 120)
    assert page.paged and page.shaped and (page.offset, page.top_k) == (80, 40)
    plain = search_params(pb.SearchRequest(query="tea"), SearchDefaults(), Limits())
    assert not plain.shaped and not plain.paged


@pytest.mark.parametrize("seed", range(6))
def test_a_plain_request_gets_what_the_long_way_gives(seed):
    import random

    from rag_service.api.request import PlainParams, search_params
    from rag_service.core.config import Limits, SearchDefaults
    from rag_service.core.errors import InvalidArgument

    rng = random.Random(seed)
    defaults = SearchDefaults(top_k=rng.randint(1, 50), depth=rng.randint(1, 300),
                              fusion=rng.choice(["rrf", "weighted"]), dense_weight=rng.random(),
                              rerank=rng.random() < 0.5, rerank_depth=rng.randint(1, 100), mmr_lambda=rng.random(),
                              dedup_threshold=rng.uniform(0.5, 1.0), max_context_tokens=rng.choice([0, 500, 4000]))
    limits = Limits()
    plain = PlainParams()
    for query in ("tea", "  What is DNA?  ", "ünïcode question", "x" * 300):
        got = plain(pb.SearchRequest(query=query), defaults, limits)
        assert got == search_params(pb.SearchRequest(query=query), defaults, limits) and got.query == query
    first, second = plain(pb.SearchRequest(query="a"), defaults, limits), plain(pb.SearchRequest(query="b"), defaults,
                                                                                 limits)
    assert first.query == "a" and first.filters is not second.filters  # nothing mutable is shared
    # The cache mode and the debug flag are part of a plain request.
    for cache in (pb.CACHE_DEFAULT, pb.CACHE_BYPASS, pb.CACHE_EXACT_ONLY, pb.CACHE_STRICT):
        for debug in (False, True):
            request = pb.SearchRequest(query="tea", cache=cache, debug=debug)
            got = plain(request, defaults, limits)
            assert got == search_params(request, defaults, limits) and got.explain == debug
    with pytest.raises(InvalidArgument) as caught:
        plain(pb.SearchRequest(query="tea", cache=9), defaults, limits)
    assert caught.value.field == "cache"
    # So is its top_k: each value gets the parameters it asks, its depth following it as the long way's does.
    for top_k in (1, 3, defaults.top_k, rng.randint(1, limits.max_top_k), limits.max_top_k, 3):
        for cache in (pb.CACHE_DEFAULT, pb.CACHE_BYPASS):
            request = pb.SearchRequest(query="tea cup", top_k=top_k, cache=cache)
            got = plain(request, defaults, limits)
            assert got == search_params(request, defaults, limits) and got.top_k == top_k
    for bad in (0, limits.max_top_k + 1):
        with pytest.raises(InvalidArgument) as caught:
            plain(pb.SearchRequest(query="tea", top_k=bad), defaults, limits)
        assert caught.value.field == "top_k"
    # A request that sets any other field takes the long way, and gets what it asks.
    assert plain(pb.SearchRequest(query="tea", depth=7), defaults, limits).depth == 7
    assert plain(pb.SearchRequest(query="tea", debug=True, filters={"a": "b"}), defaults, limits).filters == {"a": "b"}
    # Other defaults (another collection, a tuned index) get their own parameters.
    other = SearchDefaults(top_k=defaults.top_k % 50 + 1, rerank=not defaults.rerank)
    got = plain(pb.SearchRequest(query="tea"), other, limits)
    assert got == search_params(pb.SearchRequest(query="tea"), other, limits) and got.top_k != defaults.top_k
    # Defaults the limits refuse are refused as the long way refuses them, naming the field.
    with pytest.raises(InvalidArgument) as caught:
        plain(pb.SearchRequest(query="tea"), SearchDefaults(top_k=limits.max_top_k + 1), limits)
    assert caught.value.field == "top_k"
    for bad in ("", "   ", "bad\x00byte", "x" * (limits.max_query_chars + 1)):
        for debug in (False, True):
            with pytest.raises(InvalidArgument) as caught:
                plain(pb.SearchRequest(query=bad, debug=debug), defaults, limits)
            assert caught.value.field == "query"


def test_dates_parse_iso_strings_and_unix_seconds():
    import math

    from rag_service.index.dates import parse_date

    assert parse_date("2021-03-01") == parse_date("2021-03-01T00:00:00Z") == 1614556800.0
    assert parse_date("2021-03-01T02:00:00+02:00") == 1614556800.0
    assert parse_date("1614556800") == parse_date("1614556800.0") == 1614556800.0
    assert parse_date('"2021-03-01"') == 1614556800.0  # a JSON string inside a structured value
    for bad in ("", "yesterday", "2021-13-01", "nan", "inf"):
        assert math.isnan(parse_date(bad)), bad
