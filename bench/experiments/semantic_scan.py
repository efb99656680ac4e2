"""What the semantic cache's nearest-entry scan costs as the cache fills: `CacheStore.nearest` over N stored query
vectors of one group, each call after 64 MB written (the caches as an encode leaves them), in process, interleaved
with the float rows' scan it replaced (`native.dense_top` over the same N vectors, the top k kept at min_cosine)
and with the same store's look-up without its prefilter (a second store filled with the prefilter off).

    python bench/experiments/semantic_scan.py --entries 1000,10000,50000
    python bench/experiments/semantic_scan.py --entries 1000,10000,31000 --vectors /tmp/windows.npy

Every miss and every semantic hit of a request in the default cache mode asks it once, right after the encode.
Printed per N: p50 / p90 µs of each call and how many probes found an entry. The vectors are seeded random unit
vectors of `--dim` dimensions, or the rows of a .npy (`--vectors`: real embeddings, e.g. an index's sentence
windows, normalized here, shuffled with the seed), where near neighbours are common and the codes' bounds rule out
fewer rows. Half the probes are stored vectors (semantic hits), half are rows left out of the cache (misses, whose
nearest entries lie close when the rows are real). The threshold is the default semantic_min_cosine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from rag_service.core.config import CacheConfig
from rag_service.core.params import SearchResult
from rag_service.kernels import native
from rag_service.search import cache as cache_module
from rag_service.search.cache import CacheStore, Entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="1000,10000,50000", help="comma-separated cache sizes")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--vectors", help="a .npy of real embeddings to store instead of random ones")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    flush = np.zeros(64 << 20, np.uint8)
    config = CacheConfig(max_bytes=1 << 40)
    sizes = [int(x) for x in args.entries.split(",") if x]
    if args.vectors:
        pool = np.load(args.vectors).astype(np.float32)
        rng.shuffle(pool)
    else:
        pool = rng.normal(size=(max(sizes) + args.calls, args.dim)).astype(np.float32)
    pool /= np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    k, min_cosine = config.semantic_candidates, config.semantic_min_cosine
    for n in sizes:
        if n + args.calls > len(pool):
            raise SystemExit(f"--vectors has {len(pool)} rows: too few for {n} entries and {args.calls} probes")
        group = (("c", "v1"), (0,))
        vectors = np.ascontiguousarray(pool[:n])
        left_out = pool[n:n + args.calls]
        stores = {}
        for name, fit_at in (("codes", n + 1), ("prefilter", cache_module.PREFILTER_ROWS)):
            shipped, cache_module.PREFILTER_ROWS = cache_module.PREFILTER_ROWS, fit_at
            try:
                store = stores[name] = CacheStore(config)
                store.use_version("c", "v1")
                for i in range(n):
                    store.put(Entry(key=(group[0], f"q{i}", group[1]), group=group,
                                    result=SearchResult(contexts=[], index_version="v1", stage_us={}),
                                    vector=vectors[i], lexical=np.zeros(0, np.int64), terms={}, polarity=(),
                                    signature=(f"q{i}",), nbytes=100, inserted=store.clock()))
            finally:
                cache_module.PREFILTER_ROWS = shipped
        times: dict[str, list[float]] = {"float rows": [], "codes + bounds": [], "prefilter + codes": []}
        found = dict.fromkeys(times, 0)
        for call in range(2 * args.calls):
            probe = vectors[(call * 7919) % n] if call % 2 else left_out[call // 2]
            order = list(times) if call % 2 else list(times)[::-1]
            for name in order:
                flush[:] = call % 200
                started = time.perf_counter()
                if name.startswith("float"):
                    ids, sims = native.dense_top(vectors, probe, k)
                    hits = int((sims >= min_cosine).sum())
                else:
                    hits = len(stores["prefilter" if name.startswith("prefilter") else "codes"].nearest(
                        group, probe, min_cosine, k))
                times[name].append((time.perf_counter() - started) * 1e6)
                found[name] += hits > 0
        cells = [f"{name} p50 {np.median(t):6.0f} p90 {np.percentile(t, 90):6.0f} µs ({found[name]} found)"
                 for name, t in times.items()]
        print(f"{n:>7} entries: " + "; ".join(cells))


if __name__ == "__main__":
    main()
