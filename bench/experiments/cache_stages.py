"""What the semantic cache costs a request, per install: the semantic look-up on a miss and on a hit, and the
store of a miss's answer, from the stage times the cache reports (`cache_semantic`, `cache_store`).

    python bench/experiments/cache_stages.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --python before=/tmp/before/.venv/bin/python --python after=.venv/bin/python --rounds 2

Each round starts one process per install (rounds alternate which goes first) with the server's default
configuration and an empty cache: the first `--limit` queries are asked once (misses: a semantic look-up that finds
nothing near, then the store), then each again with a zero-width space appended (another exact key, the same tokens
and nearly the same vector: the look-ups that become semantic hits are timed). Printed per install: p50 / p99 µs of
each and the number of hits, which should not differ between installs that decide alike. `--worker` is the
per-process part (internal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def worker(index: Path, queries: Path, limit: int) -> None:
    from rag_service.api.loader import load_searcher
    from rag_service.api.request import search_params
    from rag_service.bench.data import load_queries
    from rag_service.core.config import ServerConfig
    from rag_service.core.metrics import Metrics
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.search.cache import CachedSearch

    config = ServerConfig(index=index)
    searcher = load_searcher(config)
    cache = CachedSearch(config.cache, Metrics())
    texts = list(load_queries(queries).values())[:limit]

    def ask(text: str):
        return cache.run(searcher, search_params(pb.SearchRequest(query=text), config.defaults, config.limits), None)

    out: dict[str, list[int]] = {"look-up, miss": [], "store": [], "look-up, semantic hit": []}
    for text in texts:
        stages = ask(text).result.stage_us
        out["look-up, miss"].append(stages.get("cache_semantic", 0))
        out["store"].append(stages.get("cache_store", 0))
    for text in texts:
        served = ask(text + "\u200b")
        if served.served_from != "miss":
            out["look-up, semantic hit"].append(served.result.stage_us.get("cache_semantic", 0))
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--python", action="append", default=[], metavar="NAME=PYTHON",
                        help="an install's interpreter (repeatable; default: this one as 'this')")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=300, help="queries per round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.index, args.queries, args.limit)
        return
    # Absolute (not resolved: a virtual environment's python is a link that must stay one), as workers run from /.
    installs = {name: os.path.abspath(python) for name, python in (item.split("=", 1) for item in args.python)} \
        or {"this": sys.executable}
    runs: dict[str, dict[str, list[int]]] = {name: {} for name in installs}
    for r in range(args.rounds):
        for name in (list(installs) if r % 2 == 0 else list(reversed(installs))):
            out = subprocess.run([installs[name], str(Path(__file__).resolve()), "--worker", "--index",
                                  str(args.index.resolve()), "--queries", str(args.queries.resolve()),
                                  "--limit", str(args.limit)], check=True, capture_output=True, text=True, cwd="/")
            for part, values in json.loads(out.stdout.strip().splitlines()[-1]).items():
                runs[name].setdefault(part, []).extend(values)
            print(f"round {r + 1}: {name} done", flush=True)
    print(f"\n{'install':10s} {'part':24s} {'n':>6s} {'p50 µs':>8s} {'p99 µs':>8s}")
    for name, parts in runs.items():
        for part, values in parts.items():
            print(f"{name:10s} {part:24s} {len(values):6d} {np.percentile(values, 50):8.0f} "
                  f"{np.percentile(values, 99):8.0f}")


if __name__ == "__main__":
    main()
