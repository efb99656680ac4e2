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
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.data import load_queries
from rag_service.bench.serve import ServerProcess
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

VARIANTS = {"top1": 1, "top10": 10, "top20": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-round", type=int, default=150)
    parser.add_argument("--deadline", type=float, default=None, help="each Search's timeout in seconds (default: none)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable of the served rag-serve (repeatable)")
    args = parser.parse_args()
    texts = list(load_queries(args.queries).values())
    env = dict(item.split("=", 1) for item in args.server_env)
    client: dict[str, list[float]] = {name: [] for name in (*VARIANTS, "check")}
    server: dict[str, list[float]] = {name: [] for name in VARIANTS}
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
            for _ in range(args.per_round):
                began = time.perf_counter()
                check(empty, timeout=10)
                client["check"].append((time.perf_counter() - began) * 1e3)
    print(f"ms, {args.rounds} rounds of {args.per_round}; deadline {args.deadline}; server env {env or 'default'}")
    print(f"{'call':<8} {'client p50':>10} {'p99':>7} {'server p50':>11} {'p99':>7} {'gap p50':>8} {'p90':>6} "
          f"{'p99':>6}")
    for name, times in client.items():
        c = np.array(times)
        if name == "check":
            print(f"{name:<8} {np.median(c):10.2f} {np.percentile(c, 99):7.2f}")
            continue
        s = np.array(server[name])
        gap = c - s
        print(f"{name:<8} {np.median(c):10.2f} {np.percentile(c, 99):7.2f} {np.median(s):11.2f} "
              f"{np.percentile(s, 99):7.2f} {np.median(gap):8.2f} {np.percentile(gap, 90):6.2f} "
              f"{np.percentile(gap, 99):6.2f}")


if __name__ == "__main__":
    main()
