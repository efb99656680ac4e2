"""What the client's work between two Search calls costs the next call: the cache-bypassed miss path of one
`rag-serve` (as `rag-bench compare` asks it: top 20, a 30 s deadline, one synchronous channel) after each of several
kinds of work in the client process, interleaved query by query.

    python bench/experiments/interleave_cost.py --index /tmp/lead/sf --data ../shared/data/scifact --rounds 3

`rag-bench compare` times its systems in turn, query by query, and rag-service's server time is longer there than
when it is asked alone. The kinds of work tell the causes apart:

    back-to-back  nothing between the calls
    sleep         the client sleeps --gap-ms: every thread of both processes idles that long (vCPU halts, wake-ups)
    spin          the client computes --gap-ms on one core without touching memory (the other core idles)
    memory        the client reads and writes a 256 MB buffer for --gap-ms (the caches the server had are gone)
    same-parts    the same-parts peer of `rag-bench compare` answers one query (what compare does between calls)

Each round gives every condition every query once, the conditions rotated query by query. Printed per condition:
the client's and the server's (`server_time_us`) p50 / p90 / p99 in ms, and the ratio of the server's p50 and p99 to
back-to-back.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

CONDITIONS = ("back-to-back", "sleep", "spin", "memory", "same-parts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder: queries.jsonl and qrels/<split>.tsv")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap-ms", type=float, default=6.0, help="length of the sleep, spin and memory work")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--stages", action="store_true",
                        help="ask with debug and print each condition's stage times (p50 / p99 µs)")
    parser.add_argument("--torch", action="store_true",
                        help="first encode the queries with the sentence-transformers model, as rag-bench compare does")
    args = parser.parse_args()

    import grpc
    from threadpoolctl import threadpool_limits

    from rag_service.bench import index_peers
    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.bench.serve import ServerProcess
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    queries = load_queries(args.data / "queries.jsonl")
    judged = load_qrels(args.data / "qrels" / f"{args.split}.tsv")
    texts = [queries[q] for q in judged if q in queries]
    if args.torch:
        import torch

        from rag_service.bench import peers as peers_mod

        torch.set_num_threads(1)
        peers_mod.sentence_transformer().encode(texts, batch_size=64, normalize_embeddings=True)
    peer = index_peers.SamePartsPeer(index_peers.read_index_chunks(args.index),
                                     index_peers.index_encoder(args.index, threads=1), n_chunks=args.top_k)
    buffer = np.ones(256 << 20, np.uint8)
    gap = args.gap_ms / 1e3
    requests = [pb.SearchRequest(query=t, top_k=args.top_k, cache=pb.CACHE_BYPASS, debug=args.stages) for t in texts]

    def work(condition: str, i: int) -> None:
        if condition == "sleep":
            time.sleep(gap)
        elif condition == "spin":
            end = time.perf_counter() + gap
            x = 0
            while time.perf_counter() < end:
                x += 1
        elif condition == "memory":
            end = time.perf_counter() + gap
            step = 16 << 20
            offset = 0
            while time.perf_counter() < end:
                buffer[offset:offset + step] += 1
                offset = (offset + step) % len(buffer)
        elif condition == "same-parts":
            peer.search(texts[(i + 1) % len(texts)], 10)

    client: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    server: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    stages: dict[str, dict[str, list[int]]] = {c: {} for c in CONDITIONS}
    with threadpool_limits(limits=1, user_api="blas"), \
            ServerProcess(args.index, extra_env={"OMP_NUM_THREADS": "1"}) as process, \
            grpc.insecure_channel(process.target) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for request in requests[:20]:  # warm-up
            stub.Search(request, timeout=30)
            peer.search(request.query, 10)
        for r in range(args.rounds):
            for i, request in enumerate(requests):
                condition = CONDITIONS[(i + r) % len(CONDITIONS)]
                stub.Search(requests[(i + 7) % len(requests)], timeout=30)  # the call before the gap
                work(condition, i)
                started = time.perf_counter()
                reply = stub.Search(request, timeout=30)
                client[condition].append((time.perf_counter() - started) * 1e3)
                server[condition].append(reply.server_time_us / 1e3)
                times = dict(reply.stage_time_us)
                times["(outside the stages)"] = reply.server_time_us - sum(times.values())
                for name, us in times.items():
                    stages[condition].setdefault(name, []).append(us)

    def cells(values: list[float]) -> str:
        p = np.percentile(values, [50, 90, 99])
        return f"{p[0]:6.2f} {p[1]:6.2f} {p[2]:6.2f}"

    base = np.percentile(server["back-to-back"], [50, 99])
    print(f"{len(texts)} queries x {args.rounds} rounds, gap {args.gap_ms:g} ms; ms p50 / p90 / p99")
    print(f"{'condition':14} {'client':>20}   {'server':>20}   server p50 x  p99 x")
    for c in CONDITIONS:
        p = np.percentile(server[c], [50, 99])
        print(f"{c:14} {cells(client[c]):>20}   {cells(server[c]):>20}   {p[0] / base[0]:11.2f} {p[1] / base[1]:6.2f}")
    if args.stages:
        names = sorted(stages["back-to-back"], key=lambda n: -float(np.median(stages["back-to-back"][n])))
        print("stage µs p50 / p99: " + " | ".join(CONDITIONS))
        for name in names:
            row = [" ".join(f"{v:6.0f}" for v in np.percentile(stages[c].get(name, [0]), [50, 99]))
                   for c in CONDITIONS]
            print(f"{name:22} " + " | ".join(row))


if __name__ == "__main__":
    main()
