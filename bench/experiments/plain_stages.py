"""Stage by stage, what a plain request (no debug, no query-API options) costs in the search path, for two installs
(two commits) in alternating rounds: the server's path without the network, so that a change of tens of µs in a
Python stage is not lost in the encode's and the loopback's noise.

    python bench/experiments/plain_stages.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --python before=/tmp/before/.venv/bin/python --python after=.venv/bin/python --rounds 4

Each round starts one process per install (the same index, the server's default configuration, cache bypassed as
in `request_budget.py`), warms it with 30 queries, then runs every query once: validation, the cache's run (encode,
first stage, rerank, context filter, contexts), the metrics the server records and the joined reply, each query's
stage times taken from its result (`SearchResult.stage_us`, which the server reports with `debug`). Rounds alternate
which install goes first. Printed: per install, p50 / p99 µs of every stage, of the request, and of the request
minus its encode. `--worker` is the per-process part (internal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def worker(index: Path, queries: Path, limit: int) -> None:
    from rag_service.api import reply
    from rag_service.api.loader import load_searcher
    from rag_service.api.request import search_params
    from rag_service.bench.data import load_queries
    from rag_service.core.config import ServerConfig
    from rag_service.core.metrics import Metrics
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.search.cache import CachedSearch

    config = ServerConfig(index=index)
    searcher = load_searcher(config)
    metrics = Metrics()
    cache = CachedSearch(config.cache, metrics)
    prepared = searcher.index.context_bytes()
    texts = list(load_queries(queries).values())[:limit]

    def one(text: str) -> dict[str, int]:
        started = time.perf_counter_ns()
        request = pb.SearchRequest(query=text, cache=pb.CACHE_BYPASS)
        params = search_params(request, config.defaults, config.limits)
        validated = time.perf_counter_ns()
        served = cache.run(searcher, params, None)
        result = served.result
        metrics.observe_stages(result.stage_us)
        metrics.observe_quality(result)
        reply.joined(result, pb.SERVED_FROM_MISS, None, False, 1, prepared)
        stages = dict(result.stage_us)
        stages["validate"] = (validated - started) // 1000
        stages["request"] = (time.perf_counter_ns() - started) // 1000
        return stages

    for text in texts[:30]:
        one(text)
    print(json.dumps([one(text) for text in texts]))


def install_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options of an A/B of installs in alternating rounds (this script's and cache_stages.py's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--python", action="append", default=[], metavar="NAME=PYTHON",
                        help="an install's interpreter (repeatable; default: this one as 'this')")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--limit", type=int, default=300, help="queries per round")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def run_installs(script: str, args: argparse.Namespace) -> dict[str, list]:
    """Runs `script --worker` once per install and round, rounds alternating which install goes first; per
    install, the JSON each worker printed last, round by round."""
    # Absolute (not resolved: a virtual environment's python is a link that must stay one), as workers run from /.
    installs = {name: os.path.abspath(python) for name, python in (item.split("=", 1) for item in args.python)} \
        or {"this": sys.executable}
    outputs: dict[str, list] = {name: [] for name in installs}
    for r in range(args.rounds):
        for name in (list(installs) if r % 2 == 0 else list(reversed(installs))):
            out = subprocess.run([installs[name], str(Path(script).resolve()), "--worker", "--index",
                                  str(args.index.resolve()), "--queries", str(args.queries.resolve()),
                                  "--limit", str(args.limit)], check=True, capture_output=True, text=True, cwd="/")
            outputs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {name} done", flush=True)
    return outputs


def main() -> None:
    args = install_parser(__doc__.splitlines()[0], rounds=4).parse_args()
    if args.worker:
        worker(args.index, args.queries, args.limit)
        return
    for name, rounds in run_installs(__file__, args).items():
        rows = [row for one_round in rounds for row in one_round]
        for row in rows:
            row["request - encode"] = row["request"] - row.get("encode", 0)
        stages = sorted({k for row in rows for k in row}, key=lambda k: -np.median([row.get(k, 0) for row in rows]))
        print(f"\n{name}: {len(rows)} requests")
        print(f"{'part':24s} {'p50 µs':>8s} {'p99 µs':>8s}")
        for stage in stages:
            values = [row.get(stage, 0) for row in rows]
            print(f"{stage:24s} {np.percentile(values, 50):8.0f} {np.percentile(values, 99):8.0f}")


if __name__ == "__main__":
    main()
