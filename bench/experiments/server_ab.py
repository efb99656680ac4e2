"""Two rag-serve builds on one index, measured by one client in the same run: does a change cost latency?

    python bench/experiments/server_ab.py --index /tmp/rerank/cranfield \
        --queries ../shared/data/cranfield/queries.jsonl --server old=/tmp/lead/oldvenv/bin/rag-serve \
        --server new=.venv/bin/rag-serve --rounds 6 --per-round 100

Each `--server NAME=EXECUTABLE` starts that rag-serve (e.g. from another virtual environment holding another commit)
on the index; then rounds alternate between the servers in a rotating order, each round sending `--per-round`
queries one at a time (closed loop, one client, CACHE_BYPASS, the full default pipeline). Prints p50 / p99 per server
and their ratios to the first, over all rounds and the spread of per-round p50s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_queries
from rag_service.bench.serve import serve_builds
from rag_service.pb.rag.v1 import retrieval_pb2 as pb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--server", action="append", required=True, help="NAME=path to a rag-serve executable")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    servers = dict(s.split("=", 1) for s in args.server)
    queries = list(load_queries(args.queries).values())
    with serve_builds(args.index, servers) as stubs:

        def call(name: str, query: str) -> float:
            started = time.perf_counter()
            stubs[name].Search(pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS), timeout=30)
            return time.perf_counter() - started

        for name in stubs:
            for q in queries[: args.warmup]:
                call(name, q)
        times: dict[str, list[float]] = {n: [] for n in stubs}
        round_p50: dict[str, list[float]] = {n: [] for n in stubs}
        names = list(stubs)
        at = 0
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                batch = []
                for _ in range(args.per_round):
                    batch.append(call(name, queries[at % len(queries)]))
                    at += 1
                times[name] += batch
                round_p50[name].append(float(np.percentile(batch, 50)) * 1e3)
            at -= args.per_round * len(names)  # every server gets the same queries in a round
            at += args.per_round
        first = names[0]
        base = {p: float(np.percentile(times[first], p)) for p in (50, 99)}
        print(f"{'server':<10} {'p50 ms':>8} {'p99 ms':>8} {'p50 ratio':>10} {'p99 ratio':>10}  per-round p50 ms")
        for name in names:
            p50, p99 = (float(np.percentile(times[name], p)) for p in (50, 99))
            spread = ", ".join(f"{v:.2f}" for v in round_p50[name])
            print(f"{name:<10} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {p50 / base[50]:10.3f} {p99 / base[99]:10.3f}  "
                  f"[{spread}]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
