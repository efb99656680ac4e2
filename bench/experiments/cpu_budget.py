"""Where the cores go at saturation: CPU milliseconds per answer, by thread of the server and for the client, for
empty calls, exact cache hits and misses, beside the query encoder alone.

    python bench/experiments/cpu_budget.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl

Peak goodput is bounded by the CPU an answer costs on the machine's cores, the client's included when it shares
them: at 2 cores and c ms of CPU per answer, no more than 2000 / c answers/s. Issue 15 holds rag-serve's peak to 75%
of what the query encoder alone sustains, so this script measures both in one run:
  0. the encoder alone (the index's query encoder with the server's settings, in this process): CPU ms per encode on
     one thread, and the queries/s `--workers` threads sustain together; measured again after the server's phases
     (the machine drifts), and each phase's answers/s given against the mean of the two as well;
  1. one `rag-serve` (its own process, `--workers` pipeline threads, logging at WARNING), then per phase (`check`:
     health Check; `hit`: Search answered from the exact cache; `miss`: Search with CACHE_BYPASS, the whole
     pipeline) `--clients` closed-loop callers in a child process (so its CPU is counted apart) for `--seconds`,
     after `--warmup` seconds of the same load. Refusals (RESOURCE_EXHAUSTED) are asked again at once and counted.
Printed per phase: answers/s, refusals, and CPU ms per answer of each server thread group (the event loop is the
main thread; the pipeline threads and gRPC's own are named by `py-spy dump` when py-spy is installed, else listed
by thread id), of the whole server and of the client.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

PHASES = ("check", "hit", "miss")


def caller_main(target: str, queries_path: Path, phase: str, clients: int, seconds: float, distinct: int) -> None:
    """The client process: closed-loop callers, one channel each; prints answers and refusals as JSON."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rag_service.bench.data import load_queries
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    texts = list(load_queries(queries_path).values())[:distinct]
    cache = pb.CACHE_BYPASS if phase == "miss" else pb.CACHE_DEFAULT
    requests = [pb.SearchRequest(query=text, cache=cache) for text in texts]
    end = time.monotonic() + seconds
    answered, refused = [0] * clients, [0] * clients

    def loop(c: int) -> None:
        channel = grpc.insecure_channel(target)
        search = pb_grpc.RetrieverStub(channel).Search
        check = health_pb2_grpc.HealthStub(channel).Check
        empty = health_pb2.HealthCheckRequest()
        n = c
        while time.monotonic() < end:
            try:
                if phase == "check":
                    check(empty, timeout=30)
                else:
                    search(requests[n % len(requests)], timeout=30)
                answered[c] += 1
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                refused[c] += 1
            n += clients
        channel.close()

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"answered": sum(answered), "refused": sum(refused)}))


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid`, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended between the listing and the read
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from `py-spy dump` when it is installed (else none)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True)
    return {int(tid): name for tid, name in re.findall(r'Thread (?:0x[0-9a-fA-F]+ )?\(?(\d+)\)?[^"\n]*"([^"]+)"',
                                                        dump.stdout)}


def group_of(tid: int, pid: int, names: dict[int, str]) -> str:
    if tid == pid:
        return "event loop (main thread)"
    name = names.get(tid)
    if name is None:
        return "other threads (gRPC's, unnamed)"
    return re.sub(r"_\d+$", "", name) + " threads"


def load_encoder(index: Path, workers: int) -> Any:
    """The index's query encoder with the server's settings."""
    from rag_service.core.config import ServerConfig
    from rag_service.encoder.encode import load_index_encoder
    from rag_service.index.load import load_index

    settings = ServerConfig(index=str(index), workers=workers).encoder
    return load_index_encoder(settings.backend, load_index(index).path, settings.model_path, settings.threads)


def encoder_alone(encoder: Any, texts: list[str], workers: int, seconds: float) -> tuple[float, float]:
    """(CPU ms per encode on one thread, queries/s on `workers` threads together) for `encoder`."""
    from concurrent.futures import ThreadPoolExecutor

    for text in texts[:20]:
        encoder.encode_queries([text])
    started, cpu = time.perf_counter(), time.thread_time()
    n = 0
    while time.perf_counter() - started < seconds / 2:
        encoder.encode_queries([texts[n % len(texts)]])
        n += 1
    per_encode_ms = (time.thread_time() - cpu) / n * 1e3
    end = time.perf_counter() + seconds / 2
    counts = [0] * workers

    def loop(t: int) -> None:
        i = t
        while time.perf_counter() < end:
            encoder.encode_queries([texts[i % len(texts)]])
            counts[t] += 1
            i += workers

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(loop, range(workers)))
    return per_encode_ms, sum(counts) / (time.perf_counter() - started)


def run_callers(args: argparse.Namespace, target: str, phase: str, seconds: float) -> tuple[dict, float]:
    """Runs the client process; returns its JSON and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, str(Path(__file__).resolve()), "--caller", "--target", target, "--index",
               str(args.index), "--queries", str(args.queries.resolve()), "--phase", phase, "--clients",
               str(args.clients), "--seconds", str(seconds), "--distinct", str(args.distinct)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(done.stdout.strip().splitlines()[-1]), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="the server's pipeline threads (its default: 2)")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--distinct", type=int, default=100, help="queries cycled through")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--caller", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.caller:
        caller_main(args.target, args.queries, args.phase, args.clients, args.seconds, args.distinct)
        return
    from rag_service.bench.data import load_queries
    from rag_service.bench.serve import ServerProcess

    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"--phases: unknown {sorted(unknown)}; known: {', '.join(PHASES)}")
    texts = list(load_queries(args.queries).values())[: args.distinct]
    encoder = load_encoder(args.index, args.workers)
    per_encode_ms, encoder_rps = encoder_alone(encoder, texts, args.workers, args.seconds)
    print(f"encoder alone: {per_encode_ms:.2f} CPU ms per encode on one thread; {encoder_rps:.1f} queries/s on "
          f"{args.workers} threads (measured again after the server, below)", flush=True)
    report: dict = {"encoder_cpu_ms": per_encode_ms, "encoder_rps": encoder_rps, "phases": {}}
    with ServerProcess(args.index, workers=args.workers) as server:
        for phase in phases:
            run_callers(args, server.target, phase, args.warmup)  # the hit phase's warm-up also fills the cache
            names = thread_names(server.pid)
            cpu_before, started = thread_cpu(server.pid), time.perf_counter()
            counts, client_cpu = run_callers(args, server.target, phase, args.seconds)
            wall = time.perf_counter() - started
            cpu_after = thread_cpu(server.pid)
            answered = max(counts["answered"], 1)
            groups: dict[str, float] = defaultdict(float)
            for tid, seconds in cpu_after.items():
                groups[group_of(tid, server.pid, names)] += seconds - cpu_before.get(tid, 0.0)
            server_ms = sum(groups.values()) / answered * 1e3
            row = {"answers_per_s": counts["answered"] / wall, "refused": counts["refused"],
                   "server_cpu_ms": server_ms, "client_cpu_ms": client_cpu / answered * 1e3,
                   "threads_cpu_ms": {g: s / answered * 1e3 for g, s in sorted(groups.items())}}
            report["phases"][phase] = row
            print(f"\n{phase}: {row['answers_per_s']:.1f} answers/s ({row['answers_per_s'] / encoder_rps:.0%} of the "
                  f"encoder alone), {counts['refused']} refused, {args.clients} callers, {wall:.1f} s")
            print("  CPU ms per answer")
            for group, ms in sorted(row["threads_cpu_ms"].items(), key=lambda item: -item[1]):
                print(f"  server: {group:<34} {ms:8.3f}")
            # What an encode costs the cores when `workers` run at once (sharing caches and the memory bus).
            encode_ms = args.workers * 1e3 / encoder_rps
            print(f"  server, all threads{'':<23} {server_ms:8.3f}  (an encode with {args.workers} at once: "
                  f"{encode_ms:.3f}, {encode_ms / server_ms:.0%} of it)")
            print(f"  client process{'':<28} {row['client_cpu_ms']:8.3f}")
            total = server_ms + row["client_cpu_ms"]
            print(f"  together{'':<34} {total:8.3f}  (at most {2000 / total:.0f} answers/s on 2 cores)")
    # This VM's encoder alone drifts by 20% within minutes: measured on both sides of the server's phases, each
    # phase's share is also given against the mean of the two.
    per_encode_after, rps_after = encoder_alone(encoder, texts, args.workers, args.seconds)
    mean_rps = (encoder_rps + rps_after) / 2
    print(f"\nencoder alone again: {per_encode_after:.2f} CPU ms per encode on one thread; {rps_after:.1f} queries/s "
          f"on {args.workers} threads (before the server: {encoder_rps:.1f}; mean {mean_rps:.1f})")
    for phase, row in report["phases"].items():
        print(f"{phase}: {row['answers_per_s']:.1f} answers/s, {row['answers_per_s'] / mean_rps:.0%} of the encoder "
              f"alone's mean ({row['answers_per_s'] / max(encoder_rps, rps_after):.0%} to "
              f"{row['answers_per_s'] / min(encoder_rps, rps_after):.0%} of each measurement)")
    report.update(encoder_cpu_ms_after=per_encode_after, encoder_rps_after=rps_after, encoder_rps_mean=mean_rps)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
