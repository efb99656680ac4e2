"""Replies joined from prepared bytes (api/reply.py, index/reply_bytes.py) say exactly what the field-by-field
message says: on seeded random results, on a real index's searches, and over a real channel."""

from __future__ import annotations

import random
from dataclasses import replace

import grpc
import pytest

from rag_service.api import reply
from rag_service.core.params import (
    ContextResult,
    Decay,
    DocumentGroup,
    Explanation,
    SearchParams,
    SearchResult,
)
from rag_service.index.reply_bytes import ContextBytes, StaticFields, varint
from rag_service.kernels import native
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

_ALPHABETS = ["abcdefghij klmnop", "éüßøåç ñ", "中文字符检索", "😀🧊🌋", "a\u0301e\u0308", "\x00\x7f\t\n",
              "Ω≈ç√∫"]


def _text(rng: random.Random, max_len: int) -> str:
    alphabet = rng.choice(_ALPHABETS)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def _chunks(rng: random.Random, n: int) -> list[StaticFields]:
    out = []
    for i in range(n):
        doc = _text(rng, 12) or f"d{i}"
        metadata = {_text(rng, 6): _text(rng, 10) for _ in range(rng.choice([0, 0, 1, 3, 5]))}
        # Long texts cross the one-byte and two-byte length varints (128, 16384 bytes).
        text = _text(rng, rng.choice([0, 5, 200, 6000]))
        out.append(StaticFields(doc_id=doc, chunk_id=f"{doc}#{i}", title=rng.choice(["", _text(rng, 30)]),
                                text=text, metadata=metadata))
    return out


def _score(rng: random.Random) -> float:
    return rng.choice([0.0, -0.0, 1.0, rng.uniform(-50, 50), rng.random() * 1e-3, 3.0e38, -1e-40])


def _optional(rng: random.Random) -> float | None:
    return None if rng.random() < 0.3 else _score(rng)


def _result(rng: random.Random, chunks: list[StaticFields]) -> SearchResult:
    contexts = []
    for chunk in rng.sample(range(len(chunks)), rng.randint(0, min(len(chunks), 12))):
        f = chunks[chunk]
        rerank = _optional(rng)
        contexts.append(ContextResult(
            chunk=chunk, doc_id=f.doc_id, chunk_id=f.chunk_id, title=f.title, text=f.text, metadata=dict(f.metadata),
            score=_score(rng), bm25_score=_optional(rng), dense_score=_optional(rng), rerank_score=rerank,
            features=({f"feature_{k}": _score(rng) for k in range(rng.randint(1, 6))}
                      if rerank is not None and rng.random() < 0.8 else None),
            tokens=rng.choice([0, 1, 127, 128, 300, 20000]), fused_score=_optional(rng), **_query_api(rng, f.text)))
    shaped = rng.random() < 0.5
    groups = None
    if shaped and rng.random() < 0.5:
        groups = [DocumentGroup(doc_id=c.doc_id, score=_score(rng), first=i, count=1)
                  for i, c in enumerate(contexts)]
    return SearchResult(
        contexts=contexts, index_version=rng.choice(["", "v-20261202T191530Z-60c72944"]),
        stage_us={name: rng.choice([0, 5, 300, 70000]) for name in rng.sample(
            ["validate", "encode", "lexical", "dense", "fusion", "rerank", "assemble", "cache"], rng.randint(0, 8))},
        context_tokens=rng.choice([0, 40, 1 << 20]), route=rng.choice(["", "full", "no_rerank"]),
        route_reason=rng.choice(["", "budget 12 ms < rerank's 15 ms", "raison d'être 😀"]),
        partial=rng.random() < 0.3,
        shards_answered=[_text(rng, 8) for _ in range(rng.randint(0, 3))],
        shards_missing=[_text(rng, 8) for _ in range(rng.randint(0, 2))],
        complete=rng.random() < 0.7, legs=rng.choice([(), ("bm25",), ("bm25", "dense"), ("bm25", "dense", "rerank")]),
        shaped=shaped, groups=groups, below_min_score=rng.choice([0, 3]) if shaped else 0,
        offset=rng.choice([0, 20]) if shaped else 0)


def _query_api(rng: random.Random, text: str) -> dict:
    """The query API's per-context fields, present in about half the contexts (spans in code points of `text`)."""
    if rng.random() < 0.5:
        return {}
    n = len(text)
    spans = tuple(sorted((a, b, _text(rng, 5)) for a, b in
                         (sorted((rng.randint(0, n), rng.randint(0, n))) for _ in range(rng.randint(0, 4)))))
    explanation = None
    if rng.random() < 0.6:
        explanation = Explanation(
            fused_score=_score(rng), bm25_rank=rng.choice([None, 1, 300]), bm25_normalized=_optional(rng),
            bm25_contribution=_optional(rng), dense_rank=rng.choice([None, 2]), dense_normalized=_optional(rng),
            dense_contribution=_optional(rng),
            rerank_contributions=rng.choice([None, {f"feature_{k}": _score(rng) for k in range(3)}]),
            rerank_bias=_optional(rng), decay_factor=rng.choice([None, 0.0, 0.5]), decay_contribution=_optional(rng))
    return {"highlights": spans, "best_window": rng.choice([None, (0, n)]), "explanation": explanation,
            "document_score": _optional(rng)}


def _cases(seed: int, rounds: int = 5):
    """(rng, prepared table, result) for `rounds` seeded results over one seeded set of chunks."""
    rng = random.Random(seed)
    chunks = _chunks(rng, rng.randint(1, 30))
    prepared = ContextBytes.from_fields(chunks)
    for _ in range(rounds):
        yield rng, prepared, _result(rng, chunks)


@pytest.mark.parametrize("seed", range(40))
def test_joined_bytes_parse_to_the_field_by_field_message(seed: int) -> None:
    for rng, prepared, result in _cases(seed):
        served_from = rng.choice([pb.SERVED_FROM_MISS, pb.SERVED_FROM_EXACT, pb.SERVED_FROM_SEMANTIC,
                                  pb.SERVED_FROM_PREFETCHED])
        similarity = rng.choice([None, 0.0, 0.973])
        time_us = rng.choice([0, 17, 1 << 40])
        for debug, profile in ((False, False), (True, False), (False, True), (True, True)):
            token = rng.choice(["", "eyJ2IjoidiJ9"]) if result.shaped else ""
            expected = reply.message(result, served_from, similarity, debug, time_us, token, profile=profile)
            assert bool(expected.stage_time_us) == ((debug or profile) and bool(result.stage_us))
            for table in (prepared, None):
                got = pb.SearchResponse.FromString(reply.joined(result, served_from, similarity, debug, time_us,
                                                                table, token, profile=profile))
                assert got == expected, (seed, debug, profile, table is not None)
                # Presence too: an optional field set to 0.0 differs from one left unset.
                for g, e in zip(got.contexts, expected.contexts, strict=True):
                    for name in ("bm25_score", "dense_score", "fused_score", "rerank_score", "best_window",
                                 "explanation", "document_score"):
                        assert g.HasField(name) == e.HasField(name)
                assert got.HasField("cache_similarity") == expected.HasField("cache_similarity")


@pytest.mark.parametrize("seed", range(10))
def test_a_kept_reply_and_a_calls_fields_parse_to_the_message(seed: int) -> None:
    # What a cache entry keeps (reply.body) followed by one call's fields is the reply of that call.
    for rng, prepared, result in _cases(seed):
        if result.shaped:  # shaped replies (pages, explanations) are never kept
            continue
        collection = rng.choice(["", "docs"])
        for table in (prepared, None):
            kept = reply.body(result, table, collection)
            for served_from in (pb.SERVED_FROM_EXACT, pb.SERVED_FROM_SEMANTIC, pb.SERVED_FROM_PREFETCHED):
                similarity = 0.97 if served_from == pb.SERVED_FROM_SEMANTIC else None
                time_us = rng.choice([0, 17, 1 << 40])
                got = pb.SearchResponse.FromString(kept + reply.call_fields(served_from, similarity, time_us))
                assert got == reply.message(result, served_from, similarity, False, time_us, "", collection)
                assert got.HasField("cache_similarity") == (similarity is not None)
                # A profile request's hit: the same, with the hit's stage timings after the call's fields.
                timed = kept + reply.call_fields(served_from, similarity, time_us) + reply.stage_fields(result.stage_us)
                assert pb.SearchResponse.FromString(timed) == reply.message(result, served_from, similarity, False,
                                                                            time_us, "", collection, profile=True)


def test_a_context_whose_score_overflows_float32_becomes_an_infinity_as_in_the_message() -> None:
    chunks = [StaticFields("d", "d#0", "", "x", {})]
    c = ContextResult(chunk=0, doc_id="d", chunk_id="d#0", title="", text="x", metadata={}, score=1e39,
                      bm25_score=-1e39, dense_score=None, rerank_score=None, features=None, tokens=0)
    result = SearchResult(contexts=[c], index_version="v", stage_us={})
    got = pb.SearchResponse.FromString(reply.joined(result, 0, None, True, 1, ContextBytes.from_fields(chunks)))
    assert got == reply.message(result, 0, None, True, 1)
    assert got.contexts[0].score == float("inf") and got.contexts[0].bm25_score == float("-inf")


def test_varints_match_protobuf() -> None:
    rng = random.Random(7)
    for n in [0, 1, 127, 128, 16383, 16384, 2**32, 2**63 - 1, *(rng.randrange(2**40) for _ in range(200))]:
        assert varint(n) == pb.IndexInfo(document_count=n).SerializeToString()[1:] or n == 0
    with pytest.raises(ValueError, match="negative"):
        varint(-1)


def test_offsets_must_span_the_buffer() -> None:
    from array import array

    with pytest.raises(ValueError, match="offsets"):
        ContextBytes(b"abc", array("q", [0, 2]))
    assert ContextBytes(b"", array("q", [0])).n_chunks == 0


def test_the_serializer_passes_bytes_through() -> None:
    message = pb.SearchResponse(index_version="v")
    assert reply.serialize(b"\x12\x01v") == b"\x12\x01v"
    assert reply.serialize(message) == message.SerializeToString()


# --- A real index ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(built_index, encoder):
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    return Pipeline(load_index(built_index), encoder)


def test_prepared_bytes_hold_each_chunks_reply_fields(pipeline) -> None:
    index = pipeline.index
    table = index.context_bytes()
    assert table is index.context_bytes()  # prepared once
    assert table.n_chunks == index.n_chunks
    for chunk in range(index.n_chunks):
        f = pipeline.read_chunk(chunk)
        got = pb.Context.FromString(table[chunk])
        assert got == pb.Context(doc_id=f.doc_id, chunk_id=f.chunk_id, title=f.title, text=f.text,
                                 metadata=f.metadata)


@pytest.mark.parametrize("query", ["glacier ice moraines", "coffee caffeine", "speed of light in a vacuum"])
@pytest.mark.parametrize("debug", [False, True])
def test_real_searches_joined_equal_field_by_field(pipeline, query: str, debug: bool) -> None:
    table = pipeline.index.context_bytes()
    for top_k, budget in ((3, 0), (10, 0), (10, 60)):
        result = pipeline.search(replace(SearchParams(query=query), top_k=top_k, max_context_tokens=budget))
        assert result.contexts
        got = pb.SearchResponse.FromString(reply.joined(result, pb.SERVED_FROM_MISS, None, debug, 1234, table))
        assert got == reply.message(result, pb.SERVED_FROM_MISS, None, debug, 1234)


@pytest.mark.parametrize("debug", [False, True])
def test_query_api_replies_joined_equal_field_by_field(pipeline, debug: bool) -> None:
    table = pipeline.index.context_bytes()
    decay = Decay(field="year", origin=2020.0, scale=10.0, weight=0.5)
    for shaping in ({"group_size": 2, "paged": True, "offset": 1}, {"highlight": True, "explain": debug},
                    {"decay": decay, "min_score": 0.0, "explain": debug}):
        result = pipeline.search(SearchParams(query="glaciers and ice sheets", top_k=4, **shaping))
        assert result.contexts and result.shaped
        got = pb.SearchResponse.FromString(reply.joined(result, pb.SERVED_FROM_MISS, None, debug, 1, table, "tok"))
        assert got == reply.message(result, pb.SERVED_FROM_MISS, None, debug, 1, "tok")
        assert got.legs == ["bm25", "dense", "rerank"] and not got.degraded


def test_a_plain_search_reads_no_reply_field_from_the_store_until_asked(pipeline, monkeypatch) -> None:
    import pickle

    from rag_service.core.config import CacheConfig
    from rag_service.search.cache import CachedSearch
    from rag_service.search.searcher import StoredContext

    reads: list[int] = []
    real = pipeline.read_chunk

    def counted(chunk: int):
        reads.append(chunk)
        return real(chunk)

    monkeypatch.setattr(pipeline, "read_chunk", counted)
    # Through the cache, which stores the answer (and sizes it), then the joined reply, as the server does.
    served = CachedSearch(CacheConfig()).run(pipeline, SearchParams(query="glacier ice moraines", top_k=5))
    contexts = served.result.contexts
    reply.joined(served.result, pb.SERVED_FROM_MISS, None, False, 1, pipeline.index.context_bytes())
    assert len(contexts) == 5 and reads == []
    assert all(isinstance(c, StoredContext) and not c.resolved for c in contexts)
    first = contexts[0]
    f = real(first.chunk)
    assert (first.doc_id, first.chunk_id, first.title, first.text, first.metadata) == tuple(f)
    assert reads == [first.chunk] and first.resolved  # one read for all five fields, kept
    assert first.text == f.text and reads == [first.chunk]
    # It is the ContextResult it stands for: equal both ways; replace gives a read copy, pickle a plain one.
    second = contexts[1]
    plain = ContextResult(**{name: getattr(second, name) for name in ContextResult.__dataclass_fields__})
    assert plain == second and second == plain and plain != replace(plain, score=-1.0) != second
    assert type(pickle.loads(pickle.dumps(second))) is ContextResult
    assert pickle.loads(pickle.dumps(second)) == plain
    assert replace(second, score=1.5) == replace(plain, score=1.5)
    with pytest.raises(AttributeError):
        _ = contexts[2].no_such_field
    # The query API's copies (explanations, document scores) leave the fields unread; a field given stays.
    from rag_service.search.searcher import replace_context

    third, before = contexts[2], len(reads)
    copied = replace_context(third, document_score=0.25)
    titled = replace_context(third, title="given")
    assert not third.resolved and not copied.resolved and copied.document_score == 0.25
    assert len(reads) == before
    assert copied.text == real(third.chunk).text and titled.title == "given"
    assert titled.text == copied.text and titled.doc_id == real(third.chunk).doc_id
    with pytest.raises(TypeError, match="no field 'bogus'"):
        replace_context(contexts[3], bogus=1)


# --- Over a real channel ---------------------------------------------------------------------------------------------


def test_server_replies_are_the_same_joined_or_built(server_thread, built_index, encoder) -> None:
    from rag_service.core.config import ServerConfig

    config = ServerConfig(index=built_index, port=0, warmup_queries=0)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        servicer = running.server.servicer
        assert servicer.joined_replies  # the default
        # A query per debug setting: debug does not change the result, so the second would be a cache hit at once.
        for debug, query in ((False, "glaciers carve valleys"), (True, "volcano lava and ash")):
            request = pb.SearchRequest(query=query, top_k=5, debug=debug)
            replies = {}
            for joined in (True, False, True):  # miss, then exact hits
                servicer.joined_replies = joined
                replies.setdefault(joined, []).append(stub.Search(request, timeout=30))
            for got in replies[True] + replies[False]:
                got.server_time_us = 0
                if debug:
                    got.stage_time_us.clear()
            first, built, hit = replies[True][0], replies[False][0], replies[True][1]
            assert first.served_from == pb.SERVED_FROM_MISS and hit.served_from == pb.SERVED_FROM_EXACT
            assert built.served_from == pb.SERVED_FROM_EXACT
            built.served_from = first.served_from
            assert first == built
            hit.served_from = first.served_from
            assert hit == first
            assert len(first.contexts) == 5 and all(c.text and c.metadata for c in first.contexts)
            assert all(c.HasField("fused_score") for c in first.contexts) == debug
        servicer.joined_replies = True
        drafts = iter([pb.QueryDraft(request=pb.SearchRequest(query="glaciers", top_k=3)),
                       pb.QueryDraft(request=pb.SearchRequest(query="glaciers carve", top_k=3), final=True)])
        streamed = list(stub.StreamSearch(drafts, timeout=30))
        assert len(streamed) == 1 and len(streamed[0].contexts) == 3 and streamed[0].index_version


# -- the native join of a plain reply's contexts ----------------------------------------------------------------------

_needs_join = pytest.mark.skipif(native.join_contexts_backend() != "cpp", reason="needs the C++ extension")


@_needs_join
@pytest.mark.parametrize("seed", range(30))
def test_native_join_writes_the_python_loops_bytes(seed):
    rng = random.Random(seed)
    chunks = _chunks(rng, rng.randint(1, 30))
    prepared = ContextBytes.from_fields(chunks)
    edge = [float("inf"), float("-inf"), float("nan"), 3.4028235e38, 3.4028236e38, -3.5e38, 1e-46, -0.0]
    contexts = [ContextResult(chunk=c, doc_id="", chunk_id="", title="", text="", metadata={}, bm25_score=None,
                              dense_score=None,
                              score=rng.choice([_score(rng), rng.choice(edge)]),
                              tokens=rng.choice([0, 1, 127, 128, 16383, 16384, 2**31]))
                for c in [rng.randrange(len(chunks)) for _ in range(rng.randint(0, 25))]]
    expected = b"".join(reply._contexts_python(contexts, prepared, False, False))
    assert b"".join(reply._contexts(contexts, prepared, False, False)) == expected


@_needs_join
def test_native_join_refuses_a_chunk_outside_the_prepared_bytes():
    prepared = ContextBytes.from_fields(_chunks(random.Random(1), 3))
    for chunk in (3, -1):
        with pytest.raises(ValueError, match=r"chunks\[1\]"):
            native.join_contexts(prepared.blob, prepared.offsets, [0, chunk], [1.0, 1.0], [0, 0], b"\n", b"5", b"`")
    with pytest.raises(ValueError, match="one entry per context"):
        native.join_contexts(prepared.blob, prepared.offsets, [0, 1], [1.0], [0, 0], b"\n", b"5", b"`")
    with pytest.raises(ValueError, match="negative"):
        native.join_contexts(prepared.blob, prepared.offsets, [0], [1.0], [-1], b"\n", b"5", b"`")
