"""Size on disk, load time (with and without checksum verification) and per-stage query latency of a built index.

    python bench/experiments/index_stats.py /tmp/idx/scifact --queries ../shared/data/scifact/queries.jsonl
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_queries
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index, resolve_version_dir


def percentiles(name: str, seconds: list[float], unit: float = 1e6, label: str = "us") -> None:
    values = np.asarray(seconds) * unit
    p50, p99 = np.percentile(values, [50, 99])
    print(f"{name:<40} p50 {p50:8.1f} {label}   p99 {p99:8.1f} {label}")


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("--queries", type=Path, required=True)
    args = parser.parse_args()

    version_dir = resolve_version_dir(args.index)
    files = sorted(version_dir.iterdir(), key=lambda p: -p.stat().st_size)
    print(f"{version_dir.name}: {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB on disk")
    for p in files[:6]:
        print(f"  {p.name:<28} {p.stat().st_size / 2**20:7.2f} MiB")
    for verify in (False, True):
        loads = [timed(lambda: load_index(args.index, verify_checksums=verify)) for _ in range(5)]
        percentiles(f"load (verify_checksums={verify})", loads, 1e3, "ms")
    index = load_index(args.index, verify_checksums=False)
    queries = list(load_queries(args.queries).values())
    for depth in (100, 1000):
        percentiles(f"bm25 search depth {depth}", [timed(index.bm25.search, q, depth) for q in queries])
    encoder = Encoder()
    vectors = [encoder.encode_queries([q])[0] for q in queries[:20]]  # warm-up
    encode_times = [timed(encoder.encode_queries, [q]) for q in queries[:300]]
    percentiles("query encode (sentence-transformers)", encode_times, 1e3, "ms")
    vectors = encoder.encode_queries(queries)
    percentiles(f"dense search depth 100 ({index.dense.kind})", [timed(index.dense.search, v, 100) for v in vectors])


if __name__ == "__main__":
    main()
