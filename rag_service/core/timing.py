"""Per-stage wall-clock timing, shared by the request pipeline (microseconds per request) and the index build.

A stage of a traced request is also a span, a child of the current one (rag_service/core/tracing.py); untraced
(the index build, or a server without a recording tracer) it costs one context-variable read more.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rag_service.core.tracing import request_tracer


class _Stage:
    """One timed stage, a context manager object: a request enters ~10 stages, and a generator-based
    contextmanager costs about twice the calls (helper, generator, next on entry and exit)."""

    __slots__ = ("_timer", "_name", "_start", "_span")

    def __init__(self, timer: StageTimer, name: str) -> None:
        self._timer = timer
        self._name = name
        self._span: Any = None

    def __enter__(self) -> None:
        tracer = request_tracer()
        self._start = time.perf_counter_ns()
        if tracer is not None:
            self._span = tracer.start_as_current_span(self._name)
            self._span.__enter__()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            if self._span is not None:
                self._span.__exit__(kind, error, trace)
        finally:
            us = self._timer.us
            us[self._name] = us.get(self._name, 0) + (time.perf_counter_ns() - self._start) // 1000


class StageTimer:
    """Accumulates microseconds per named stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.us: dict[str, int] = {}

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def seconds(self, name: str) -> float:
        return self.us[name] / 1e6
