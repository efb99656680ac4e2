"""Across hosts for real (issue 8): servers and clients in their own network namespaces on a bridge, talking over veth
links with addresses of the test's own (tests/netlab.py). Skipped only where namespaces cannot be made (not root, no
iproute2); CI runs as root."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

# Tests import in importlib mode (no tests/ on sys.path): load the harness beside this file by its path.
if "netlab" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("netlab", Path(__file__).with_name("netlab.py"))
    sys.modules["netlab"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["netlab"])
netlab = sys.modules["netlab"]

_reason = netlab.unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ADMIN = "netns-admin-token"
PORT = 50051  # every namespace has its own ports: all replicas listen on the same one, as pods do
SERVICE_NAME = "replicas.rag.test"

# Runs in the client's namespace: searches from a few threads until stdin closes, one JSON line per call on stdout:
# [monotonic send time, seconds taken, status, replica (x-served-by), top doc id or error details, partial,
# shards_missing, doc ids]. The monotonic clock is the machine's, the same as the test's.
LOAD_CLIENT = r"""
import json, sys, threading, time
from rag_service.client import RetrieverClient, RetrieverError
target, query, threads, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
# Re-resolve the name at most twice a second (gRPC's default waits 30 s between resolutions); ping busy connections
# every second, so a replica cut off the network fails its calls over instead of holding them for 20 s.
client = RetrieverClient(target, load_balancing="round_robin", retries=3, timeout=20, keepalive=1.0,
                         options=[("grpc.dns_min_time_between_resolutions_ms", 500)])
client.wait_until_serving(60)
stop, out = threading.Event(), threading.Lock()
def load():
    while not stop.is_set():
        sent = time.monotonic()
        try:
            r = client.search(query, top_k=3, cache=cache)
            row = [sent, time.monotonic() - sent, "OK", r.served_by, r.contexts[0].doc_id, r.partial,
                   r.shards_missing, [c.doc_id for c in r.contexts]]
        except RetrieverError as e:
            row = [sent, time.monotonic() - sent, e.code.name, e.served_by, e.details, None, [], []]
        with out:
            print(json.dumps(row), flush=True)
workers = [threading.Thread(target=load) for _ in range(threads)]
for w in workers:
    w.start()
sys.stdin.read()
stop.set()
for w in workers:
    w.join()
client.close()
"""


class LoadClient:
    """The load client process, its replies collected as they come."""

    def __init__(self, host, target: str, query: str, threads: int = 3, cache: str = "default") -> None:
        self.proc = host.popen([sys.executable, "-c", LOAD_CLIENT, target, query, str(threads), cache], log="client",
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.rows: list[list] = []
        self.new: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            row = json.loads(line)
            self.rows.append(row)
            self.new.put(row)

    def wait_for(self, predicate, timeout: float, what: str) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                row = self.new.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if predicate(row):
                return row
        raise AssertionError(f"load client: no reply {what} within {timeout} s (exit {self.proc.poll()}); "
                             f"last rows {self.rows[-5:]}")

    def finish(self) -> list[list]:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
        return self.rows


@pytest.fixture
def lab(tmp_path):
    with netlab.NetLab(log_dir=tmp_path / "logs") as lab:
        yield lab


def test_lab_isolates_and_cleans_up(tmp_path):
    """Hosts reach each other over the bridge, a name in set_hosts resolves to every address, and nothing of the lab
    is left once it closes, even when the test body fails."""
    with pytest.raises(RuntimeError, match="boom"), netlab.NetLab(log_dir=tmp_path) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.set_hosts({"both.lab.test": [a.address, b.address]})
        server = a.popen([sys.executable, "-c", "import socket,sys; s=socket.create_server((sys.argv[1], 7000)); "
                          "c,_=s.accept(); c.sendall(b'hello'); c.close()", a.address])
        probe = ("import socket,sys,time\n"
                 "print(sorted({ai[4][0] for ai in socket.getaddrinfo('both.lab.test', 1, socket.AF_INET)}))\n"
                 "for _ in range(100):\n"
                 "    try: print(socket.create_connection((sys.argv[1], 7000), timeout=2).recv(5)); break\n"
                 "    except ConnectionRefusedError: time.sleep(0.05)\n")
        seen = b.run([sys.executable, "-c", probe, a.address])
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.split("\n")[:2] == [repr(sorted([a.address, b.address])), "b'hello'"]
        assert server.wait(timeout=10) == 0
        # b's address is not on this namespace's loopback: the bytes crossed the veths and the bridge.
        names = (lab.hosts["a"].netns, lab.hosts["b"].netns, lab._bridge)
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert names[0] not in listed and names[1] not in listed and f" {names[2]}:" not in links
    assert not (netlab.ETC_NETNS / names[0]).exists()


def _rolling_reload(lab, pods: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Runs deploy/rolling-reload.sh with a `kubectl` that lists `pods` and execs into their namespaces."""
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir(exist_ok=True)
    cases = "".join(f"    pod/{p}) exec ip netns exec {lab.hosts[p].netns} \"$@\";;\n" for p in pods)
    fake.write_text("#!/usr/bin/env bash\n"
                    "[ \"$1\" = -n ] && shift 2\n"
                    f"if [ \"$1\" = get ]; then printf '%s\\n' {' '.join(f'pod/{p}' for p in pods)}; exit 0; fi\n"
                    "[ \"$1\" = exec ] || exit 2\n"
                    "pod=$2; shift 3  # exec POD --\n"
                    f"case $pod in\n{cases}    *) exit 3;;\nesac\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAG_AUTH__ADMIN_TOKEN": ADMIN, "PAUSE": "0.2"}
    return subprocess.run(["bash", str(DEPLOY / "rolling-reload.sh")], env=env, capture_output=True, text=True,
                          timeout=120)


def test_round_robin_over_dns_across_namespaces_survives_a_replica_dying(lab, built_index, tmp_path):
    """Three replicas, each in its own namespace, one DNS name (hosts file) for them, a client in a fourth namespace
    balancing round_robin with retries. A replica added to the name is found (connections age out, the client
    re-resolves); a replica that hangs with calls in flight and is then killed costs no call: they fail over."""
    replicas = {name: lab.add_host(name) for name in ("r1", "r2", "r3")}
    client_host = lab.add_host("client")
    # Bound to every address, as in a pod: the rolling reload below reaches each replica on its own 127.0.0.1.
    served = {name: netlab.rag_serve(name, ["--index", str(built_index), "--host", "0.0.0.0", "--port", str(PORT),
                                            "--workers", "1"], host=host, log_dir=lab.log_dir,
                                     env={"RAG_WARMUP_QUERIES": "1", "RAG_MAX_CONNECTION_AGE_SECONDS": "1",
                                          "RAG_MAX_CONNECTION_AGE_GRACE_SECONDS": "10", "RAG_AUTH__ADMIN_TOKEN": ADMIN})
              for name, host in replicas.items()}
    for s in served.values():
        assert s.wait_serving().endswith(f":{PORT}")
    lab.set_hosts({SERVICE_NAME: [replicas["r1"].address, replicas["r2"].address]})  # r3 not in the name yet
    client = LoadClient(client_host, f"dns:///{SERVICE_NAME}:{PORT}", "glacier ice moraines")
    try:
        client.wait_for(lambda r: r[2] == "OK" and r[3] == "r1", 60, "from r1")
        client.wait_for(lambda r: r[2] == "OK" and r[3] == "r2", 10, "from r2")
        added = time.monotonic()
        lab.set_hosts({SERVICE_NAME: [r.address for r in replicas.values()]})
        found = client.wait_for(lambda r: r[3] == "r3", 15, "from r3 after adding it to the name")
        # A fresh answer from r1 first: its connection is up now. (One that aged out just before the stop would be
        # reopened to a process that never answers the handshake, and round_robin would send r1 nothing.)
        client.wait_for(lambda r: r[0] > found[0] and r[3] == "r1", 10, "from r1 before it hangs")
        # r1 hangs (a stopped process answers nothing): round_robin keeps picking it, so calls pile up on it ...
        served["r1"].proc.send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        # ... until it dies: its kernel resets the connections, every stuck call fails UNAVAILABLE, and gRPC retries
        # it on the next replica.
        killed = time.monotonic()
        served["r1"].proc.send_signal(signal.SIGKILL)
        served["r1"].proc.wait(timeout=10)
        client.wait_for(lambda r: r[0] > killed and r[3] == "r2", 15, "from r2 after the kill")
        client.wait_for(lambda r: r[0] > killed and r[3] == "r3", 15, "from r3 after the kill")
        # deploy/rolling-reload.sh over the survivors, as on Kubernetes, with `kubectl exec` into their namespaces.
        rolled = time.monotonic()
        reload = _rolling_reload(lab, ["r2", "r3"], tmp_path)
        assert reload.returncode == 0, reload.stderr
        client.wait_for(lambda r: r[0] > rolled + 0.5 and r[3] == "r2", 15, "from r2 after the reloads")
        # r2 is cut off the network: no reset, its calls hang until the client's keepalive gives up on the
        # connection (1 s ping + 1 s to answer); then they fail UNAVAILABLE and are retried on r3.
        cut = time.monotonic()
        replicas["r2"].set_link(False)
        client.wait_for(lambda r: r[0] > cut + 3 and r[3] == "r3", 20, "from r3 once r2 is cut off")
        time.sleep(0.3)
    finally:
        rows = client.finish()
        replicas["r2"].set_link(True)
    failures = [r for r in rows if r[2] != "OK"]
    assert not failures, (failures[:5], lab.log("client")[-2000:])
    assert all(r[4] == "glacier" for r in rows)
    assert found[0] >= added - 0.1  # r3 answered only once the name listed it
    assert not [r for r in rows if r[3] == "r3" and r[0] < added - 0.1]
    # Calls sent while r1 hung waited for its death, then succeeded elsewhere: each was retried.
    rescued = [r for r in rows if r[0] < killed and r[0] + r[1] > killed]
    assert rescued and all(r[3] in ("r2", "r3") for r in rescued), rescued
    assert max(r[1] for r in rescued) > 0.8, rescued  # at least one had been stuck on r1 since it hung
    after = Counter(r[3] for r in rows if r[0] > killed + 0.05)
    assert set(after) == {"r2", "r3"}, after
    assert {r[3] for r in rows if rolled < r[0] < cut} == {"r2", "r3"}
    # Cut off: calls round_robin sent to r2 waited for the keepalive (seconds, not the 20 s deadline), then r3
    # answered them. Those in flight at the cut count too: when every client thread was waiting on r2 at that
    # moment, no call starts in the following second.
    held = [r for r in rows if r[0] < cut + 1 and r[0] + r[1] > cut and r[1] > 1.0]
    assert held and all(r[3] == "r3" and r[1] < 10 for r in held), held
    assert {r[3] for r in rows if r[0] > cut + 3} == {"r3"}
    # Each pod reloaded the index it serves (CURRENT unchanged here: old and new version are the same; the switch to
    # a new version under load is test_replicas.py's).
    lines = reload.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["pod/r2", "pod/r3"], reload.stdout
    assert all(" -> " in line for line in lines), reload.stdout
    for name in ("r2", "r3"):
        assert served[name].stop() == 0
        assert re.search(r"reloaded collection \S+: serving", (lab.log_dir / f"{name}.log").read_text())


@pytest.fixture(scope="module")
def sharded(built_index, tmp_path_factory):
    """The shared test index split in 3 shards (global BM25 statistics) plus the router's directory."""
    from rag_service.shard.split import split_index

    return split_index(built_index, tmp_path_factory.mktemp("netns") / "sharded", 3)


def test_router_and_shards_in_their_own_namespaces(lab, sharded, built_index):
    """Three shards and a router, each in its own namespace, a client in a fifth: replies over the real network match
    the single index; a shard killed mid-run, then another one cut off the network (no RST: the router waits for its
    per-shard timeout), yield replies marked partial that hold none of the missing shards' documents, never an error;
    require_complete gets UNAVAILABLE naming the shard; the cut-off shard is used again once its link is back."""
    from rag_service.client import RetrieverClient, RetrieverError
    from rag_service.shard.split import shard_of

    query, shard_port, router_port = "glacier ice moraines", 7001, 7000
    shards = [lab.add_host(f"s{i}") for i in range(3)]
    router_host, client_host = lab.add_host("router"), lab.add_host("client")
    # Queues deep enough that a slow moment on a loaded machine does not shed a call: this test is about shards lost
    # to the network, and admission control has its own tests.
    env = {"RAG_WARMUP_QUERIES": "1", "RAG_MAX_QUEUED": "32"}
    shard_procs = [netlab.rag_serve(f"s{i}", ["--index", str(sharded.root / f"shard-{i}"), "--host", h.address,
                                               "--port", str(shard_port), "--workers", "1"],
                                    host=h, log_dir=lab.log_dir, env=env) for i, h in enumerate(shards)]
    # The unsplit index served the same way (same query encoder as the shards: the test session's own encoder
    # would rank near-ties differently on some CPUs).
    single_host = lab.add_host("single")
    single_proc = netlab.rag_serve("single", ["--index", str(built_index), "--host", single_host.address,
                                              "--port", str(shard_port), "--workers", "1"],
                                   host=single_host, log_dir=lab.log_dir, env=env)
    for proc in [*shard_procs, single_proc]:
        proc.wait_serving()
    addresses = [f"{h.address}:{shard_port}" for h in shards]
    label = {i: f"{i}@{address}" for i, address in enumerate(addresses)}
    router = netlab.rag_serve("router", ["--index", str(sharded.router), "--shards", ",".join(addresses),
                                         "--host", router_host.address, "--port", str(router_port), "--workers", "4"],
                              host=router_host, log_dir=lab.log_dir,
                              env={**env, "RAG_ROUTER__SHARD_TIMEOUT_SECONDS": "1"})
    router_address = router.wait_serving()
    # The test's own namespace reaches the lab through the bridge: the router against the single index.
    with RetrieverClient(router_address, timeout=20) as direct, \
            RetrieverClient(f"{single_host.address}:{shard_port}", timeout=20) as single:
        whole = direct.search(query, top_k=5)
        assert not whole.partial and sorted(whole.shards_answered) == sorted(label.values())
        assert [c.doc_id for c in whole.contexts] == [c.doc_id for c in single.search(query, top_k=5).contexts]
        victim = shard_of("glacier", 3)  # the shard holding the best answer
        cut = (victim + 1) % 3

        # The router caches complete replies: bypass it, or the shards would not be asked again after the kill. A
        # router thread waits out a cut-off shard's timeout: more threads than callers, or admission control sheds.
        client = LoadClient(client_host, router_address, query, threads=2, cache="bypass")
        try:
            client.wait_for(lambda r: r[2] == "OK" and not r[5], 60, "complete")
            kill_sent = time.monotonic()
            shard_procs[victim].proc.send_signal(signal.SIGKILL)
            shard_procs[victim].proc.wait(timeout=10)
            killed = time.monotonic()
            client.wait_for(lambda r: r[0] > killed and r[5], 15, "partial after the kill")
            with pytest.raises(RetrieverError) as refused:
                direct.search(query, require_complete=True, cache="bypass")
            assert refused.value.code.name == "UNAVAILABLE" and label[victim] in refused.value.details, refused.value
            pulled = time.monotonic()
            shards[cut].set_link(False)
            client.wait_for(lambda r: r[0] > pulled and label[cut] in r[6], 15, "missing the cut-off shard")
            replugged = time.monotonic()
            shards[cut].set_link(True)
            client.wait_for(lambda r: r[0] > replugged and r[6] == [label[victim]], 30, "from the shard plugged back")
        finally:
            rows = client.finish()
    failures = [r for r in rows if r[2] != "OK"]
    assert not failures, (failures[:5], lab.log("router")[-3000:])
    assert all(not r[5] and r[4] == "glacier" for r in rows if r[0] + r[1] < kill_sent)
    after = [r for r in rows if r[0] > killed + 0.05]
    assert after and all(r[5] and label[victim] in r[6] for r in after), after[:3]
    for r in rows:  # a partial reply holds nothing from a shard it names missing
        missing = {int(m.split("@")[0]) for m in r[6]}
        assert not [d for d in r[7] if shard_of(d, 3) in missing], r
    assert any(set(r[6]) == {label[victim], label[cut]} for r in rows if pulled < r[0] < replugged)
    assert router.stop() == 0
