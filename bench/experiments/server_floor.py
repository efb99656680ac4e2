"""What a call costs before any search: rag-serve's empty call and exact cache hit against a bare grpc.aio server.

    python bench/experiments/server_floor.py --index /tmp/rerank/cranfield \
        --queries ../shared/data/cranfield/queries.jsonl --rounds 6 --per-round 300

Starts two processes: `rag-serve` on the index, and a bare grpc.aio server with only the standard health service
(no interceptors, no auth, no logging, no metrics). One client then alternates rounds between:
- `bare Check`: health Check on the bare server, what gRPC in Python costs a call;
- `rag-serve Check`: health Check on rag-serve, the same call through rag-serve's interceptors (request log, wire
  guard, auth);
- `rag-serve exact hit`: a Search answered from the exact cache on the event loop (each query asked once before the
  rounds, so every measured call is a hit), i.e. the RPC wrapper, admission, validation, the cache lookup and the
  reply;
- `rag-serve semantic hit`: the same queries with a zero-width space appended (another exact key, the same tokens),
  each answered from the semantic cache: the encode, the semantic look-up and its guard, the reply;
- `rag-serve miss`: the same queries with CACHE_BYPASS, for the encode stage's own time in this run;
and prints p50 / p99 of each and its ratio to the bare call, then the server's own time (`server_time_us`) of each
Search kind beside the encode stage's (issue 15's targets: an exact hit within 1.2x the empty call, a semantic hit
within the encode + 0.5 ms).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.data import load_queries
from rag_service.bench.serve import SAFE_PATH, ServerProcess, stop_processes
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

# The bare server: a child process so that it has its own interpreter and event loop, as rag-serve does.
BARE = """
import asyncio, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

async def main():
    server = grpc.aio.server()
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=300)
    args = parser.parse_args()
    queries = list(load_queries(args.queries).values())[: args.per_round]

    bare = subprocess.Popen([sys.executable, "-c", BARE], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **SAFE_PATH})
    try:
        port = bare.stdout.readline().strip() if bare.stdout is not None else ""
        if not port.isdigit():
            raise SystemExit(f"the bare server did not start (printed {port!r})")
        bare_target = f"127.0.0.1:{port}"
        with ServerProcess(args.index) as rag:
            bare_channel, rag_channel = grpc.insecure_channel(bare_target), grpc.insecure_channel(rag.target)
            bare_health = health_pb2_grpc.HealthStub(bare_channel)
            rag_health = health_pb2_grpc.HealthStub(rag_channel)
            search = pb_grpc.RetrieverStub(rag_channel)
            check = health_pb2.HealthCheckRequest()
            requests = [pb.SearchRequest(query=q) for q in queries]
            for request in requests:  # fills the exact cache: every measured Search is a hit
                search.Search(request, timeout=30)
            # A zero-width space: another exact key (NFKC keeps it), but the tokenizer drops it, so the embedding and
            # the terms are the query's own and the guard lets the hit through: this measures what a semantic hit
            # costs, not how often the guard allows one (bench/experiments/guard_families.py measures that).
            variants = [pb.SearchRequest(query=q + "\u200b") for q in queries]
            misses = [pb.SearchRequest(query=q, debug=True, cache=pb.CACHE_BYPASS) for q in queries]
            # Server time (µs) per Search kind, and the encode stage of the misses.
            server_us: dict[str, list[int]] = {"exact hit": [], "semantic hit": [], "miss": [], "miss: encode": []}
            not_semantic = [0]

            def timed(call, request) -> float:
                started = time.perf_counter()
                call(request, timeout=10)
                return time.perf_counter() - started

            def timed_search(request, kind: str) -> float:
                started = time.perf_counter()
                reply = search.Search(request, timeout=10)
                elapsed = time.perf_counter() - started
                if kind == "semantic hit" and reply.served_from != pb.SERVED_FROM_SEMANTIC:
                    not_semantic[0] += 1  # the guard refused this variant: not a semantic hit, not counted
                    return float("nan")
                server_us[kind].append(reply.server_time_us)
                if kind == "miss":
                    server_us["miss: encode"].append(reply.stage_time_us["encode"])
                return elapsed

            modes = {
                "bare Check": lambda i: timed(bare_health.Check, check),
                "rag-serve Check": lambda i: timed(rag_health.Check, check),
                "rag-serve exact hit": lambda i: timed_search(requests[i], "exact hit"),
                "rag-serve semantic hit": lambda i: timed_search(variants[i], "semantic hit"),
                "rag-serve miss": lambda i: timed_search(misses[i], "miss"),
            }
            for mode in modes.values():  # warm-up
                for i in range(50):
                    mode(i % len(requests))
            for values in server_us.values():
                values.clear()
            not_semantic[0] = 0
            times: dict[str, list[float]] = {name: [] for name in modes}
            names = list(modes)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    times[name] += [modes[name](i) for i in range(len(requests))]
            base = np.asarray(times["bare Check"]) * 1e3
            b50, b99 = np.percentile(base, [50, 99])
            print(f"{'call':<22} {'p50 ms':>8} {'p99 ms':>8} {'p50 / bare':>11} {'p99 / bare':>11}")
            for name in names:
                ms = np.asarray(times[name]) * 1e3
                ms = ms[~np.isnan(ms)]
                p50, p99 = np.percentile(ms, [50, 99])
                print(f"{name:<22} {p50:8.3f} {p99:8.3f} {p50 / b50:11.2f} {p99 / b99:11.2f}", flush=True)
            print(f"\nserver_time_us (the encode: the misses' encode stage); {not_semantic[0]} variants were not "
                  "semantic hits")
            print(f"{'search':<22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
            for kind, values in server_us.items():
                if values:
                    p50, p99 = np.percentile(np.asarray(values) / 1e3, [50, 99])
                    print(f"{kind:<22} {len(values):6d} {p50:8.3f} {p99:8.3f}")
            bare_channel.close()
            rag_channel.close()
    finally:
        stop_processes([bare])


if __name__ == "__main__":
    main()
