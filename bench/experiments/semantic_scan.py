"""What the semantic cache's nearest-entry scan costs as the cache fills: `CacheStore.nearest` over N stored query
vectors of one group, each call after 64 MB written (the caches as an encode leaves them), in process.

    python bench/experiments/semantic_scan.py --entries 1000,10000,50000

Every miss and every semantic hit of a request in the default cache mode asks it once, right after the encode.
Printed per N: p50 / p90 µs of the call. The vectors are seeded random unit vectors of `--dim` dimensions; the
threshold is the default semantic_min_cosine, so the scan, not the guard, is what is timed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rag_service.core.config import CacheConfig
from rag_service.core.params import SearchResult
from rag_service.search.cache import CacheStore, Entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="1000,10000,50000", help="comma-separated cache sizes")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    flush = np.zeros(64 << 20, np.uint8)
    config = CacheConfig(max_bytes=1 << 40)
    for n in (int(x) for x in args.entries.split(",") if x):
        store = CacheStore(config)
        store.use_version("c", "v1")
        group = (("c", "v1"), (0,))
        vectors = rng.normal(size=(n, args.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for i in range(n):
            store.put(Entry(key=(group[0], f"q{i}", group[1]), group=group,
                            result=SearchResult(contexts=[], index_version="v1", stage_us={}), vector=vectors[i],
                            lexical=np.zeros(0, np.int64), terms={}, polarity=(), signature=(f"q{i}",), nbytes=100,
                            inserted=store.clock()))
        times = []
        for call in range(args.calls):
            flush[:] = call % 200
            started = time.perf_counter()
            store.nearest(group, vectors[call % n], config.semantic_min_cosine, config.semantic_candidates)
            times.append((time.perf_counter() - started) * 1e6)
        print(f"{n:>7} entries: nearest p50 {np.median(times):7.0f} µs, p90 {np.percentile(times, 90):7.0f} µs")


if __name__ == "__main__":
    main()
