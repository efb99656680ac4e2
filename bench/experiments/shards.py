"""Sharded serving on SciFact: equivalence of a 3-shard router with one index, and the router's latency over 1, 2 and
4 shards against one server (issue 8, bench/README.md "Issue 8: shards").

    nice -n 10 python bench/experiments/shards.py --index /tmp/lead/scifact_full --work /tmp/shards \\
        --data ../shared/data/scifact --json /tmp/shards/shards.json

1. Splits the index into 1, 2, 3 and 4 shards (`rag-index shard`, the split `rag-index build --shards` does after its
   build) under WORK/scifact-<n>.
2. Equivalence: one rag-serve of the index and a router over 3 shard rag-serve processes; every SciFact test query
   under each setting (rerank on, rerank off, a context-filter setting), CACHE_BYPASS; chunk ids, order and scores
   (within 1e-5) compared.
3. Latency, for the router over 1, 2 and 4 shards (every process on this machine) against one server started beside
   it: a paired closed loop (one request at a time, each query to both back to back, so both see the same load: the
   extra hop's cost without queueing), then `rag-bench latency` at fixed rates against each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np

from rag_service.bench.data import load_queries
from rag_service.bench.serve import SAFE_PATH, stop_processes
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

SETTINGS = {
    "rerank on (defaults)": {},
    "rerank off": {"rerank": False},
    "context filter (mmr 0.8, dedup 0.9, 1024 tokens)": {"mmr_lambda": 0.8, "dedup_threshold": 0.9,
                                                         "max_context_tokens": 1024},
}


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **SAFE_PATH, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as err:  # a file: a pipe nobody reads would stall the server
        return subprocess.Popen([sys.executable, "-m", "rag_service.cli.serve", "--port", "0", "--log-level",
                                 "WARNING", *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env)


def address(proc: subprocess.Popen, log: Path) -> str:
    line = proc.stdout.readline()  # printed once the index is loaded and warm
    match = re.search(r"SERVING .* on ([\d.]+:\d+)", line)
    if match is None:
        raise RuntimeError(f"rag-serve did not start: {line!r}\n{log.read_text()[-2000:]}")
    return match.group(1)


@contextmanager
def processes(specs: list[tuple[list[str], Path]]):
    """rag-serve processes started together; yields their addresses once each prints SERVING."""
    procs = [spawn(a, log) for a, log in specs]
    try:
        yield [address(p, log) for p, (_, log) in zip(procs, specs)]
    finally:
        stop_processes(procs)


@contextmanager
def serve(args: list[str], log: Path):
    with processes([(args, log)]) as (addr,):
        yield addr


@contextmanager
def sharded(work: Path, n: int, logs: Path):
    """n shard processes (loading in parallel), then a router; yields the router's address."""
    shards = [(["--index", str(work / f"scifact-{n}" / f"shard-{i}")], logs / f"shard{n}-{i}.log") for i in range(n)]
    with processes(shards) as addresses, serve(["--index", str(work / f"scifact-{n}" / "router"), "--shards",
                                                ",".join(addresses)], logs / f"router{n}.log") as router:
        yield router


def split(index: Path, work: Path, counts: list[int]) -> dict[int, float]:
    seconds = {}
    for n in counts:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rag_service.cli.index", "shard", str(index), str(work / f"scifact-{n}"),
                        "--shards", str(n), "--keep", "1"], check=True, env={**os.environ, **SAFE_PATH},
                       stdout=subprocess.DEVNULL)
        seconds[n] = round(time.perf_counter() - t0, 2)
    return seconds


def test_queries(data: Path) -> list[str]:
    queries = load_queries(data / "queries.jsonl")
    ids = []
    with open(data / "qrels" / "test.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            qid = line.split("\t")[0]
            if qid not in ids:
                ids.append(qid)
    return [queries[q] for q in ids]


def equivalence(single: str, router: str, queries: list[str]) -> dict:
    out = {}
    with grpc.insecure_channel(single) as cs, grpc.insecure_channel(router) as cr:
        a_stub, b_stub = pb_grpc.RetrieverStub(cs), pb_grpc.RetrieverStub(cr)
        for name, settings in SETTINGS.items():
            same = differ = partial = contexts = 0
            max_diff = 0.0
            examples = []
            for query in queries:
                request = pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS, **settings)
                a = a_stub.Search(request, timeout=60)
                b = b_stub.Search(request, timeout=60)
                partial += b.partial
                ids_a, ids_b = [c.chunk_id for c in a.contexts], [c.chunk_id for c in b.contexts]
                diff = float(np.abs(np.subtract([c.score for c in a.contexts],
                                                [c.score for c in b.contexts])).max(initial=0.0)) \
                    if ids_a == ids_b else float("inf")
                if ids_a == ids_b and diff <= 1e-5:
                    same += 1
                    max_diff = max(max_diff, diff)
                    contexts += len(ids_a)
                else:
                    differ += 1
                    if len(examples) < 3:
                        examples.append({"query": query, "single": ids_a, "router": ids_b})
            out[name] = {"queries": len(queries), "identical": same, "different": differ, "partial": partial,
                         "contexts_compared": contexts, "max_abs_score_diff": max_diff, "examples": examples}
            print(f"  {name}: {same}/{len(queries)} identical (max |score diff| {max_diff:.2e}), {differ} differ",
                  flush=True)
    return out


def _pct(values: list[float]) -> dict:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


def paired(single: str, router: str, queries: list[str], n: int, warmup: int, seed: int = 0) -> dict:
    """One request at a time, each query sent to the single server and to the router back to back (in alternating
    order), so both see the same machine load: client latency, server time and stages (p50/p99 ms), and the
    per-query difference router - single."""
    rng = random.Random(seed)
    order = [rng.choice(queries) for _ in range(warmup + n)]
    rows = {"single": {"client": [], "server": [], "stages": {}}, "router": {"client": [], "server": [], "stages": {}}}
    diff = []
    with grpc.insecure_channel(single) as cs, grpc.insecure_channel(router) as cr:
        stubs = {"single": pb_grpc.RetrieverStub(cs).Search, "router": pb_grpc.RetrieverStub(cr).Search}
        for i, query in enumerate(order):
            elapsed = {}
            for name in (("single", "router") if i % 2 == 0 else ("router", "single")):
                t0 = time.perf_counter()
                reply = stubs[name](pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS, debug=True), timeout=30)
                elapsed[name] = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    row = rows[name]
                    row["client"].append(elapsed[name])
                    row["server"].append(reply.server_time_us / 1e3)
                    for stage, us in reply.stage_time_us.items():
                        row["stages"].setdefault(stage, []).append(us / 1e3)
            if i >= warmup:
                diff.append(elapsed["router"] - elapsed["single"])
    out = {name: {"n": n, "client_ms": _pct(r["client"]), "server_ms": _pct(r["server"]),
                  "stages_ms": {k: _pct(v) for k, v in sorted(r["stages"].items())}} for name, r in rows.items()}
    out["router_minus_single_ms"] = _pct(diff)
    return out


def rag_bench_latency(target: str, queries_file: Path, qps: str, duration: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "rag_service.cli.bench", "latency", "--target", target, "--queries", str(queries_file),
           "--qps", qps, "--duration", str(duration), "--warmup", "3", "--json", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, **SAFE_PATH}, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    rows = []
    for row in report["rates"]:
        search = row["search"]
        rows.append({"offered_qps": row["offered_qps"], "achieved_qps": search["achieved_qps"],
                     "errors": search["errors"], "behind_schedule": row["behind_schedule"],
                     "floor_ms": {p: row["floor"]["latency_ms"][p] for p in ("p50", "p99")} if "floor" in row else None,
                     "search_ms": {p: search["latency_ms"][p] for p in ("p50", "p90", "p99")},
                     "server_ms": {p: search.get("server_time_ms", {}).get(p) for p in ("p50", "p99")}})
    return {"command": " ".join(cmd[1:]), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="The unsharded index (root or version directory).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shards"))
    parser.add_argument("--data", type=Path, required=True, help="SciFact in BEIR layout.")
    parser.add_argument("--equivalence-shards", type=int, default=3)
    parser.add_argument("--latency-shards", default="1,2,4")
    parser.add_argument("--closed-loop", type=int, default=300, help="Requests per configuration (0: skip).")
    parser.add_argument("--qps", default="10", help="rag-bench latency rates ('' skips it).")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--skip-equivalence", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work, logs = args.work, args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    latency_counts = [int(x) for x in args.latency_shards.split(",") if x]
    counts = sorted({args.equivalence_shards, *latency_counts})
    report: dict = {"index": str(args.index), "machine": "2-core shared VM, no GPU", "date": time.strftime("%Y-%m-%d")}
    print(f"splitting {args.index} into {counts} shards", flush=True)
    report["split_seconds"] = split(args.index, work, counts)
    queries = test_queries(args.data)
    all_queries = list(load_queries(args.data / "queries.jsonl").values())

    if not args.skip_equivalence:
        with serve(["--index", str(args.index)], logs / "single.log") as single:
            print(f"equivalence: router over {args.equivalence_shards} shards vs one index, {len(queries)} test "
                  "queries", flush=True)
            with sharded(work, args.equivalence_shards, logs) as router:
                report["equivalence"] = equivalence(single, router, queries)
    report["latency"] = {}
    for n in latency_counts:
        # Fresh processes for every pair: token counts are memoised per chunk, so a server that has answered more
        # queries is faster; single and router start equally cold and get the same queries.
        print(f"latency: router over {n} shard(s) vs one server", flush=True)
        with serve(["--index", str(args.index)], logs / f"single-{n}.log") as single, \
                sharded(work, n, logs) as router:
            result = {}
            if args.closed_loop:
                result["paired"] = paired(single, router, all_queries, args.closed_loop, warmup=30)
                print(f"  paired closed loop: single {result['paired']['single']['client_ms']}, router "
                      f"{result['paired']['router']['client_ms']}, router - single "
                      f"{result['paired']['router_minus_single_ms']}", flush=True)
            if args.qps:
                result["rag_bench_latency"] = {
                    "single": rag_bench_latency(single, args.data / "queries.jsonl", args.qps, args.duration,
                                                work / f"latency-single-{n}.json"),
                    "router": rag_bench_latency(router, args.data / "queries.jsonl", args.qps, args.duration,
                                                work / f"latency-router-{n}.json")}
                print(f"  rag-bench latency: {result['rag_bench_latency']}", flush=True)
            report["latency"][f"{n}"] = result
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
