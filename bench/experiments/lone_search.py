"""What a search alone in the server gains from the worker thread on the idle core (`search_core(helper=True)`):
the search after the encode with and without the worker, alternating query by query in one process, placed as the
server places a lone search (the calling thread on the lowest allowed CPU, the worker on the others).

    python bench/experiments/lone_search.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl

Each query is encoded once up front; before every search a 32 MB write stands in for the encode (which leaves the
caches to its weights) and the thread sleeps 2 ms, so the worker has gone back to sleep as it has between a lone
client's requests. Printed: p50 / p99 µs of the dense stage, the rerank, the call around them and the whole ranking
(`Pipeline._rank`), without and with the worker, the answers compared, and how many jobs the worker took part in.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from rag_service.api.loader import load_searcher
    from rag_service.api.request import search_params
    from rag_service.bench.data import load_queries
    from rag_service.core.config import ServerConfig
    from rag_service.core.timing import StageTimer
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.search.pipeline import Pipeline

    config = ServerConfig(index=args.index)
    searcher = load_searcher(config)
    if not isinstance(searcher, Pipeline) or searcher.rerank_store is None:
        raise SystemExit(f"{args.index}: needs a local index with its rerank store")
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(allowed) >= 2:
        os.sched_setaffinity(0, {allowed[0]})
        searcher.rerank_store.core.place_helper(allowed[1:])
        print(f"caller on CPU {allowed[0]}, worker on CPUs {allowed[1:]}")
    texts = list(load_queries(args.queries).values())[: args.limit]
    vectors = searcher.encoder.encode_queries(texts)
    params = [search_params(pb.SearchRequest(query=t), config.defaults, config.limits) for t in texts]
    flush = np.zeros(32 << 20, np.uint8)
    parts = ("dense", "rerank", "call", "ranking")
    times: dict[bool, dict[str, list[int]]] = {False: {p: [] for p in parts}, True: {p: [] for p in parts}}
    same = total = 0
    for round_ in range(args.rounds):
        for i, (p, v) in enumerate(zip(params, vectors, strict=True)):
            answers = {}
            # Which comes first alternates by round.
            for helper in (False, True) if (round_ + i) % 2 == 0 else (True, False):
                flush[:] = i & 0xFF
                time.sleep(0.002)
                plan = searcher.plan(p, encoded=True)
                started = time.perf_counter_ns()
                result = searcher._rank(plan, v, None, StageTimer(), None, helper)
                ranking = (time.perf_counter_ns() - started) // 1000
                answers[helper] = [repr(c) for c in result.contexts]
                for part in parts:
                    times[helper][part].append(ranking if part == "ranking" else result.stage_us.get(part, 0))
            same += answers[True] == answers[False]
            total += 1
    print(f"same answers: {same} of {total}; worker jobs: {searcher.rerank_store.core.helper_jobs}")
    print(f"{'part':10s} {'alone p50':>10s} {'alone p99':>10s} {'worker p50':>11s} {'worker p99':>11s}")
    for part in parts:
        off, on = np.asarray(times[False][part]), np.asarray(times[True][part])
        print(f"{part:10s} {np.percentile(off, 50):10.0f} {np.percentile(off, 99):10.0f} "
              f"{np.percentile(on, 50):11.0f} {np.percentile(on, 99):11.0f}")


if __name__ == "__main__":
    main()
