"""Overload: offer about twice the load a rag-serve process sustains and check that it sheds fast and stays healthy.

    python bench/experiments/overload.py --index /tmp/idx/scifact --queries ../shared/data/scifact/queries.jsonl

Phases, against one `rag-serve` process (its own PID, so its RSS is measured alone):
  1. capacity: closed loop with as many concurrent callers as pipeline threads (every thread busy, nothing queued):
     the sustained throughput X and the nominal latency (p50/p99) at full utilisation.
  2. overload: open loop, Poisson arrivals at `--factor` x X (default 2x) for `--seconds`: admitted requests'
     p50/p99 against nominal, how fast refusals come back, the server's RSS over time.
  3. retry storm (`--retry-clients N`): N closed-loop callers that retry a refusal at once, then N callers that
     wait what the server's `grpc-retry-pushback-ms` says (the typed client's `retry_overloaded`): goodput against
     capacity, admitted p99 against nominal, refusals per answer.
  4. after: health and a probe query.
  0. with `--encoder-ceiling`, before the server starts: what the query encoder alone sustains on `--workers`
     threads in this process (the same index's query encoder and threads setting), the ceiling the server's goodput
     is read against.
Every request bypasses the result cache (CACHE_BYPASS), so every admitted request runs the whole pipeline, and asks
for the server's stage timings (`profile`, which changes nothing else), so each phase also says where an admitted
answer's time went (`parts`, p50 / p99 ms): the wait for a pipeline thread (`queue`), the server's time
(`server_time_us`) less that wait (`served`: the search itself, with its encode), and the client's time outside the
server (`outside`: the call, the event loops of both processes).
`--factor` takes a list (2,4): one open-loop phase per factor.

    python bench/experiments/overload.py --index /tmp/lead/scifact_full --queries ../shared/data/scifact/queries.jsonl \
        --seconds 15 --factor 2,4 --retry-clients 8 --encoder-ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.bench.serve import SAFE_PATH
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc


def read_queries(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def search_request(query: str) -> pb.SearchRequest:
    return pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS, profile=True)


class Parts:
    """Where admitted answers' time went: per answer, its wait for a pipeline thread, the rest of its server time,
    and the client's time outside the server (ms)."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {"queue": [], "served": [], "outside": []}

    def add(self, reply: pb.SearchResponse, client_s: float) -> None:
        queue_us = reply.stage_time_us.get("queue", 0)
        self.rows["queue"].append(queue_us / 1e3)
        self.rows["served"].append((reply.server_time_us - queue_us) / 1e3)
        self.rows["outside"].append(client_s * 1e3 - reply.server_time_us / 1e3)

    def summary(self) -> dict[str, list[float]]:
        return {name: [round(pct(v, 50), 2), round(pct(v, 99), 2)] for name, v in self.rows.items()}


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.every = every
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.process.memory_info().rss / 2**20)
            self.stop.wait(self.every)


async def closed_loop(stub, queries: list[str], concurrency: int, seconds: float, rng: random.Random,
                      parts: Parts | None = None):
    latencies: list[float] = []
    codes: dict[str, int] = {}
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            request = search_request(rng.choice(queries))
            started = time.perf_counter()
            try:
                reply = await stub.Search(request, timeout=10)
                latencies.append(time.perf_counter() - started)
                if parts is not None:
                    parts.add(reply, latencies[-1])
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] = codes.get(error.code().name, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, codes, time.perf_counter() - started


async def open_loop(stub, queries: list[str], rate: float, seconds: float, rng: random.Random, parts: Parts):
    ok: list[float] = []
    refused: list[float] = []
    codes: dict[str, int] = {}
    tasks = []

    async def one(query: str) -> None:
        started = time.perf_counter()
        try:
            reply = await stub.Search(search_request(query), timeout=10)
            ok.append(time.perf_counter() - started)
            parts.add(reply, ok[-1])
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.aio.AioRpcError as error:
            refused.append(time.perf_counter() - started)
            codes[error.code().name] = codes.get(error.code().name, 0) + 1

    started = time.perf_counter()
    next_at = started
    while next_at < started + seconds:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rng.choice(queries))))
        next_at += rng.expovariate(rate)
    offered_seconds = time.perf_counter() - started
    await asyncio.gather(*tasks)
    return ok, refused, codes, len(tasks) / offered_seconds


def pushback_seconds(error: grpc.aio.AioRpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            return int(value) / 1000.0
    return None


async def retry_storm(stub, queries: list[str], clients: int, seconds: float, rng: random.Random,
                      honour_pushback: bool, parts: Parts):
    """`clients` closed-loop callers; a refused call is sent again at once (or after the server's pushback) until it
    is answered. Latency is the answered call's own, refusals are counted."""
    latencies: list[float] = []
    refusals = 0
    end = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal refusals
        while time.perf_counter() < end:
            request = search_request(rng.choice(queries))
            while time.perf_counter() < end:
                started = time.perf_counter()
                try:
                    reply = await stub.Search(request, timeout=10)
                    latencies.append(time.perf_counter() - started)
                    parts.add(reply, latencies[-1])
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    refusals += 1
                    wait = pushback_seconds(error) if honour_pushback else None
                    if wait:
                        await asyncio.sleep(wait)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    return latencies, refusals, time.perf_counter() - started


def encoder_ceiling(index: Path, queries: list[str], threads: int, seconds: float) -> float:
    """Queries per second the index's query encoder sustains alone on `threads` threads (the server's default
    encoder settings), in this process."""
    from concurrent.futures import ThreadPoolExecutor

    from rag_service.core.config import ServerConfig
    from rag_service.encoder.encode import load_index_encoder
    from rag_service.index.load import load_index

    settings = ServerConfig(index=str(index), workers=threads).encoder
    encoder = load_index_encoder(settings.backend, load_index(index).path, settings.model_path, settings.threads)
    for query in queries[:20]:
        encoder.encode_queries([query])
    end = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(t: int) -> None:
        i = t
        while time.perf_counter() < end:
            encoder.encode_queries([queries[i % len(queries)]])
            counts[t] += 1
            i += threads

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    return sum(counts) / (time.perf_counter() - started)


async def run(args: argparse.Namespace, port: int, pid: int) -> dict:
    rng = random.Random(args.seed)
    queries = read_queries(args.queries)
    rss = RssSampler(pid)
    rss.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        await closed_loop(stub, queries, args.workers, 5, rng)  # warm every stage and the OS page cache
        rss_start = rss.samples[-1]
        parts = Parts()
        latencies, codes, elapsed = await closed_loop(stub, queries, args.workers, args.seconds, rng, parts)
        capacity = len(latencies) / elapsed
        nominal = {"capacity_rps": capacity, "p50_ms": pct(latencies, 50) * 1e3, "p99_ms": pct(latencies, 99) * 1e3,
                   "codes": codes, "parts": parts.summary()}
        print(f"capacity {capacity:.1f} req/s; nominal p50 {nominal['p50_ms']:.1f} ms p99 {nominal['p99_ms']:.1f} ms; "
              f"parts {nominal['parts']}",
              flush=True)
        overloads = {}
        for factor in args.factor:
            parts = Parts()
            ok, refused, codes, offered = await open_loop(stub, queries, factor * capacity, args.seconds, rng, parts)
            overload = {"offered_rps": offered, "ok_rps": len(ok) / args.seconds, "codes": codes,
                        "goodput_over_capacity": len(ok) / args.seconds / capacity,
                        "shed_fraction": codes.get("RESOURCE_EXHAUSTED", 0) / max(sum(codes.values()), 1),
                        "admitted_p50_ms": pct(ok, 50) * 1e3, "admitted_p99_ms": pct(ok, 99) * 1e3,
                        "refused_p50_ms": pct(refused, 50) * 1e3, "refused_p99_ms": pct(refused, 99) * 1e3}
            overload["admitted_p99_over_nominal"] = overload["admitted_p99_ms"] / nominal["p99_ms"]
            overload["parts"] = parts.summary()
            overloads[f"{factor:g}x"] = overload
            print(f"{factor:g}x:", json.dumps(overload, indent=1), flush=True)
        storms = {}
        if args.retry_clients:
            for mode, honour in (("retry at once", False), ("retry after pushback", True)):
                parts = Parts()
                latencies, refusals, elapsed = await retry_storm(stub, queries, args.retry_clients, args.seconds, rng,
                                                                 honour, parts)
                storm = {"clients": args.retry_clients, "ok_rps": len(latencies) / elapsed,
                         "goodput_over_capacity": len(latencies) / elapsed / capacity,
                         "refusals_per_answer": refusals / max(len(latencies), 1),
                         "admitted_p50_ms": pct(latencies, 50) * 1e3, "admitted_p99_ms": pct(latencies, 99) * 1e3}
                storm["admitted_p99_over_nominal"] = storm["admitted_p99_ms"] / nominal["p99_ms"]
                storm["parts"] = parts.summary()
                storms[mode] = storm
                print(f"{mode}:", json.dumps(storm, indent=1), flush=True)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        probe = await stub.Search(search_request(queries[0]), timeout=10)
    rss.stop.set()
    rss.join()
    return {"nominal": nominal, "overload": overloads, "retry": storms,
            "after": {"health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
                      "probe_contexts": len(probe.contexts)},
            "rss_mib": {"start": rss_start, "peak": max(rss.samples), "end": rss.samples[-1]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=Path("/tmp/idx/scifact"))
    parser.add_argument("--queries", type=Path, default=Path("../shared/data/scifact/queries.jsonl"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-queued", type=int, default=None, help="server max_queued (default: its default)")
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument("--factor", type=lambda v: [float(f) for f in v.split(",")], default=[2.0],
                        help="offered load as a multiple of capacity; a list (2,4) runs one phase per factor")
    parser.add_argument("--retry-clients", type=int, default=0,
                        help="closed-loop callers that retry refusals (at once, then after the pushback); 0: skip")
    parser.add_argument("--encoder-ceiling", action="store_true",
                        help="first measure what the query encoder alone sustains on --workers threads")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    ceiling = None
    if args.encoder_ceiling:
        ceiling = encoder_ceiling(args.index, read_queries(args.queries), args.workers, args.seconds)
        print(f"query encoder alone, {args.workers} threads: {ceiling:.1f} queries/s", flush=True)
    # SAFE_PATH: run from a checkout, `python -m` would import the source tree, which has no compiled extension.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **SAFE_PATH}
    if args.max_queued is not None:
        env["RAG_MAX_QUEUED"] = str(args.max_queued)
    if args.max_in_flight is not None:
        env["RAG_MAX_IN_FLIGHT"] = str(args.max_in_flight)
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"overload-server-{os.getpid()}.log"
    with open(log_path, "w") as log:
        # INFO: one JSON access line per request, as in production.
        server = subprocess.Popen([sys.executable, "-m", "rag_service.cli.serve", "--index", str(args.index),
                                   "--port", "0", "--workers", str(args.workers)], stdout=subprocess.PIPE,
                                  stderr=log, text=True, env=env)
        try:
            line = server.stdout.readline()
            match = re.search(r"on [\d.]+:(\d+)", line)
            if not match:
                raise SystemExit(f"server did not start: {line!r}; see {log_path}")
            report = asyncio.run(run(args, int(match.group(1)), server.pid))
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
    report["server_exit_code"] = code
    if ceiling is not None:
        report["encoder_alone_rps"] = ceiling
        report["capacity_over_encoder"] = report["nominal"]["capacity_rps"] / ceiling
    report["config"] = {k: str(v) for k, v in vars(args).items()}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
