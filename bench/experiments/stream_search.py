"""StreamSearch against plain Search: time from the final draft to the answer, with drafts typed out word by word.

    python bench/experiments/stream_search.py --index /tmp/idx/scifact --queries ../shared/data/scifact/queries.jsonl

Starts `rag-serve` on the index (or uses --target), then for each sampled query, alternately: a plain Search, and a
StreamSearch that sends the query's prefixes word by word (--word-ms apart, like a typist), waits --gap-ms (the user
reading over the question before pressing enter) and sends the final draft. Both with CACHE_BYPASS, so no answer comes
from an earlier query's cache entry: the stream's gain is its own speculative work only. Reports the client-side time
from sending the final draft to its answer against the plain Search's round trip (median, p90, p99), per gap.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from rag_service.bench.data import load_queries
from rag_service.bench.serve import SAFE_PATH
from rag_service.client import RetrieverClient
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


def start_server(index: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "rag_service.cli.serve", "--index", str(index), "--port", "0",
                                "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **SAFE_PATH, "HF_HUB_OFFLINE": "1"})
    for line in process.stdout:
        found = re.search(r"SERVING .* on (\S+):(\d+)", line)
        if found:
            return process, f"{found.group(1)}:{found.group(2)}"
    raise RuntimeError(f"rag-serve exited with {process.wait()} before serving")


def stream_once(stub, query: str, word_s: float, gap_s: float, top_k: int) -> tuple[float, pb.SearchResponse]:
    sent = {}  # the request iterator runs on gRPC's thread: it records when the final draft left

    def drafts():
        words = query.split()
        for n in range(1, len(words) + 1):
            yield pb.QueryDraft(request=pb.SearchRequest(query=" ".join(words[:n]), top_k=top_k,
                                                         cache=pb.CACHE_BYPASS))
            time.sleep(word_s)
        time.sleep(gap_s)
        sent["final"] = time.perf_counter()
        yield pb.QueryDraft(request=pb.SearchRequest(query=query, top_k=top_k, cache=pb.CACHE_BYPASS), final=True)

    replies = stub.StreamSearch(drafts(), timeout=120)
    reply = next(replies)
    answered = time.perf_counter()
    for _ in replies:  # the drafts end after the final one, so the server closes the stream
        pass
    return (answered - sent["final"]) * 1e3, reply


def row(name: str, ms: list[float]) -> str:
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return f"| {name} | {len(ms)} | {p50:.2f} | {p90:.2f} | {p99:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path)
    parser.add_argument("--target", help="a running server instead of starting one on --index")
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--word-ms", type=float, default=150.0)
    parser.add_argument("--gaps-ms", default="0,150")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.target and not args.index:
        parser.error("give --index or --target")

    queries = list(load_queries(args.queries).values())
    random.Random(args.seed).shuffle(queries)
    queries = queries[: args.n]
    process = None
    target = args.target
    if target is None:
        process, target = start_server(args.index)
    try:
        with RetrieverClient(target, timeout=60) as client:
            client.wait_until_serving(300)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.RetrieverStub(channel)
            for q in queries[:5]:  # warm-up
                stub.Search(pb.SearchRequest(query=q, cache=pb.CACHE_BYPASS), timeout=30)
            print("| path | n | median ms | p90 ms | p99 ms |")
            print("| --- | --- | --- | --- | --- |")
            mismatches = 0
            for gap in [float(g) for g in args.gaps_ms.split(",")]:
                plain, streamed, served = [], [], {}
                for q in queries:
                    t0 = time.perf_counter()
                    reference = stub.Search(pb.SearchRequest(query=q, top_k=args.top_k, cache=pb.CACHE_BYPASS),
                                            timeout=30)
                    plain.append((time.perf_counter() - t0) * 1e3)
                    ms, reply = stream_once(stub, q, args.word_ms / 1e3, gap / 1e3, args.top_k)
                    streamed.append(ms)
                    name = pb.ServedFrom.Name(reply.served_from)
                    served[name] = served.get(name, 0) + 1
                    if [c.chunk_id for c in reply.contexts] != [c.chunk_id for c in reference.contexts]:
                        mismatches += 1
                print(row(f"plain Search (gap {gap:.0f} ms run)", plain))
                print(row(f"StreamSearch final -> answer, gap {gap:.0f} ms", streamed))
                print(f"|  served_from: {served} | | | | |", flush=True)
            print(f"answers that differ from the plain Search: {mismatches}")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
