"""Structured metadata filters: typed metadata at build time, the boolean tree (must / should / must_not over match,
any, range, date_range, exists, is_empty and nested filters) against a brute-force evaluator on random metadata, bad
filters as INVALID_ARGUMENT naming the path, cache keys, and indexes built before types existed."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rag_service.core import filter as flt
from rag_service.core.config import Limits
from rag_service.core.errors import BuildError, InvalidArgument
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

KEYWORDS = ["alpha", "beta", "gamma", "delta", "épsilon"]
TAGS = ["red", "green", "blue", "cyan", "ünï"]
DATES = ["2015-03-01", "2016-07-15", "2018-01-01T12:00:00Z", "2019-12-31T23:59:59+02:00", "2021-06-01",
         "2023-02-28T00:00:00.5Z"]
WORDS = ["ice", "magma", "cell", "light", "bread", "river", "stone", "wind", "cloud", "forest", "glacier", "ocean",
         "star", "metal", "field"]
FIELDS = {"kw": flt.KEYWORD, "tags": flt.KEYWORD_LIST, "n": flt.INTEGER, "x": flt.FLOAT, "day": flt.DATE,
          "flag": flt.BOOLEAN}


def random_docs(seed: int = 16, count: int = 90) -> list[dict]:
    """Seeded documents whose metadata fields are each sometimes missing, null or (lists) empty."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        meta: dict[str, Any] = {}
        draws = {"kw": lambda: rng.choice(KEYWORDS), "tags": lambda: rng.sample(TAGS, rng.randint(0, 3)),
                 "n": lambda: rng.randint(-3, 20), "x": lambda: rng.choice([rng.uniform(-2, 9), 1.0, 2.5]),
                 "day": lambda: rng.choice(DATES), "flag": lambda: rng.random() < 0.5}
        for name, draw in draws.items():
            roll = rng.random()
            if roll < 0.1:
                continue  # missing
            meta[name] = None if roll < 0.15 else draw()
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
        docs.append({"_id": f"doc{i:03d}", "title": f"Note {i}", "text": text, "metadata": meta})
    return docs


# -- the brute-force evaluator ---------------------------------------------------------------------------------------

def _empty(value: Any) -> bool:
    return value is None or value == []


def _cmp(field: str, value: Any) -> Any:
    return flt.parse_date(value) if FIELDS[field] == flt.DATE else value


def brute_condition(meta: dict, cond: dict) -> bool:
    if "filter" in cond:
        return brute_tree(meta, cond["filter"])
    key = cond["key"]
    value = meta.get(key)
    if "is_empty" in cond:
        return _empty(value) == cond["is_empty"]
    if "exists" in cond:
        return (not _empty(value)) == cond["exists"]
    if _empty(value):
        return False
    elements = value if isinstance(value, list) else [value]
    if "match" in cond:
        wanted = [next(iter(cond["match"].values()))]
    elif "any" in cond:
        wanted = next(iter(cond["any"].values()), [])
    else:
        bounds = cond.get("range") or cond["date_range"]
        v = _cmp(key, value)
        checks = {"gt": lambda b: v > b, "gte": lambda b: v >= b, "lt": lambda b: v < b, "lte": lambda b: v <= b}
        return all(checks[name](_cmp(key, b)) for name, b in bounds.items())
    return any(_cmp(key, e) == _cmp(key, w) for e in elements for w in wanted)


def brute_tree(meta: dict, tree: dict) -> bool:
    must, should, must_not = tree.get("must", []), tree.get("should", []), tree.get("must_not", [])
    if not all(brute_condition(meta, c) for c in must):
        return False
    if should and sum(brute_condition(meta, c) for c in should) < tree.get("min_should", 1):
        return False
    return not any(brute_condition(meta, c) for c in must_not)


# -- random filter trees ---------------------------------------------------------------------------------------------

def _bounds(values) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), values, min_size=1, max_size=3)


def _field_condition(field: str) -> st.SearchStrategy[dict]:
    kind = FIELDS[field]
    empties = st.sampled_from([{"exists": True}, {"exists": False}, {"is_empty": True}, {"is_empty": False}])
    keywords = st.sampled_from(KEYWORDS + ["zeta"])
    if kind == flt.KEYWORD:
        tests = st.one_of(keywords.map(lambda v: {"match": {"keyword": v}}),
                          st.lists(keywords, max_size=3).map(lambda v: {"any": {"keywords": v}}))
    elif kind == flt.KEYWORD_LIST:
        tags = st.sampled_from(TAGS + ["black"])
        tests = st.one_of(tags.map(lambda v: {"match": {"keyword": v}}),
                          st.lists(tags, max_size=3).map(lambda v: {"any": {"keywords": v}}))
    elif kind == flt.INTEGER:
        ints = st.integers(-4, 21)
        tests = st.one_of(ints.map(lambda v: {"match": {"integer": v}}),
                          st.lists(ints, min_size=1, max_size=4).map(lambda v: {"any": {"integers": v}}),
                          _bounds(st.sampled_from([-3.0, 0.0, 4.5, 7.0, 12.0, 20.0])).map(lambda b: {"range": b}))
    elif kind == flt.FLOAT:
        tests = st.one_of(st.sampled_from([{"match": {"number": 2.5}}, {"match": {"integer": 1}}]),
                          _bounds(st.sampled_from([-1.0, 0.0, 1.0, 2.5, 4.0, 8.5])).map(lambda b: {"range": b}))
    elif kind == flt.DATE:
        stamps = st.sampled_from(DATES + ["2017-01-01", "2019-12-31T21:59:59Z", "2030-01-01T00:00:00Z"])
        tests = st.one_of(stamps.map(lambda v: {"match": {"keyword": v}}),
                          _bounds(stamps).map(lambda b: {"date_range": b}))
    else:
        tests = st.booleans().map(lambda v: {"match": {"boolean": v}})
    return st.one_of(tests, empties).map(lambda c: {"key": field, **c})


conditions = st.sampled_from(sorted(FIELDS)).flatmap(_field_condition)


def _tree(children: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    @st.composite
    def build(draw) -> dict:
        tree = {name: draw(st.lists(children, max_size=2)) for name in ("must", "should", "must_not")}
        if not any(tree.values()):
            tree["must"] = [draw(children)]
        tree = {k: v for k, v in tree.items() if v}
        if tree.get("should") and draw(st.booleans()):
            tree["min_should"] = draw(st.integers(1, len(tree["should"])))
        return tree
    return build()


filter_trees = st.recursive(_tree(conditions), lambda inner: _tree(conditions | inner.map(lambda t: {"filter": t})),
                           max_leaves=4)


# -- fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def filtered_index(tmp_path_factory, encoder, write_corpus):
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("filters")
    docs = random_docs()
    corpus = write_corpus(work / "corpus.jsonl", docs)
    root = work / "idx"
    build_index(corpus, root, BuildConfig(chunk_tokens=64, chunk_overlap=16, window_sentences=0), encoder=encoder,
                progress=False)
    return root, docs


@pytest.fixture(scope="module")
def filtered_server(filtered_index, encoder, server_thread):
    from rag_service.core.config import ServerConfig

    root, docs = filtered_index
    with server_thread(ServerConfig(index=root, port=0, warmup_queries=0), encoder) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.RetrieverStub(channel), docs, running


def _count(tree: dict) -> int:
    children = [c for name in ("must", "should", "must_not") for c in tree.get(name, [])]
    return sum(1 + (_count(c["filter"]) if "filter" in c else 0) for c in children)


def _matching(docs: list[dict], tree: dict) -> set[str]:
    return {d["_id"] for d in docs if brute_tree(d["metadata"], tree)}


# -- types at build time ---------------------------------------------------------------------------------------------

def test_types_are_inferred_from_json_values():
    assert flt.TYPES == (flt.KEYWORD, flt.KEYWORD_LIST, flt.INTEGER, flt.FLOAT, flt.DATE, flt.BOOLEAN)
    from rag_service.index.metadata import infer_type

    assert infer_type(["a", "b"]) == flt.KEYWORD
    assert infer_type([["a"], [], None, ["b", "c"]]) == flt.KEYWORD_LIST
    assert infer_type([1, 2, None]) == flt.INTEGER
    assert infer_type([1, 2.5]) == flt.FLOAT
    assert infer_type([True, False]) == flt.BOOLEAN
    assert infer_type([1, True]) == flt.KEYWORD  # a boolean is not a number
    assert infer_type(["2020-01-01", "2021-02-03T04:05:06Z"]) == flt.DATE
    assert infer_type(["2020-01-01", "soon"]) == flt.KEYWORD
    assert infer_type([{"a": 1}]) == flt.KEYWORD
    assert infer_type([None]) == flt.KEYWORD


def test_dates_parse_as_rfc3339():
    assert flt.parse_date("1970-01-01") == 0
    assert flt.parse_date("1970-01-01T00:00:01Z") == 1_000_000
    assert flt.parse_date("1970-01-01T02:00:00+02:00") == 0
    assert flt.parse_date("1970-01-01 00:00:00.5") == 500_000
    assert flt.parse_date("1970-01-01T00:00:00.123456789Z") == 123_456
    for bad in ("2020-13-01", "yesterday", "2020-1-1", "20200101", "2020-01-01T25:00:00Z", ""):
        with pytest.raises(ValueError):
            flt.parse_date(bad)


def test_declared_schema_wins_and_bad_values_fail_the_build(tmp_path):
    from rag_service.index.chunking import Document
    from rag_service.index.metadata import read_schema_file, resolve_schema

    docs = [Document(id="a", title="", text="x", metadata={"year": 2020, "code": "7"}),
            Document(id="b", title="", text="y", metadata={"year": 2021})]
    assert resolve_schema(docs) == {"code": flt.KEYWORD, "year": flt.INTEGER}
    assert resolve_schema(docs, {"year": "float", "extra": "date"}) == {"code": "keyword", "extra": "date",
                                                                        "year": "float"}
    with pytest.raises(BuildError, match="'b'.*'code'|'a'.*'code'"):
        resolve_schema(docs + [Document(id="c", title="", text="z", metadata={"code": "x"})], {"code": "integer"})
    path = tmp_path / "schema.json"
    path.write_text(json.dumps({"year": "integer", "tags": "keyword_list"}))
    assert read_schema_file(path) == {"year": "integer", "tags": "keyword_list"}
    path.write_text(json.dumps({"year": "int"}))
    with pytest.raises(BuildError, match="year"):
        read_schema_file(path)


# -- evaluation ------------------------------------------------------------------------------------------------------

def _tree_of(tree: dict) -> flt.Tree:
    from google.protobuf import json_format

    from rag_service.api.request import parse_filter

    return parse_filter(json_format.ParseDict(tree, pb.Filter()), Limits())


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(tree=filter_trees)
def test_masks_equal_a_brute_force_evaluator(filtered_index, tree):
    from rag_service.index.store import DocStore

    assume(_count(tree) <= Limits().max_filter_conditions)
    root, docs = filtered_index
    store = _store(root)
    assert isinstance(store, DocStore)
    mask = store.filter_mask(None, _tree_of(tree))
    got = {store.doc_id(store.chunk_doc(int(c))) for c in np.flatnonzero(mask)}
    assert got == _matching(docs, tree), tree
    # Chunks of one document agree: a document matches whole.
    assert all(mask[c] == mask[np.flatnonzero(store.chunk_docs == store.chunk_docs[c])].all() for c in range(len(mask)))


_STORES: dict[Path, Any] = {}


def _store(root: Path):
    from rag_service.index.load import resolve_version_dir
    from rag_service.index.store import DocStore

    if root not in _STORES:
        _STORES[root] = DocStore.load(resolve_version_dir(root))
    return _STORES[root]


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(tree=filter_trees)
def test_search_over_grpc_returns_exactly_the_matching_documents(filtered_server, tree):
    assume(_count(tree) <= Limits().max_filter_conditions)
    stub, docs, _ = filtered_server
    request = pb.SearchRequest(query="glacier ice river", top_k=1000, depth=1000, rerank=False, mmr_lambda=1.0,
                               dedup_threshold=1.0, cache=pb.CACHE_BYPASS)
    from google.protobuf import json_format

    request.filter.CopyFrom(json_format.ParseDict(tree, pb.Filter()))
    reply = stub.Search(request, timeout=30)
    assert {c.doc_id for c in reply.contexts} == _matching(docs, tree), tree


def test_filters_map_and_filter_tree_are_anded(filtered_server):
    stub, docs, _ = filtered_server
    tree = {"must": [{"key": "n", "range": {"gte": 5}}]}
    from google.protobuf import json_format

    request = pb.SearchRequest(query="stone", top_k=1000, depth=1000, rerank=False, cache=pb.CACHE_BYPASS,
                               filters={"kw": "beta"}, filter=json_format.ParseDict(tree, pb.Filter()))
    got = {c.doc_id for c in stub.Search(request, timeout=30).contexts}
    want = {d["_id"] for d in docs if d["metadata"].get("kw") == "beta" and brute_tree(d["metadata"], tree)}
    assert got == want and want


def test_client_builders_make_the_same_filter(filtered_server):
    from rag_service.client import RetrieverClient, any_of, date_range, is_empty, match, must, nested, range_of, should

    stub, docs, running = filtered_server
    tree = must(range_of("n", gte=2, lt=15), nested(should(match("kw", "alpha"), any_of("tags", ["red", "ünï"]))),
                date_range("day", gte="2016-01-01"))
    tree["must_not"] = [is_empty("day")]
    with RetrieverClient(f"127.0.0.1:{running.port}") as client:
        result = client.search("forest", top_k=1000, depth=1000, rerank=False, filter=tree, cache="bypass")
        assert {c.doc_id for c in result.contexts} == _matching(docs, tree)
        with pytest.raises(ValueError, match="filter"):
            client.search("forest", filter={"must": [{"key": "n", "rnge": {}}]})


def test_hnsw_plan_scans_few_rows_exactly_and_walks_past_a_share_or_a_count():
    """The dense stage's plan for an HNSW index by allowed rows: the measured shares and counts, at 100k and at 1M
    chunks (bench/README.md "Filtered dense stage at 1M passages")."""
    from rag_service.retrievers import dense

    exact = 0
    # Few rows: scanned at any index size, however small their share.
    for n in (10_000, 100_000, 1_000_000, 50_000_000):
        assert dense.filtered_plan(1, n, 100) == exact
        assert dense.filtered_plan(dense.EXACT_FILTER_LIMIT, n, 100) == exact
    # 100k chunks: a share up to 5% (5,000 rows) is scanned, 10% walks at a doubled beam, 20% and up at the
    # unfiltered one.
    assert dense.filtered_plan(5_000, 100_000, 100) == exact
    assert dense.filtered_plan(5_001, 100_000, 100) == 511  # just over 5%: the walk at a four-fold beam
    assert dense.filtered_plan(10_000, 100_000, 100) == 2 * dense.HNSW_EF_SEARCH_MIN
    assert dense.filtered_plan(20_000, 100_000, 100) == dense.HNSW_EF_SEARCH_MIN
    assert dense.filtered_plan(100_000, 100_000, 100) == dense.HNSW_EF_SEARCH_MIN
    # 1M chunks: the scan stops at EXACT_FILTER_MAX rows (1%) although 2% and 5% are small shares; the walk there
    # runs at the widest beam (1024 at 2%, 512 at 5%).
    assert dense.EXACT_FILTER_MAX == 10_000
    assert dense.filtered_plan(10_000, 1_000_000, 100) == exact
    assert dense.filtered_plan(10_001, 1_000_000, 100) == dense.FILTER_EF_MAX
    assert dense.filtered_plan(20_000, 1_000_000, 100) == dense.FILTER_EF_MAX
    assert dense.filtered_plan(50_000, 1_000_000, 100) == 4 * dense.HNSW_EF_SEARCH_MIN
    assert dense.filtered_plan(1_000_000, 1_000_000, 100) == dense.HNSW_EF_SEARCH_MIN
    # The beam is never narrower than the depth asked.
    assert dense.filtered_plan(1_000_000, 1_000_000, 500) == 500
    # With sq8 codes the scan reads a quarter of the bytes and runs to EXACT_FILTER_MAX_SQ8 rows (2% at 1M); a small
    # index's plan does not change (its 5% is 5,000 rows).
    assert dense.EXACT_FILTER_MAX_SQ8 == 20_000
    assert dense.filtered_plan(20_000, 1_000_000, 100, sq8=True) == exact
    assert dense.filtered_plan(20_001, 1_000_000, 100, sq8=True) == dense.FILTER_EF_MAX
    assert dense.filtered_plan(50_000, 1_000_000, 100, sq8=True) == 4 * dense.HNSW_EF_SEARCH_MIN
    for allowed in (5_000, 5_001, 10_000):
        assert dense.filtered_plan(allowed, 100_000, 100, sq8=True) == dense.filtered_plan(allowed, 100_000, 100)


# -- errors ----------------------------------------------------------------------------------------------------------

BAD = [
    ({"must": [{"key": "nope", "match": {"keyword": "x"}}]}, 'filter.must[0].key: unknown metadata field "nope"'),
    ({"must": [{"key": "n", "match": {"integer": 1}}, {"key": "kw", "range": {"gte": 1}}]},
     'filter.must[1].range: field "kw" is keyword'),
    ({"should": [{"key": "day", "range": {"gte": 1}}]}, 'filter.should[0].range: field "day" is date; range needs'),
    ({"must": [{"key": "day", "date_range": {"lt": "last tuesday"}}]}, "filter.must[0].date_range.lt: 'last tuesday'"),
    ({"must": [{"key": "day", "match": {"keyword": "2020-02-30"}}]}, 'filter.must[0].match: field "day" is date'),
    ({"must": [{"key": "n", "date_range": {"lt": "2020-01-01"}}]}, 'filter.must[0].date_range: field "n" is integer'),
    ({"must": [{"key": "kw", "match": {"integer": 3}}]}, 'filter.must[0].match: field "kw" is keyword'),
    ({"must": [{"key": "flag", "any": {"keywords": ["true"]}}]}, 'filter.must[0].any: field "flag" is boolean'),
    ({"must_not": [{"key": "tags", "range": {"lt": 3}}]}, 'filter.must_not[0].range: field "tags" is keyword_list'),
    ({}, "filter: is empty"),
    ({"must": [{"filter": {}}]}, "filter.must[0].filter: is empty"),
    ({"must": [{"key": "n"}]}, "filter.must[0]: no condition"),
    ({"must": [{"match": {"integer": 1}}]}, "filter.must[0].key: is empty"),
    ({"must": [{"key": "n", "range": {}}]}, "filter.must[0].range: has no bound"),
    ({"should": [{"key": "n", "exists": True}], "min_should": 2}, "filter.min_should: must be between 1 and the 1"),
    ({"must": [{"key": "n", "match": {}}]}, "filter.must[0].match: no value"),
    ({"must": [{"key": "n", "any": {"keywords": ["a"], "integers": [1]}}]}, "filter.must[0].any: give keywords or"),
    ({"must": [{"key": "x", "range": {"gt": "NaN"}}]}, "filter.must[0].range.gt: must be a finite number"),
    ({"must": [{"key": "kw", "filter": {"must": [{"key": "n", "exists": True}]}}]}, "filter.must[0].key: a nested"),
]


def _nested(depth: int) -> dict:
    tree: dict = {"must": [{"key": "n", "exists": True}]}
    for _ in range(depth - 1):
        tree = {"must": [{"filter": tree}]}
    return tree


@pytest.mark.parametrize("tree,message", BAD + [
    (_nested(9), "nests deeper than 8 filters"),
    ({"should": [{"key": "n", "exists": True}] * 65}, "filter.should[64]: the filter has more than 64 conditions"),
])
def test_bad_filters_are_invalid_argument_naming_the_path(filtered_server, tree, message):
    from google.protobuf import json_format

    stub = filtered_server[0]
    request = pb.SearchRequest(query="ice", filter=json_format.ParseDict(tree, pb.Filter()))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert message in caught.value.details(), caught.value.details()


def test_depth_at_the_limit_is_accepted(filtered_server):
    from google.protobuf import json_format

    stub, docs, _ = filtered_server
    tree = _nested(8)
    reply = stub.Search(pb.SearchRequest(query="ice", top_k=1000, depth=1000, rerank=False, cache=pb.CACHE_BYPASS,
                                         filter=json_format.ParseDict(tree, pb.Filter())), timeout=30)
    assert {c.doc_id for c in reply.contexts} == _matching(docs, tree)


# -- cache keys ------------------------------------------------------------------------------------------------------

def test_requests_that_differ_only_by_filter_never_share_a_cache_entry(filtered_server):
    from google.protobuf import json_format

    from rag_service.core.params import SearchParams
    from rag_service.search.cache import params_key

    stub, docs, _ = filtered_server
    trees = [{"must": [{"key": "kw", "match": {"keyword": "alpha"}}]},
             {"must": [{"key": "kw", "match": {"keyword": "beta"}}]},
             {"must_not": [{"key": "kw", "match": {"keyword": "alpha"}}]},
             {"must": [{"key": "n", "match": {"integer": 1}}]},
             {"must": [{"key": "x", "match": {"number": 1.0}}]},
             {"must": [{"key": "n", "any": {"integers": [1, 2]}}]},
             {"should": [{"key": "n", "exists": True}, {"key": "x", "exists": True}], "min_should": 2},
             {"should": [{"key": "n", "exists": True}, {"key": "x", "exists": True}]}]
    keys = {params_key(SearchParams(query="q", filter=_tree_of(t))) for t in trees}
    assert len(keys) == len(trees)
    assert params_key(SearchParams(query="q")) not in keys
    # The same set in another order is the same request.
    assert params_key(SearchParams(query="q", filter=_tree_of({"must": [{"key": "n", "any": {"integers": [2, 1]}}]}))) \
        == params_key(SearchParams(query="q", filter=_tree_of(trees[5])))
    # Over gRPC with the cache on: the second filter is a miss with its own answer, each repeat a hit.
    for tree in trees[:3]:
        request = pb.SearchRequest(query="cloud forest", top_k=1000, depth=1000, rerank=False,
                                   filter=json_format.ParseDict(tree, pb.Filter()))
        first = stub.Search(request, timeout=30)
        assert first.served_from == pb.SERVED_FROM_MISS
        assert {c.doc_id for c in first.contexts} == _matching(docs, tree)
        again = stub.Search(request, timeout=30)
        assert again.served_from == pb.SERVED_FROM_EXACT
        assert [c.chunk_id for c in again.contexts] == [c.chunk_id for c in first.contexts]


# -- index info and older indexes ------------------------------------------------------------------------------------

def test_index_info_reports_types_and_distinct_values(filtered_server):
    stub, docs, _ = filtered_server
    info = stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
    schema = {f.name: (f.type, f.distinct_values) for f in info.metadata_schema}
    kw = {d["metadata"]["kw"] for d in docs if d["metadata"].get("kw") is not None}
    tags = {t for d in docs for t in d["metadata"].get("tags") or []}
    assert schema == {"day": ("date", 0), "flag": ("boolean", 0), "kw": ("keyword", len(kw)),
                      "n": ("integer", 0), "tags": ("keyword_list", len(tags)), "x": ("float", 0)}
    assert sorted(info.metadata_fields) == sorted(FIELDS)


def test_an_index_from_before_types_loads_with_keyword_fields(filtered_index, tmp_path):
    from rag_service.index.load import resolve_version_dir
    from rag_service.index.store import DocStore

    root, docs = filtered_index
    old = tmp_path / "old"
    shutil.copytree(resolve_version_dir(root), old)
    meta = json.loads((old / "meta_fields.json").read_text())
    for entry in meta["fields"]:  # the format before typed columns: name, values, codes
        for key in list(entry):
            if key not in ("name", "values", "codes"):
                entry.pop(key)
    (old / "meta_fields.json").write_text(json.dumps(meta))
    for path in old.glob("meta_*_*.npy"):
        if not path.name.startswith("meta_codes_"):
            path.unlink()
    store = DocStore.load(old)
    assert set(store.metadata_schema.values()) == {flt.KEYWORD}
    mask = store.filter_mask({"kw": "gamma"})
    assert {store.doc_id(store.chunk_doc(int(c))) for c in np.flatnonzero(mask)} == \
        {d["_id"] for d in docs if d["metadata"].get("kw") == "gamma"}
    tree = {"must": [{"key": "kw", "any": {"keywords": ["alpha", "beta"]}}],
            "must_not": [{"key": "n", "exists": False}]}
    got = store.filter_mask(None, _tree_of(tree))
    assert {store.doc_id(store.chunk_doc(int(c))) for c in np.flatnonzero(got)} == \
        {d["_id"] for d in docs if d["metadata"].get("kw") in ("alpha", "beta") and "n" in d["metadata"]}
    with pytest.raises(InvalidArgument, match='field "n" is keyword'):
        store.filter_mask(None, _tree_of({"must": [{"key": "n", "range": {"gt": 1}}]}))


def test_unknown_fields_of_a_wider_schema_are_empty(filtered_index):
    store = _store(filtered_index[0])
    schema = {**store.metadata_schema, "colour": flt.KEYWORD}
    tree = _tree_of({"must": [{"key": "colour", "is_empty": True}]})
    assert store.filter_mask(None, tree, schema=schema).all()
    tree = replace(tree, must=(replace(tree.must[0], negate=True),))
    assert not store.filter_mask(None, tree, schema=schema).any()


def test_cli_build_takes_a_metadata_schema(tmp_path, encoder, write_corpus, monkeypatch):
    from click.testing import CliRunner

    import rag_service.encoder.encode
    from rag_service.cli.index import cli
    from rag_service.index.load import load_index

    monkeypatch.setattr(rag_service.encoder.encode, "Encoder", lambda *args, **kwargs: encoder)
    docs = [{"_id": "a", "text": "ice and snow", "metadata": {"year": 2020, "code": "17", "when": "2021-01-02"}},
            {"_id": "b", "text": "lava and ash", "metadata": {"year": 2021, "code": "x"}}]
    corpus = write_corpus(tmp_path / "c.jsonl", docs)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"year": "float", "when": "keyword", "tags": "keyword_list"}))
    root = tmp_path / "idx"
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "--input", str(corpus), "--output", str(root), "--no-progress",
                                 "--window-sentences", "0", "--metadata-schema", str(schema)])
    assert result.exit_code == 0, result.output
    assert "code (keyword), tags (keyword_list), when (keyword), year (float)" in result.output
    index = load_index(root)
    assert index.manifest["metadata_schema"] == {"code": "keyword", "tags": "keyword_list", "when": "keyword",
                                                 "year": "float"}
    assert index.store.metadata_schema == index.manifest["metadata_schema"]
    schema.write_text(json.dumps({"code": "integer"}))
    result = runner.invoke(cli, ["build", "--input", str(corpus), "--output", str(root), "--no-progress",
                                 "--window-sentences", "0", "--metadata-schema", str(schema)])
    assert result.exit_code == 1 and "'code'" in result.output and "integer" in result.output
    assert "Traceback" not in result.output
