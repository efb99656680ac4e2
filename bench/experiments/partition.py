"""A replica cut off the network, with and without client keepalive (issue 8). Needs root (network namespaces).

Two `rag-serve` replicas and a client, each in its own network namespace (tests/netlab.py); the client balances
round_robin with 3 retries on UNAVAILABLE and an 8 s deadline from 2 threads. After 4 s, r1's link goes down: no
reset, its packets just vanish. Printed: the calls before and after the cut by replica or status, and the slowest.

    python bench/experiments/partition.py --index /tmp/replicas/idx0/root --keepalive 0  # gRPC's default: no keepalive
    python bench/experiments/partition.py --index /tmp/replicas/idx0/root --keepalive 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

_spec = importlib.util.spec_from_file_location("netlab", Path(__file__).resolve().parents[2] / "tests" / "netlab.py")
netlab = importlib.util.module_from_spec(_spec)
sys.modules["netlab"] = netlab
_spec.loader.exec_module(netlab)

CLIENT = r"""
import json, sys, threading, time
from rag_service.client import RetrieverClient, RetrieverError
target, keepalive, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
client = RetrieverClient(target, load_balancing="round_robin", retries=3, timeout=8,
                         keepalive=keepalive or None)
client.wait_until_serving(60)
stop, lock = threading.Event(), threading.Lock()
def load():
    while not stop.is_set():
        sent = time.monotonic()
        try:
            served_by = client.search("glacier ice", top_k=1).served_by
            row = [sent, time.monotonic() - sent, served_by]
        except RetrieverError as error:
            row = [sent, time.monotonic() - sent, error.code.name]
        with lock:
            print(json.dumps(row), flush=True)
threads = [threading.Thread(target=load) for _ in range(2)]
for t in threads:
    t.start()
time.sleep(seconds)
stop.set()
for t in threads:
    t.join()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="index root every replica serves")
    parser.add_argument("--keepalive", type=float, default=0.0, help="client keepalive seconds; 0: none")
    parser.add_argument("--seconds", type=float, default=14.0, help="how long the client runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs, netlab.NetLab(log_dir=Path(logs)) as lab:
        replicas = [lab.add_host(name) for name in ("r1", "r2")]
        client_host = lab.add_host("client")
        served = [netlab.rag_serve(h.name, ["--index", str(args.index), "--host", "0.0.0.0", "--port", "50051",
                                            "--workers", "1"], host=h, log_dir=lab.log_dir,
                                   env={"RAG_WARMUP_QUERIES": "1"}) for h in replicas]
        for s in served:
            s.wait_serving()
        target = "ipv4:///" + ",".join(f"{h.address}:50051" for h in replicas)
        client = client_host.popen([sys.executable, "-c", CLIENT, target, str(args.keepalive), str(args.seconds)],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(4.0)
        cut = time.monotonic()
        replicas[0].set_link(False)
        rows = [json.loads(line) for line in client.communicate(timeout=args.seconds + 60)[0].splitlines()]
    before = Counter(r[2] for r in rows if r[0] < cut)
    after = [r for r in rows if r[0] >= cut]
    print(f"keepalive {args.keepalive or 'off'}: before the cut {dict(before)}; after it "
          f"{dict(Counter(r[2] for r in after))}, slowest call {max(r[1] for r in after):.2f} s")


if __name__ == "__main__":
    main()
