"""A small network lab for tests: hosts in their own network namespaces on one bridge, with real addresses.

    with NetLab(log_dir=tmp_path) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        server = a.popen(["python", "-m", "http.server", "--bind", a.address, "8000"])
        b.run(["python", "-c", f"import urllib.request; urllib.request.urlopen('http://{a.address}:8000')"])

Each host is a namespace `raglab-<token>-<name>` joined to the lab's bridge `rlb<token>` by a veth pair (its end is
`eth0` inside, with an address from a 10.x.y.0/24 subnet no interface of this machine uses); the bridge itself gets
.1, so the test process reaches every host too. Processes run inside with `ip netns exec`, which also bind-mounts
/etc/netns/<namespace>/hosts and resolv.conf over /etc's: `set_hosts` gives a name several addresses there, a DNS
name with several A records as far as a resolver inside is concerned (there is no DNS server in the lab). `close`
(also on an exception, and at exit) kills the lab's processes and removes its namespaces, bridge and files; a lab
left by a killed test run is removed by the next one (the token holds the pid that made it).

Needs root and iproute2; `unavailable_reason()` says why not, for a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "raglab-"
BRIDGE_PREFIX = "rlb"
ETC_NETNS = Path("/etc/netns")
_TOKEN_RE = re.compile(r"^([0-9a-f]+)x([0-9a-f]+)$")
_counter = itertools.count()
_open_labs: set[NetLab] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """None when network namespaces can be made here; else why not (a reason for pytest.skip)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add`); these tests run as root in CI"
    probe = f"{PREFIX}{os.getpid():x}xprobe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Removes what labs of processes that no longer exist left behind (a test run killed before its cleanup)."""
    removed = []
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        if not name.startswith(PREFIX):
            continue
        token = name[len(PREFIX):].split("-", 1)[0]
        match = _TOKEN_RE.match(token)
        if match and not _pid_alive(int(match.group(1), 16)):
            _ip("netns", "del", name, check=False)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
            removed.append(name)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        match = _TOKEN_RE.match(ifname[len(BRIDGE_PREFIX):]) if ifname.startswith(BRIDGE_PREFIX) else None
        if match and not _pid_alive(int(match.group(1), 16)):
            _ip("link", "del", ifname, check=False)
            removed.append(ifname)
    return removed


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            nets.append(ipaddress.ip_interface(match.group(1)).network)
    for line in _ip("-4", "route", "show", check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first and first != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(first, strict=False))
    return nets


def _free_subnet(token: str) -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0-10.249.255.0 that overlaps nothing on this machine, picked from the token (two labs of
    one run get different ones)."""
    used = _subnets_in_use()
    start = zlib.crc32(token.encode())
    for i in range(1000):
        n = (start + i * 7919) % (50 * 256)
        net = ipaddress.ip_network(f"10.{200 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("netlab: no free 10.x.y.0/24 subnet")


@dataclass
class Host:
    lab: NetLab
    name: str
    netns: str
    address: str
    veth: str  # the host-side end on the bridge

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: list[str], *, log: str | None = None, **kwargs) -> subprocess.Popen:
        """Starts `argv` inside this host; the lab kills it on close. With `log`, stderr goes to a file of that name
        in the lab's log directory (`lab.log(name)` reads it)."""
        if log is not None and self.lab.log_dir is not None and "stderr" not in kwargs:
            kwargs["stderr"] = open(self.lab.log_dir / f"{log}.log", "w")  # noqa: SIM115 - the lab closes it
            self.lab.files.append(kwargs["stderr"])
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self.lab.processes.append(proc)
        return proc

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.command(argv), **kwargs)

    def set_link(self, up: bool) -> None:
        """Plugs or pulls this host's cable: no packet in or out while down (no RST either, unlike a killed
        process), the way a host that dies or a partition looks from the network."""
        _ip("link", "set", self.veth, "up" if up else "down")


@dataclass(eq=False)
class NetLab:
    log_dir: Path | None = None
    token: str = ""
    subnet: ipaddress.IPv4Network | None = None
    hosts: dict[str, Host] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)
    files: list = field(default_factory=list)
    _names: dict[str, list[str]] = field(default_factory=dict)
    _bridge: str | None = None

    def __post_init__(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"netlab: {reason}")
        remove_stale()
        self.token = f"{os.getpid():x}x{next(_counter):x}"
        self.subnet = _free_subnet(self.token)
        if self.log_dir is not None:
            self.log_dir = Path(self.log_dir)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        _open_labs.add(self)
        try:
            bridge = f"{BRIDGE_PREFIX}{self.token}"
            _ip("link", "add", bridge, "type", "bridge")
            self._bridge = bridge
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", bridge)
            _ip("link", "set", bridge, "up")
        except BaseException:
            self.close()
            raise

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        if not re.fullmatch(r"[a-z0-9]{1,8}", name) or name in self.hosts:
            raise ValueError(f"netlab: host name must be 1-8 lower-case letters or digits, unique: {name!r}")
        i = len(self.hosts)
        if i >= 250:
            raise ValueError("netlab: at most 250 hosts per lab")
        netns = f"{PREFIX}{self.token}-{name}"
        veth = f"rlv{self.token}h{i:x}"  # at most 15 characters (IFNAMSIZ)
        address = str(self.subnet.network_address + 2 + i)
        _ip("netns", "add", netns)
        host = Host(self, name, netns, address, veth)
        self.hosts[name] = host
        peer = f"rlp{self.token}h{i:x}"
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "master", self._bridge, "up")
        _ip("-n", netns, "link", "set", peer, "name", "eth0")
        _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        # `ip netns exec` bind-mounts these over /etc (when they exist as it starts a process, hence now): names come
        # from the lab's hosts file only, and with no DNS server in the lab (127.0.0.1 refuses at once) a lookup
        # never waits for the machine's resolver, which the lab cannot reach (c-ares would time out, seconds).
        etc = ETC_NETNS / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (etc / "hosts").write_text(self._hosts_text())
        return host

    def _hosts_text(self) -> str:
        return "127.0.0.1 localhost\n" + "".join(f"{address} {name}\n" for name, addresses in self._names.items()
                                               for address in addresses)

    def set_hosts(self, names: dict[str, list[str]]) -> None:
        """/etc/hosts of every host (processes already running too: the file is rewritten in place, and
        `ip netns exec` bind-mounted it) maps each name to its addresses, in order; hosts added later get it too."""
        self._names = {name: list(addresses) for name, addresses in names.items()}
        text = self._hosts_text()
        for host in self.hosts.values():
            with open(ETC_NETNS / host.netns / "hosts", "r+") as f:  # in place: the bind mounts keep the inode
                f.write(text)
                f.truncate()

    def log(self, name: str) -> str:
        path = (self.log_dir or Path("/nonexistent")) / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.processes.clear()
        for f in self.files:
            f.close()
        self.files.clear()
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)  # its eth0 goes with it, and so the veth's other end
            shutil.rmtree(ETC_NETNS / host.netns, ignore_errors=True)
        self.hosts.clear()
        if self._bridge is not None:
            _ip("link", "del", self._bridge, check=False)
            self._bridge = None
        _open_labs.discard(self)


@atexit.register
def _close_all() -> None:
    for lab in list(_open_labs):
        lab.close()


# ---------------------------------------------------------------------------------------------------------------------
# rag-serve processes, in the test's own namespace or in a lab host.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Served:
    """A `rag-serve` process: `address` is HOST:PORT once it printed SERVING (its index loaded and warm)."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None
    address: str = ""
    _lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)
            match = re.search(r"SERVING .* on (\S+):(\d+)", line)
            if match and not self._ready.is_set():
                self.address = f"{match.group(1)}:{match.group(2)}"
                self._ready.set()
        self._ready.set()  # exited: wait() stops waiting and reports it

    def wait_serving(self, timeout: float = 120.0) -> str:
        if not self._ready.wait(timeout) or not self.address:
            log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path and self.log_path.exists() else ""
            raise RuntimeError(f"rag-serve {self.name} not SERVING (exit code {self.proc.poll()}); "
                               f"stdout {''.join(self._lines)[-500:]!r}; log tail:\n{log}")
        return self.address

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def rag_serve(name: str, args: list[str], *, host: Host | None = None, env: dict[str, str] | None = None,
              log_dir: Path | None = None) -> Served:
    """Starts `rag-serve ARGS` (in `host`'s namespace, or here) named `name` (RAG_REPLICA_NAME); returns at once:
    start several, then `wait_serving()` on each, so they load in parallel."""
    argv = [sys.executable, "-m", "rag_service.cli.serve", "--log-format", "text", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAG_REPLICA_NAME": name, **(env or {})}
    log_path = Path(log_dir) / f"{name}.log" if log_dir is not None else None
    stderr = open(log_path, "w") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    kwargs = dict(stdout=subprocess.PIPE, stderr=stderr, text=True, env=full_env)
    try:
        proc = host.popen(argv, **kwargs) if host is not None else subprocess.Popen(argv, **kwargs)
    finally:
        if stderr is not subprocess.DEVNULL:
            stderr.close()  # the child holds its own copy
    served = Served(name, proc, log_path)
    threading.Thread(target=served._read, daemon=True).start()
    return served
