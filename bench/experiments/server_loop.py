"""Which server loop: grpc.aio (asyncio), grpc.aio on uvloop, or the sync grpc server with a thread pool.

    python bench/experiments/server_loop.py --index /tmp/lead/scifact_full \
        --queries ../shared/data/scifact/queries.jsonl --qrels ../shared/data/scifact/qrels/test.tsv \
        --clients 1,2,4,8 --seconds 8 --rounds 2

Starts one child process per design, each serving the same minimal `Retriever.Search` over the same searcher
(`load_searcher` with the index and rag-serve's default configuration, so the same pipeline, encoder and worker
count): parse the request, `SearchParams.from_defaults`, `searcher.search`, build the reply with rag-serve's own
`to_context` (api/reply.py's plain path). Nothing else differs but the loop that carries the call:
- `aio`: `grpc.aio.server`, the search on a `workers`-thread pool through `run_in_executor` (what rag-serve does);
- `aio+uvloop`: the same on uvloop's event loop;
- `sync`: `grpc.server` with a `workers`-thread pool, the search in the handler thread;
and `rag-serve` itself (guards, admission, cache bypassed per request, metrics), for the cost of everything around
the search, on asyncio and with `event_loop = "uvloop"`. For each design it measures an empty call (health Check,
one client) and the miss path in closed
loop at each client count (N client tasks on one grpc.aio channel each, in this process): throughput, p50 and p99.
Designs alternate within each round, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.serve import SAFE_PATH, ServerProcess, stop_processes
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

# One child per design. The servicer is the same code for all; only the server object and how the search is called
# differ. argv: design index workers
CHILD = r'''
import asyncio, concurrent.futures, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rag_service.api.loader import load_searcher
from rag_service.api.reply import to_context
from rag_service.core.config import ServerConfig
from rag_service.core.params import SearchParams
from rag_service.pb.rag.v1 import retrieval_pb2 as pb, retrieval_pb2_grpc as pb_grpc

design, index, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = ServerConfig(index=index, workers=workers)
searcher = load_searcher(config)

def answer(request):
    result = searcher.search(SearchParams.from_defaults(request.query, config.defaults))
    return pb.SearchResponse(contexts=[to_context(c, False) for c in result.contexts],
                             index_version=result.index_version, context_tokens=result.context_tokens)

if design == "sync":
    class Sync(pb_grpc.RetrieverServicer):
        def Search(self, request, context):
            return answer(request)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers))
    pb_grpc.add_RetrieverServicer_to_server(Sync(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
else:
    from grpc_health.v1._async import HealthServicer
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    class Aio(pb_grpc.RetrieverServicer):
        async def Search(self, request, context):
            return await asyncio.get_running_loop().run_in_executor(pool, answer, request)
    async def main():
        server = grpc.aio.server()
        pb_grpc.add_RetrieverServicer_to_server(Aio(), server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()
    if design == "aio+uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
'''

DESIGNS = ("aio", "aio+uvloop", "sync")


async def empty_calls(target: str, n: int) -> list[float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(50):
            await stub.Check(request, timeout=10)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            await stub.Check(request, timeout=10)
            times.append(time.perf_counter() - started)
        return times


async def closed_loop(target: str, requests: list[pb.SearchRequest], clients: int,
                      seconds: float) -> tuple[list[float], float]:
    """(latencies, answers per second) of `clients` callers each sending its next request when the last returns."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    stubs = [pb_grpc.RetrieverStub(c) for c in channels]
    latencies: list[float] = []
    stop_at = 0.0

    async def caller(c: int) -> None:
        i = c
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await stubs[c].Search(requests[i % len(requests)], timeout=30)
            latencies.append(time.perf_counter() - started)
            i += clients

    for stub in stubs:  # connect and warm each channel
        for request in requests[:5]:
            await stub.Search(request, timeout=30)
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(caller(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    return latencies, len(latencies) / elapsed


def start_child(design: str, index: Path, workers: int) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, design, str(index), str(workers)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, **SAFE_PATH, "HF_HUB_OFFLINE": "1"})
    port = child.stdout.readline().strip() if child.stdout is not None else ""
    if not port.isdigit():
        stop_processes([child])
        raise SystemExit(f"the {design} server did not start (printed {port!r})")
    return child, f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, help="only the queries judged here (e.g. the test split)")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=8.0, help="per design, client count and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="pipeline threads of every design (rag-serve's default)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    queries = load_queries(args.queries)
    if args.qrels:
        judged = load_qrels(args.qrels)
        queries = {q: t for q, t in queries.items() if q in judged}
    texts = list(queries.values())
    clients = [int(c) for c in args.clients.split(",")]
    plain = [pb.SearchRequest(query=q) for q in texts]
    bypass = [pb.SearchRequest(query=q, cache=pb.CACHE_BYPASS) for q in texts]

    children: list[subprocess.Popen] = []
    targets: dict[str, str] = {}
    try:
        for design in DESIGNS:
            child, targets[design] = start_child(design, args.index, args.workers)
            children.append(child)
        # Closed loop never offers more than `clients` requests: lift rag-serve's queue limit so that it queues as
        # the bare designs do instead of shedding (admission is measured on its own in the overload runs).
        lifted = {"RAG_MAX_QUEUED": "64"}
        uv = {**lifted, "RAG_EVENT_LOOP": "uvloop"}
        with ServerProcess(args.index, workers=args.workers, extra_env=lifted) as rag, \
                ServerProcess(args.index, workers=args.workers, extra_env=uv) as rag_uv:
            targets["rag-serve"] = rag.target
            targets["rag-serve+uvloop"] = rag_uv.target
            names = list(targets)
            empty: dict[str, list[float]] = {n: [] for n in names}
            loops: dict[tuple[str, int], list[float]] = {(n, c): [] for n in names for c in clients}
            rates: dict[tuple[str, int], list[float]] = {(n, c): [] for n in names for c in clients}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order:
                    empty[name] += asyncio.run(empty_calls(targets[name], 300))
                for c in clients:
                    for name in order:
                        requests = bypass if name.startswith("rag-serve") else plain
                        lat, rate = asyncio.run(closed_loop(targets[name], requests, c, args.seconds))
                        loops[(name, c)] += lat
                        rates[(name, c)].append(rate)
                        print(f"round {r} {name:<16} {c} clients: {rate:6.1f}/s p50 "
                              f"{np.percentile(lat, 50) * 1e3:.2f} ms", flush=True)
    finally:
        stop_processes(children)

    rows = []
    base = "aio"
    print(f"\n{'design':<16} {'what':<12} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6}")
    b50, b99 = np.percentile(np.asarray(empty[base]) * 1e3, [50, 99])
    for name in names:
        p50, p99 = np.percentile(np.asarray(empty[name]) * 1e3, [50, 99])
        rows.append({"design": name, "what": "empty call", "p50_ms": p50, "p99_ms": p99})
        print(f"{name:<16} {'empty call':<12} {'':>7} {p50:8.3f} {p99:8.3f} {p50 / b50:6.2f} {p99 / b99:6.2f}")
    for c in clients:
        b50, b99 = np.percentile(np.asarray(loops[(base, c)]) * 1e3, [50, 99])
        for name in names:
            ms = np.asarray(loops[(name, c)]) * 1e3
            p50, p99 = np.percentile(ms, [50, 99])
            rate = float(np.mean(rates[(name, c)]))
            rows.append({"design": name, "what": f"{c} clients", "per_s": rate, "p50_ms": p50, "p99_ms": p99})
            print(f"{name:<16} {f'{c} clients':<12} {rate:7.1f} {p50:8.2f} {p99:8.2f} {p50 / b50:6.2f} "
                  f"{p99 / b99:6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
