"""System calls per answer: what `rag-serve` asks of the kernel for each Search, at one client or at saturation.

    python bench/experiments/syscalls.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl
    python bench/experiments/syscalls.py --index /tmp/lead/sf --queries ../shared/data/scifact/queries.jsonl \
        --clients 4

A profile by function shows where CPU time goes but not a call into the kernel hidden in a library (a thread's
wake-up, a file read per request); on a VM each costs microseconds, several when it wakes another vCPU. This script
starts one `rag-serve` (the index, its defaults), drives it with `--clients` closed-loop callers (Search with
CACHE_BYPASS: the whole pipeline; refusals asked again at once), attaches `strace -f -c` to the server for
`--seconds` after `--warmup` seconds of the same load, and prints per answer each system call's count and errors,
then the files the server opened meanwhile (`strace -e trace=openat` in a second pass: a request should open none).
strace slows every call it sees, so the answers per second it reports are not the server's; the counts are. Needs
strace (apt install strace).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from rag_service.bench.data import load_queries
from rag_service.bench.serve import ServerProcess
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

# strace -c's table: % time, seconds, usecs/call, calls, [errors,] syscall
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")
_OPENAT = re.compile(r'openat\([^"]*"([^"]*)"')


class Load:
    """`clients` closed-loop callers of plain misses, counting answers, until stopped."""

    def __init__(self, target: str, texts: list[str], clients: int) -> None:
        self.requests = [pb.SearchRequest(query=t, cache=pb.CACHE_BYPASS) for t in texts]
        self.answered = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(target, c, clients)) for c in range(clients)]

    def _loop(self, target: str, c: int, clients: int) -> None:
        with grpc.insecure_channel(target) as channel:
            search = pb_grpc.RetrieverStub(channel).Search
            n = c
            while not self._stop.is_set():
                try:
                    search(self.requests[n % len(self.requests)], timeout=30)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    continue
                with self._lock:
                    self.answered += 1
                n += clients

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def traced(strace: str, pid: int, load: Load, seconds: float, args: list[str]) -> tuple[str, int]:
    """strace `args` attached to `pid` for `seconds` of `load`: (its output, answers meanwhile)."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        tool = subprocess.Popen([strace, "-f", "-o", out.name, *args, "-p", str(pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached to every thread
        before = load.answered
        time.sleep(seconds)
        answered = load.answered - before
        tool.send_signal(2)
        tool.wait()
        return Path(out.name).read_text(), max(answered, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--top", type=int, default=15, help="system calls listed")
    args = parser.parse_args()
    strace = shutil.which("strace")
    if strace is None:
        sys.exit("syscalls.py needs strace (apt install strace)")
    texts = list(load_queries(args.queries).values())[:300]
    with ServerProcess(args.index) as server, Load(server.target, texts, args.clients) as load:
        time.sleep(args.warmup)
        table, answered = traced(strace, server.pid, load, args.seconds, ["-c"])
        opened, opened_answers = traced(strace, server.pid, load, args.seconds, ["-e", "trace=openat"])
    rows = []
    for line in table.splitlines():
        match = _ROW.match(line)
        if match and match.group(3) != "total":
            rows.append((int(match.group(1)), int(match.group(2) or 0), match.group(3)))
    rows.sort(reverse=True)
    print(f"rag-serve, {args.clients} client(s), {answered} answers under strace in {args.seconds:g} s")
    print(f"{'system call':<18} {'per answer':>10} {'errors':>8}")
    for calls, errors, name in rows[: args.top]:
        print(f"{name:<18} {calls / answered:10.2f} {errors / answered:8.2f}")
    print(f"{'all':<18} {sum(r[0] for r in rows) / answered:10.2f}")
    files = collections.Counter(_OPENAT.findall(opened))
    print(f"\nfiles opened in {opened_answers} answers:" + ("" if files else " none"))
    for name, count in files.most_common(args.top):
        print(f"  {count / opened_answers:6.2f} per answer  {name}")


if __name__ == "__main__":
    main()
