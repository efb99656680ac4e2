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
normalised; the queries are fresh draws of the mixture), an HNSW index built as the build does (M and efConstruction
of `rag-index build` unless given; kept under --graph-cache, so a rerun skips the build), and DenseIndex.search with
the mask at each selectivity under six plans: the shipped rule (dense.filtered_plan: an exact scan of the allowed
set when few, else a filtered graph walk with a beam widened below 20% allowed), the same rule on the same graph with
sq8 codes beside it (`--dense-codes sq8`: the exact scans read the codes, up to EXACT_FILTER_MAX_SQ8 rows), the
exact scan forced, the widened walk forced, the walk at the widest beam (1024) and at the unfiltered beam (128, what
the index did before); beside them an sq8 scan of the allowed rows with exact rescoring forced at every share
(native.dense_top over codes). Depth 100 as in the server;
p50/p99 per query, one thread. Part 2 alone, at 1M (bench/README.md "Filtered dense stage at 1M passages"):

    python bench/experiments/filtered_search.py --skip-scifact --hnsw-size 1000000 --ef-construction 40 \
        --graph-cache /tmp/filt1m/graphs --json /tmp/filt1m/run1m.json
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
from rag_service.index.chunking import Document
from rag_service.index.load import load_index
from rag_service.index.store import DocStore, write_store
from rag_service.kernels import native
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


def exact_top_scores(scores: np.ndarray, mask: np.ndarray | None, k: int) -> np.ndarray:
    """exact_top from precomputed scores of every row: the top k allowed ids, score desc then id asc."""
    allowed = np.arange(len(scores)) if mask is None else np.flatnonzero(mask)
    allowed_scores = scores[allowed]
    if len(allowed) > 4 * k:
        # Everything tied with the k-th best stays in, so the id order breaks ties exactly as a full sort would.
        cut = np.partition(allowed_scores, len(allowed) - k)[len(allowed) - k]
        keep = allowed_scores >= cut
        allowed, allowed_scores = allowed[keep], allowed_scores[keep]
    return allowed[np.lexsort((allowed, -allowed_scores))[:k]]


def stats(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def scifact(args: argparse.Namespace) -> dict:
    index = load_index(args.index, verify_checksums=False)
    store = index.store
    meta = synthetic_metadata(store.n_docs, args.seed)
    docs = [Document(id=store.doc_id(d), title=store.doc_title(d), text="", metadata=meta[d])
            for d in range(store.n_docs)]
    chunks = [store.chunk(c) for c in range(store.n_chunks)]
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


def cached_graph(args: argparse.Namespace, vectors: np.ndarray) -> tuple[Path, float | None]:
    """The HNSW index over `vectors`, built as `rag-index build` builds it (dense.build_dense_index, every core) and
    kept under --graph-cache keyed by size, seed and graph parameters, so that a rerun skips a build of ~an hour at
    1M. Returns its directory and the build's seconds (None when it came from the cache)."""
    name = f"hnsw-n{len(vectors)}-seed{args.seed}-m{args.hnsw_m}-efc{args.ef_construction}"
    directory = args.graph_cache / name
    if (directory / dense_mod.PARAMS_FILE).is_file():
        return directory, None
    args.graph_cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=args.graph_cache))
    started = time.perf_counter()
    graph = dense_mod.build_dense_index(vectors, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    dense_mod.write_dense(partial, graph, vectors, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
    build_s = round(time.perf_counter() - started, 1)
    partial.rename(directory)
    return directory, build_s


def hnsw(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    n, dim = args.hnsw_size, 384
    vectors, centers = mixture(n, dim, 1000, rng)
    queries, _ = mixture(args.hnsw_queries, dim, 1000, rng, centers)
    work = Path(tempfile.mkdtemp(prefix="filtered-hnsw-", dir=args.work))
    graph_dir, build_s = cached_graph(args, vectors)
    if args.build_only:
        return {"vectors": n, "graph": str(graph_dir), "build_s": build_s}
    dense = dense_mod.DenseIndex.load(graph_dir, search_threads=1)
    # The same graph with sq8 codes beside it, as `rag-index build --dense-codes sq8` writes them.
    coded_dir = work / "coded"
    coded_dir.mkdir()
    for name in dense_mod.FILES:
        (coded_dir / name).symlink_to(graph_dir / name)
    dense_mod.write_codes(coded_dir, vectors, "sq8")
    coded = dense_mod.DenseIndex.load(coded_dir, search_threads=1)
    rank = rng.permutation(n)
    docs = [Document(id=str(i), title="", text="", metadata={"rank": int(rank[i])}) for i in range(n)]
    entries, _ = metadata_mod.write_columns(work, docs, np.arange(n, dtype=np.int32), {"rank": "integer"})
    field = metadata_mod.Field(work, entries[0], np.load(work / entries[0]["codes"]), n)
    evaluator = metadata_mod.FilterEvaluator({"rank": field}, np.arange(n, dtype=np.int32), n)
    shares = sorted(set(SELECTIVITIES) | set(args.extra_shares))
    masks = {s: evaluator.mask(rank_filter(s, n)) for s in shares}
    # Each plan is a setting of the rule's constants in dense.py; exact_sq8 is not a setting but the scan an index with
    # sq8 codes could do instead of the float rows' (native.dense_top over the codes, the candidates rescored).
    names = ("EXACT_FILTER_LIMIT", "EXACT_FILTER_FRACTION", "EXACT_FILTER_MAX", "EXACT_FILTER_MAX_SQ8",
             "FILTER_EF_SHARE", "FILTER_EF_MAX")
    shipped = {name: getattr(dense_mod, name) for name in names}
    walk = {"EXACT_FILTER_LIMIT": 0, "EXACT_FILTER_FRACTION": 0.0, "EXACT_FILTER_MAX": 0}
    plans: dict[str, dict | None] = {
        "shipped": shipped,
        "shipped_sq8": shipped,
        "exact": {**shipped, "EXACT_FILTER_LIMIT": n},
        "walk": {**shipped, **walk},
        # The widest beam at every share: 1024 (the cap) from a share of 1 down.
        "walk_ef1024": {**shipped, **walk, "FILTER_EF_SHARE": 8.0, "FILTER_EF_MAX": 1024},
        "walk_ef128": {**shipped, **walk, "FILTER_EF_MAX": 0},
        "exact_sq8": None,
    }
    sq8 = native.sq8_quantize(vectors)
    depth = 100
    times: dict[tuple, list[float]] = {("unfiltered", 1.0): []}
    recall: dict[tuple, list[float]] = {}
    # The exact answers from one product of all rows with all queries (a gather per query and share would copy the
    # allowed rows each time: minutes at 1M).
    scores = np.empty((n, len(queries)), np.float32)
    for begin in range(0, n, 65_536):
        scores[begin : begin + 65_536] = vectors[begin : begin + 65_536] @ queries.T
    truth = {s: [exact_top_scores(scores[:, qi], masks[s], 10) for qi in range(len(queries))] for s in shares}
    unfiltered_truth = [exact_top_scores(scores[:, qi], None, 10) for qi in range(len(queries))]
    del scores
    for _ in range(3):
        dense.search(queries[0], depth)
    order = np.random.default_rng(args.seed + 1)
    try:
        for qi, q in enumerate(queries):
            started = time.perf_counter()
            dense.search(q, depth)
            times[("unfiltered", 1.0)].append(time.perf_counter() - started)
            for plan, setting in plans.items():
                for name, value in (setting or shipped).items():
                    setattr(dense_mod, name, value)
                # Shares in a seeded random order per query and plan: a cell that always followed the widest scan
                # would meet the graph's pages cold every time.
                for s in order.permutation(shares).tolist():
                    started = time.perf_counter()
                    if setting is None:
                        ids, _ = native.dense_top(dense.vectors, q, depth, mask=masks[s], codes=sq8,
                                                  oversample=dense_mod.NATIVE_SQ8_OVERSAMPLE)
                    else:
                        ids, _ = (coded if plan == "shipped_sq8" else dense).search(q, depth, masks[s])
                    times.setdefault((plan, s), []).append(time.perf_counter() - started)
                    want = truth[s][qi]
                    recall.setdefault((plan, s), []).append(
                        len(set(ids[:10].tolist()) & set(want.tolist())) / max(1, len(want)))
    finally:
        for name, value in shipped.items():
            setattr(dense_mod, name, value)
    base = stats(times[("unfiltered", 1.0)])
    unfiltered_recall = np.mean([len(set(dense.search(q, depth)[0][:10].tolist()) & set(want.tolist())) / 10
                                 for q, want in zip(queries, unfiltered_truth)])
    rows = []
    for plan, setting in plans.items():
        for s in shares:
            st = stats(times[(plan, s)])
            allowed = int(masks[s].sum())
            for name, value in (setting or shipped).items():
                setattr(dense_mod, name, value)
            ef = 0 if setting is None else dense_mod.filtered_plan(allowed, n, depth, sq8=plan == "shipped_sq8")
            rows.append({"plan": plan, "share": s, "allowed": allowed,
                         "recall@10": round(float(np.mean(recall[(plan, s)])), 4), **st,
                         "p99_ratio": round(st["p99_ms"] / base["p99_ms"], 2), "ef": ef or "exact"})
    for name, value in shipped.items():
        setattr(dense_mod, name, value)
    return {"vectors": n, "queries": len(queries), "build_s": build_s, "graph": str(graph_dir),
            "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
            "unfiltered": {**base, "recall@10": round(float(unfiltered_recall), 4)}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, help="A built SciFact index (flat); needed unless --skip-scifact.")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--hnsw-size", type=int, default=100_000, help="0: skip the HNSW part.")
    parser.add_argument("--hnsw-queries", type=int, default=200)
    # The graph `rag-index build` builds by default (BuildConfig.hnsw_m, hnsw_ef_construction).
    parser.add_argument("--hnsw-m", type=int, default=dense_mod.HNSW_M)
    parser.add_argument("--ef-construction", type=int, default=dense_mod.HNSW_EF_CONSTRUCTION)
    parser.add_argument("--graph-cache", type=Path, default=Path("/tmp/filtered-graphs"),
                        help="Where built HNSW graphs are kept between runs.")
    parser.add_argument("--build-only", action="store_true", help="Build (or find) the HNSW graph, then stop.")
    parser.add_argument("--extra-shares", type=float, nargs="*", default=[0.02, 0.05, 0.2])
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp"))
    parser.add_argument("--skip-scifact", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.skip_scifact and (args.index is None or args.data is None):
        parser.error("--index and --data are needed unless --skip-scifact")
    out: dict = {}
    if not args.skip_scifact and not args.build_only:
        out["scifact"] = scifact(args)
        print(json.dumps(out["scifact"], indent=1))
    if args.hnsw_size:
        out["hnsw"] = hnsw(args)
        print(json.dumps(out["hnsw"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
