"""Closed-loop, one-client latency of Search against a running server, beside the empty-call floor (health Check).

    rag-serve --index /tmp/idx/scifact --port 50051 &
    python bench/experiments/search_latency.py --target localhost:50051 --queries ../shared/data/scifact/queries.jsonl

A quick figure for one client at a time; load at fixed arrival rates (p99 under load) is `rag-bench latency`'s job.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.data import load_queries
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


def summary(name: str, ms: np.ndarray) -> str:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return f"{name:<22} n={len(ms):>5}  p50 {p50:7.2f} ms  p90 {p90:7.2f} ms  p99 {p99:7.2f} ms  max {ms.max():7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    queries = list(load_queries(args.queries).values())
    random.Random(args.seed).shuffle(queries)
    with grpc.insecure_channel(args.target) as channel:
        search = pb_grpc.RetrieverStub(channel).Search
        check = health_pb2_grpc.HealthStub(channel).Check
        rows: dict[str, list[float]] = {"health (floor)": [], "search": [], "search server_time": []}
        stages: dict[str, list[int]] = {}
        for i in range(args.warmup + args.n):
            query = queries[i % len(queries)]
            t0 = time.perf_counter()
            check(health_pb2.HealthCheckRequest(), timeout=5)
            t1 = time.perf_counter()
            reply = search(pb.SearchRequest(query=query, debug=True), timeout=5)
            t2 = time.perf_counter()
            if i < args.warmup:
                continue
            rows["health (floor)"].append((t1 - t0) * 1e3)
            rows["search"].append((t2 - t1) * 1e3)
            rows["search server_time"].append(reply.server_time_us / 1e3)
            for stage, us in reply.stage_time_us.items():
                stages.setdefault(stage, []).append(us)
    for name, values in rows.items():
        print(summary(name, np.asarray(values)))
    for stage, values in sorted(stages.items(), key=lambda kv: -np.median(kv[1])):
        print(summary(f"  stage {stage}", np.asarray(values) / 1e3))


if __name__ == "__main__":
    main()
