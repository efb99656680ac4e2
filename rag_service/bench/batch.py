"""Batch throughput: the same queries sent one by one (Search) and in SearchBatch calls of several sizes.

Closed loop: each of `clients` callers sends its share of the queries, the next call as soon as the last returned, so
a mode's figure is what the server sustains, not an offered rate. Per mode and round: queries per second (every query
answered / the wall time of the mode), the server's CPU time per query when it runs here (on a machine shared with
other work, the wall time of a CPU-bound burst depends on the others; its CPU time much less), and each query's
latency (its call's: a query in a batch waits for its whole batch, so its latency is the batch's). The modes run in
rounds, in a rotated order each round, so a drift of the machine spreads over all of them; each batch mode's QPS is
reported as a ratio to one-by-one's in the same round (the median of the rounds' ratios), and its answers are
compared with one-by-one's of the same round (the share of queries with the very same ranking).

By default every request bypasses the cache (each round would otherwise be answered from the first round's entries):
every query runs the whole pipeline in every mode. With the cache on, an untimed pass first sends every query, so the
timed ones are all exact hits: the cost of a call around an answer the server already has.
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
    # The server's process id, when it runs on this machine: its CPU seconds per query are reported per mode.
    server_pid: int | None = None


def _mode_name(size: int | None, clients: int) -> str:
    name = ONE_BY_ONE if size is None else f"batch {size}"
    return name if clients == 1 else f"{name} x{clients}"


def _run_mode(stub, requests: list, size: int | None, clients: int, timeout: float,
              metadata: tuple) -> tuple[float, list[float], list[tuple | None]]:
    """(wall seconds, per-query latency seconds, per-query answer: its (doc_id, chunk_id) ranking, None when it
    failed) of sending `requests` from `clients` callers."""
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb

    step = size or 1
    starts = list(range(0, len(requests), step))
    latencies: list[list[float]] = [[] for _ in range(clients)]
    answers: list[tuple | None] = [None] * len(requests)

    def ranking(response) -> tuple:
        return tuple((c.doc_id, c.chunk_id) for c in response.contexts)

    def caller(c: int) -> None:
        for first in starts[c::clients]:
            call = requests[first:first + step]
            started = time.perf_counter()
            try:
                if size is None:
                    answers[first] = ranking(stub.Search(call[0], timeout=timeout, metadata=metadata))
                else:
                    reply = stub.SearchBatch(pb.SearchBatchRequest(requests=call), timeout=timeout, metadata=metadata)
                    for n, result in enumerate(reply.results):
                        answers[first + n] = ranking(result.response) if result.code == 0 else None
            except grpc.RpcError:
                pass  # every query of the call stays unanswered
            latencies[c].extend([time.perf_counter() - started] * len(call))

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, [x for part in latencies for x in part], answers


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
    per_mode: dict[str, dict[str, list]] = {_mode_name(s, c): {"qps": [], "latency": [], "ratio": [], "failed": [],
                                                               "same": [], "cpu": []} for s, c in modes}
    total, done = config.rounds * len(modes), 0
    server = None
    if config.server_pid is not None:
        import psutil

        server = psutil.Process(config.server_pid)

    def cpu_seconds() -> float:
        if server is None:
            return 0.0
        times = server.cpu_times()
        return times.user + times.system
    with grpc.insecure_channel(config.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        # One untimed pass warms the server (its caches of index pages, the encoder's first calls) and the channel;
        # with the cache on it sends every query, so every timed one is an exact hit (what the cache saves).
        warm = requests if config.cache != "bypass" else requests[: max(config.sizes)]
        _run_mode(stub, warm, max(config.sizes), 1, config.timeout_s, metadata)
        for r in range(config.rounds):
            shift = r % len(modes)
            round_qps: dict[str, float] = {}
            round_answers: dict[str, list[tuple | None]] = {}
            for size, clients in modes[shift:] + modes[:shift]:
                cpu = cpu_seconds()
                seconds, latencies, answers = _run_mode(stub, requests, size, clients, config.timeout_s, metadata)
                cpu = cpu_seconds() - cpu
                name = _mode_name(size, clients)
                round_qps[name], round_answers[name] = len(requests) / seconds, answers
                entry = per_mode[name]
                entry["qps"].append(round_qps[name])
                entry["latency"].extend(latencies)
                entry["cpu"].append(cpu / len(requests))
                entry["failed"].append(sum(1 for a in answers if a is None))
                done += 1
                if progress is not None:
                    progress(done, total)
            for size, clients in modes:
                name, alone = _mode_name(size, clients), _mode_name(None, clients)
                per_mode[name]["ratio"].append(round_qps[name] / round_qps[alone])
                # The same ranking as the one-by-one Search of this round (the server's answers are deterministic on
                # an idle machine; under load the adaptive policy may shorten a rerank, for either mode).
                per_mode[name]["same"].append(sum(1 for a, b in zip(round_answers[name], round_answers[alone])
                                                  if a is not None and a == b))
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
                     "failed": int(sum(entry["failed"])),
                     "same_as_search": round(sum(entry["same"]) / (len(requests) * config.rounds), 4),
                     "server_cpu_ms": round(statistics.median(entry["cpu"]) * 1000.0, 2) if server else None})
    return {"queries": len(requests), "rounds": config.rounds, "top_k": config.top_k, "cache": config.cache,
            "rows": rows}


def format_table(report: dict) -> str:
    lines = ["| mode | queries/s | vs one by one | per-query p50 ms | per-query p99 ms | server CPU ms/query | "
             "same as Search | failed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        cpu = "" if row["server_cpu_ms"] is None else f"{row['server_cpu_ms']:.2f}"
        lines.append(f"| {row['mode']} | {row['qps']:.1f} | {row['ratio']:.2f}x | {row['latency_p50_ms']:.1f} | "
                     f"{row['latency_p99_ms']:.1f} | {cpu} | {row['same_as_search']:.1%} | {row['failed']} |")
    return "\n".join(lines)


__all__ = ["BatchBenchConfig", "format_table", "run_batch_bench"]
