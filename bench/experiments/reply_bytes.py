"""Replies joined from prepared bytes against replies built field by field, interleaved in one process.

    python bench/experiments/reply_bytes.py --index /tmp/lead/scifact_full \
        --queries ../shared/data/scifact/queries.jsonl --queries-n 200 --rounds 6

1. Reply building alone: for real SciFact results at top_k 10 and 100 (debug off and on), the time to turn a
   SearchResult into the bytes gRPC sends: `reply.message(...).SerializeToString()` (the field-by-field path) against
   `reply.joined(...)` (static bytes prepared at load + per-request fields), alternating per call.
2. End to end over gRPC: a server on the index in a background thread of this process, a sync client in the main
   thread; rounds alternate the servicer's `joined_replies` between the two paths. Exact cache hits (every query asked
   once before the rounds) and cache-bypassed misses (CACHE_BYPASS: the whole pipeline) at top_k 10.

Also prints the time and memory the prepared bytes cost at load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

from rag_service.api import reply
from rag_service.api.server import create_server
from rag_service.bench.data import load_queries
from rag_service.core.config import ServerConfig
from rag_service.core.params import SearchParams
from rag_service.index.reply_bytes import ContextBytes
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

MODES = ("plain", "joined")


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _row(name: str, times: dict[str, list[float]]) -> str:
    (p50, p99), (j50, j99) = (np.percentile(np.asarray(times[m]) * 1e6, [50, 99]) for m in MODES)
    return f"| {name} | {p50:.1f} | {j50:.1f} | {j50 / p50:.2f} | {p99:.1f} | {j99:.1f} | {j99 / p99:.2f} |"


def building(searcher, queries: list[str], repeats: int) -> None:
    table = searcher.index.context_bytes()
    print("| reply building (µs) | plain p50 | joined p50 | joined / plain | plain p99 | joined p99 | joined / plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for top_k in (10, 100):
        results = [searcher.search(replace(SearchParams(query=q), top_k=top_k)) for q in queries]
        for debug in (False, True):
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(repeats):
                for r in results:
                    started = time.perf_counter()
                    reply.message(r, pb.SERVED_FROM_EXACT, None, debug, 1234).SerializeToString()
                    middle = time.perf_counter()
                    reply.joined(r, pb.SERVED_FROM_EXACT, None, debug, 1234, table)
                    times["plain"].append(middle - started)
                    times["joined"].append(time.perf_counter() - middle)
            print(_row(f"top_k {top_k}{', debug' if debug else ''}", times), flush=True)


class Served:
    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(create_server(config), self.loop).result(600)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def end_to_end(index: Path, queries: list[str], rounds: int, misses: int) -> None:
    served = Served(ServerConfig(index=index, port=0, warmup_queries=5))
    try:
        servicer = served.server.servicer
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            hits = [pb.SearchRequest(query=q, top_k=10) for q in queries]
            bypass = [pb.SearchRequest(query=q, top_k=10, cache=pb.CACHE_BYPASS) for q in queries[:misses]]
            for request in hits:  # every measured hit is an exact one
                stub.Search(request, timeout=60)
            kinds = {"exact hit, top_k 10": hits, "miss (CACHE_BYPASS), top_k 10": bypass}
            times = {kind: {m: [] for m in MODES} for kind in kinds}
            for r in range(rounds):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    servicer.joined_replies = mode == "joined"
                    for kind, requests in kinds.items():
                        for request in requests:
                            started = time.perf_counter()
                            stub.Search(request, timeout=60)
                            times[kind][mode].append(time.perf_counter() - started)
            servicer.joined_replies = True
        print("| over gRPC (µs) | plain p50 | joined p50 | joined / plain | plain p99 | joined p99 | joined / plain |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for kind in kinds:
            print(_row(kind, times[kind]), flush=True)
    finally:
        served.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--queries-n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5, help="passes over the results when timing reply building")
    parser.add_argument("--rounds", type=int, default=6, help="end-to-end rounds (alternating the two paths)")
    parser.add_argument("--misses", type=int, default=30, help="cache-bypassed requests per round and path")
    args = parser.parse_args()
    queries = list(load_queries(args.queries).values())[: args.queries_n]

    from rag_service.api.loader import load_searcher

    searcher = load_searcher(ServerConfig(index=args.index, warmup_queries=0))
    index = searcher.index
    # The prepared bytes again, timed on their own (the loader prepared them once already).
    before = _rss_mb()
    started = time.perf_counter()
    table = ContextBytes.for_store(index.store)
    seconds = time.perf_counter() - started
    print(f"prepared bytes: {table.n_chunks} chunks in {seconds:.2f} s, {table.nbytes / 1e6:.1f} MB "
          f"(RSS +{_rss_mb() - before:.1f} MB)\n")
    del table
    building(searcher, queries, args.repeats)
    print()
    end_to_end(args.index, queries, args.rounds, args.misses)


if __name__ == "__main__":
    main()
