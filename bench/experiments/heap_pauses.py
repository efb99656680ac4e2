"""The collector's pauses in a server whose cache fills: the tail of a stream of distinct questions, cache on.

    python bench/experiments/heap_pauses.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --corpus ../shared/data/scifact/corpus.jsonl --server before=/tmp/lead/x/prev-serve --server after=rag-serve

Benchmarks with CACHE_BYPASS never keep an answer, so the heap stays as the load left it. A real server keeps every
miss's answer for minutes, and each entry's objects are long-lived: the collector walks them in its passes over the
young generations and in its full passes, holding the GIL while a request waits. Here one client asks questions no
earlier call asked (the queries file, then the corpus titles: thousands of distinct ones), with the cache in its
default mode, in rounds that alternate between the `--server NAME=RAG_SERVE` builds (each its own process, cache
and index; every build gets the same questions in the same order). Printed per build: the client's and the server's
(`server_time_us`) p50 / p99 / p99.9 / max, and the calls over 20 ms. A collector pause lands in the server time
of the call that was running when it started. `--sentences` adds the corpus texts' sentences to the questions, to
fill the cache further (its semantic look-up scans every entry of a miss's group).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_queries
from rag_service.bench.serve import serve_builds
from rag_service.pb.rag.v1 import retrieval_pb2 as pb


def questions(queries: Path, corpus: Path, sentences: bool) -> list[str]:
    """The queries, then the corpus titles, then (`sentences`) the corpus texts' sentences: distinct strings."""
    seen: dict[str, None] = dict.fromkeys(load_queries(queries).values())
    with corpus.open() as lines:
        docs = [json.loads(line) for line in lines]
    for doc in docs:
        seen.setdefault((doc.get("title") or doc.get("text", "")[:120]).strip() or doc["_id"])
    if sentences:
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", doc.get("text", "")):
                if 20 <= len(sentence) <= 300 and sentence.isprintable():  # the server refuses control characters
                    seen.setdefault(sentence)
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="its titles are asked after the queries")
    parser.add_argument("--server", action="append", required=True, help="NAME=path to a rag-serve executable")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=500)
    parser.add_argument("--sentences", action="store_true",
                        help="ask the corpus texts' sentences too (tens of thousands: a cache filled further)")
    args = parser.parse_args()
    servers = dict(s.split("=", 1) for s in args.server)
    asked = questions(args.queries, args.corpus, args.sentences)
    if len(asked) < args.rounds * args.per_round:
        raise SystemExit(f"{len(asked)} distinct questions, fewer than {args.rounds} x {args.per_round}")
    with serve_builds(args.index, servers) as stubs:
        client: dict[str, list[float]] = {n: [] for n in stubs}
        served: dict[str, list[float]] = {n: [] for n in stubs}
        names = list(stubs)
        # This client's own objects stay out of its collector's passes (as `rag-bench compare` does): its pauses
        # would land in the client's times.
        gc.collect()
        gc.freeze()
        for r in range(args.rounds):
            chosen = asked[r * args.per_round:(r + 1) * args.per_round]
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                for query in chosen:
                    started = time.perf_counter()
                    reply = stubs[name].Search(pb.SearchRequest(query=query, top_k=10), timeout=30)
                    client[name].append((time.perf_counter() - started) * 1e3)
                    served[name].append(reply.server_time_us / 1e3)
        gc.unfreeze()
        print(f"{args.rounds} rounds of {args.per_round} distinct questions, cache on (default mode); ms; the last "
              "column: the server's p50 per round, as the cache fills")
        print(f"{'server':<10} {'':<7} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'>20 ms':>7}  per round")
        for name in names:
            for what, times in (("client", client[name]), ("server", served[name])):
                t = np.array(times)
                rounds = "" if what == "client" else ", ".join(
                    f"{np.median(t[r * args.per_round:(r + 1) * args.per_round]):.2f}" for r in range(args.rounds))
                print(f"{name:<10} {what:<7} {np.median(t):7.2f} {np.percentile(t, 99):7.2f} "
                      f"{np.percentile(t, 99.9):7.2f} {t.max():7.2f} {int((t > 20).sum()):7d}  {rounds}")


if __name__ == "__main__":
    sys.exit(main())
