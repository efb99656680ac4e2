"""Batch throughput: the same queries sent one by one (Search) and in SearchBatch calls of several sizes.

Closed loop: each of `clients` callers sends its share of the queries, the next call as soon as the last returned, so
a mode's figure is what the server sustains, not an offered rate. Per mode and round: queries per second (every query
answered / the wall time of the mode) and each query's latency (its call's: a query in a batch waits for its whole
batch, so its latency is the batch's). The modes run in rounds, in a rotated order each round, so a drift of the
machine spreads over all of them; each batch mode's QPS is reported as a ratio to one-by-one's in the same round
(the median of the rounds' ratios).

By default every request bypasses the cache (each round would otherwise be answered from the first round's entries):
every query runs the whole pipeline in every mode.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from rag_service.bench.latency import CACHE_MODES

ONE_BY_ONE = "search"


@dataclass(frozen=True)
class BatchBenchConfig:
    target: str
    queries: Sequence[str]
    sizes: Sequence[int] = (1, 8, 32, 128)
    clients: Sequence[int] = (1,)
    rounds: int = 3
    top_k: int = 10
    cache: str = "bypass"
    timeout_s: float = 300.0
    token: str | None = None


def _mode_name(size: int | None, clients: int) -> str:
    name = ONE_BY_ONE if size is None else f"batch {size}"
    return name if clients == 1 else f"{name} x{clients}"


def _run_mode(stub, requests: list, size: int | None, clients: int, timeout: float,
              metadata: tuple) -> tuple[float, list[float], int]:
    """(wall seconds, per-query latency seconds, failed queries) of sending `requests` from `clients` callers."""
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb

    calls = [requests[i:i + 1] for i in range(len(requests))] if size is None else \
        [requests[i:i + size] for i in range(0, len(requests), size)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failed = [0] * clients

    def caller(c: int) -> None:
        for call in calls[c::clients]:
            started = time.perf_counter()
            try:
                if size is None:
                    stub.Search(call[0], timeout=timeout, metadata=metadata)
                    bad = 0
                else:
                    reply = stub.SearchBatch(pb.SearchBatchRequest(requests=call), timeout=timeout, metadata=metadata)
                    bad = sum(1 for r in reply.results if r.code != 0)
            except grpc.RpcError:
                bad = len(call)
            seconds = time.perf_counter() - started
            failed[c] += bad
            latencies[c].extend([seconds] * len(call))

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, [x for part in latencies for x in part], sum(failed)


def run_batch_bench(config: BatchBenchConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    if not config.queries:
        raise ValueError("queries: none given")
    if config.rounds < 1 or not config.sizes or not config.clients:
        raise ValueError("rounds must be >= 1, and sizes and clients must name at least one value")
    cache = getattr(pb, CACHE_MODES[config.cache])
    requests = [pb.SearchRequest(query=q, top_k=config.top_k, cache=cache) for q in config.queries]
    metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
    modes = [(size, clients) for clients in config.clients for size in (None, *config.sizes)]
    per_mode: dict[str, dict[str, list]] = {_mode_name(s, c): {"qps": [], "latency": [], "ratio": [], "failed": []}
                                            for s, c in modes}
    total, done = config.rounds * len(modes), 0
    with grpc.insecure_channel(config.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        # One untimed pass warms the server (its caches of index pages, the encoder's first calls) and the channel.
        _run_mode(stub, requests[: max(config.sizes)], max(config.sizes), 1, config.timeout_s, metadata)
        for r in range(config.rounds):
            shift = r % len(modes)
            round_qps: dict[str, float] = {}
            for size, clients in modes[shift:] + modes[:shift]:
                seconds, latencies, failed = _run_mode(stub, requests, size, clients, config.timeout_s, metadata)
                name = _mode_name(size, clients)
                round_qps[name] = len(requests) / seconds
                entry = per_mode[name]
                entry["qps"].append(round_qps[name])
                entry["latency"].extend(latencies)
                entry["failed"].append(failed)
                done += 1
                if progress is not None:
                    progress(done, total)
            for size, clients in modes:
                name = _mode_name(size, clients)
                per_mode[name]["ratio"].append(round_qps[name] / round_qps[_mode_name(None, clients)])
    rows = []
    for size, clients in modes:
        name = _mode_name(size, clients)
        entry = per_mode[name]
        latency = np.asarray(entry["latency"]) * 1000.0
        rows.append({"mode": name, "batch": size or 1, "clients": clients,
                     "qps": round(statistics.median(entry["qps"]), 1),
                     "qps_rounds": [round(x, 1) for x in entry["qps"]],
                     "ratio": round(statistics.median(entry["ratio"]), 3),
                     "latency_p50_ms": round(float(np.percentile(latency, 50)), 2),
                     "latency_p99_ms": round(float(np.percentile(latency, 99)), 2),
                     "failed": int(sum(entry["failed"]))})
    return {"queries": len(requests), "rounds": config.rounds, "top_k": config.top_k, "cache": config.cache,
            "rows": rows}


def format_table(report: dict) -> str:
    lines = ["| mode | queries/s | vs one by one | per-query p50 ms | per-query p99 ms | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        lines.append(f"| {row['mode']} | {row['qps']:.1f} | {row['ratio']:.2f}x | {row['latency_p50_ms']:.1f} | "
                     f"{row['latency_p99_ms']:.1f} | {row['failed']} |")
    return "\n".join(lines)


__all__ = ["BatchBenchConfig", "format_table", "run_batch_bench"]
