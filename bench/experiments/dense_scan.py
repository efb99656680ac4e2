"""The flat index's dense stage on its own: recall of the sq8 scan's candidates against the exact float top-k, and the
time of one `dense_top` call per SIMD level, with the caches warm and after a 64 MB write has pushed the index out of
them (as the encode does between two requests).

    python bench/experiments/dense_scan.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --qrels ../shared/data/scifact/qrels/test.tsv --qrels ../shared/data/scifact/qrels/train.tsv

Queries are the data set's own, encoded by the index's query encoder. Recall: per depth and oversample, the share of
the exact float top-depth that the scan returns, for the int8 query the native scan ranks codes by
(`reference.quantize_query`), with and without the sign bits read first (where the loaded index keeps them), and for
the float query the codes were ranked by before (`codes @ (q * scale)`). Times: p50 / p99 µs per call of the float
rows' scan, the codes' scan and the codes' scan after the sign bits, alternating query by query.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def float_ranked(vectors: np.ndarray, codes, query: np.ndarray, depth: int, oversample: int) -> np.ndarray:
    """The top depth after rescoring the best depth * oversample rows by the float query's product with the codes."""
    approx = codes.codes.astype(np.float32) @ (query * codes.scale)
    wide = np.argsort(-approx, kind="stable")[: depth * oversample]
    exact = vectors[wide] @ query
    return wide[np.argsort(-exact, kind="stable")[:depth]]


def pipeline_ndcg(searcher, index: Path, queries_path: Path, qrels_paths: list[Path]) -> None:
    """nDCG@10 of the documents of the server's default search (top 10 contexts), for the loaded index and for a
    second load of it whose check keeps no sign bits."""
    import ir_measures

    from rag_service.api.loader import load_searcher
    from rag_service.api.request import search_params
    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.bench.quality import doc_run
    from rag_service.core.config import ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.retrievers import dense as dense_mod

    config = ServerConfig(index=index)
    saved = dense_mod.BITS_MIN_AGREEMENT
    dense_mod.BITS_MIN_AGREEMENT = 2.0  # no agreement reaches it: the codes are scanned whole
    try:
        plain = load_searcher(config)
    finally:
        dense_mod.BITS_MIN_AGREEMENT = saved
    texts = load_queries(queries_path)
    for path in qrels_paths:
        qrels = load_qrels(path)
        asked = {qid: text for qid, text in texts.items() if qid in qrels}
        vectors = dict(zip(asked, searcher.encoder.encode_queries(list(asked.values())), strict=True))
        for name, which in (("codes whole", plain), ("sign bits first", searcher)):
            run = {}
            for qid, text in asked.items():
                params = search_params(pb.SearchRequest(query=text, top_k=10), config.defaults, config.limits)
                result = which.search(params, query_vector=vectors[qid])
                run[qid] = doc_run(c.doc_id for c in result.contexts)
            ndcg = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrels, run)[ir_measures.nDCG @ 10]
            print(f"  {path.name}: {len(asked)} queries, nDCG@10 {name}: {ndcg:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--qrels", type=Path, action="append", default=[],
                        help="qrels TSV (repeatable): nDCG@10 of the whole pipeline with and without the sign bits")
    args = parser.parse_args()

    from rag_service.api.loader import load_searcher
    from rag_service.bench.data import load_queries
    from rag_service.core.config import ServerConfig
    from rag_service.kernels import native

    searcher = load_searcher(ServerConfig(index=args.index))
    dense = searcher.index.dense
    if dense.sq8 is None:
        raise SystemExit(f"{args.index}: the dense index has no sq8 codes for the native scan (kind {dense.kind})")
    vectors = np.asarray(dense.vectors)
    texts = list(load_queries(args.queries).values())[: args.limit]
    queries = [dense.query_row(q) for q in searcher.encoder.encode_queries(texts)]
    print(f"{args.index}: {vectors.shape[0]} rows x {vectors.shape[1]}, {len(queries)} queries, "
          f"SIMD {native.simd_level()}; sign bits {'read' if dense.sq8.bits is not None else 'not read'} "
          f"(agreement at load {dense.bits_agreement})")
    if args.qrels:
        pipeline_ndcg(searcher, args.index, args.queries, args.qrels)

    c = dense.sq8
    plain = c._replace(bits=None)
    scans = {"sq8": plain, "sq8 + bits": c} if c.bits is not None else {"sq8": plain}
    print("\nrecall of the exact float top-depth")
    for depth in (10, args.depth):
        for oversample in (1, 2):
            got = {name: [] for name in scans}
            got_float = []
            for q in queries:
                exact = set(np.argsort(-(vectors @ q), kind="stable")[:depth].tolist())
                for name, codes in scans.items():
                    ids, _ = native.dense_top(vectors, q, depth, codes=codes, oversample=oversample, backend="cpp")
                    got[name].append(len(exact & set(ids.tolist())) / depth)
                got_float.append(len(exact & set(float_ranked(vectors, c, q, depth, oversample).tolist())) / depth)
            shown = ", ".join(f"{name} {np.mean(values):.4f}" for name, values in got.items())
            print(f"  depth {depth:4d} oversample {oversample}: int8 query: {shown}; "
                  f"float query {np.mean(got_float):.4f}")

    flush = np.zeros(64 << 20, np.uint8)
    oversample = dense.native_oversample or 2
    variants = [("float", None, 0)] + [(name, codes, oversample) for name, codes in scans.items()]
    print(f"\ndense_top, depth {args.depth}: p50 / p99 µs per call (sq8: oversample {oversample})")
    for level in native._native.simd_levels():
        for cold in (False, True):
            times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
            # The variants alternate query by query, so a drift of the machine touches them alike.
            for i, q in enumerate(queries):
                for name, codes, ov in variants:
                    if cold:
                        flush[:] = i & 0xFF
                    parts = (codes.codes, codes.scale, codes.base) if codes is not None else (None, None, None)
                    bits = codes.bits if codes is not None else None
                    started = time.perf_counter_ns()
                    native._native.dense_top(vectors, q, None, args.depth, *parts, ov, level, code_bits=bits)
                    times[name].append((time.perf_counter_ns() - started) / 1e3)
            for name, values in times.items():
                t = np.asarray(values[10:])
                print(f"  {level:7s} {name:11s} {'cold' if cold else 'warm'}: "
                      f"{np.percentile(t, 50):7.1f} / {np.percentile(t, 99):7.1f}")


if __name__ == "__main__":
    main()
