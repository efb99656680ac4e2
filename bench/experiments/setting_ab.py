"""One build, several settings: the miss path in closed loop at 1, 2, 4 ... clients, servers alternating.

    python bench/experiments/setting_ab.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --qrels ../shared/data/scifact/qrels/test.tsv --setting idle-cores: \
        --setting one-thread:RAG_ENCODER__IDLE_THREADS=1 --clients 1,2,4 --seconds 8 --rounds 2

Starts one `rag-serve` per `--setting NAME:KEY=VALUE[,KEY=VALUE...]` (environment variables, i.e. settings; `NAME:`
alone is the defaults) on the same index, then, for each client count and round, runs the same closed loop against
each server in turn (the order rotating by round, so drift on a shared machine hits them alike): N callers on a
channel each, every call CACHE_BYPASS (the whole pipeline), each sending its next query when the last returns.
Prints answers per second, p50 and p99 per setting and client count, with each ratio to the first setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
from server_loop import closed_loop  # this folder's script: the same closed loop as the server-loop runs

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.serve import ServerProcess
from rag_service.pb.rag.v1 import retrieval_pb2 as pb


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = text.partition(":")
    if not name or not sep:
        raise SystemExit(f"--setting {text!r}: want NAME:KEY=VALUE[,KEY=VALUE...] (or NAME: for the defaults)")
    env = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not key or not eq:
            raise SystemExit(f"--setting {text!r}: {item!r} is not KEY=VALUE")
        env[key] = value
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, help="only the queries judged here (e.g. the test split)")
    parser.add_argument("--setting", action="append", required=True, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=8.0, help="per setting, client count and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    queries = load_queries(args.queries)
    if args.qrels:
        judged = load_qrels(args.qrels)
        queries = {q: t for q, t in queries.items() if q in judged}
    requests = [pb.SearchRequest(query=q, cache=pb.CACHE_BYPASS) for q in queries.values()]
    settings = dict(parse_setting(s) for s in args.setting)
    clients = [int(c) for c in args.clients.split(",")]
    # Closed loop never offers more than `clients` requests: a queue that holds them all measures the design, not
    # the shedding (admission is measured on its own in overload.py).
    servers = {name: ServerProcess(args.index, extra_env={"RAG_MAX_QUEUED": "64", **env})
               for name, env in settings.items()}
    names = list(settings)
    latencies: dict[tuple[str, int], list[float]] = {(n, c): [] for n in names for c in clients}
    rates: dict[tuple[str, int], list[float]] = {(n, c): [] for n in names for c in clients}
    try:
        for server in servers.values():
            server.__enter__()
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for c in clients:
                for name in order:
                    lat, rate = asyncio.run(closed_loop(servers[name].target, requests, c, args.seconds))
                    latencies[(name, c)] += lat
                    rates[(name, c)].append(rate)
                    print(f"round {r} {name:<14} {c} clients: {rate:6.1f}/s p50 {np.percentile(lat, 50) * 1e3:.2f} ms",
                          flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    print(f"\n{'setting':<14} {'clients':>7} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8} {'rate x':>7} {'p50 x':>6} "
          f"{'p99 x':>6}")
    for c in clients:
        base = np.percentile(np.asarray(latencies[(names[0], c)]) * 1e3, [50, 99])
        base_rate = float(np.mean(rates[(names[0], c)]))
        for name in names:
            p50, p99 = np.percentile(np.asarray(latencies[(name, c)]) * 1e3, [50, 99])
            rate = float(np.mean(rates[(name, c)]))
            rows.append({"setting": name, "clients": c, "per_s": rate, "p50_ms": p50, "p99_ms": p99})
            print(f"{name:<14} {c:7d} {rate:7.1f} {p50:8.2f} {p99:8.2f} {rate / base_rate:7.2f} {p50 / base[0]:6.2f} "
                  f"{p99 / base[1]:6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
