"""Replicas behind gRPC round_robin (issue 8): what a rolling reload and a replica's death cost the callers.

Starts N `rag-serve` processes on one index root, drives them closed-loop from T client threads over one round_robin
channel with retries (rag_service.client), and reports per phase the calls, failures, p50/p99 latency and the spread
over replicas:

  steady    nothing happens
  reload    each replica reloads the index (ReloadIndex "", CURRENT followed anew: a full load, checksum and warm-up
            beside the serving index, then the swap), one after the other
  kill      one replica is SIGKILLed at the start of the phase; the others carry on

    python bench/experiments/replicas.py --index /tmp/lead/scifact_full --queries ../shared/data/scifact/queries.jsonl

Searches bypass the cache (the full pipeline every time) and cycle through the queries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from rag_service.bench.serve import SAFE_PATH, stop_processes
from rag_service.client import RetrieverClient, RetrieverError, replica_target

ADMIN = "bench-replicas-admin"


def start(index: Path, name: str, workers: int) -> subprocess.Popen:
    env = {**os.environ, **SAFE_PATH, "HF_HUB_OFFLINE": "1", "RAG_REPLICA_NAME": name, "RAG_AUTH__ADMIN_TOKEN": ADMIN}
    return subprocess.Popen([sys.executable, "-m", "rag_service.cli.serve", "--index", str(index), "--port", "0",
                             "--workers", str(workers), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def serving_address(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    match = re.search(r"SERVING .* on (\S+):(\d+)", line)
    if not match:
        raise SystemExit(f"rag-serve did not start (exit {proc.wait()}): {line!r}")
    return f"{match.group(1)}:{match.group(2)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="index root (with CURRENT)")
    parser.add_argument("--queries", type=Path, required=True, help="BEIR queries.jsonl")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="pipeline threads per replica")
    parser.add_argument("--threads", type=int, default=3, help="client threads (closed loop)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the steady and kill phases")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    queries = [json.loads(line)["text"] for line in args.queries.read_text().splitlines() if line.strip()]
    procs = [start(args.index, f"r{i + 1}", args.workers) for i in range(args.replicas)]
    try:
        addresses = [serving_address(p) for p in procs]
        client = RetrieverClient(replica_target(addresses), load_balancing="round_robin", retries=3, timeout=30)
        rows: list[tuple[float, float, str, str]] = []  # (sent, seconds, status, replica)
        lock, stop = threading.Lock(), threading.Event()

        def load(offset: int) -> None:
            i = offset
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.search(queries[i % len(queries)], cache="bypass")
                    row = (sent, time.monotonic() - sent, "OK", r.served_by)
                except RetrieverError as error:
                    row = (sent, time.monotonic() - sent, error.code.name, error.served_by)
                with lock:
                    rows.append(row)
                i += args.threads

        threads = [threading.Thread(target=load, args=(k,)) for k in range(args.threads)]
        for t in threads:
            t.start()
        time.sleep(3.0)  # warm-up, not reported
        phases = {"steady": [time.monotonic()]}
        time.sleep(args.seconds)
        phases["steady"].append(time.monotonic())
        phases["reload"] = [time.monotonic()]
        reload_seconds = []
        for address in addresses:
            with RetrieverClient(address, admin_token=ADMIN, timeout=600) as one:
                reload_seconds.append(one.reload("").load_seconds)
        phases["reload"].append(time.monotonic())
        phases["kill"] = [time.monotonic()]
        procs[0].send_signal(signal.SIGKILL)
        time.sleep(args.seconds)
        phases["kill"].append(time.monotonic())
        stop.set()
        for t in threads:
            t.join()
        client.close()
    finally:
        stop_processes(procs, timeout=60)

    report = {"replicas": args.replicas, "workers": args.workers, "threads": args.threads,
              "reload_load_seconds": [round(s, 2) for s in reload_seconds], "phases": {}}
    print(f"{args.replicas} replicas x {args.workers} workers, {args.threads} client threads, "
          f"reload load+warm seconds {report['reload_load_seconds']}")
    print(f"{'phase':8} {'seconds':>7} {'calls':>6} {'failed':>6} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7}  spread")
    for name, (begin, end) in phases.items():
        phase = [r for r in rows if begin <= r[0] < end]
        ok = np.array([r[1] for r in phase if r[2] == "OK"]) * 1000
        failed = Counter(r[2] for r in phase if r[2] != "OK")
        spread = dict(sorted(Counter(r[3] for r in phase if r[2] == "OK").items()))
        figures = {"seconds": round(end - begin, 2), "calls": len(phase), "failed": dict(failed),
                   "p50_ms": round(float(np.percentile(ok, 50)), 2), "p99_ms": round(float(np.percentile(ok, 99)), 2),
                   "spread": spread}
        report["phases"][name] = figures
        rate = len(phase) / (end - begin)
        print(f"{name:8} {end - begin:7.1f} {len(phase):6d} {sum(failed.values()):6d} {rate:8.1f} "
              f"{figures['p50_ms']:7.1f} {figures['p99_ms']:7.1f}  {spread}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
