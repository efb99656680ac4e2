"""Closed-loop Search calls against a running server, for a profiler to sample: exact cache hits (the default) or
misses through the whole pipeline (`--miss`, CACHE_BYPASS), from `--clients` callers.

    rag-serve --index /tmp/lead/scifact_full --port 50777 &
    python bench/experiments/hammer.py --target 127.0.0.1:50777 --queries ../shared/data/scifact/queries.jsonl \
        --miss --clients 1 --seconds 25 &
    py-spy record -p $(pgrep -f "port 50777") -d 15 -r 500 -f flamegraph -o bench/figures/issue15-miss-1-client.svg \
        --nonblocking
"""

from __future__ import annotations

import argparse
import threading
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
    parser.add_argument("--distinct", type=int, default=100, help="queries cycled through (hits: each asked first)")
    parser.add_argument("--miss", action="store_true", help="every call CACHE_BYPASS: the whole pipeline")
    parser.add_argument("--clients", type=int, default=1, help="concurrent callers, one channel each")
    args = parser.parse_args()
    queries = list(load_queries(args.queries).values())[: args.distinct]
    cache = pb.CACHE_BYPASS if args.miss else pb.CACHE_DEFAULT
    requests = [pb.SearchRequest(query=q, cache=cache) for q in queries]
    if not args.miss:
        stub = pb_grpc.RetrieverStub(grpc.insecure_channel(args.target))
        for request in requests:  # every later call is an exact hit
            stub.Search(request)
    end = time.monotonic() + args.seconds
    counts = [0] * args.clients
    refused = [0] * args.clients

    def caller(c: int) -> None:
        stub = pb_grpc.RetrieverStub(grpc.insecure_channel(args.target))
        n = c
        while time.monotonic() < end:
            try:
                stub.Search(requests[n % len(requests)], timeout=30)
                counts[c] += 1
            except grpc.RpcError as error:  # past saturation the server sheds; the caller asks again at once
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused[c] += 1
            n += args.clients

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"{sum(counts)} calls answered, {sum(refused)} refused, in {args.seconds:.0f} s from {args.clients} callers")


if __name__ == "__main__":
    main()
