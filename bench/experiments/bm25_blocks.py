"""BM25's top-depth with and without bounds per block of chunks, on one index's postings, in process.

    python bench/experiments/bm25_blocks.py --index /tmp/scale/synthetic/idx-n1000000-s0-efc40 \
        --queries /tmp/scale/synthetic/n1000000-s0/queries.jsonl --limit 100 --rounds 3

Loads the index's BM25 postings, makes their bounds (kernels.native.block_bounds: its time and size are printed),
checks that every query gets the same top with and without them, then times `bm25_top` alone over the queries,
the two alternating query by query, `--rounds` times; prints p50 / p90 / p99 / max of each, and the queries where
the bounds gain least. `--oracle` also prints, per block size, the postings that a scorer told the final depth-th
score in advance would have to read (the blocks whose bound reaches it): what the block size leaves to gain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_queries
from rag_service.index.load import resolve_version_dir
from rag_service.kernels import native
from rag_service.retrievers.lexical import BM25Index


def oracle(index: BM25Index, terms: np.ndarray, depth: int, shift: int) -> tuple[int, int]:
    """(postings in blocks whose bound reaches the final depth-th score, all of the query's postings)."""
    indptr, docs, weights, n = index.indptr, index.docs, index.weights, index.n_chunks
    sums = np.zeros(n, np.float32)
    for t in terms:
        sums[docs[indptr[t]:indptr[t + 1]]] += weights[indptr[t]:indptr[t + 1]]
    positive = np.sort(sums[sums > 0])
    bar = positive[-depth] if len(positive) >= depth else 0.0
    blocks = (n + (1 << shift) - 1) >> shift
    bound = np.zeros(blocks, np.float32)
    count = np.zeros(blocks, np.int64)
    for t in terms:
        b = docs[indptr[t]:indptr[t + 1]] >> shift
        top = np.zeros(blocks, np.float32)
        np.maximum.at(top, b, weights[indptr[t]:indptr[t + 1]])
        bound += top
        count += np.bincount(b, minlength=blocks)
    return int(count[bound >= bar].sum()), int(count.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100, help="the first N queries")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shift", type=int, default=native.BLOCK_SHIFT, help="blocks of 2^shift chunks")
    parser.add_argument("--oracle", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    index = BM25Index.load(resolve_version_dir(args.index), warmup=False)
    plain = index.postings._replace(blocks=None)
    started = time.perf_counter()
    bounds = native.block_bounds(plain, shift=args.shift)
    made_s = time.perf_counter() - started
    bounded = plain._replace(blocks=bounds)
    print(f"{index.n_chunks} chunks, {len(plain.docs)} postings; bounds in {made_s:.2f} s: {bounds.n_blocks} blocks "
          f"of {1 << args.shift}, {bounds.rows} lists with a row, {bounds.nbytes / 2**20:.1f} MiB")
    texts = list(load_queries(args.queries).values())[: args.limit]
    queries = [t[t >= 0] for t in (index.query_term_ids(text) for text in texts)]
    queries = [q for q in queries if q.size]
    for q in queries:
        a, b = native.bm25_top(plain, q, args.depth), native.bm25_top(bounded, q, args.depth)
        if not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])):
            raise SystemExit(f"different tops for term ids {q.tolist()}")
    print(f"{len(queries)} queries: the same top with and without bounds")

    times: dict[str, list[list[float]]] = {"without": [[] for _ in queries], "with": [[] for _ in queries]}
    for _ in range(args.rounds):
        for i, q in enumerate(queries):
            for name, postings in (("without", plain), ("with", bounded)):
                started = time.perf_counter()
                native.bm25_top(postings, q, args.depth)
                times[name][i].append((time.perf_counter() - started) * 1e3)
    report: dict[str, object] = {"chunks": index.n_chunks, "bounds_s": made_s, "bounds_bytes": bounds.nbytes}
    for name, per_query in times.items():
        flat = np.asarray(per_query).ravel()
        p50, p90, p99 = np.percentile(flat, [50, 90, 99])
        report[name] = {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": float(flat.max())}
        print(f"{name:>8} bounds: p50 {p50:.3f}  p90 {p90:.3f}  p99 {p99:.3f}  max {flat.max():.3f} ms")
    lens = np.diff(index.indptr)
    ratios = sorted(((min(w) / min(o), min(o), min(w), int(lens[q].sum()))
                     for w, o, q in zip(times["with"], times["without"], queries, strict=True)), reverse=True)
    print("least gain (fastest of the rounds): with / without, ms, the query's postings")
    for ratio, without, with_, postings in ratios[:5]:
        print(f"  {ratio:.2f}  {without:.3f} -> {with_:.3f}  {postings}")
    if args.oracle:
        for shift in (args.shift - 2, args.shift, args.shift + 2, args.shift + 4):
            work = np.array([oracle(index, q, args.depth, shift) for q in queries])
            read, total = np.percentile(work[:, 0], [50, 90, 99]), np.percentile(work[:, 1], [50, 90, 99])
            print(f"blocks of {1 << shift}: postings read told the bar, p50/p90/p99 {read.astype(int).tolist()} of "
                  f"{total.astype(int).tolist()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
