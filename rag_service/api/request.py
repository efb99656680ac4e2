"""Request stage: turns a wire SearchRequest into validated SearchParams, applying the server's defaults.

Every violation raises InvalidArgument naming the field, which the server maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
import re
import time

from rag_service.api import pages
from rag_service.core import filter as flt
from rag_service.core.config import Limits, SearchDefaults
from rag_service.core.errors import InvalidArgument
from rag_service.core.params import Decay, SearchParams
from rag_service.pb.rag.v1 import retrieval_pb2 as pb

FUSION_NAMES = {pb.FUSION_RRF: "rrf", pb.FUSION_WEIGHTED: "weighted"}
CACHE_MODES = {pb.CACHE_DEFAULT: "default", pb.CACHE_BYPASS: "bypass", pb.CACHE_EXACT_ONLY: "exact_only",
               pb.CACHE_STRICT: "strict"}


# Unicode's control characters (category Cc) are exactly C0, DEL and C1; tabs and newlines are ordinary in pasted
# questions. One regex search instead of a category look-up per character (~20 µs on a 100-character query).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _has_control_chars(text: str) -> bool:
    return _CONTROL.search(text) is not None


def check_query(query: str, limits: Limits) -> None:
    if not query.strip():
        raise InvalidArgument("query", "must not be empty or blank")
    if len(query) > limits.max_query_chars:
        raise InvalidArgument("query", f"is {len(query)} characters; the limit is {limits.max_query_chars}")
    if _has_control_chars(query):
        raise InvalidArgument("query", "contains control characters")


class PlainParams:
    """`search_params` with a short way for a plain request, one that sets nothing but its query, its top_k, its cache
    mode and its debug flag (most requests): its parameters are those of any other such request under the same
    defaults, limits, top_k, cache mode and debug flag, so they are validated once per combination and then copied
    with each query. The ~20 field reads and checks of the long way cost ~30 µs a request on the caches a search
    leaves behind (bench/README.md, "Issue 15")."""

    MAX_HELD = 64  # combinations remembered: a few cache modes and top_k per defaults object (collection, tuned index)

    def __init__(self) -> None:
        # (id(defaults), cache, debug, top_k or None) -> (defaults, limits, their params); the objects are held, so an
        # id is never reused while its entry stands.
        self._held: dict[tuple[int, int, bool, int | None], tuple[SearchDefaults, Limits, SearchParams]] = {}

    def __call__(self, request: pb.SearchRequest, defaults: SearchDefaults, limits: Limits) -> SearchParams:
        fields = request.ListFields()
        if not fields or any(field.name not in _PLAIN_FIELDS for field, _ in fields):
            return search_params(request, defaults, limits)
        query = request.query
        check_query(query, limits)
        top_k = request.top_k if request.HasField("top_k") else None
        shape = (id(defaults), request.cache, request.debug, top_k)
        held = self._held.get(shape)
        if held is None or held[0] is not defaults or held[1] is not limits:
            if len(self._held) >= self.MAX_HELD:
                self._held.clear()
            probe = pb.SearchRequest(query="plain", cache=request.cache, debug=request.debug)
            if top_k is not None:
                probe.top_k = top_k
            held = self._held[shape] = (defaults, limits, search_params(probe, defaults, limits))
        params = object.__new__(SearchParams)  # SearchParams' __init__ sets its fields and nothing else
        params.__dict__.update(held[2].__dict__, query=query, filters={})
        return params


# profile asks for the stage timings in the reply: the search, hence its parameters, are those without it.
_PLAIN_FIELDS = frozenset({"query", "top_k", "cache", "debug", "profile"})


def search_params(request: pb.SearchRequest, defaults: SearchDefaults, limits: Limits) -> SearchParams:
    query = request.query
    check_query(query, limits)

    top_k = request.top_k if request.HasField("top_k") else defaults.top_k
    if not 1 <= top_k <= limits.max_top_k:
        raise InvalidArgument("top_k", f"must be between 1 and {limits.max_top_k}, got {top_k}")

    # A page is cut from the ranking of its window [0, offset + top_k): depth and rerank depth follow the window,
    # so page 2 ranks exactly as one request for both pages would.
    offset, token = 0, None
    paged = request.HasField("offset") or bool(request.page_token)
    if paged:
        offset, token = _page(request, top_k, limits)
    window = offset + top_k

    if request.HasField("depth"):
        depth = request.depth
        if not 1 <= depth <= limits.max_depth:
            raise InvalidArgument("depth", f"must be between 1 and {limits.max_depth}, got {depth}")
    else:
        # An explicit top_k above the default depth means "I want that many": fetch enough candidates for it.
        depth = min(max(defaults.depth, window), limits.max_depth)

    fusion: str
    if request.fusion == pb.FUSION_UNSPECIFIED:
        fusion = defaults.fusion
    elif request.fusion in FUSION_NAMES:
        fusion = FUSION_NAMES[request.fusion]
    else:
        raise InvalidArgument("fusion", f"unknown fusion method {request.fusion}; use FUSION_RRF or FUSION_WEIGHTED")

    dense_weight = request.dense_weight if request.HasField("dense_weight") else defaults.dense_weight
    if not (math.isfinite(dense_weight) and 0.0 <= dense_weight <= 1.0):
        raise InvalidArgument("dense_weight", f"must be between 0 and 1, got {dense_weight}")

    if len(request.filters) > limits.max_filters:
        raise InvalidArgument("filters", f"has {len(request.filters)} entries; the limit is {limits.max_filters}")
    for name, value in request.filters.items():
        if not name:
            raise InvalidArgument("filters", "a filter field name is empty")
        if len(value) > limits.max_filter_value_chars:
            raise InvalidArgument(f"filters[{name}]", f"value longer than {limits.max_filter_value_chars} characters")

    tree = parse_filter(request.filter, limits) if request.HasField("filter") else None

    rerank = request.rerank if request.HasField("rerank") else defaults.rerank
    if request.HasField("rerank_depth"):
        rerank_depth = request.rerank_depth
        if not 1 <= rerank_depth <= limits.max_rerank_depth:
            raise InvalidArgument("rerank_depth",
                                  f"must be between 1 and {limits.max_rerank_depth}, got {rerank_depth}")
    else:
        rerank_depth = defaults.rerank_depth
    # The reranker can only see what the first stage fetched, and must see at least what is returned.
    rerank_depth = max(min(rerank_depth, depth), min(window, depth))

    max_context_tokens = request.max_context_tokens if request.HasField("max_context_tokens") \
        else defaults.max_context_tokens
    if max_context_tokens > limits.max_context_tokens:
        raise InvalidArgument("max_context_tokens",
                              f"must be at most {limits.max_context_tokens}, got {max_context_tokens}")

    mmr_lambda = request.mmr_lambda if request.HasField("mmr_lambda") else defaults.mmr_lambda
    if not (math.isfinite(mmr_lambda) and 0.0 <= mmr_lambda <= 1.0):
        raise InvalidArgument("mmr_lambda", f"must be between 0 and 1, got {mmr_lambda}")
    dedup = request.dedup_threshold if request.HasField("dedup_threshold") else defaults.dedup_threshold
    if not (math.isfinite(dedup) and 0.0 < dedup <= 1.0):
        raise InvalidArgument("dedup_threshold", f"must be in (0, 1], got {dedup}")

    budget_ms = None
    if request.HasField("budget_ms"):
        if not 1 <= request.budget_ms <= limits.max_budget_ms:
            raise InvalidArgument("budget_ms", f"must be between 1 and {limits.max_budget_ms}, got {request.budget_ms}")
        budget_ms = float(request.budget_ms)

    if request.cache not in CACHE_MODES:
        raise InvalidArgument("cache", f"unknown cache mode {request.cache}")

    group_size = 0
    if request.group_by_doc:
        group_size = request.group_size if request.HasField("group_size") else 1
        if not 1 <= group_size <= MAX_GROUP_SIZE:
            raise InvalidArgument("group_size", f"must be between 1 and {MAX_GROUP_SIZE}, got {group_size}")
    elif request.HasField("group_size"):
        raise InvalidArgument("group_size", "applies to grouped requests only: set group_by_doc")

    min_score = None
    if request.HasField("min_score"):
        min_score = float(request.min_score)
        if not math.isfinite(min_score):
            raise InvalidArgument("min_score", f"must be finite, got {min_score}")

    return SearchParams(query=query, top_k=top_k, depth=depth, fusion=fusion, dense_weight=float(dense_weight),
                          rrf_k=defaults.rrf_k, filters=dict(request.filters), filter=tree, rerank=rerank,
                          rerank_depth=rerank_depth, max_context_tokens=max_context_tokens,
                          mmr_lambda=float(mmr_lambda), dedup_threshold=float(dedup), budget_ms=budget_ms,
                          cache=CACHE_MODES[request.cache], require_complete=request.require_complete,
                          group_size=group_size, offset=offset, paged=paged, min_score=min_score,
                          decay=_decay(request.decay, token) if request.HasField("decay") else None,
                          highlight=request.highlight, explain=request.debug)


MAX_GROUP_SIZE = 100
MAX_FIELD_CHARS = 256
DECAY_FUNCTIONS = {pb.DECAY_EXP: "exp", pb.DECAY_LINEAR: "linear", pb.DECAY_GAUSS: "gauss"}
_YEAR_10000 = 253402300800  # seconds: datetime's range; a decay origin or scale beyond it is a mistake


def _page(request: pb.SearchRequest, top_k: int, limits: Limits) -> tuple[int, pages.PageToken | None]:
    token = None
    if request.page_token:
        if request.HasField("offset"):
            raise InvalidArgument("offset", "give offset or page_token, not both")
        token = pages.decode(request.page_token)
        offset = token.offset
    else:
        offset = request.offset
    if offset + top_k > limits.max_top_k:
        field = "page_token" if token is not None else "offset"
        raise InvalidArgument(field, f"offset {offset} + top_k {top_k} is beyond the deepest page, "
                              f"{limits.max_top_k} results")
    return offset, token


def _seconds(value, field: str) -> float:
    seconds = value.seconds + value.nanos / 1e9
    if not abs(seconds) < _YEAR_10000:
        raise InvalidArgument(field, f"is out of range ({seconds} s)")
    return seconds


def _decay(decay: pb.Decay, token: pages.PageToken | None) -> Decay:
    if not decay.field:
        raise InvalidArgument("decay.field", "must name a metadata field holding dates")
    if len(decay.field) > MAX_FIELD_CHARS:
        raise InvalidArgument("decay.field", f"is longer than {MAX_FIELD_CHARS} characters")
    if decay.function not in DECAY_FUNCTIONS:
        raise InvalidArgument("decay.function", f"unknown decay function {decay.function}; use DECAY_EXP, "
                              "DECAY_LINEAR or DECAY_GAUSS")
    if decay.HasField("origin"):
        origin = _seconds(decay.origin, "decay.origin")
    elif token is not None and token.origin is not None:
        origin = float(token.origin)  # the "now" of page 1, so that the pages rank alike
    else:
        # Now, to the minute, so that requests a few seconds apart rank alike and share a cache entry.
        origin = float(int(time.time()) // 60 * 60)
    if not decay.HasField("scale"):
        raise InvalidArgument("decay.scale", "is required: the distance from the origin at which the factor is "
                              "`decay` (a Duration, e.g. \"2592000s\")")
    scale = _seconds(decay.scale, "decay.scale")
    if not scale > 0:
        raise InvalidArgument("decay.scale", f"must be > 0, got {scale} s")
    offset = _seconds(decay.offset, "decay.offset")
    if offset < 0:
        raise InvalidArgument("decay.offset", f"must be >= 0, got {offset} s")
    value = float(decay.decay) if decay.HasField("decay") else 0.5
    if not 0.0 < value < 1.0:
        raise InvalidArgument("decay.decay", f"must be in (0, 1), got {value}")
    weight = float(decay.weight)
    if not (math.isfinite(weight) and weight >= 0.0):
        raise InvalidArgument("decay.weight", f"must be finite and >= 0, got {weight}")
    return Decay(field=decay.field, function=DECAY_FUNCTIONS[decay.function], origin=origin, scale=scale,
                 offset=offset, decay=value, weight=weight)


def parse_filter(message: pb.Filter, limits: Limits, path: str = "filter") -> flt.Tree:
    """The structured filter as a validated tree (core/filter.py). What needs the index's types (unknown fields,
    a condition that does not fit its field) is checked where the index is: DocStore.filter_mask, the router."""
    count = [0]
    return _tree(message, limits, path, 1, count)


def _tree(message: pb.Filter, limits: Limits, path: str, depth: int, count: list[int]) -> flt.Tree:
    if depth > limits.max_filter_depth:
        raise InvalidArgument(path, f"nests deeper than {limits.max_filter_depth} filters")
    if not (message.must or message.should or message.must_not):
        raise InvalidArgument(path, "is empty: give must, should or must_not conditions (leave the filter unset for "
                              "no filter)")
    lists = {name: tuple(_node(c, limits, f"{path}.{name}[{i}]", depth, count)
                         for i, c in enumerate(getattr(message, name)))
             for name in ("must", "should", "must_not")}
    min_should = 1
    if message.HasField("min_should"):
        if not 1 <= message.min_should <= len(message.should):
            raise InvalidArgument(f"{path}.min_should", f"must be between 1 and the {len(message.should)} should "
                                  f"conditions, got {message.min_should}")
        min_should = message.min_should
    return flt.Tree(path=path, must=lists["must"], should=lists["should"], must_not=lists["must_not"],
                    min_should=min_should)


def _node(message: pb.Condition, limits: Limits, path: str, depth: int, count: list[int]) -> flt.Node:
    count[0] += 1
    if count[0] > limits.max_filter_conditions:
        raise InvalidArgument(path, f"the filter has more than {limits.max_filter_conditions} conditions")
    kind = message.WhichOneof("condition")
    if kind is None:
        raise InvalidArgument(path, "no condition: set one of match, any, range, date_range, exists, is_empty, filter")
    if kind == "filter":
        if message.key:
            raise InvalidArgument(f"{path}.key", "a nested filter takes no key")
        return _tree(message.filter, limits, f"{path}.filter", depth + 1, count)
    key = message.key
    if not key:
        raise InvalidArgument(f"{path}.key", f"is empty: name the metadata field the {kind} condition tests")
    if len(key) > limits.max_filter_value_chars:
        raise InvalidArgument(f"{path}.key", f"longer than {limits.max_filter_value_chars} characters")
    where = f"{path}.{kind}"
    if kind in ("exists", "is_empty"):
        empty = message.is_empty if kind == "is_empty" else not message.exists
        return flt.Condition(path=path, key=key, kind=flt.EMPTY, negate=not empty)
    if kind == "match":
        which = message.match.WhichOneof("value")
        if which is None:
            raise InvalidArgument(where, "no value: set keyword, integer, boolean or number")
        value = getattr(message.match, which)
        _check_value(which, value, where, limits)
        return flt.Condition(path=path, key=key, kind=flt.MATCH, values=((which, value),))
    if kind == "any":
        keywords, integers = message.any.keywords, message.any.integers
        if keywords and integers:
            raise InvalidArgument(where, "give keywords or integers, not both")
        if len(keywords) + len(integers) > limits.max_filter_values:
            raise InvalidArgument(where, f"has more than {limits.max_filter_values} values")
        values: tuple[tuple[str, str | int | float | bool], ...] = (
            tuple(("keyword", v) for v in keywords) or tuple(("integer", int(v)) for v in integers))
        for i, (which, v) in enumerate(values):
            _check_value(which, v, f"{where}.{which}s[{i}]", limits)
        # Order and repeats do not change what matches: one cache entry for every spelling of the set.
        return flt.Condition(path=path, key=key, kind=flt.ANY, values=tuple(sorted(set(values))))
    bounds_message = message.range if kind == "range" else message.date_range
    names = ("gt", "gte", "lt", "lte")
    bounds = tuple(getattr(bounds_message, n) if bounds_message.HasField(n) else None for n in names)
    if all(b is None for b in bounds):
        raise InvalidArgument(where, "has no bound: give gt, gte, lt or lte")
    if kind == "range":
        flt.finite_bounds(bounds, where)
        return flt.Condition(path=path, key=key, kind=flt.RANGE, bounds=bounds)  # type: ignore[arg-type]
    for name, bound in zip(names, bounds):
        if bound is not None:
            try:
                flt.parse_date(str(bound))
            except ValueError as e:
                raise InvalidArgument(f"{where}.{name}", str(e)) from None
    return flt.Condition(path=path, key=key, kind=flt.DATE_RANGE, bounds=bounds)  # type: ignore[arg-type]


def _check_value(which: str, value: object, where: str, limits: Limits) -> None:
    if which == "keyword" and len(str(value)) > limits.max_filter_value_chars:
        raise InvalidArgument(where, f"value longer than {limits.max_filter_value_chars} characters")
    if which == "number" and isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(where, f"must be a finite number, got {value}")
