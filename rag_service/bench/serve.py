"""A real `rag-serve` in a child process, for benchmarks that need a server of their own (`--index` instead of
`--target`): port 0, so runs never collide, and its pid, so its resident memory can be read."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

_SERVING = re.compile(r"rag-serve: SERVING .* on (?P<host>\S+):(?P<port>\d+)")


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 30.0) -> None:
    """SIGTERM to every process still running (all at once, so their drains overlap), then a wait for each; one that
    outlives `timeout` is killed."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# `python -m` puts the working directory first on sys.path: run from a checkout, the child would import the source
# tree (without the compiled extension) instead of the installed package. Python 3.11+ honours this variable.
SAFE_PATH = {"PYTHONSAFEPATH": "1"}


class ServerProcess:
    """`with ServerProcess(index) as server: server.target` -> "127.0.0.1:<port>"; stopped with SIGTERM on exit."""

    def __init__(self, index: Path | None, *, workers: int | None = None, start_timeout: float = 600.0,
                 extra_env: dict[str, str] | None = None, executable: str | None = None,
                 args: Sequence[str] = ()) -> None:
        """`executable`: a rag-serve to run instead of this environment's (another build, for an A/B). `args`: more
        rag-serve options (`--index-root DIR` in place of an index: give index None)."""
        self.index = Path(index) if index is not None else None
        self.args = list(args)
        self.executable = executable
        self.workers = workers
        self.start_timeout = start_timeout
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self.target = ""
        self.port = 0
        self.start_seconds = 0.0
        self._log: deque[str] = deque(maxlen=50)

    def __enter__(self) -> ServerProcess:
        serve = [self.executable] if self.executable else [sys.executable, "-m", "rag_service.cli.serve"]
        command = [*serve, *(["--index", str(self.index)] if self.index is not None else []), *self.args,
                   "--port", "0", "--log-level", "WARNING"]
        if self.workers:
            command += ["--workers", str(self.workers)]
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1", **SAFE_PATH, **self.extra_env})
        found: dict[str, str] = {}
        ready = threading.Event()

        def read() -> None:  # drains the pipe for the server's whole life so it never blocks on a full pipe
            assert self.process is not None and self.process.stdout is not None
            for line in self.process.stdout:
                self._log.append(line.rstrip())
                match = _SERVING.search(line)
                if match and not ready.is_set():
                    found.update(match.groupdict())
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.start_timeout) or not found:
            self.stop()
            raise RuntimeError(f"rag-serve did not start on {self.index or self.args}:\n" + "\n".join(self._log))
        self.start_seconds = time.monotonic() - started
        self.port = int(found["port"])
        self.target = f"127.0.0.1:{self.port}"
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss

    def stop(self) -> None:
        if self.process is not None:
            stop_processes([self.process])

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serve_builds(index: Path, builds: Mapping[str, str | None]) -> Iterator[dict[str, Any]]:
    """`builds`: NAME -> a rag-serve executable (another build, for an A/B; None: this environment's). Starts each on
    `index` and yields a ready Retriever stub per name; every server stops on exit."""
    import grpc

    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    with contextlib.ExitStack() as stack:
        stubs = {}
        for name, executable in builds.items():
            server = stack.enter_context(ServerProcess(index, executable=executable))
            channel = stack.enter_context(grpc.insecure_channel(server.target))
            grpc.channel_ready_future(channel).result(timeout=60)
            stubs[name] = pb_grpc.RetrieverStub(channel)
        yield stubs
