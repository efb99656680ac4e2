"""Open-loop load at fixed arrival rates against a running server, recorded in HdrHistograms.

Each request has a scheduled send time (constant spacing, or Poisson arrivals) fixed before the run. It is sent at
that time whether or not earlier requests have returned, and its latency is measured from the scheduled time, not
from the moment it actually left: if the server (or the generator) stalls, every request scheduled during the stall
carries the stall in its latency, so no coordinated omission. How late each send actually was (send lag) is recorded
too; when its p99 exceeds a bound the generator fell behind and the result says so.

Load comes from several client processes (spawned, each with its own channel and interpreter, so the GIL of one is
never the bottleneck); each takes every N-th request of the shared schedule and returns its histograms encoded, and
the parent merges them. The floor is the same schedule sent to grpc.health.v1.Health/Check (an empty unary call on the
same server and channel type) at the same rates in the same run, so every figure reads as a ratio to what the
transport alone costs.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from hdrh.histogram import HdrHistogram

# Microseconds, 1 us .. 10 min at 3 significant digits (0.1% resolution): covers a floor call and a stalled server.
LOWEST_US, HIGHEST_US, DIGITS = 1, 600_000_000, 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# --cache value -> the rag.v1.CacheMode name (the generated code is imported only where requests are built).
CACHE_MODES = {"bypass": "CACHE_BYPASS", "default": "CACHE_DEFAULT", "exact_only": "CACHE_EXACT_ONLY",
               "strict": "CACHE_STRICT"}


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def decode(encoded: str | bytes) -> HdrHistogram:
    histogram = new_histogram()
    histogram.decode_and_add(encoded if isinstance(encoded, bytes) else encoded.encode())
    return histogram


def clamp_us(seconds: float) -> int:
    return min(max(int(seconds * 1e6), LOWEST_US), HIGHEST_US)


def summarize(histogram: HdrHistogram) -> dict[str, float]:
    """Milliseconds: p50, p90, p99, p99.9, max, mean (zeros when nothing was recorded)."""
    if histogram.get_total_count() == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0, "mean": 0.0}
    out = {f"p{p:g}": histogram.get_value_at_percentile(p) / 1e3 for p in PERCENTILES}
    out["max"] = histogram.get_max_value() / 1e3
    out["mean"] = histogram.get_mean_value() / 1e3
    return {k: round(v, 4) for k, v in out.items()}


@dataclass(frozen=True)
class RequestOptions:
    top_k: int = 10
    depth: int | None = None
    profile: bool = True  # the server's stage timings (stage_time_us), and nothing else of debug
    debug: bool = False  # debug's per-context scores and explanations too: work a plain request does not do
    cache: str = "bypass"  # every request does the full work unless the caller allows the cache
    rerank: bool | None = None  # None: the server's default
    timeout_s: float = 10.0
    budget_ms: int | None = None  # the adaptive pipeline's latency budget; None: from the deadline, if any


@dataclass(frozen=True)
class WorkerTask:
    target: str
    kind: str  # "search" or "floor"
    offsets: list[float]  # this worker's scheduled send times, seconds after start_at
    query_ids: list[int]  # index into queries per scheduled request
    queries: list[str]
    warmup_s: float
    start_at: float  # time.monotonic() (one clock for all processes on Linux)
    options: RequestOptions


_progress = None  # the parent's shared completion counter, set in each worker by the pool initializer


def _init_worker(counter) -> None:
    global _progress
    _progress = counter
    # Imported before the first phase is scheduled, so a cold start never shows up as send lag.
    import grpc  # noqa: F401 - imported to load it, not to use it here
    from grpc_health.v1 import health_pb2_grpc  # noqa: F401 - as above

    from rag_service.pb.rag.v1 import retrieval_pb2_grpc  # noqa: F401 - as above


def _ready(_: int) -> bool:
    return True


def _tick() -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += 1


def _search_requests(task: WorkerTask) -> list:
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb

    options = task.options
    made: dict[int, object] = {}
    out = []
    for q in task.query_ids:
        if q not in made:
            request = pb.SearchRequest(query=task.queries[q], top_k=options.top_k, debug=options.debug,
                                       profile=options.profile, cache=CACHE_MODES[options.cache])
            if options.depth is not None:
                request.depth = options.depth
            if options.rerank is not None:
                request.rerank = options.rerank
            if options.budget_ms is not None:
                request.budget_ms = options.budget_ms
            made[q] = request
        out.append(made[q])
    return out


def run_worker(task: WorkerTask) -> dict:
    """One client process's share of one phase; returns encoded histograms and counts."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(task.target)
    grpc.channel_ready_future(channel).result(timeout=60)
    if task.kind == "search":
        method = pb_grpc.RetrieverStub(channel).Search
        requests = _search_requests(task)
    else:
        method = health_pb2_grpc.HealthStub(channel).Check
        requests = [health_pb2.HealthCheckRequest()] * len(task.offsets)

    latency, lag, server = new_histogram(), new_histogram(), new_histogram()
    stages: dict[str, HdrHistogram] = {}
    errors: Counter[str] = Counter()
    routes: Counter[str] = Counter()  # the adaptive pipeline's choice per reply: load changes the work done
    lock = threading.Lock()
    outstanding = len(task.offsets)
    all_done = threading.Event()
    window = {"first_due": math.inf, "last_done": -math.inf, "ok": 0, "sent": 0, "within_budget": 0}
    # Answered OK within the budget, from the scheduled send (the client's view): the adaptive pipeline's goodput.
    budget_s = None if task.options.budget_ms is None else task.options.budget_ms / 1000.0
    if outstanding == 0:
        all_done.set()

    def done(future, due: float, measured: bool) -> None:
        nonlocal outstanding
        finished = time.monotonic()
        code = future.code()
        with lock:
            if measured:
                if code == grpc.StatusCode.OK:
                    latency.record_value(clamp_us(finished - due))
                    window["ok"] += 1
                    if budget_s is not None and finished - due <= budget_s:
                        window["within_budget"] += 1
                    window["last_done"] = max(window["last_done"], finished)
                    reply = future.result()
                    if task.kind == "search":
                        routes[reply.route or "-"] += 1
                        server.record_value(max(min(reply.server_time_us, HIGHEST_US), LOWEST_US))
                        for stage, us in reply.stage_time_us.items():
                            if stage not in stages:
                                stages[stage] = new_histogram()
                            stages[stage].record_value(max(min(us, HIGHEST_US), LOWEST_US))
                else:
                    errors[code.name] += 1
            outstanding -= 1
            if outstanding == 0:
                all_done.set()
        _tick()

    # Requests are created before the clock starts so building them never delays a send.
    pause = task.start_at - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    for offset, request in zip(task.offsets, requests):
        due = task.start_at + offset
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        sent = time.monotonic()
        measured = offset >= task.warmup_s
        if measured:
            lag.record_value(clamp_us(sent - due))
            window["sent"] += 1
            window["first_due"] = min(window["first_due"], due)
        future = method.future(request, timeout=task.options.timeout_s)
        future.add_done_callback(lambda f, due=due, measured=measured: done(f, due, measured))
    all_done.wait(task.options.timeout_s + 60)
    channel.close()
    return {
        "latency": latency.encode().decode(), "lag": lag.encode().decode(), "server": server.encode().decode(),
        "stages": {k: v.encode().decode() for k, v in stages.items()}, "errors": dict(errors),
        "routes": dict(routes), **window,
    }


def schedule(rate: float, seconds: float, arrival: str, rng: np.random.Generator) -> np.ndarray:
    """Send offsets in seconds: evenly spaced (constant) or exponential gaps (poisson), `rate` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    n = max(1, int(round(rate * seconds)))
    if arrival == "constant":
        return np.arange(n, dtype=np.float64) / rate
    if arrival == "poisson":
        offsets = np.cumsum(rng.exponential(1.0 / rate, size=n))
        return offsets[offsets < seconds] if (offsets < seconds).any() else offsets[:1]
    raise ValueError(f"arrival must be 'constant' or 'poisson', got {arrival!r}")


@dataclass
class LatencyConfig:
    target: str
    queries: list[str]
    rates: list[float]
    duration_s: float = 10.0
    warmup_s: float = 2.0
    processes: int = 0  # 0: enough for the highest rate (one per PER_PROCESS_RATE requests/s, at least one)
    arrival: str = "constant"
    seed: int = 0
    max_lag_ms: float = 5.0
    floor: bool = True
    connect_timeout_s: float = 15.0
    options: RequestOptions = field(default_factory=RequestOptions)


# One Python process sends a few thousand small unary calls per second; stay well below that so its own send loop
# never adds lag.
PER_PROCESS_RATE = 400.0


def processes_for(config: LatencyConfig) -> int:
    if config.processes > 0:
        return config.processes
    return max(1, math.ceil(max(config.rates) / PER_PROCESS_RATE))


def merge(parts: Sequence[dict], kind: str, rate: float, config: LatencyConfig) -> dict:
    latency, lag, server = new_histogram(), new_histogram(), new_histogram()
    stages: dict[str, HdrHistogram] = {}
    errors: Counter[str] = Counter()
    routes: Counter[str] = Counter()
    first_due, last_done, ok, sent, within = math.inf, -math.inf, 0, 0, 0
    for part in parts:
        latency.decode_and_add(part["latency"].encode())
        lag.decode_and_add(part["lag"].encode())
        server.decode_and_add(part["server"].encode())
        for stage, encoded in part["stages"].items():
            stages.setdefault(stage, new_histogram()).decode_and_add(encoded.encode())
        errors.update(part["errors"])
        routes.update(part["routes"])
        first_due, last_done = min(first_due, part["first_due"]), max(last_done, part["last_done"])
        ok += part["ok"]
        sent += part["sent"]
        within += part["within_budget"]
    span = last_done - first_due if ok and last_done > first_due else math.nan
    lag_summary = summarize(lag)
    result = {
        "kind": kind, "offered_qps": rate, "sent": sent, "ok": ok, "errors": dict(sorted(errors.items())),
        "achieved_qps": round(ok / span, 2) if span == span else 0.0,
        "latency_ms": summarize(latency), "send_lag_ms": lag_summary,
        "behind_schedule": lag_summary["p99"] > config.max_lag_ms,
        "histogram": latency.encode().decode(),
    }
    if kind == "search" and config.options.budget_ms is not None:
        result["within_budget"] = within
    if kind == "search" and server.get_total_count():
        result["server_time_ms"] = summarize(server)
        result["routes"] = dict(routes.most_common())
        result["stages_ms"] = {k: summarize(v) for k, v in sorted(stages.items(),
                                                                 key=lambda kv: -kv[1].get_value_at_percentile(50))}
    return result


def _check_reachable(target: str, timeout: float = 15.0) -> None:
    """Fails before any client process starts when nothing answers at `target`."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise ValueError(f"target: no gRPC server answered at {target} within {timeout:g} s") from None


def run_latency(config: LatencyConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Runs the floor and then the search at each rate; returns the report (see `format_table`)."""
    if not config.queries:
        raise ValueError("no queries to send")
    if config.duration_s <= 0 or config.warmup_s < 0:
        raise ValueError("duration must be > 0 and warm-up >= 0 seconds")
    _check_reachable(config.target, config.connect_timeout_s)
    rng = np.random.default_rng(config.seed)
    n_proc = processes_for(config)
    kinds = ("floor", "search") if config.floor else ("search",)
    phases = [(rate, kind) for rate in config.rates for kind in kinds]
    plans = []
    for rate, kind in phases:
        offsets = schedule(rate, config.warmup_s + config.duration_s, config.arrival, rng)
        plans.append((rate, kind, offsets, rng.integers(0, len(config.queries), size=len(offsets))))
    total = sum(len(p[2]) for p in plans)

    ctx = mp.get_context("spawn")  # gRPC is not fork-safe once a channel exists
    counter = ctx.Value("q", 0)
    started = time.time()
    results: dict[float, dict] = {}
    with ctx.Pool(n_proc, initializer=_init_worker, initargs=(counter,)) as pool:
        pool.map(_ready, range(n_proc), chunksize=1)
        for rate, kind, offsets, qids in plans:
            start_at = time.monotonic() + 1.0  # every worker has its channel up by then
            tasks = [WorkerTask(target=config.target, kind=kind, offsets=offsets[w::n_proc].tolist(),
                                query_ids=qids[w::n_proc].tolist(), queries=config.queries,
                                warmup_s=config.warmup_s, start_at=start_at, options=config.options)
                     for w in range(n_proc)]
            pending = pool.map_async(run_worker, tasks)
            while not pending.ready():
                pending.wait(0.2)
                if progress is not None:
                    progress(counter.value, total)
            results.setdefault(rate, {"offered_qps": rate})[kind] = merge(pending.get(), kind, rate, config)
    if progress is not None:
        progress(counter.value, total)
    rows = []
    for rate in config.rates:
        row = results[rate]
        if "floor" in row and row["floor"]["ok"] and row["search"]["ok"]:
            row["ratio_to_floor"] = {p: round(row["search"]["latency_ms"][p] / row["floor"]["latency_ms"][p], 2)
                                     if row["floor"]["latency_ms"][p] else None for p in ("p50", "p99", "p99.9")}
        row["behind_schedule"] = any(row[k]["behind_schedule"] for k in kinds)
        rows.append(row)
    settings = {k: v for k, v in asdict(config).items() if k not in ("queries", "options")}
    return {
        "tool": "rag-bench latency", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1), "settings": settings, "request": asdict(config.options),
        "processes": n_proc, "queries": len(config.queries), "rates": rows,
    }


def format_table(report: dict) -> str:
    head = (f"{'offered':>8} {'call':<7} {'achieved':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} {'max':>8} "
            f"{'lag p99':>8} {'errors':<12} {'p50/floor':>9} {'p99/floor':>9}")
    lines = ["latency in ms, measured from each request's scheduled send time", head]
    for row in report["rates"]:
        for kind in ("floor", "search"):
            if kind not in row:
                continue
            r, lat = row[kind], row[kind]["latency_ms"]
            errors = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "0"
            ratio = row.get("ratio_to_floor", {}) if kind == "search" else {}
            lines.append(
                f"{row['offered_qps']:>8g} {kind:<7} {r['achieved_qps']:>9.1f} {lat['p50']:>8.2f} {lat['p90']:>8.2f} "
                f"{lat['p99']:>8.2f} {lat['p99.9']:>8.2f} {lat['max']:>8.2f} {r['send_lag_ms']['p99']:>8.2f} "
                f"{errors:<12} {_ratio(ratio.get('p50')):>9} {_ratio(ratio.get('p99')):>9}"
                + ("  BEHIND SCHEDULE" if r["behind_schedule"] else ""))
    stage_rows = [(row["offered_qps"], row["search"].get("stages_ms")) for row in report["rates"]]
    if any(stages for _, stages in stage_rows):
        lines.append("server-side stages, p50 / p99 ms")
        for rate, stages in stage_rows:
            if stages:
                lines.append(f"{rate:>8g}  " + "  ".join(f"{k} {v['p50']:.2f}/{v['p99']:.2f}"
                                                         for k, v in stages.items()))
    routes = [(row["offered_qps"], row["search"].get("routes")) for row in report["rates"]]
    if any(r and set(r) != {"-"} for _, r in routes):
        lines.append("routes taken (adaptive pipeline): " + "; ".join(
            f"{rate:g}/s " + ", ".join(f"{k} {v}" for k, v in r.items()) for rate, r in routes if r))
    behind = [row["offered_qps"] for row in report["rates"] if row["behind_schedule"]]
    if behind:
        lines.append(f"WARNING: the load generator fell behind its schedule at {', '.join(f'{r:g}' for r in behind)} "
                     f"requests/s (send lag p99 above {report['settings']['max_lag_ms']} ms): latencies there include "
                     "the generator's own delay; use more --processes or a less loaded client machine")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}x"
