"""Filtered search: recall@10 of the filtered dense stage against an exact filtered scan, and latency, by selectivity.

    python bench/experiments/filtered_search.py --index /tmp/filters/scifact --data ../shared/data/scifact \
        --hnsw-size 100000 --json /tmp/filters/filtered.json

Part 1, SciFact: every document gets seeded synthetic metadata (a date over ten years, an integer, a keyword of 1,000
values, a list of 1-3 of 100 tags, and a rank: a permutation of the documents, so that `rank < s * n` selects exactly
a share s). The store is rewritten with it (typed columns, index/metadata.py) and the index's first stage runs as the
server runs it (`Pipeline.retrieve`: mask evaluation, BM25 + dense + fusion, one native call on a flat index) with the
query vector given, unfiltered and at each selectivity interleaved per query. Recall@10: the dense stage's top 10
against the exact top 10 among the allowed chunks. A few filters of the other condition types are timed beside.

Part 2, HNSW: `--hnsw-size` seeded synthetic vectors (a Gaussian mixture of 1,000 clusters in 384 dimensions,
normalised; the queries are fresh draws of the mixture), an HNSW index built as the build does, and DenseIndex.search
with the mask at each selectivity under five plans: the shipped rule (exact scan of the allowed set when few, else a
filtered graph walk with a beam widened below 20% allowed, dense.filtered_ef), the exact scan forced, the widened
walk forced, the walk at the widest beam (1024) and at the unfiltered beam (128, what the index did before). Depth
100 as in the server; p50/p99 per query, one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from rag_service.api.request import parse_filter
from rag_service.bench.data import load_queries
from rag_service.core.config import Limits
from rag_service.core.params import SearchParams
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import OnnxEncoder
from rag_service.index import metadata as metadata_mod
from rag_service.index.chunking import Chunk, Document
from rag_service.index.load import load_index
from rag_service.index.store import DocStore, write_store
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.retrievers import dense as dense_mod
from rag_service.search.pipeline import Pipeline

SELECTIVITIES = (0.0001, 0.001, 0.01, 0.1, 0.5, 1.0)
START = datetime(2015, 1, 1, tzinfo=timezone.utc)


def tree(body: dict):
    return parse_filter(json_format.ParseDict(body, pb.Filter()), Limits())


def rank_filter(share: float, n: int):
    return tree({"must": [{"key": "rank", "range": {"lt": max(1, math.ceil(share * n))}}]})


def synthetic_metadata(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rank = rng.permutation(n)
    seconds = rng.integers(0, 10 * 365 * 86_400, n)
    number = rng.integers(0, 1000, n)
    keyword = rng.integers(0, 1000, n)
    out = []
    for i in range(n):
        tags = rng.choice(100, size=int(rng.integers(1, 4)), replace=False)
        out.append({"rank": int(rank[i]), "date": (START + timedelta(seconds=int(seconds[i]))).isoformat(),
                    "number": int(number[i]), "keyword": f"k{int(keyword[i]):03d}",
                    "tags": [f"t{int(t):02d}" for t in tags]})
    return out


def exact_top(vectors: np.ndarray, q: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    allowed = np.arange(len(vectors)) if mask is None else np.flatnonzero(mask)
    scores = vectors[allowed] @ q
    order = np.lexsort((allowed, -scores))[:k]
    return allowed[order]


def stats(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def scifact(args: argparse.Namespace) -> dict:
    index = load_index(args.index, verify_checksums=False)
    store = index.store
    meta = synthetic_metadata(store.n_docs, args.seed)
    docs = [Document(id=store.doc_id(d), title=store.doc_title(d), text="", metadata=meta[d])
            for d in range(store.n_docs)]
    chunks = []
    for c in range(store.n_chunks):
        start, end = store.chunk_span(c)
        chunks.append(Chunk(doc=store.chunk_doc(c), no=store.chunk_no(c), start=start, end=end,
                            text=store.chunk_text(c)))
    work = Path(tempfile.mkdtemp(prefix="filtered-", dir=args.work))
    write_store(work, docs, chunks)
    # Only the store differs: the other files of the index are its own.
    typed = DocStore.load(work)
    index = replace(index, store=typed)
    encoder = OnnxEncoder(onnx_export.cached_export(), "onnx-fp32", threads=1)
    pipeline = Pipeline(index, encoder)
    queries = list(load_queries(args.data / "queries.jsonl").values())[: args.queries]
    qvec = encoder.encode_queries(queries)
    vectors = np.asarray(index.dense.vectors, dtype=np.float32)
    n_docs = store.n_docs
    filters = {f"{s:.2%}": rank_filter(s, n_docs) for s in SELECTIVITIES}
    filters.update({
        "date: one year": tree({"must": [{"key": "date", "date_range": {"gte": "2019-01-01", "lt": "2020-01-01"}}]}),
        "keyword: any of 10": tree({"must": [{"key": "keyword",
                                              "any": {"keywords": [f"k{i:03d}" for i in range(10)]}}]}),
        "tag: match, not another": tree({"must": [{"key": "tags", "match": {"keyword": "t07"}}],
                                         "must_not": [{"key": "tags", "match": {"keyword": "t08"}}]}),
        "number: 100 <= x < 150 or date before 2016": tree({"should": [
            {"key": "number", "range": {"gte": 100, "lt": 150}},
            {"key": "date", "date_range": {"lt": "2016-01-01"}}]}),
    })
    times: dict[str, list[float]] = {"unfiltered": [], **{name: [] for name in filters}}
    mask_times: dict[str, list[float]] = {name: [] for name in filters}
    recall: dict[str, list[float]] = {name: [] for name in filters}
    masks = {name: typed.filter_mask(None, t) for name, t in filters.items()}
    for _ in range(2):  # warm: pages, the native code's first calls
        pipeline.retrieve(SearchParams(query=queries[0], top_k=10, depth=100), query_vector=qvec[0])
    for query, q in zip(queries, qvec):
        started = time.perf_counter()
        pipeline.retrieve(SearchParams(query=query, top_k=10, depth=100), query_vector=q)
        times["unfiltered"].append(time.perf_counter() - started)
        for name, t in filters.items():
            started = time.perf_counter()
            candidates = pipeline.retrieve(SearchParams(query=query, top_k=10, depth=100, filter=t), query_vector=q)
            times[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            typed.filter_mask(None, t)
            mask_times[name].append(time.perf_counter() - started)
            want = exact_top(vectors, q, masks[name], 10)
            got = candidates.dense[0][:10]
            recall[name].append(len(set(got.tolist()) & set(want.tolist())) / max(1, len(want)))
    base = stats(times["unfiltered"])
    rows = [{"filter": "unfiltered", "allowed": 1.0, **base, "p99_ratio": 1.0}]
    for name in filters:
        s = stats(times[name])
        rows.append({"filter": name, "allowed": round(float(masks[name].mean()), 6),
                     "recall@10": round(float(np.mean(recall[name])), 4), **s,
                     "p99_ratio": round(s["p99_ms"] / base["p99_ms"], 2),
                     "mask_p50_ms": stats(mask_times[name])["p50_ms"]})
    return {"index": str(args.index), "chunks": int(index.n_chunks), "documents": int(n_docs),
            "queries": len(queries), "dense_kind": index.dense.kind, "rows": rows}


def mixture(n: int, dim: int, clusters: int, rng: np.random.Generator, centers: np.ndarray | None = None):
    if centers is None:
        centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32), centers


def hnsw(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    n, dim = args.hnsw_size, 384
    vectors, centers = mixture(n, dim, 1000, rng)
    queries, _ = mixture(args.hnsw_queries, dim, 1000, rng, centers)
    work = Path(tempfile.mkdtemp(prefix="filtered-hnsw-", dir=args.work))
    started = time.perf_counter()
    graph = dense_mod.build_dense_index(vectors, "hnsw", ef_construction=args.ef_construction)
    dense_mod.write_dense(work, graph, vectors, "hnsw", ef_construction=args.ef_construction)
    build_s = time.perf_counter() - started
    del graph
    dense = dense_mod.DenseIndex.load(work, search_threads=1)
    rank = rng.permutation(n)
    docs = [Document(id=str(i), title="", text="", metadata={"rank": int(rank[i])}) for i in range(n)]
    entries, _ = metadata_mod.write_columns(work, docs, np.arange(n, dtype=np.int32), {"rank": "integer"})
    field = metadata_mod.Field(work, entries[0], np.load(work / entries[0]["codes"]), n)
    evaluator = metadata_mod.FilterEvaluator({"rank": field}, np.arange(n, dtype=np.int32), n)
    shares = sorted(set(SELECTIVITIES) | set(args.extra_shares))
    masks = {s: evaluator.mask(rank_filter(s, n)) for s in shares}
    shipped = (dense_mod.EXACT_FILTER_LIMIT, dense_mod.EXACT_FILTER_FRACTION, dense_mod.FILTER_EF_MAX)
    shipped_share = dense_mod.FILTER_EF_SHARE
    plans = {"shipped": shipped, "exact": (n, 1.0, shipped[2]), "walk": (0, 0.0, shipped[2]),
             "walk_ef1024": (0, 0.0, 1 << 20), "walk_ef128": (0, 0.0, 0)}
    depth = 100
    times: dict[tuple, list[float]] = {("unfiltered", 1.0): []}
    recall: dict[tuple, list[float]] = {}
    truth = {s: [exact_top(vectors, q, masks[s], 10) for q in queries] for s in shares}
    for _ in range(3):
        dense.search(queries[0], depth)
    try:
        for qi, q in enumerate(queries):
            started = time.perf_counter()
            dense.search(q, depth)
            times[("unfiltered", 1.0)].append(time.perf_counter() - started)
            for plan, (limit, fraction, ef_max) in plans.items():
                dense_mod.EXACT_FILTER_LIMIT, dense_mod.EXACT_FILTER_FRACTION, dense_mod.FILTER_EF_MAX = \
                    limit, fraction, min(ef_max, 1024)
                # The widest beam at every share: 1024 (the cap) from a share of 1 down.
                dense_mod.FILTER_EF_SHARE = 8.0 if plan == "walk_ef1024" else shipped_share
                for s in shares:
                    started = time.perf_counter()
                    ids, _ = dense.search(q, depth, masks[s])
                    times.setdefault((plan, s), []).append(time.perf_counter() - started)
                    want = truth[s][qi]
                    recall.setdefault((plan, s), []).append(
                        len(set(ids[:10].tolist()) & set(want.tolist())) / max(1, len(want)))
    finally:
        dense_mod.EXACT_FILTER_LIMIT, dense_mod.EXACT_FILTER_FRACTION, dense_mod.FILTER_EF_MAX = shipped
        dense_mod.FILTER_EF_SHARE = shipped_share
    base = stats(times[("unfiltered", 1.0)])
    unfiltered_recall = np.mean([len(set(dense.search(q, depth)[0][:10].tolist())
                                     & set(exact_top(vectors, q, None, 10).tolist())) / 10 for q in queries])
    rows = []
    for plan in plans:
        for s in shares:
            st = stats(times[(plan, s)])
            rows.append({"plan": plan, "share": s, "allowed": int(masks[s].sum()),
                         "recall@10": round(float(np.mean(recall[(plan, s)])), 4), **st,
                         "p99_ratio": round(st["p99_ms"] / base["p99_ms"], 2),
                         "ef": {"walk_ef128": 128, "walk_ef1024": 1024}.get(plan, dense_mod.filtered_ef(depth, s))})
    return {"vectors": n, "queries": len(queries), "build_s": round(build_s, 1),
            "ef_construction": args.ef_construction,
            "unfiltered": {**base, "recall@10": round(float(unfiltered_recall), 4)}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="A built SciFact index (flat).")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--hnsw-size", type=int, default=100_000, help="0: skip the HNSW part.")
    parser.add_argument("--hnsw-queries", type=int, default=200)
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--extra-shares", type=float, nargs="*", default=[0.02, 0.05, 0.2])
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp"))
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out: dict = {}
    if not args.skip_scifact:
        out["scifact"] = scifact(args)
        print(json.dumps(out["scifact"], indent=1))
    if args.hnsw_size:
        out["hnsw"] = hnsw(args)
        print(json.dumps(out["hnsw"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
