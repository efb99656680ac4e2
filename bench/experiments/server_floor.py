"""What a call costs before any search: rag-serve's empty call and exact cache hit against a bare grpc.aio server.

    python bench/experiments/server_floor.py --index /tmp/rerank/cranfield \
        --queries ../shared/data/cranfield/queries.jsonl --rounds 6 --per-round 300

Starts a bare grpc.aio server with only the standard health service (no interceptors, no auth, no logging, no
metrics) and `rag-serve` on the index (or several: `--server NAME=EXECUTABLE`, repeated, e.g. two builds for an A/B).
One client then alternates rounds between:
- `bare Check`: health Check on the bare server, what gRPC in Python costs a call;
- `rag-serve Check`: health Check on rag-serve (rag-serve registers the standard health service as it is);
- `rag-serve exact hit`: a Search answered from the exact cache on the event loop (each query asked twice before the
  rounds, so every measured call is a hit, replayed from the request's bytes where the build does that), i.e. the
  RPC's wrappers, admission, the cache lookup and the reply;
- `rag-serve semantic hit`: the same queries with a zero-width space appended (another exact key, the same tokens),
  each answered from the semantic cache: the encode, the semantic look-up and its guard, the reply;
- `rag-serve miss`: the same queries with CACHE_BYPASS, for the encode stage's own time in this run;
and prints p50 / p99 of each and its ratio to the bare call and to the same server's Check, then the server's own
time (`server_time_us`) of each Search kind beside the encode stage's (issue 15's targets: an exact hit within 1.2x
the empty call, a semantic hit within the encode + 0.5 ms). `--by call` alternates the kinds call by call instead
of round by round: each call then finds the caches as the other kinds left them, the Check's too.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
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
    parser.add_argument("--server", action="append", default=[],
                        help="NAME=path to a rag-serve executable (repeat for an A/B; default: this environment's)")
    parser.add_argument("--by", choices=("round", "call"), default="round",
                        help="alternate the kinds of call round by round (default) or call by call")
    args = parser.parse_args()
    queries = list(load_queries(args.queries).values())[: args.per_round]
    builds = dict(s.split("=", 1) for s in args.server) or {"rag-serve": ""}

    bare = subprocess.Popen([sys.executable, "-c", BARE], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **SAFE_PATH})
    try:
        port = bare.stdout.readline().strip() if bare.stdout is not None else ""
        if not port.isdigit():
            raise SystemExit(f"the bare server did not start (printed {port!r})")
        with contextlib.ExitStack() as stack:
            servers = {name: stack.enter_context(ServerProcess(args.index, executable=executable or None))
                       for name, executable in builds.items()}
            measure(f"127.0.0.1:{port}", {name: server.target for name, server in servers.items()}, queries,
                    args.rounds, args.by)
    finally:
        stop_processes([bare])


def measure(bare_target: str, targets: dict[str, str], queries: list[str], rounds: int, by: str) -> None:
    channels = [grpc.insecure_channel(bare_target), *(grpc.insecure_channel(t) for t in targets.values())]
    bare_health = health_pb2_grpc.HealthStub(channels[0])
    check = health_pb2.HealthCheckRequest()
    requests = [pb.SearchRequest(query=q) for q in queries]
    # A zero-width space: another exact key (NFKC keeps it), but the tokenizer drops it, so the embedding and the
    # terms are the query's own and the guard lets the hit through: this measures what a semantic hit costs, not how
    # often the guard allows one (bench/experiments/guard_families.py measures that).
    variants = [pb.SearchRequest(query=q + "\u200b") for q in queries]
    misses = [pb.SearchRequest(query=q, profile=True, cache=pb.CACHE_BYPASS) for q in queries]
    # Server time (µs) per server and Search kind, and the encode stage of the misses.
    server_us: dict[str, dict[str, list[int]]] = {}
    not_semantic = dict.fromkeys(targets, 0)

    def timed(call, request) -> float:
        started = time.perf_counter()
        call(request, timeout=10)
        return time.perf_counter() - started

    def timed_search(name: str, search, request, kind: str) -> float:
        started = time.perf_counter()
        reply = search.Search(request, timeout=10)
        elapsed = time.perf_counter() - started
        if kind == "semantic hit" and reply.served_from != pb.SERVED_FROM_SEMANTIC:
            not_semantic[name] += 1  # the guard refused this variant: not a semantic hit, not counted
            return float("nan")
        server_us[name][kind].append(reply.server_time_us)
        if kind == "miss":
            server_us[name]["miss: encode"].append(reply.stage_time_us["encode"])
        return elapsed

    modes: dict[str, Callable[[int], float]] = {"bare Check": lambda i: timed(bare_health.Check, check)}
    for (name, _), channel in zip(targets.items(), channels[1:], strict=True):
        health, search = health_pb2_grpc.HealthStub(channel), pb_grpc.RetrieverStub(channel)
        for request in requests:  # fills the exact cache; the second ask is a hit, after which a repeat is replayed
            search.Search(request, timeout=30)
            search.Search(request, timeout=30)
        server_us[name] = {"exact hit": [], "semantic hit": [], "miss": [], "miss: encode": []}
        modes |= {
            f"{name} Check": functools.partial(lambda i, h: timed(h.Check, check), h=health),
            f"{name} exact hit": functools.partial(lambda i, n, s: timed_search(n, s, requests[i], "exact hit"),
                                                   n=name, s=search),
            f"{name} semantic hit": functools.partial(
                lambda i, n, s: timed_search(n, s, variants[i], "semantic hit"), n=name, s=search),
            f"{name} miss": functools.partial(lambda i, n, s: timed_search(n, s, misses[i], "miss"), n=name, s=search),
        }
    for mode in modes.values():  # warm-up
        for i in range(50):
            mode(i % len(requests))
    for kinds in server_us.values():
        for values in kinds.values():
            values.clear()
    not_semantic = dict.fromkeys(targets, 0)
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if by == "round":
            for name in order:
                times[name] += [modes[name](i) for i in range(len(requests))]
        else:
            for i in range(len(requests)):
                for name in order:
                    times[name].append(modes[name](i))
    p50s = {name: float(np.nanpercentile(np.asarray(t) * 1e3, 50)) for name, t in times.items()}
    b50, b99 = p50s["bare Check"], float(np.nanpercentile(np.asarray(times["bare Check"]) * 1e3, 99))
    print(f"{'call':<28} {'p50 ms':>8} {'p99 ms':>8} {'p50 / bare':>11} {'p99 / bare':>11} {'p50 / Check':>12}")
    for name in names:
        ms = np.asarray(times[name]) * 1e3
        ms = ms[~np.isnan(ms)]
        p50, p99 = np.percentile(ms, [50, 99])
        own = name.rsplit(" ", 2)[0] if name.endswith(" hit") else name.rsplit(" ", 1)[0]
        check_p50 = p50s.get(f"{own} Check")
        versus = f"{p50 / check_p50:12.2f}" if check_p50 and name != f"{own} Check" else ""
        print(f"{name:<28} {p50:8.3f} {p99:8.3f} {p50 / b50:11.2f} {p99 / b99:11.2f} {versus}", flush=True)
    for name, kinds in server_us.items():
        print(f"\n{name}: server_time_us (the encode: the misses' encode stage); {not_semantic[name]} variants were "
              "not semantic hits")
        print(f"{'search':<22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
        for kind, values in kinds.items():
            if values:
                p50, p99 = np.percentile(np.asarray(values) / 1e3, [50, 99])
                print(f"{kind:<22} {len(values):6d} {p50:8.3f} {p99:8.3f}")
    for channel in channels:
        channel.close()


if __name__ == "__main__":
    main()
