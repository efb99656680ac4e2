"""What tracing costs when no provider records: pipeline stages in process, and Search over a real channel.

    python bench/experiments/tracing_overhead.py [--index ROOT] [--stages 200000] [--calls 2000]

In process: per-stage time of StageTimer.stage as shipped, no request traced (one context-variable read more), against
the timer without the tracing check ("skipped"), and inside a request traced by an SDK provider that records every
span (no exporter); the RPC span through OpenTelemetry's no-op provider with a caller's traceparent (what an
untraced server would pay per call had it used the API's no-op path rather than no span); `carry` (the context copy
each pipeline submission makes).
Search: per-call client time on an in-process server with a caller's traceparent, in alternating blocks so drift hits
every mode alike: tracing not configured (as shipped), "skipped" (StageTimer without the check, no context copy) and
"recording" (an SDK provider that records every span, no exporter); exact cache hits (answered on the event loop,
where the wrapper's share is largest) and CACHE_BYPASS (the whole pipeline on a thread).
Without --index it builds a 12-document index in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracerProvider

from rag_service.core import tracing
from rag_service.core.timing import StageTimer

TRACEPARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)


class SkippedTimer(StageTimer):
    """StageTimer.stage without the tracing check: the baseline."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.us[name] = self.us.get(name, 0) + (time.perf_counter_ns() - start) // 1000


def per_op_ns(fn, n: int, repeats: int = 5) -> float:
    """Best of `repeats` runs of n calls, in ns per call (the least disturbed by the other processes here)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def stages(n: int) -> dict[str, float]:
    def run(timer_class):
        timer = timer_class()

        def one():
            with timer.stage("fusion"):
                pass
        return one

    recording = tracing.tracer(TracerProvider())  # records every span, exports none
    noop = tracing.tracer(NoOpTracerProvider())
    out = {"stage_skipped_ns": per_op_ns(run(SkippedTimer), n), "stage_untraced_ns": per_op_ns(run(StageTimer), n)}
    with tracing.server_span(recording, "rag.v1.Retriever", "Search", TRACEPARENT):
        out["stage_recording_ns"] = per_op_ns(run(StageTimer), n // 10)

    def rpc_span():
        with tracing.server_span(noop, "rag.v1.Retriever", "Search", TRACEPARENT):
            pass
    out["rpc_span_noop_ns"] = per_op_ns(rpc_span, n // 10)
    out["carry_ns"] = per_op_ns(lambda: tracing.carry(int)(), n)
    return out


@contextlib.contextmanager
def mode(server, name: str) -> Iterator[None]:
    """untraced: as shipped; skipped: no tracing check in stages, no context copy; recording: every span recorded."""
    if name == "untraced":
        yield
        return
    if name == "recording":
        calls = server.servicer.rpc
        calls.tracer = tracing.tracer(TracerProvider())
        try:
            yield
        finally:
            calls.tracer = None
        return
    saved = StageTimer.stage, tracing.carry
    StageTimer.stage, tracing.carry = SkippedTimer.stage, functools.partial
    try:
        yield
    finally:
        StageTimer.stage, tracing.carry = saved


def build_small_index(work: Path) -> Path:
    from rag_service.encoder.encode import Encoder
    from rag_service.index.build import BuildConfig, build_index

    texts = ["A volcano erupts when magma rises through the crust.", "Glaciers carve U-shaped valleys.",
             "Earthquakes are caused by a sudden slip on a fault.", "Plants turn sunlight into sugar.",
             "DNA carries genetic instructions as a double helix.", "Roman aqueducts carried water by gravity.",
             "Gutenberg's press spread books across Europe.", "The speed of light is a physical constant.",
             "Gravity attracts masses to one another.", "A suspension bridge hangs its deck from cables.",
             "Coffee is brewed from roasted beans.", "Sourdough is leavened by wild yeast."]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    build_index(corpus, work / "idx", BuildConfig(), encoder=Encoder(), progress=False)
    return work / "idx"


def searches(index: Path, calls: int, blocks: int = 10) -> dict[str, dict[str, float]]:
    from rag_service.api.server import create_server
    from rag_service.core.config import ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(
        create_server(ServerConfig(index=index, port=0, warmup_queries=2)), loop).result(300)
    kinds = {"exact_hit": pb.SearchRequest(query="how do volcanoes erupt"),
             "bypass": pb.SearchRequest(query="how do volcanoes erupt", cache=pb.CACHE_BYPASS)}
    modes = ("untraced", "skipped", "recording")
    times: dict[str, list[float]] = {f"{kind}/{name}": [] for kind in kinds for name in modes}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            for request in kinds.values():
                for _ in range(50):
                    stub.Search(request, timeout=30)
            per_block = max(calls // blocks, 1)
            for block in range(blocks):
                for name in modes[block % 3:] + modes[:block % 3]:  # each mode first as often as the others
                    with mode(server, name):
                        for kind, request in kinds.items():
                            for _ in range(per_block):
                                start = time.perf_counter_ns()
                                stub.Search(request, timeout=30, metadata=TRACEPARENT)
                                times[f"{kind}/{name}"].append((time.perf_counter_ns() - start) / 1000)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
    return {name: {"p50_us": float(np.percentile(t, 50)), "p99_us": float(np.percentile(t, 99)),
                   "mean_us": float(np.mean(t)), "n": len(t)} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="index root to serve (default: a 12-document index built here)")
    parser.add_argument("--stages", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=2000, help="Search calls per kind and mode")
    args = parser.parse_args()
    print(json.dumps(stages(args.stages), indent=1))
    if args.calls:
        with tempfile.TemporaryDirectory() as work:
            index = args.index or build_small_index(Path(work))
            print(json.dumps(searches(index, args.calls), indent=1))


if __name__ == "__main__":
    main()
