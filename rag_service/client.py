"""A small typed client for backend services.

    from rag_service.client import RetrieverClient
    with RetrieverClient("localhost:50051") as client:
        for ctx in client.search("how do I parse JSON?", top_k=5).contexts:
            print(ctx.score, ctx.doc_id, ctx.title)

Several identical replicas are balanced by gRPC itself, client side: a target that resolves to several addresses (a
DNS name such as a Kubernetes headless Service, or a static list from `replica_target`) with `load_balancing=
"round_robin"` sends each call to the next ready replica, and `retries` re-sends a call that failed with UNAVAILABLE
(a replica that died or is draining) to another one, both through gRPC's service config:

    with RetrieverClient("dns:///rag-serve.search.svc.cluster.local:50051", load_balancing="round_robin",
                         retries=3) as client:
        result = client.search("how do I parse JSON?")
        print(result.served_by, result.index_version)

Retry policy (`retries=N`, N up to 4, gRFC A6): the read RPCs (Search, SearchBatch, StreamSearch, GetIndexInfo,
Prefetch; never ReloadIndex) are sent again up to N more times, all attempts within the call's one deadline, on
UNAVAILABLE (a replica down, draining or still loading: after exponential backoff with jitter, 50 ms doubling up to
1 s, to the next replica under round_robin) and, unless `retry_overloaded=False`, on RESOURCE_EXHAUSTED (a server
shedding load: after the delay that server sends as `grpc-retry-pushback-ms`, its estimate of when there will be
room; a server holds back the refusal of a request sent again sooner, and for a second any refusal on that
connection, then sends 0; a request over the server's max_message_bytes is RESOURCE_EXHAUSTED too, and is retried
to no avail after the client's own backoff). Once a reply has started streaming, a StreamSearch is not retried.
Without retries a refused call raises RetrieverError with `retry_after_ms` set from that pushback, for callers that
retry themselves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

FUSION = {None: pb.FUSION_UNSPECIFIED, "rrf": pb.FUSION_RRF, "weighted": pb.FUSION_WEIGHTED}
CACHE = {None: pb.CACHE_DEFAULT, "default": pb.CACHE_DEFAULT, "bypass": pb.CACHE_BYPASS,
         "exact_only": pb.CACHE_EXACT_ONLY, "strict": pb.CACHE_STRICT}
DECAY_FUNCTIONS = {"exp": pb.DECAY_EXP, "linear": pb.DECAY_LINEAR, "gauss": pb.DECAY_GAUSS}
SERVED_FROM = {pb.SERVED_FROM_MISS: "miss", pb.SERVED_FROM_EXACT: "exact", pb.SERVED_FROM_SEMANTIC: "semantic",
               pb.SERVED_FROM_PREFETCHED: "prefetched"}
SERVED_BY_HEADER = "x-served-by"  # trailing metadata: the replica that answered (ServerConfig.replica_name)
PUSHBACK_HEADER = "grpc-retry-pushback-ms"  # trailing metadata of a refusal for load: when to come back (gRFC A6)
MAX_REPLY_BYTES = 64 << 20  # the server's grpc.max_send_message_length
_CODES = {code.value[0]: code for code in grpc.StatusCode}  # BatchResult.code -> grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["Retriever"].full_name
# Read RPCs are safe to send again; the admin RPCs (ReloadIndex, aliases, deletes) are aimed at one server and are
# never retried.
RETRIED_METHODS = ("Search", "StreamSearch", "GetIndexInfo", "Prefetch", "SearchBatch", "ListCollections")


def replica_target(addresses: Iterable[str]) -> str:
    """A gRPC target naming a fixed set of replicas ("10.0.0.5:50051", "[fd00::5]:50051"): `ipv4:///a,b` or
    `ipv6:///a,b`, for when there is no DNS name that resolves to all of them."""
    addresses = [a.strip() for a in addresses if a.strip()]
    if not addresses:
        raise ValueError("replica_target: give at least one HOST:PORT")
    v6 = [a.startswith("[") for a in addresses]
    if any(v6) and not all(v6):
        raise ValueError(f"replica_target: cannot mix IPv4 and IPv6 addresses in one target: {addresses}")
    return f"{'ipv6' if all(v6) else 'ipv4'}:///{','.join(addresses)}"


def service_config(*, load_balancing: Literal["round_robin", "pick_first"] | None = "round_robin",
                   retries: int = 0, initial_backoff: float = 0.05, max_backoff: float = 1.0,
                   retry_overloaded: bool = True) -> str:
    """gRPC service config (JSON) for a channel over replicas: the load-balancing policy and a retry policy that
    re-sends the read RPCs up to `retries` more times on UNAVAILABLE, with exponential backoff and jitter (gRFC A6),
    and with `retry_overloaded` on RESOURCE_EXHAUSTED too: gRPC then waits the server's `grpc-retry-pushback-ms`
    instead of its own backoff (a server refusing for load says when it expects room). A retried call keeps its
    deadline: the attempts share it."""
    if not 0 <= retries <= 4:  # gRPC caps maxAttempts at 5
        raise ValueError(f"retries must be between 0 and 4, got {retries}")
    if load_balancing not in ("round_robin", "pick_first", None):
        raise ValueError(f"load_balancing must be 'round_robin', 'pick_first' or None, got {load_balancing!r}")
    config: dict = {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retries:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": {"maxAttempts": retries + 1, "initialBackoff": f"{initial_backoff}s",
                            "maxBackoff": f"{max_backoff}s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"] if retry_overloaded
                            else ["UNAVAILABLE"]},
        }]
    return json.dumps(config)


@dataclass(frozen=True)
class Context:
    doc_id: str
    chunk_id: str
    title: str
    text: str
    metadata: dict[str, str]
    score: float
    # Filled with debug=True only; None when that retriever did not return the chunk.
    bm25_score: float | None = None
    dense_score: float | None = None
    fused_score: float | None = None
    # With debug: the reranker's score and inputs (None / empty when it did not run).
    rerank_score: float | None = None
    features: dict[str, float] = field(default_factory=dict)
    # Tokens of this context toward max_context_tokens (the model's tokenizer).
    tokens: int = 0
    # With highlight=True: (start, end, term) of each matched query term and the best sentence window's (start,
    # end), in Unicode code points of `text` (Python string indices).
    highlights: list[tuple[int, int, str]] = field(default_factory=list)
    best_window: tuple[int, int] | None = None
    # With debug=True: why it has its score (the Explanation message as a dict; its parts add up to `score`).
    explanation: dict | None = None
    # Grouped replies: the best score of this context's document.
    document_score: float | None = None


@dataclass(frozen=True)
class DocumentGroup:
    doc_id: str
    score: float  # the document's best score
    contexts: list[Context]


@dataclass(frozen=True)
class Decay:
    """A recency decay on a date metadata field (search request option `decay`): score += weight x factor, factor
    exp/linear/gauss of the distance from `origin` (Unix seconds; None: now) beyond `offset`, equal to `decay` at
    `scale` (seconds)."""

    field: str
    scale: float
    weight: float
    function: Literal["exp", "linear", "gauss"] = "exp"
    origin: float | None = None
    offset: float = 0.0
    decay: float = 0.5

    def message(self) -> pb.Decay:
        if self.function not in DECAY_FUNCTIONS:
            raise ValueError(f"function must be 'exp', 'linear' or 'gauss', got {self.function!r}")
        msg = pb.Decay(field=self.field, function=DECAY_FUNCTIONS[self.function], weight=self.weight,
                       decay=self.decay)
        msg.scale.FromNanoseconds(round(self.scale * 1e9))
        msg.offset.FromNanoseconds(round(self.offset * 1e9))
        if self.origin is not None:
            msg.origin.FromNanoseconds(round(self.origin * 1e9))
        return msg


@dataclass(frozen=True)
class SearchResult:
    contexts: list[Context]
    index_version: str
    server_time_us: int
    stage_time_us: dict[str, int] = field(default_factory=dict)
    # How the server answered: "miss", "exact", "semantic" or "prefetched"; the cosine for semantic hits.
    served_from: str = "miss"
    cache_similarity: float | None = None
    context_tokens: int = 0  # tokens of all contexts, as counted toward max_context_tokens
    # The replica that answered (its x-served-by trailing metadata; "" from a server that does not send it).
    served_by: str = ""
    # From a router over shards: true when some shard did not answer, so its documents are missing; which did.
    partial: bool = False
    shards_answered: list[str] = field(default_factory=list)
    shards_missing: list[str] = field(default_factory=list)
    # Grouped replies (group_by_doc): the documents in order, each with its contexts.
    groups: list[DocumentGroup] | None = None
    # Pages: pass next_page_token as page_token for the next page ("" when this page was the last full one).
    next_page_token: str = ""
    offset: int = 0
    below_min_score: int = 0  # contexts of this page dropped by min_score
    legs: list[str] = field(default_factory=list)  # what ran: "bm25", "dense", "rerank"
    degraded: bool = False  # a leg was skipped for budget or load, or a shard is missing
    collection: str = ""  # the collection that answered (an alias resolved)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    status: str  # SERVING, LOADING or FAILED (then `error` says why)
    version: str
    document_count: int
    chunk_count: int
    embedding_model: str
    aliases: list[str]
    is_default: bool
    error: str = ""



# Structured filters ----------------------------------------------------------------------------------------------
# A filter is a rag.v1.Filter or its JSON form (a dict); the builders make the dict form, e.g.
#     must(match("lang", "en"), range_of("year", gte=2015)) | {"must_not": [match("tags", "retracted")]}
FilterLike = pb.Filter | dict


def filter_message(value: FilterLike) -> pb.Filter:
    """A rag.v1.Filter from the message itself or its JSON form (proto field names); ValueError names a bad key."""
    if isinstance(value, pb.Filter):
        return value
    from google.protobuf import json_format

    try:
        return json_format.ParseDict(value, pb.Filter())
    except json_format.ParseError as e:
        raise ValueError(f"filter: {e}") from None


def must(*conditions: dict) -> dict:
    return {"must": list(conditions)}


def should(*conditions: dict, min_should: int | None = None) -> dict:
    return {"should": list(conditions), **({"min_should": min_should} if min_should is not None else {})}


def must_not(*conditions: dict) -> dict:
    return {"must_not": list(conditions)}


def nested(tree: dict) -> dict:
    """A filter as one condition of another (e.g. an OR inside a must)."""
    return {"filter": tree}


def match(key: str, value: str | int | float | bool) -> dict:
    """Equals `value` (on a keyword list field: some element does). A date field takes an RFC 3339 string."""
    kind = ("boolean" if isinstance(value, bool) else "integer" if isinstance(value, int)
            else "number" if isinstance(value, float) else "keyword")
    return {"key": key, "match": {kind: value}}


def any_of(key: str, values: Iterable[str] | Iterable[int]) -> dict:
    """Equals one of `values` (IN): all strings or all integers."""
    items: list[object] = list(values)
    kind = "integers" if items and all(isinstance(v, int) and not isinstance(v, bool) for v in items) \
        else "keywords"
    return {"key": key, "any": {kind: items}}


def range_of(key: str, *, gt: float | None = None, gte: float | None = None, lt: float | None = None,
             lte: float | None = None) -> dict:
    """Numeric bounds (integer and float fields)."""
    bounds = {k: v for k, v in (("gt", gt), ("gte", gte), ("lt", lt), ("lte", lte)) if v is not None}
    return {"key": key, "range": bounds}


def date_range(key: str, *, gt: str | None = None, gte: str | None = None, lt: str | None = None,
               lte: str | None = None) -> dict:
    """RFC 3339 bounds (date fields), e.g. date_range("published", gte="2020-01-01")."""
    bounds = {k: v for k, v in (("gt", gt), ("gte", gte), ("lt", lt), ("lte", lte)) if v is not None}
    return {"key": key, "date_range": bounds}


def exists(key: str) -> dict:
    return {"key": key, "exists": True}


def is_empty(key: str) -> dict:
    return {"key": key, "is_empty": True}


def search_request(query: str, *, top_k: int | None = None, depth: int | None = None,
                   fusion: Literal["rrf", "weighted"] | None = None, dense_weight: float | None = None,
                   filters: dict[str, str] | None = None, filter: FilterLike | None = None, debug: bool = False,
                   cache: Literal["default", "bypass", "exact_only", "strict"] | None = None,
                   rerank: bool | None = None, rerank_depth: int | None = None, max_context_tokens: int | None = None,
                   mmr_lambda: float | None = None, dedup_threshold: float | None = None,
                   require_complete: bool = False, group_by_doc: bool = False, group_size: int | None = None,
                   offset: int | None = None, page_token: str | None = None, min_score: float | None = None,
                   decay: Decay | None = None, highlight: bool = False,
                   tenant: str | None = None, collection: str = "", profile: bool = False) -> pb.SearchRequest:
    """None leaves a parameter to the server's default. `collection`: the collection or alias to search ("": the
    server's default). `tenant`: the tenant to search as, in a collection built
    with a tenant key (a token scoped to a tenant sets it; naming another is refused). `require_complete` (routers
    over shards): fail rather than answer from the shards that did answer. The query API: `group_by_doc` (top_k
    counts documents, each with up to `group_size` chunks), pages (`offset`, or the previous reply's
    `next_page_token` as `page_token`), `min_score`, a recency `decay` and `highlight`; `debug` adds explanations;
    `profile` adds the server's stage timings (`stage_time_us`) alone.
    `filter`: a structured filter (rag.v1.Filter), as the message or its JSON form as a dict, e.g.
    {"must": [{"key": "year", "range": {"gte": 2015}}]}, ANDed with the equality `filters`; see also the
    builders `must`, `match`, `any_of`, `range_of`, ... below."""
    if fusion not in FUSION:
        raise ValueError(f"fusion must be 'rrf', 'weighted' or None, got {fusion!r}")
    if cache not in CACHE:
        raise ValueError(f"cache must be one of 'default', 'bypass', 'exact_only', 'strict' or None, got {cache!r}")
    request = pb.SearchRequest(query=query, fusion=FUSION[fusion], filters=filters or {}, debug=debug,
                               cache=CACHE[cache], require_complete=require_complete, group_by_doc=group_by_doc,
                               page_token=page_token or "", highlight=highlight, tenant=tenant or "",
                               collection=collection, profile=profile)
    if decay is not None:
        request.decay.CopyFrom(decay.message())
    if filter is not None:
        request.filter.CopyFrom(filter_message(filter))
    if top_k is not None:
        request.top_k = top_k
    if depth is not None:
        request.depth = depth
    if dense_weight is not None:
        request.dense_weight = dense_weight
    for name, value in (("rerank", rerank), ("rerank_depth", rerank_depth),
                        ("max_context_tokens", max_context_tokens), ("mmr_lambda", mmr_lambda),
                        ("dedup_threshold", dedup_threshold), ("group_size", group_size),
                        ("offset", offset), ("min_score", min_score)):
        if value is not None:
            setattr(request, name, value)
    return request


class RetrieverError(Exception):
    """A failed call: `code` is the gRPC status code, `details` the server's message (it names the bad field);
    `served_by` the replica that refused it, when one answered at all; `retry_after_ms` the delay a server refusing
    for load (RESOURCE_EXHAUSTED) asked for before trying again, None when it sent none."""

    def __init__(self, code: grpc.StatusCode, details: str, served_by: str = "",
                 retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.served_by = served_by
        self.retry_after_ms = retry_after_ms


def _optional(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _header(metadata, name: str) -> str:
    for key, value in metadata or ():
        if key == name:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else value
    return ""


def _served_by(metadata) -> str:
    return _header(metadata, SERVED_BY_HEADER)


def _retry_after_ms(metadata) -> int | None:
    value = _header(metadata, PUSHBACK_HEADER)
    return int(value) if value.isdigit() else None


def _error(error: grpc.RpcError) -> RetrieverError:
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return RetrieverError(error.code(), error.details() or "", _served_by(metadata), _retry_after_ms(metadata))


def _result(reply: pb.SearchResponse, served_by: str = "") -> SearchResult:
    contexts = [_context(c) for c in reply.contexts]
    groups = [DocumentGroup(doc_id=g.doc_id, score=g.score, contexts=contexts[g.first:g.first + g.count])
              for g in reply.groups] if reply.groups else None
    return SearchResult(contexts=contexts, index_version=reply.index_version,
                        server_time_us=reply.server_time_us, stage_time_us=dict(reply.stage_time_us),
                        served_from=SERVED_FROM.get(reply.served_from, "miss"),
                        cache_similarity=_optional(reply, "cache_similarity"), context_tokens=reply.context_tokens,
                        served_by=served_by, partial=reply.partial, shards_answered=list(reply.shards_answered),
                        shards_missing=list(reply.shards_missing), groups=groups,
                        next_page_token=reply.next_page_token, offset=reply.offset,
                        below_min_score=reply.below_min_score, legs=list(reply.legs), degraded=reply.degraded,
                        collection=reply.collection)


def _explanation(msg: pb.Explanation) -> dict:
    out: dict = {"fused_score": msg.fused_score}
    for name in ("bm25_rank", "bm25_normalized", "bm25_contribution", "dense_rank", "dense_normalized",
                 "dense_contribution", "rerank_bias", "decay_factor", "decay_contribution"):
        if msg.HasField(name):
            out[name] = getattr(msg, name)
    if msg.rerank_contributions:
        out["rerank_contributions"] = dict(msg.rerank_contributions)
    return out


def _context(msg: pb.Context) -> Context:
    return Context(doc_id=msg.doc_id, chunk_id=msg.chunk_id, title=msg.title, text=msg.text,
                   metadata=dict(msg.metadata), score=msg.score, bm25_score=_optional(msg, "bm25_score"),
                   dense_score=_optional(msg, "dense_score"), fused_score=_optional(msg, "fused_score"),
                   rerank_score=_optional(msg, "rerank_score"), features=dict(msg.features), tokens=msg.tokens,
                   highlights=[(h.start, h.end, h.term) for h in msg.highlights],
                   best_window=(msg.best_window.start, msg.best_window.end) if msg.HasField("best_window") else None,
                   explanation=_explanation(msg.explanation) if msg.HasField("explanation") else None,
                   document_score=_optional(msg, "document_score"))


def _pem(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class RetrieverClient:
    """Blocking client over one channel. `target` is any gRPC target ("host:port", "dns:///name:port",
    `replica_target([...])`).

    `token` is sent as `authorization: Bearer <token>` on read RPCs, `admin_token` on admin RPCs (reload). TLS is used
    when `tls_ca` (the CA that signed the server's certificate; PEM bytes or a file) is given; `tls_cert`/`tls_key`
    add a client certificate for servers that require mutual TLS.

    Replicas: `load_balancing="round_robin"` spreads calls over every address the target resolves to (gRPC's default,
    pick_first, sends them all to one), and `retries=N` re-sends a read call that failed with UNAVAILABLE up to N more
    times, each time to the next replica, and (unless `retry_overloaded=False`) one refused with RESOURCE_EXHAUSTED
    after the delay the server asked for (`grpc-retry-pushback-ms`); see the module's retry policy and
    `service_config`. Leave both None to keep gRPC's defaults or a "grpc.service_config" given in `options`.
    `keepalive` (seconds) pings each connection that has calls in flight that often and gives it as long to answer: a
    replica cut off the network (no reset, so nothing else notices) then fails its calls with UNAVAILABLE, retried
    elsewhere, instead of holding them until their deadline.
    """

    def __init__(self, target: str, *, timeout: float = 5.0, channel: grpc.Channel | None = None,
                 options: list[tuple[str, object]] | None = None, token: str | None = None,
                 admin_token: str | None = None, tls_ca: bytes | str | Path | None = None,
                 tls_cert: bytes | str | Path | None = None, tls_key: bytes | str | Path | None = None,
                 load_balancing: Literal["round_robin", "pick_first"] | None = None,
                 retries: int | None = None, keepalive: float | None = None, retry_overloaded: bool = True) -> None:
        options = list(options or [])
        if not any(name == "grpc.max_receive_message_length" for name, _ in options):
            # A SearchBatch reply holds up to max_batch replies (256 x top_k 10 is ~2.6 MB): up to what the server
            # sends (64 MiB), rather than gRPC's default of 4 MiB.
            options.append(("grpc.max_receive_message_length", MAX_REPLY_BYTES))
        if keepalive is not None:
            if keepalive <= 0:
                raise ValueError(f"keepalive must be > 0 seconds, got {keepalive}")
            # Only while calls are in flight (keepalive_permit_without_calls stays 0): servers refuse idle pings.
            options += [("grpc.keepalive_time_ms", int(keepalive * 1000)),
                        ("grpc.keepalive_timeout_ms", int(keepalive * 1000))]
        if load_balancing is not None or retries is not None:
            if any(name == "grpc.service_config" for name, _ in options):
                raise ValueError("give load_balancing/retries or a grpc.service_config option, not both")
            if channel is not None:
                raise ValueError("load_balancing/retries configure a channel this client creates; "
                                 "pass them to the channel you give instead")
            options.append(("grpc.service_config", service_config(load_balancing=load_balancing, retries=retries or 0,
                                                                  retry_overloaded=retry_overloaded)))
        self._own_channel = channel is None
        if channel is None and tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca), private_key=_pem(tls_key),
                                                       certificate_chain=_pem(tls_cert))
            channel = grpc.secure_channel(target, credentials, options=options)
        self.channel = channel or grpc.insecure_channel(target, options=options)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._admin_metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self._stub = pb_grpc.RetrieverStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> RetrieverClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def _call(self, method, request, timeout: float | None, metadata=None):
        return self._call_with_served_by(method, request, timeout, metadata)[0]

    def _call_with_served_by(self, method, request, timeout: float | None, metadata=None):
        try:
            reply, call = method.with_call(request, timeout=self.timeout if timeout is None else timeout,
                                           metadata=self._metadata if metadata is None else metadata)
        except grpc.RpcError as error:
            raise _error(error) from error
        return reply, _served_by(call.trailing_metadata())

    def search(self, query: str, *, top_k: int | None = None, depth: int | None = None,
               fusion: Literal["rrf", "weighted"] | None = None, dense_weight: float | None = None,
               filters: dict[str, str] | None = None, filter: FilterLike | None = None, debug: bool = False,
               cache: Literal["default", "bypass", "exact_only", "strict"] | None = None,
               rerank: bool | None = None, rerank_depth: int | None = None, max_context_tokens: int | None = None,
               mmr_lambda: float | None = None, dedup_threshold: float | None = None,
               require_complete: bool = False, group_by_doc: bool = False, group_size: int | None = None,
               offset: int | None = None, page_token: str | None = None, min_score: float | None = None,
               decay: Decay | None = None, highlight: bool = False, tenant: str | None = None,
               collection: str = "", profile: bool = False, timeout: float | None = None) -> SearchResult:
        """None leaves a parameter to the server's default; the parameters are those of `search_request`."""
        request = search_request(
            query, top_k=top_k, depth=depth, fusion=fusion, dense_weight=dense_weight, filters=filters, filter=filter,
            debug=debug, cache=cache, rerank=rerank, rerank_depth=rerank_depth, max_context_tokens=max_context_tokens,
            mmr_lambda=mmr_lambda, dedup_threshold=dedup_threshold, require_complete=require_complete,
            group_by_doc=group_by_doc, group_size=group_size, offset=offset, page_token=page_token,
            min_score=min_score, decay=decay, highlight=highlight, tenant=tenant, collection=collection,
            profile=profile)
        return _result(*self._call_with_served_by(self._stub.Search, request, timeout))

    def search_batch(self, queries: Iterable[str | pb.SearchRequest], *, timeout: float | None = None,
                     **params: Any) -> list[SearchResult | RetrieverError]:
        """Many searches in one call (SearchBatch): a query string takes `params` (the keywords of `search`), a
        SearchRequest is sent as it is. One entry per query, in order: its SearchResult, or the RetrieverError it
        failed with (INVALID_ARGUMENT naming `requests[i].field`, ...) while the others are answered. The call itself
        raises RetrieverError only for the whole batch: more queries than the server's `limits.max_batch`
        (INVALID_ARGUMENT naming `requests`), a server refusing it for load (RESOURCE_EXHAUSTED), or the deadline
        passing before every query was answered (DEADLINE_EXCEEDED: the answered ones are cached, so sending the
        batch again resumes). The deadline `timeout` covers the whole batch."""
        requests = [q if isinstance(q, pb.SearchRequest) else search_request(q, **params) for q in queries]
        reply, served_by = self._call_with_served_by(self._stub.SearchBatch, pb.SearchBatchRequest(requests=requests),
                                                     timeout)
        return [_result(r.response, served_by) if r.code == grpc.StatusCode.OK.value[0]
                else RetrieverError(_CODES.get(r.code, grpc.StatusCode.UNKNOWN), r.message, served_by)
                for r in reply.results]

    def prefetch(self, queries: Iterable[str | pb.SearchRequest], *, tenant: str | None = None, collection: str = "",
                 timeout: float | None = None) -> pb.PrefetchResponse:
        """Names searches expected soon (plain queries, or requests with their parameters); the server fills its
        cache in the background. The reply counts what was accepted and what was dropped (queue full, server busy).
        `tenant` and `collection` apply to the plain queries (a request carries its own)."""
        requests = [q if isinstance(q, pb.SearchRequest)
                    else pb.SearchRequest(query=q, tenant=tenant or "", collection=collection) for q in queries]
        return self._call(self._stub.Prefetch, pb.PrefetchRequest(requests=requests), timeout)

    def stream_search(self, drafts: Iterable[tuple[str | pb.SearchRequest, bool]], *, tenant: str | None = None,
                      collection: str = "", timeout: float | None = None) -> Iterator[SearchResult]:
        """Sends (draft, final) pairs as the user types (a draft is a query or a request with its parameters) and
        yields one result per final draft. The server searches speculatively on drafts; pace the iterator as the
        typing goes (it is consumed on gRPC's thread). `tenant` and `collection` apply to the plain-query drafts."""
        def messages():
            for draft, final in drafts:
                request = draft if isinstance(draft, pb.SearchRequest) \
                    else pb.SearchRequest(query=draft, tenant=tenant or "", collection=collection)
                yield pb.QueryDraft(request=request, final=final)

        try:
            for reply in self._stub.StreamSearch(messages(), timeout=self.timeout if timeout is None else timeout,
                                                 metadata=self._metadata):
                yield _result(reply)
        except grpc.RpcError as error:
            raise _error(error) from error

    def index_info(self, *, collection: str = "", timeout: float | None = None) -> pb.IndexInfo:
        """What serves `collection` (a collection or alias; "": the default)."""
        return self._call(self._stub.GetIndexInfo, pb.GetIndexInfoRequest(collection=collection), timeout)

    def reload(self, path: str = "", *, collection: str = "", timeout: float | None = 120.0) -> pb.ReloadIndexResponse:
        """Asks the server to load, check, warm and swap in the index at `path` (inside its index root; "" = the
        collection's own path, CURRENT followed anew) as `collection` ("": the default; a folder of the index root
        the server does not serve yet is loaded as a new collection). Needs `admin_token`."""
        return self._call(self._stub.ReloadIndex, pb.ReloadIndexRequest(path=path, collection=collection), timeout,
                          metadata=self._admin_metadata)

    def list_collections(self, *, timeout: float | None = None) -> tuple[list[CollectionInfo], dict[str, str]]:
        """Every collection the server holds, and its aliases (alias -> collection)."""
        reply = self._call(self._stub.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [CollectionInfo(name=c.name, status=c.status, version=c.version, document_count=c.document_count,
                               chunk_count=c.chunk_count, embedding_model=c.embedding_model, aliases=list(c.aliases),
                               is_default=c.is_default, error=c.error)
                for c in reply.collections], dict(reply.aliases)

    def set_alias(self, alias: str, collection: str, *, timeout: float | None = 30.0) -> str:
        """Points `alias` at `collection` atomically (persisted in the server's index root); returns the collection
        it named before ("" if new). Needs `admin_token`."""
        return self._call(self._stub.SetAlias, pb.SetAliasRequest(alias=alias, collection=collection), timeout,
                          metadata=self._admin_metadata).previous

    def delete_alias(self, alias: str, *, timeout: float | None = 30.0) -> str:
        """Removes `alias`; returns the collection it named. Needs `admin_token`."""
        return self._call(self._stub.DeleteAlias, pb.DeleteAliasRequest(alias=alias), timeout,
                          metadata=self._admin_metadata).previous

    def delete_collection(self, collection: str, *, remove_files: bool = False,
                          timeout: float | None = 60.0) -> str:
        """Stops serving `collection` (refused while an alias names it); `remove_files` also deletes its folder.
        Returns the version it served. Needs `admin_token`."""
        return self._call(self._stub.DeleteCollection, pb.DeleteCollectionRequest(
            collection=collection, remove_files=remove_files), timeout, metadata=self._admin_metadata).version

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, ())
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 60.0, *, collection: str = "") -> None:
        """Polls health until SERVING (the server loads and warms its index first): the whole server's, or with
        `collection` that collection's or alias's (its health service)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(collection, timeout=1.0) == "SERVING":
                    return
            except RetrieverError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout} s")
            time.sleep(0.1)
