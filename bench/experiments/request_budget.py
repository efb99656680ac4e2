"""Where each microsecond of a Search goes, client to client: the server's stages, the server's time outside them,
and the call's time outside the server, beside an empty call.

    python bench/experiments/request_budget.py --index /tmp/lead/scifact_full \
        --queries ../shared/data/scifact/queries.jsonl --qrels ../shared/data/scifact/qrels/test.tsv --rounds 3

Starts `rag-serve` on the index (defaults: the full pipeline) and sends, from one client, every judged query with
`profile` (the stage timings, and nothing else of `debug`: a plain request's work) and `CACHE_BYPASS`, so each is a
miss through every stage; between searches, a health Check (the empty
call). Each reply carries `server_time_us` (handler entry to reply built) and `stage_time_us` (each stage the
pipeline timed). Per request:
- each stage's µs;
- "server outside the stages": server_time_us minus the sum of the stages (the RPC wrapper, admission, the cache
  lookup, the hand-off to a pipeline thread not counted as `queue`, the reply);
- "outside the server": the client's wall time minus server_time_us (serialisation, HTTP/2, the event loop, the
  interceptors, the client stub), to be compared with the empty call's whole time.
`--cache exact` asks with the cache on (CACHE_EXACT_ONLY) instead of bypassing it: each round appends another run of
zero-width spaces to every query (another exact key, the same tokens), so every search is still a miss, now with the
cache's exact look-up and the store of its answer (its `cache` stage; the store is not a stage of the reply).
`--cache semantic` times semantic hits: each round first asks every query as it is, untimed, with the cache on and
the timed requests' options (its answer is stored, or found there), then, timed, each query with a run of zero-width
spaces appended (another run per round: a new exact key, the same tokens, a vector close to the query's) with the
cache on; only the replies served from the semantic cache count (the rest are printed as a number). "server minus
encode" is each request's server time minus its own `encode` stage: for a semantic hit, what the look-up, its guard
and the reply add to the encode, which the issue holds to 0.5 ms (a median of the misses' encode is other requests'
and moves by ~0.1 ms between runs, so each hit is held against its own).
`--server NAME=RAG_SERVE ...` (repeatable) runs the same for several rag-serve executables (an A/B of two builds),
rounds alternating between them (`--by call`: every round on all of them, request by request, their order
alternating, so that the machine's drift during a round weighs on each alike); `NAME=` is this environment's, and
`--server-env NAME:KEY=VALUE` gives one of them a setting of its own (an A/B of two settings). `--debug-server NAME`:
that server is asked with `debug` instead (its per-context scores and explanations built too), e.g. two servers of
this environment, one of them asked with debug, for what debug's own work adds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.serve import ServerProcess
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


class Client:
    """One server's channel and stubs, for a round of `requests` (each with `suffix` appended to its query)."""

    def __init__(self, target: str, requests: list[pb.SearchRequest], suffix: str = "") -> None:
        self.bases = [r.query for r in requests]
        self.requests = [pb.SearchRequest(query=r.query + suffix, debug=r.debug, profile=r.profile, cache=r.cache)
                         for r in requests] if suffix else requests
        self.channel = grpc.insecure_channel(target)
        self.search = pb_grpc.RetrieverStub(self.channel).Search
        self.check = health_pb2_grpc.HealthStub(self.channel).Check
        self.empty = health_pb2.HealthCheckRequest()

    def warm(self, semantic: bool) -> None:
        """Warms the channel and the pipeline (bypassing the cache: no key is used up); `semantic`: every query is
        then asked as it is, untimed, so that its variant can be a semantic hit."""
        for request in self.requests[:20]:
            self.search(pb.SearchRequest(query=request.query, debug=request.debug, profile=request.profile,
                                         cache=pb.CACHE_BYPASS), timeout=30)
        if semantic:
            # With the timed requests' options (`debug`): the cache keeps each set of options' answers apart.
            for base, request in zip(self.bases, self.requests, strict=True):
                self.search(pb.SearchRequest(query=base, debug=request.debug, profile=request.profile,
                                             cache=request.cache), timeout=30)

    def one(self, i: int, into: dict[str, list[float]], semantic: bool) -> None:
        """The i-th request, after an empty call; its samples added to `into` (`semantic`: only a semantic hit's)."""
        started = time.perf_counter_ns()
        self.check(self.empty, timeout=10)
        empty_us = (time.perf_counter_ns() - started) / 1e3
        started = time.perf_counter_ns()
        reply = self.search(self.requests[i], timeout=30)
        client_us = (time.perf_counter_ns() - started) / 1e3
        if semantic and reply.served_from != pb.SERVED_FROM_SEMANTIC:
            into["not semantic hits"].append(client_us)
            return
        stages = dict(reply.stage_time_us)
        into["empty call"].append(empty_us)
        into["client total"].append(client_us)
        into["server total"].append(reply.server_time_us)
        into["outside the server"].append(client_us - reply.server_time_us)
        into["server outside the stages"].append(reply.server_time_us - sum(stages.values()))
        into["server minus encode"].append(reply.server_time_us - stages.get("encode", 0))
        for name, us in stages.items():
            into.setdefault(f"stage {name}", []).append(us)

    def close(self) -> None:
        self.channel.close()


def run_round(target: str, requests: list[pb.SearchRequest], into: dict[str, list[float]], suffix: str = "",
              semantic: bool = False) -> None:
    """One pass over `requests` on one server, the samples added to `into`. `semantic`: every query is asked as it
    is first, untimed, and only the timed replies served from the semantic cache count."""
    client = Client(target, requests, suffix)
    try:
        client.warm(semantic)
        for i in range(len(client.requests)):
            client.one(i, into, semantic)
    finally:
        client.close()


def run_round_by_call(targets: dict[str, str], requests: dict[str, list[pb.SearchRequest]],
                      into: dict[str, dict[str, list[float]]], suffix: str = "", semantic: bool = False) -> None:
    """One pass over each server's `requests` (the same queries) on every server at once, request by request, the
    servers' order alternating from one request to the next: a drift of the machine over the pass then weighs on
    each server alike."""
    clients = {name: Client(target, requests[name], suffix) for name, target in targets.items()}
    try:
        for client in clients.values():
            client.warm(semantic)
        names = list(clients)
        for i in range(len(next(iter(requests.values())))):
            for name in (names if i % 2 == 0 else names[::-1]):
                clients[name].one(i, into[name], semantic)
    finally:
        for client in clients.values():
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, help="only the queries judged here (e.g. the test split)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", action="append", default=[],
                        help="NAME=PATH of a rag-serve executable; default: this environment's")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="an environment variable for server NAME only (a setting, e.g. "
                        "RAG_ENCODER__IDLE_THREADS=1): an A/B of two settings of one build")
    parser.add_argument("--cache", choices=["bypass", "exact", "semantic"], default="bypass",
                        help="exact: misses with the cache on (a new exact key per round), not bypassing it; "
                             "semantic: semantic hits (each query asked first, then a variant of it, timed)")
    parser.add_argument("--by", choices=["round", "call"], default="round",
                        help="with several servers: alternate them round by round (default), or request by request "
                             "within each round (call), which spreads the machine's drift over all of them alike")
    parser.add_argument("--debug-server", action="append", default=[], metavar="NAME",
                        help="ask server NAME with debug instead of profile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    queries = load_queries(args.queries)
    if args.qrels:
        judged = load_qrels(args.qrels)
        queries = {q: t for q, t in queries.items() if q in judged}
    cache = {"exact": pb.CACHE_EXACT_ONLY, "semantic": pb.CACHE_DEFAULT}.get(args.cache, pb.CACHE_BYPASS)
    servers = dict(s.split("=", 1) for s in args.server) or {"rag-serve": ""}
    for name in args.debug_server:
        if name not in servers:
            parser.error(f"--debug-server {name!r}: not one of {', '.join(servers)}")
    requests = {name: [pb.SearchRequest(query=t, debug=name in args.debug_server,
                                        profile=name not in args.debug_server, cache=cache) for t in queries.values()]
                for name in servers}

    samples: dict[str, dict[str, list[float]]] = {name: {"client total": [], "empty call": [], "server total": [],
                                                         "outside the server": [], "server outside the stages": [],
                                                         "server minus encode": [], "not semantic hits": []}
                                                  for name in servers}
    env: dict[str, dict[str, str]] = {name: {} for name in servers}
    for item in args.server_env:
        name, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        if name not in env or not key:
            parser.error(f"--server-env {item!r}: want NAME:KEY=VALUE with NAME one of {', '.join(servers)}")
        env[name][key] = value
    processes = {name: ServerProcess(args.index, executable=exe or None, extra_env=env[name])
                 for name, exe in servers.items()}
    try:
        for process in processes.values():
            process.__enter__()
        names = list(servers)
        for r in range(args.rounds):
            # A fresh key per round keeps every search off the exact cache: a miss, or (semantic) a semantic hit.
            suffix = "\u200b" * (r + 1) if args.cache != "bypass" else ""
            if args.by == "call":
                run_round_by_call({name: processes[name].target for name in names}, requests, samples, suffix,
                                  semantic=args.cache == "semantic")
                continue
            for name in names[r % len(names):] + names[: r % len(names)]:
                run_round(processes[name].target, requests[name], samples[name], suffix,
                          semantic=args.cache == "semantic")
    finally:
        for process in processes.values():
            process.stop()

    report = {}
    for name, rows in samples.items():
        missed = len(rows.pop("not semantic hits"))
        print(f"\n{name}: {len(rows['client total'])} searches" + (f" ({missed} variants were not semantic hits)"
                                                                     if args.cache == "semantic" else ""))
        print(f"{'part':<28} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9}")
        report[name] = {}
        order = ["client total", "outside the server", "empty call", "server total", "server minus encode",
                 "server outside the stages"]
        order += sorted((k for k in rows if k.startswith("stage ")), key=lambda k: -float(np.median(rows[k])))
        for key in order:
            if not rows[key]:
                continue
            values = np.asarray(rows[key], dtype=np.float64)
            p50, p99 = np.percentile(values, [50, 99])
            report[name][key] = {"p50_us": p50, "p99_us": p99, "mean_us": float(values.mean())}
            print(f"{key:<28} {p50:9.0f} {p99:9.0f} {values.mean():9.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
