"""What the semantic cache costs a request, per install: the semantic look-up on a miss and on a hit, and the
store of a miss's answer, from the stage times the cache reports (`cache_semantic`, `cache_store`).

    python bench/experiments/cache_stages.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --python before=/tmp/before/.venv/bin/python --python after=.venv/bin/python --rounds 2

Each round starts one process per install (rounds alternate which goes first) with the server's default
configuration and an empty cache: the first `--limit` queries are asked once (misses: a semantic look-up that finds
nothing near, then the store), then each again with a zero-width space appended (another exact key, the same tokens
and nearly the same vector: the look-ups that become semantic hits are timed). Printed per install: p50 / p99 µs of
each and the number of hits, which should not differ between installs that decide alike. `--worker` is the
per-process part (internal); the rounds and options are plain_stages.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The A/B driver shared with plain_stages.py (this script's folder is on sys.path when run as a script).
from plain_stages import install_parser, run_installs


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
    args = install_parser(__doc__.splitlines()[0], rounds=2).parse_args()
    if args.worker:
        worker(args.index, args.queries, args.limit)
        return
    print(f"\n{'install':10s} {'part':24s} {'n':>6s} {'p50 µs':>8s} {'p99 µs':>8s}")
    for name, rounds in run_installs(__file__, args).items():
        parts: dict[str, list[int]] = {}
        for one_round in rounds:
            for part, values in one_round.items():
                parts.setdefault(part, []).extend(values)
        for part, values in parts.items():
            print(f"{name:10s} {part:24s} {len(values):6d} {np.percentile(values, 50):8.0f} "
                  f"{np.percentile(values, 99):8.0f}")


if __name__ == "__main__":
    main()
