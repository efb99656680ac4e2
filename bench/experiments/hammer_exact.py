"""Closed-loop exact cache hits against a running server, for a profiler to sample (py-spy record -p PID).

    rag-serve --index /tmp/rerank/cranfield --port 50777 &
    python bench/experiments/hammer_exact.py --target 127.0.0.1:50777 --queries ../shared/data/cranfield/queries.jsonl \
        --seconds 25 &
    py-spy record -p $(pgrep -f "port 50777") -d 15 -r 500 -f raw -o /tmp/exact.txt --nonblocking
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import grpc

from rag_service.bench.data import load_queries
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--distinct", type=int, default=100)
    args = parser.parse_args()
    queries = list(load_queries(args.queries).values())[: args.distinct]
    stub = pb_grpc.RetrieverStub(grpc.insecure_channel(args.target))
    for q in queries:  # every later call is an exact hit
        stub.Search(pb.SearchRequest(query=q))
    end, n = time.monotonic() + args.seconds, 0
    while time.monotonic() < end:
        stub.Search(pb.SearchRequest(query=queries[n % len(queries)]))
        n += 1
    print(f"{n} calls in {args.seconds:.0f} s")


if __name__ == "__main__":
    main()
