"""What a miss costs outside the server: the client's latency minus `server_time_us`, by reply size and deadline,
beside the empty call, for one `rag-serve` configured by environment variables.

    python bench/experiments/miss_gap.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl
    python bench/experiments/miss_gap.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --server-env RAG_ENCODER__IDLE_THREADS=1

One client, one channel, every Search with CACHE_BYPASS (the whole pipeline), in rounds: per round and variant
(`top1`, `top10`, `top20`: the contexts asked, so the reply's size; `--deadline S` sends each call with that
timeout, which the server then holds the request to) `--per-round` queries, then `--per-round` health Checks (the
empty call). Printed per variant: the client's p50 / p99, the server's (`server_time_us`), and the gap (client minus
server, per call) p50 / p90 / p99. Issue 15's target: the gap within 0.3 ms of the empty call.

`--bare` adds, per round, the same counts of two calls to a bare grpc.aio server (no rag-service code): `bare empty`
answers at once, `bare busy` has a worker thread spin for `--busy-ms` while the event loop waits, as a search's
pipeline thread does; each reports its own server time. Their gaps tell what the transport itself costs a call that
keeps the server busy for milliseconds, beside one that does not.
"""

from __future__ import annotations

import argparse
import os
import struct
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

VARIANTS = {"top1": 1, "top10": 10, "top20": 20}

# The bare server: Empty answers at once, Busy waits for a worker thread that spins for the given ms; both reply
# with their own time in µs (a little-endian int64), as server_time_us does.
BARE = """
import asyncio, concurrent.futures, struct, sys, time
import grpc

pool = concurrent.futures.ThreadPoolExecutor(2)
busy_s = float(sys.argv[1]) / 1e3

def spin():
    end = time.perf_counter() + busy_s
    while time.perf_counter() < end:
        pass

async def empty(request, context):
    started = time.perf_counter_ns()
    return struct.pack("<q", (time.perf_counter_ns() - started) // 1000)

async def busy(request, context):
    started = time.perf_counter_ns()
    await asyncio.get_running_loop().run_in_executor(pool, spin)
    return struct.pack("<q", (time.perf_counter_ns() - started) // 1000)

async def main():
    server = grpc.aio.server()
    handlers = {"Empty": grpc.unary_unary_rpc_method_handler(empty), "Busy": grpc.unary_unary_rpc_method_handler(busy)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bare.Bare", handlers),))
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
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-round", type=int, default=150)
    parser.add_argument("--deadline", type=float, default=None, help="each Search's timeout in seconds (default: none)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the served rag-serve (repeatable)")
    parser.add_argument("--bare", action="store_true", help="add a bare grpc.aio server's empty and busy calls")
    parser.add_argument("--busy-ms", type=float, default=3.0, help="how long the bare server's busy call spins")
    args = parser.parse_args()
    texts = list(load_queries(args.queries).values())
    env = dict(item.split("=", 1) for item in args.server_env)
    bare_names = ("bare empty", "bare busy") if args.bare else ()
    client: dict[str, list[float]] = {name: [] for name in (*VARIANTS, *bare_names, "check")}
    server: dict[str, list[float]] = {name: [] for name in (*VARIANTS, *bare_names)}
    bare = None
    if args.bare:
        bare = subprocess.Popen([sys.executable, "-c", BARE, str(args.busy_ms)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **SAFE_PATH})
    try:
        bare_calls = {}
        if bare is not None:
            port = bare.stdout.readline().strip() if bare.stdout is not None else ""
            if not port.isdigit():
                raise SystemExit(f"the bare server did not start (printed {port!r})")
            bare_channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            bare_calls = {"bare empty": bare_channel.unary_unary("/bare.Bare/Empty"),
                          "bare busy": bare_channel.unary_unary("/bare.Bare/Busy")}
        with ServerProcess(args.index, extra_env=env) as served, grpc.insecure_channel(served.target) as channel:
            search = pb_grpc.RetrieverStub(channel).Search
            check = health_pb2_grpc.HealthStub(channel).Check
            empty = health_pb2.HealthCheckRequest()
            for round_ in range(args.rounds):
                start = round_ * args.per_round
                chosen = [texts[(start + i) % len(texts)] for i in range(args.per_round)]
                for name, top_k in VARIANTS.items():
                    for text in chosen:
                        request = pb.SearchRequest(query=text, top_k=top_k, cache=pb.CACHE_BYPASS)
                        began = time.perf_counter()
                        reply = search(request, timeout=args.deadline)
                        client[name].append((time.perf_counter() - began) * 1e3)
                        server[name].append(reply.server_time_us / 1e3)
                for name, call in bare_calls.items():
                    for _ in range(args.per_round):
                        began = time.perf_counter()
                        answer = call(b"", timeout=10)
                        client[name].append((time.perf_counter() - began) * 1e3)
                        server[name].append(struct.unpack("<q", answer)[0] / 1e3)
                for _ in range(args.per_round):
                    began = time.perf_counter()
                    check(empty, timeout=10)
                    client["check"].append((time.perf_counter() - began) * 1e3)
    finally:
        if bare is not None:
            stop_processes([bare])
    print(f"ms, {args.rounds} rounds of {args.per_round}; deadline {args.deadline}; server env {env or 'default'}")
    print(f"{'call':<10} {'client p50':>10} {'p99':>7} {'server p50':>11} {'p99':>7} {'gap p50':>8} {'p90':>6} "
          f"{'p99':>6}")
    for name, times in client.items():
        c = np.array(times)
        if name == "check":
            print(f"{name:<10} {np.median(c):10.2f} {np.percentile(c, 99):7.2f}")
            continue
        s = np.array(server[name])
        gap = c - s
        print(f"{name:<10} {np.median(c):10.2f} {np.percentile(c, 99):7.2f} {np.median(s):11.2f} "
              f"{np.percentile(s, 99):7.2f} {np.median(gap):8.2f} {np.percentile(gap, 90):6.2f} "
              f"{np.percentile(gap, 99):6.2f}")


if __name__ == "__main__":
    main()
