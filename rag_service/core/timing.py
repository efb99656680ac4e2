"""Per-stage wall-clock timing, shared by the request pipeline (microseconds per request) and the index build."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Accumulates microseconds per named stage; a stage entered twice adds up."""

    def __init__(self) -> None:
        self.us: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.us[name] = self.us.get(name, 0) + (time.perf_counter_ns() - start) // 1000

    def seconds(self, name: str) -> float:
        return self.us[name] / 1e6
