"""The semantic cache's fidelity guard rules, without a model: queries whose embeddings are identical and whose BM25
candidates agree, so that only the word and differing-term checks can refuse a hit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rag_service.core.config import CacheConfig
from rag_service.core.metrics import Metrics
from rag_service.core.params import Capabilities, ContextResult, SearchParams, SearchResult
from rag_service.retrievers.analysis import Analyzer
from rag_service.search.cache import CachedSearch, differing_idf
from rag_service.search.guard_words import polarity_words

# idf of the index the fake guard stands for: "studi" and the polarity words are in nearly every chunk (as
# "increased" and "more" are in SciFact's abstracts), so BM25 barely tells them apart; every other term is rare.
COMMON = dict.fromkeys(("studi", "increas", "reduc", "caus", "larger", "smaller", "fewer", "more", "all", "some",
                        "75", "300"), 0.05)
RARE_IDF = 6.0


class FakeGuard:
    analyzer = Analyzer()

    def guard_terms(self, query: str) -> tuple[dict[str, float], np.ndarray]:
        return {t: COMMON.get(t, RARE_IDF) for t in self.analyzer.tokens(query)}, self.lexical_input(query)

    def lexical_input(self, query: str) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def lexical_candidates(self, lexical_input, filters, depth, tree=None) -> np.ndarray:
        return np.arange(5, dtype=np.int64)  # the same BM25 candidates for every query: that check always passes


class FakeSearcher:
    """Every query embeds to the same vector (cosine 1.0); a miss answers with one context named after the query."""

    version = "v1"
    collection = ""
    capabilities = Capabilities(rerank=False, lexical_route=True, semantic_guard=True)
    guard = FakeGuard()

    def search(self, params, *, query_vector=None, cache=None, **kwargs) -> SearchResult:
        vector = np.ones(4, dtype=np.float32) / 2
        if cache is not None and (hit := cache.lookup(vector, self.guard)) is not None:
            return hit
        context = ContextResult(chunk=0, doc_id=params.query, chunk_id=params.query, title="", text=params.query,
                                metadata={}, score=1.0, bm25_score=None, dense_score=None)
        result = SearchResult(contexts=[context], index_version=self.version, stage_us={})
        if cache is not None:
            cache.store(vector, result, self.guard)
        return result


def served(cache: CachedSearch, query: str) -> str:
    return cache.run(FakeSearcher(), SearchParams(query=query)).served_from


@pytest.fixture
def cache() -> CachedSearch:
    return CachedSearch(CacheConfig(), Metrics())


def test_polarity_words_are_stemmed_with_repeats_and_numbers():
    assert polarity_words("Aspirin REDUCES the risk of 2 strokes in more patients?") == ("2", "more", "reduc")
    assert polarity_words("aspirin reduced risk of 2 strokes in more patients") == ("2", "more", "reduc")
    assert polarity_words("X doesn't cause Y") == polarity_words("X does not cause Y") == ("caus", "not")
    assert polarity_words("not not") == ("not", "not")
    assert polarity_words("glaciers carve valleys") == ()


def test_differing_idf_is_the_rarest_term_in_one_query_only():
    a, b = {"aspirin": 5.0, "bleed": 4.0, "studi": 0.1}, {"aspirin": 5.0, "bleed": 4.0}
    assert differing_idf(a, b) == differing_idf(b, a) == 0.1
    assert differing_idf(a, {"aspirin": 5.0, "stroke": 3.0}) == 4.0
    assert differing_idf(a, a) == 0.0 and differing_idf({}, {}) == 0.0


def test_case_and_punctuation_variant_is_still_a_semantic_hit(cache):
    assert served(cache, "aspirin increases bleeding risk") == "miss"
    assert served(cache, "Aspirin increases bleeding risk?") == "semantic"


@pytest.mark.parametrize("cached, asked", [
    ("aspirin increases bleeding risk", "aspirin reduces bleeding risk"),  # direction
    ("aspirin is a cause of bleeding", "aspirin is not a cause of bleeding"),  # negation: a BM25 stop word
    ("aspirin doesn't cause bleeding", "aspirin does cause bleeding"),
    ("larger doses of aspirin cause bleeding", "smaller doses of aspirin cause bleeding"),  # comparison
    ("fewer strokes with aspirin", "more strokes with aspirin"),
    ("all patients on aspirin bleed", "some patients on aspirin bleed"),  # quantity
    ("aspirin bleeding risk at 75 mg", "aspirin bleeding risk at 300 mg"),  # numbers
])
def test_queries_that_differ_in_a_polarity_word_are_refused(cache, cached, asked):
    assert served(cache, cached) == "miss"
    assert served(cache, asked) == "miss"
    rejected = cache.metrics.registry.get_sample_value("rag_cache_guard_rejections_total", {"mode": "default"})
    assert rejected == 1


def test_negation_pair_is_a_hit_when_the_word_check_is_off():
    # The refusal above comes from the word check alone: BM25 drops "not" and the embeddings are identical here.
    cache = CachedSearch(CacheConfig(guard_polarity_words=False), Metrics())
    assert served(cache, "aspirin is a cause of bleeding") == "miss"
    assert served(cache, "aspirin is not a cause of bleeding") == "semantic"


def test_a_content_word_bm25_weighs_in_one_query_only_is_refused(cache):
    assert served(cache, "aspirin bleeding risk in mice") == "miss"
    assert served(cache, "aspirin bleeding risk in rats") == "miss"  # another rare word
    assert served(cache, "aspirin bleeding risk") == "miss"  # a rare word dropped
    assert served(cache, "aspirin bleeding risk in mice studies") == "semantic"  # a word nearly every chunk has


def test_differing_term_check_off_serves_the_content_word_pair():
    config = CacheConfig(guard_max_differing_idf=math.inf, guard_min_term_overlap=0.0)
    cache = CachedSearch(config, Metrics())
    assert served(cache, "aspirin bleeding risk in mice") == "miss"
    assert served(cache, "aspirin bleeding risk in rats") == "semantic"


class BagGuard(FakeGuard):
    """FakeGuard with a real BM25 input (the query's tokens as ids, sorted) that counts the BM25 searches asked of
    it; its candidates do not depend on the query, so the BM25 check passes whenever it is made."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.searches = 0

    def lexical_input(self, query: str) -> np.ndarray:
        return np.sort(np.asarray([self.ids.setdefault(t, len(self.ids)) for t in self.analyzer.tokens(query)],
                                  dtype=np.int64))

    def lexical_candidates(self, lexical_input, filters, depth, tree=None) -> np.ndarray:
        self.searches += 1
        return np.arange(5, dtype=np.int64)


def test_a_cached_query_with_the_same_bm25_input_needs_no_bm25_search():
    searcher = FakeSearcher()
    searcher.guard = guard = BagGuard()
    cache = CachedSearch(CacheConfig(), Metrics())

    def ask(query: str) -> str:
        return cache.run(searcher, SearchParams(query=query)).served_from

    assert ask("aspirin increases bleeding risk") == "miss"
    assert guard.searches == 0  # the stored entry works its BM25 top chunks out when a guard first compares them
    # The same terms in another order or with other punctuation: the same BM25 input, so the same BM25 top chunks.
    assert ask("Aspirin increases bleeding risk?") == "semantic"
    assert ask("bleeding risk: aspirin increases") == "semantic"
    assert guard.searches == 0
    # One term more ("studi", in nearly every chunk: the other checks pass): the BM25 check must search, for the
    # query and, the first time, for the entry.
    assert ask("aspirin increases bleeding risk study") == "semantic"
    assert guard.searches == 2
    # A repeated term changes the input too (BM25 counts it twice); the entry's candidates are kept from before.
    assert ask("aspirin increases bleeding risk risk") == "semantic"
    assert guard.searches == 3
