"""The server's CPU per call: a health Check and a refused Search on rag-serve, and a Check on bare gRPC servers.

    python bench/experiments/call_cpu.py --index /tmp/lead/sf --calls 3000 --rounds 3

Starts `rag-serve` on the index, then a bare `grpc.aio` server and a bare synchronous `grpc.server` with a 2-thread
pool (the health service alone, each in a child process), and sends each kind of call `--calls` times in a row from
one client, `--rounds` times, reading the server process's CPU time (user + system, psutil) before and after each
batch: the CPU one call costs the server, beside its wall time at the client. The refused Search asks for a
`top_k` past the server's limit (INVALID_ARGUMENT), which takes the same path out as a refusal for load (the status,
its message, the abort) without needing load.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.serve import ServerProcess
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

BARE_SERVER = """
import asyncio
import grpc
from grpc_health.v1 import health, health_pb2_grpc

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""

# The same health service on gRPC's synchronous server: a thread pool runs each handler, no event loop between.
BARE_SYNC_SERVER = """
import concurrent.futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc

server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def measure(name: str, pid: int, call: Callable[[], object], calls: int, rounds: int) -> None:
    for _ in range(200):  # warm the channel and the handler
        call()
    for _ in range(rounds):
        cpu, wall = cpu_seconds(pid), time.perf_counter()
        for _ in range(calls):
            call()
        cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - wall
        print(f"{name:<44} server CPU {1e6 * cpu / calls:6.0f} µs/call   wall {1e6 * wall / calls:6.0f} µs/call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    empty = health_pb2.HealthCheckRequest()
    refused = pb.SearchRequest(query="glacier", top_k=100_000, cache=pb.CACHE_BYPASS)

    with ServerProcess(args.index) as server, grpc.insecure_channel(server.target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        search = pb_grpc.RetrieverStub(channel).Search

        def refuse() -> None:
            try:
                search(refused, timeout=10)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
            else:
                raise SystemExit("the refused Search was answered: raise its top_k past the server's limit")

        measure("rag-serve: health Check", server.process.pid, lambda: check(empty, timeout=10), args.calls,
                args.rounds)
        measure("rag-serve: Search refused", server.process.pid, refuse, args.calls, args.rounds)

    for name, code in (("bare grpc.aio server", BARE_SERVER), ("bare sync grpc.server (2 threads)", BARE_SYNC_SERVER)):
        bare = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            if bare.stdout is None:
                raise SystemExit(f"{name}: no port")
            port = int(bare.stdout.readline())
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                measure(f"{name}: health Check", bare.pid, lambda: check(empty, timeout=10), args.calls, args.rounds)
        finally:
            bare.kill()
            bare.wait()


if __name__ == "__main__":
    main()
