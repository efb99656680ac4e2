"""The semantic cache's look-up on hits, with and without the equal-BM25-input shortcut, interleaved in one process.

    python bench/experiments/guard_shortcut_ab.py --index /tmp/guard/scifact \
        --queries ../shared/data/scifact/queries.jsonl --rounds 3

Two caches hold the same entries (every query of --queries, each with its own search). In one, an entry keeps its
query's BM25 input (`GuardInputs.bm25_key`), so a query with the same input (a full stop toggled: the analyzer's
tokens do not change) passes the BM25 check without a BM25 search; in the other the keys never match, so every hit
makes the search, as the guard did before the shortcut. Each variant is then probed on both (`CachedSearch.probe`:
the look-ups without a search), in random order per query; prints the semantic hits and the p50 / p99 µs of the
probes that hit.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_queries
from rag_service.core.config import CacheConfig, EncoderSettings
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import load_index_encoder
from rag_service.index.load import load_index
from rag_service.search.cache import CachedSearch
from rag_service.search.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    index = load_index(args.index, verify_checksums=False)
    pipeline = Pipeline(index, load_index_encoder(EncoderSettings().backend, index.path))
    queries = list(dict.fromkeys(load_queries(args.queries).values()))
    vectors = np.asarray(pipeline.encoder.encode_queries(queries), dtype=np.float32)
    caches = {"shortcut": CachedSearch(CacheConfig(), Metrics()),
              "always search": CachedSearch(CacheConfig(), Metrics())}
    for cache in caches.values():
        for query, vector in zip(queries, vectors):
            cache.run(pipeline, SearchParams(query=query), query_vector=vector)
    for entry in caches["always search"].store._lru.values():
        entry.bm25_key = b"-"  # no query's key: every hit makes the BM25 search
    variants = [q[:-1] if q.endswith(".") else q + "." for q in queries]
    times: dict[str, list[float]] = {name: [] for name in caches}
    rng = random.Random(args.seed)
    for _ in range(args.rounds):
        for i, query in enumerate(variants):
            order = list(caches)
            rng.shuffle(order)
            for name in order:
                started = time.perf_counter_ns()
                hit = caches[name].probe(pipeline, SearchParams(query=query), vectors[i])
                elapsed = (time.perf_counter_ns() - started) / 1000
                if hit is not None and hit.served_from == "semantic":
                    times[name].append(elapsed)
    for name, values in times.items():
        a = np.asarray(values)
        print(f"{name}: {len(a) // args.rounds} semantic hits of {len(variants)} variants; look-up p50 "
              f"{np.percentile(a, 50):.1f} µs, p99 {np.percentile(a, 99):.1f} µs")


if __name__ == "__main__":
    main()
