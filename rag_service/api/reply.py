"""A SearchResponse, two ways: `message` builds the protobuf message field by field; `joined` writes its wire bytes
directly, each context's static fields taken from the bytes the index prepared at load (index/reply_bytes.py) and
only the per-request fields (score, tokens, debug scores and features) encoded per reply. Both say the same thing:
tests/test_wire_bytes.py parses the joined bytes and compares them with the message. The server returns the joined
bytes through gRPC as they are (`serialize`, the response serializer of the methods that answer a SearchResponse).

Contexts that do not come from a local index (the shard router's, whose chunks live on the shards) have no prepared
bytes: their static fields are encoded on the fly, by the same encoder.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

from rag_service.core.params import ContextResult, SearchResult
from rag_service.index.reply_bytes import (
    FIXED32,
    LEN,
    VARINT,
    ContextBytes,
    StaticFields,
    field_bytes,
    static_bytes,
    string_field,
    tag,
    varint,
)
from rag_service.kernels import native
from rag_service.pb.rag.v1 import retrieval_pb2 as pb

# rag.v1.Context, per-request fields.
_SCORE = struct.Struct("<Bf")  # tag byte + float: every field number below 16 has a one-byte tag
_SCORE_TAG, _BM25, _DENSE, _FUSED, _RERANK = (tag(n, FIXED32)[0] for n in (6, 7, 8, 9, 10))
_FEATURES = tag(11, LEN)
_TOKENS = tag(12, VARINT)
_CONTEXT = tag(1, LEN)  # SearchResponse.contexts
# map entries: key = 1, value = 2.
_KEY = tag(1, LEN)
_FLOAT_VALUE = tag(2, FIXED32)
_UINT_VALUE = tag(2, VARINT)
# rag.v1.SearchResponse.
_INDEX_VERSION, _STAGE_TIME = tag(2, LEN), tag(4, LEN)
_SERVER_TIME, _CONTEXT_TOKENS, _SERVED_FROM = tag(3, VARINT), tag(5, VARINT), tag(6, VARINT)
_SIMILARITY = tag(7, FIXED32)[0]
_ROUTE, _ROUTE_REASON = tag(8, LEN), tag(9, LEN)
_PARTIAL = tag(10, VARINT)
_ANSWERED, _MISSING = tag(11, LEN), tag(12, LEN)
_LEG = tag(16, LEN)
_DEGRADED = tag(17, VARINT) + b"\x01"
_COLLECTION = tag(19, LEN)
_FLOAT = struct.Struct("<f")


def _float32(number: float) -> float:
    """protobuf stores a float field as float32; a double beyond its range becomes an infinity there, where
    struct.pack would raise."""
    return number if abs(number) <= 3.4028234663852886e38 or number != number else math.copysign(math.inf, number)


def _scored(field_tag: int, number: float) -> bytes:
    try:
        return _SCORE.pack(field_tag, number)
    except OverflowError:
        return _SCORE.pack(field_tag, _float32(number))


# A features map has the same keys in the same order on every context (the reranker's feature names), and an entry
# with a given key has the same bytes before its value whatever the value (a float has a fixed size). So each key
# order gets one struct that packs the whole map at once, prefixes included. The bound only guards against a caller
# that would invent key orders.
_LAYOUTS: dict[tuple[str, ...], tuple[struct.Struct, tuple[bytes, ...]]] = {}
_MAX_LAYOUTS = 256


def _layout(keys: tuple[str, ...]) -> tuple[struct.Struct, tuple[bytes, ...]]:
    layout = _LAYOUTS.get(keys)
    if layout is None:
        prefixes = []
        for key in keys:
            key_field = string_field(_KEY, key)
            prefixes.append(_FEATURES + varint(len(key_field) + 5) + key_field + _FLOAT_VALUE)
        layout = struct.Struct("<" + "".join(f"{len(p)}sf" for p in prefixes)), tuple(prefixes)
        if len(_LAYOUTS) < _MAX_LAYOUTS:
            _LAYOUTS[keys] = layout
    return layout


def _features(features: Mapping[str, float]) -> bytes:
    packer, prefixes = _layout(tuple(features))
    values = list(features.values())
    try:
        return packer.pack(*[x for pair in zip(prefixes, values, strict=True) for x in pair])
    except OverflowError:
        return packer.pack(*[x for pair in zip(prefixes, map(_float32, values), strict=True) for x in pair])


def _debug(c: ContextResult) -> bytes:
    out = _scored(_FUSED, c.fused_score if c.fused_score is not None else c.score)
    if c.bm25_score is not None:
        out += _scored(_BM25, c.bm25_score)
    if c.dense_score is not None:
        out += _scored(_DENSE, c.dense_score)
    if c.rerank_score is not None:
        out += _scored(_RERANK, c.rerank_score)
    if c.features:
        out += _features(c.features)
    return out


def _extras(c: ContextResult, debug: bool) -> bytes:
    """The query API's per-context fields (highlights, best window, explanation, document score), encoded by the
    generated class: only shaped replies have them, and a message's fields may follow each other in any order."""
    if not (c.highlights or c.best_window is not None or c.document_score is not None
            or (debug and c.explanation is not None)):
        return b""
    msg = pb.Context()
    _add_extras(msg, c, debug)
    return msg.SerializeToString()


def _add_extras(msg: pb.Context, c: ContextResult, debug: bool) -> None:
    for start, end, term in c.highlights:
        msg.highlights.add(start=start, end=end, term=term)
    if c.best_window is not None:
        msg.best_window.start, msg.best_window.end = c.best_window
        msg.best_window.SetInParent()
    if c.document_score is not None:
        msg.document_score = c.document_score
    if debug and c.explanation is not None:
        e = c.explanation
        out = msg.explanation
        out.fused_score = e.fused_score
        for name in ("bm25_rank", "bm25_normalized", "bm25_contribution", "dense_rank", "dense_normalized",
                     "dense_contribution", "rerank_bias", "decay_factor", "decay_contribution"):
            value = getattr(e, name)
            if value is not None:
                setattr(out, name, value)
        if e.rerank_contributions:
            out.rerank_contributions.update(e.rerank_contributions)
        out.SetInParent()


# A plain reply's contexts are joined by one native call: this function's loop costs ~40 µs for ten contexts on
# the caches a miss's encode has flushed, and it runs after the server's clock has stopped.
_NATIVE_JOIN = native.join_contexts_backend() == "cpp"
_SCORE_TAG_BYTE = bytes([_SCORE_TAG])


def _contexts(contexts: Sequence[ContextResult], prepared: ContextBytes | None, debug: bool,
              shaped: bool) -> list[bytes]:
    if prepared is not None and not debug and not shaped and _NATIVE_JOIN:
        return [native.join_contexts(prepared.blob, prepared.offsets, [c.chunk for c in contexts],
                                     [c.score for c in contexts], [c.tokens for c in contexts], _CONTEXT,
                                     _SCORE_TAG_BYTE, _TOKENS)]
    return _contexts_python(contexts, prepared, debug, shaped)


def _contexts_python(contexts: Sequence[ContextResult], prepared: ContextBytes | None, debug: bool,
                     shaped: bool) -> list[bytes]:
    parts: list[bytes] = []
    append = parts.append
    for c in contexts:
        static = prepared[c.chunk] if prepared is not None else \
            static_bytes(StaticFields(c.doc_id, c.chunk_id, c.title, c.text, c.metadata))
        dynamic = _scored(_SCORE_TAG, c.score)
        if c.tokens:
            dynamic += _TOKENS + varint(c.tokens)
        if debug:
            dynamic += _debug(c)
        if shaped:
            dynamic += _extras(c, debug)
        append(_CONTEXT)
        append(varint(len(static) + len(dynamic)))
        append(static)
        append(dynamic)
    return parts


def joined(result: SearchResult, served_from: pb.ServedFrom, similarity: float | None, debug: bool,
           server_time_us: int, prepared: ContextBytes | None, next_page_token: str = "",
           collection: str = "", profile: bool = False) -> bytes:
    """The SearchResponse `message` builds, as wire bytes. `prepared`: the static bytes of the index the contexts
    come from (their `chunk` indexes it), or None to encode their static fields here. `collection`: the collection
    that answered."""
    parts = _body(result, debug, prepared, next_page_token, collection)
    if profile and not debug:
        parts.append(stage_fields(result.stage_us))
    parts.append(call_fields(served_from, similarity, server_time_us))
    return b"".join(parts)


def body(result: SearchResult, prepared: ContextBytes | None, collection: str = "") -> bytes:
    """A plain (not debug) reply of `result` without its per-call fields: what a cache entry keeps, to be sent
    again followed by `call_fields` (a message's fields may come in any order)."""
    return b"".join(_body(result, False, prepared, "", collection))


def stage_fields(stage_us: Mapping[str, int]) -> bytes:
    """The stage_time_us map's entries (a map's entries may come anywhere in a message, as any repeated field)."""
    return b"".join(field_bytes(_STAGE_TIME, string_field(_KEY, name) + _UINT_VALUE + varint(us))
                    for name, us in stage_us.items())


def call_fields(served_from: pb.ServedFrom, similarity: float | None, server_time_us: int) -> bytes:
    """The fields that differ between the calls one answer serves: where it came from, and the time it took."""
    out = b""
    if server_time_us:
        out += _SERVER_TIME + varint(server_time_us)
    if served_from:
        out += _SERVED_FROM + varint(served_from)
    if similarity is not None:
        out += _scored(_SIMILARITY, similarity)
    return out


def _body(result: SearchResult, debug: bool, prepared: ContextBytes | None, next_page_token: str,
          collection: str) -> list[bytes]:
    parts = _contexts(result.contexts, prepared, debug, result.shaped)
    append = parts.append
    if result.index_version:
        append(string_field(_INDEX_VERSION, result.index_version))
    if debug:
        append(stage_fields(result.stage_us))
    if result.context_tokens:
        append(_CONTEXT_TOKENS + varint(result.context_tokens))
    if result.route:
        append(string_field(_ROUTE, result.route))
    if result.route_reason:
        append(string_field(_ROUTE_REASON, result.route_reason))
    if result.partial:
        append(_PARTIAL + b"\x01")
    for shard in result.shards_answered:
        append(field_bytes(_ANSWERED, shard.encode("utf-8")))
    for shard in result.shards_missing:
        append(field_bytes(_MISSING, shard.encode("utf-8")))
    legs = _LEGS.get(result.legs)
    append(legs if legs is not None else _legs(result.legs))
    if not result.complete:
        append(_DEGRADED)
    if result.shaped:
        append(_response_extras(result, next_page_token).SerializeToString())
    if collection:
        append(string_field(_COLLECTION, collection))
    return parts


def _legs(legs: Sequence[str]) -> bytes:
    return b"".join(field_bytes(_LEG, leg.encode("utf-8")) for leg in legs)


# The three leg lists a search reports, encoded once.
_LEGS: dict[tuple[str, ...], bytes] = {legs: _legs(legs) for legs in (("bm25",), ("bm25", "dense"),
                                                                      ("bm25", "dense", "rerank"))}


def _response_extras(result: SearchResult, next_page_token: str) -> pb.SearchResponse:
    """The query API's reply-level fields of a shaped result."""
    msg = pb.SearchResponse(next_page_token=next_page_token, below_min_score=result.below_min_score,
                            offset=result.offset)
    if result.groups is not None:
        for g in result.groups:
            msg.groups.add(doc_id=g.doc_id, score=g.score, first=g.first, count=g.count)
    return msg


def to_context(context: ContextResult, debug: bool, shaped: bool = False) -> pb.Context:
    msg = pb.Context(doc_id=context.doc_id, chunk_id=context.chunk_id, title=context.title, text=context.text,
                     metadata=context.metadata, score=context.score, tokens=context.tokens)
    if shaped:
        _add_extras(msg, context, debug)
    if debug:
        msg.fused_score = context.fused_score if context.fused_score is not None else context.score
        if context.bm25_score is not None:
            msg.bm25_score = context.bm25_score
        if context.dense_score is not None:
            msg.dense_score = context.dense_score
        if context.rerank_score is not None:
            msg.rerank_score = context.rerank_score
        if context.features:
            msg.features.update(context.features)
    return msg


def message(result: SearchResult, served_from: pb.ServedFrom, similarity: float | None, debug: bool,
            server_time_us: int, next_page_token: str = "", collection: str = "",
            profile: bool = False) -> pb.SearchResponse:
    """The SearchResponse of `result`, built field by field."""
    response = pb.SearchResponse(contexts=[to_context(c, debug, result.shaped) for c in result.contexts],
                                 index_version=result.index_version, server_time_us=server_time_us,
                                 context_tokens=result.context_tokens, route=result.route,
                                 route_reason=result.route_reason, served_from=served_from,
                                 partial=result.partial, shards_answered=result.shards_answered,
                                 shards_missing=result.shards_missing, legs=result.legs,
                                 degraded=not result.complete, collection=collection)
    if result.shaped:
        response.MergeFrom(_response_extras(result, next_page_token))
    if similarity is not None:
        response.cache_similarity = similarity
    if debug or profile:
        response.stage_time_us.update(result.stage_us)
    return response


def serialize(response: pb.SearchResponse | bytes) -> bytes:
    """The response serializer of Search and StreamSearch: joined bytes go out as they are."""
    return response if isinstance(response, bytes) else response.SerializeToString()
