"""Context filter stage: near-duplicate removal, MMR, the token budget, and the stage in the pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from rag_service.core.params import SearchParams
from rag_service.index.load import load_index
from rag_service.search import context_filter as cf
from rag_service.search.pipeline import Pipeline


def unit(*rows):
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


TEXTS = ["alpha beta gamma delta epsilon zeta", "alpha beta gamma delta epsilon zeta",
         "completely different words about rivers and lakes", "another topic on mountains and snow"]


def count_words(text: str) -> int:
    return len(text.split())


def test_identity_filter_keeps_the_ranking_and_counts_tokens():
    sel = cf.select(np.array([3.0, 2.0, 1.0, 0.5]), unit([1, 0], [1, 0], [0, 1], [1, 1]), TEXTS, count_words,
                    cf.FilterParams(top_k=3))
    assert sel.positions == [0, 1, 2]
    assert sel.tokens == [6, 6, 7] and sel.total_tokens == 19


def test_cosine_dedup_drops_the_duplicate_and_keeps_the_better_one():
    vectors = unit([1, 0, 0], [1, 0.01, 0], [0, 1, 0], [0, 0, 1])
    sel = cf.select(np.array([3.0, 2.0, 1.0, 0.5]), vectors, TEXTS, count_words,
                    cf.FilterParams(top_k=4, dedup_threshold=0.95))
    assert sel.positions == [0, 2, 3]
    assert sel.dropped["duplicate"] == 1
    # the same passage ranked first the other way round: the better-ranked copy is the one kept
    sel = cf.select(np.array([2.0, 3.0, 1.0, 0.5]), vectors, TEXTS, count_words,
                    cf.FilterParams(top_k=4, dedup_threshold=0.95))
    assert sel.positions == [1, 2, 3]


def test_shingle_dedup_catches_copied_text_with_different_vectors():
    vectors = unit([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1])
    sel = cf.select(np.array([3.0, 2.0, 1.0, 0.5]), vectors, TEXTS, count_words,
                    cf.FilterParams(top_k=4, shingle_threshold=0.5))
    assert sel.positions == [0, 2, 3] and sel.dropped["shingle"] == 1
    assert cf.jaccard(cf.shingles(TEXTS[0]), cf.shingles(TEXTS[1])) == 1.0
    assert cf.jaccard(cf.shingles(TEXTS[0]), cf.shingles(TEXTS[2])) == 0.0


def test_mmr_diversifies_as_lambda_falls():
    # 0 and 1 are near twins and the most relevant; 2 is different and a little less relevant
    vectors = unit([1, 0.05], [1, 0.0], [0, 1])
    relevance = np.array([1.0, 0.95, 0.8])
    pure = cf.select(relevance, vectors, TEXTS[:3], count_words, cf.FilterParams(top_k=2, mmr_lambda=1.0))
    diverse = cf.select(relevance, vectors, TEXTS[:3], count_words, cf.FilterParams(top_k=2, mmr_lambda=0.5))
    assert pure.positions == [0, 1]
    assert diverse.positions == [0, 2]


def test_budget_is_respected_and_smaller_passages_fill_it():
    texts = ["a " * 10, "b " * 50, "c " * 20, "d " * 15]
    sel = cf.select(np.array([4.0, 3.0, 2.0, 1.0]), unit([1, 0], [0, 1], [1, 1], [1, -1]), texts, count_words,
                    cf.FilterParams(top_k=10, max_context_tokens=40))
    assert sel.positions == [0, 2]  # 10 + 20; the 50-token passage does not fit, the 15 would exceed 40
    assert sel.total_tokens == 30 <= 40 and sel.dropped["budget"] == 2


def test_empty_candidates():
    sel = cf.select(np.zeros(0), np.zeros((0, 4), np.float32), [], count_words,
                    cf.FilterParams(top_k=3, mmr_lambda=0.5, max_context_tokens=10))
    assert sel.positions == [] and sel.total_tokens == 0


@pytest.fixture(scope="module")
def pipeline(built_index, encoder):
    return Pipeline(load_index(built_index), encoder)


@pytest.mark.slow
def test_pipeline_budget_counts_with_the_model_tokenizer(pipeline, encoder):
    for budget in (40, 100, 250):
        result = pipeline.search(SearchParams(query="glaciers and ice sheets", top_k=10, max_context_tokens=budget))
        assert 0 < result.context_tokens <= budget
        assert result.context_tokens == sum(c.tokens for c in result.contexts)
        for c in result.contexts:
            assert c.tokens == encoder.count_tokens(c.text)
    unbounded = pipeline.search(SearchParams(query="glaciers and ice sheets", top_k=10))
    assert len(unbounded.contexts) == 10 and unbounded.context_tokens == sum(c.tokens for c in unbounded.contexts)


def test_pipeline_dedup_and_mmr_change_the_contexts(pipeline):
    params = SearchParams(query="glaciers moraines valleys ice cores meltwater", top_k=6)
    plain = pipeline.search(params)
    glacier_plain = sum(c.doc_id == "glacier" for c in plain.contexts)
    assert glacier_plain >= 3  # the glacier document's overlapping chunks fill the top
    from dataclasses import replace

    diverse = pipeline.search(replace(params, mmr_lambda=0.3))
    assert sum(c.doc_id == "glacier" for c in diverse.contexts) < glacier_plain
    strict = pipeline.search(replace(params, dedup_threshold=0.5))
    assert len({c.chunk for c in strict.contexts}) == len(strict.contexts)
    vectors = pipeline.index.dense.vectors[[c.chunk for c in strict.contexts]]
    sim = vectors @ vectors.T
    assert np.all(sim[np.triu_indices(len(vectors), 1)] <= 0.5 + 1e-6)


def test_budget_over_the_server(served_index):
    import grpc

    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        reply = pb_grpc.RetrieverStub(channel).Search(
            pb.SearchRequest(query="ice cores and glaciers", top_k=10, max_context_tokens=80, mmr_lambda=0.7),
            timeout=30)
    assert 0 < reply.context_tokens <= 80
    assert reply.context_tokens == sum(c.tokens for c in reply.contexts)
