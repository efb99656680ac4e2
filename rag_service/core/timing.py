"""Per-stage wall-clock timing, shared by the request pipeline (microseconds per request) and the index build.

A stage of a traced request is also a span, a child of the current one (rag_service/core/tracing.py); untraced
(the index build, or a server without a recording tracer) it costs one context-variable read more.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rag_service.core.tracing import request_tracer


class StageTimer:
    """Accumulates microseconds per named stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.us: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        tracer = request_tracer()
        start = time.perf_counter_ns()
        try:
            if tracer is None:
                yield
            else:
                with tracer.start_as_current_span(name):
                    yield
        finally:
            self.us[name] = self.us.get(name, 0) + (time.perf_counter_ns() - start) // 1000

    def seconds(self, name: str) -> float:
        return self.us[name] / 1e6
