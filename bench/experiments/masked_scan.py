"""The native masked scan (`native.dense_top` with a filter mask, float rows and sq8 codes) at 1M rows, one build
against another in alternating processes.

    python bench/experiments/masked_scan.py --vectors /tmp/filt1m/graphs/hnsw-n1000000-seed16-m32-efc40/vectors.npy \
        --compare before=/tmp/before/.venv/bin/python after=.venv/bin/python --rounds 5

Each round starts one process per build (`--compare NAME=PYTHON`, in turn, the order alternating by round); the
process maps the vectors (any float32 .npy, e.g. the vectors of filtered_search.py's cached graph), quantizes them
to sq8, draws 100 seeded queries near stored rows and times `native.dense_top` at depth 100 for a mask allowing each
share of --shares (a seeded permutation's first rows), float and sq8 (oversample 2). Prints p50 / p99 per build and
cell over all rounds and the ratio of the last build to the first. Without --compare, one round in this process
(what each child runs, writing --json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def one_round(vectors_path: Path, shares: list[float], out: Path) -> None:
    from rag_service.kernels import native

    vectors = np.load(vectors_path, mmap_mode="r")
    n, dim = vectors.shape
    rng = np.random.default_rng(7)
    codes = native.sq8_quantize(np.asarray(vectors))
    rank = rng.permutation(n)
    queries = np.asarray(vectors[rng.integers(0, n, 100)]) + 0.05 * rng.standard_normal((100, dim)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    times: dict[str, list[float]] = {}
    for share in shares:
        mask = rank < int(share * n)
        for kind in ("float", "sq8"):
            cell = times.setdefault(f"{share}:{kind}", [])
            for q in queries:
                started = time.perf_counter_ns()
                if kind == "float":
                    native.dense_top(vectors, q, 100, mask=mask)
                else:
                    native.dense_top(vectors, q, 100, mask=mask, codes=codes, oversample=2)
                cell.append((time.perf_counter_ns() - started) / 1e6)
    out.write_text(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--shares", type=float, nargs="*", default=[0.001, 0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--compare", nargs="*", default=[], metavar="NAME=PYTHON")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.compare:
        if args.json is None:
            parser.error("--json is needed for a single round")
        one_round(args.vectors, args.shares, args.json)
        return
    builds = dict(item.split("=", 1) for item in args.compare)
    merged: dict[str, dict[str, list[float]]] = {name: {} for name in builds}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            order = list(builds) if r % 2 == 0 else list(reversed(builds))
            for name in order:
                out = Path(work) / f"{name}-{r}.json"
                subprocess.run([builds[name], __file__, "--vectors", str(args.vectors), "--json", str(out),
                                "--shares", *map(str, args.shares)], check=True, cwd="/")
                for cell, values in json.loads(out.read_text()).items():
                    merged[name].setdefault(cell, []).extend(values)
    names = list(builds)
    first, last = names[0], names[-1]
    print("| allowed | scan | " + " | ".join(f"{n} p50 / p99 ms" for n in names) + f" | {last} / {first} p50 / p99 |")
    print("| ---: | --- |" + " ---: |" * (len(names) + 1))
    for cell in merged[first]:
        share, kind = cell.split(":")
        stats = {n: (np.median(merged[n][cell]), np.percentile(merged[n][cell], 99)) for n in names}
        cols = " | ".join(f"{stats[n][0]:.3f} / {stats[n][1]:.3f}" for n in names)
        print(f"| {float(share):.1%} | {kind} | {cols} | {stats[last][0] / stats[first][0]:.2f} / "
              f"{stats[last][1] / stats[first][1]:.2f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
