"""Prefetch: searches a client expects soon, run in the background to fill the cache, never at the expense of live
searches.

A bounded queue drained by one task on the event loop, one search at a time on a thread of its own (so background work
never waits in the pipeline pool's queue in front of a live request). Work is refused when the queue is full, and
dropped instead of run while `busy_in_flight` or more live searches are in flight; both are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from rag_service.core.config import CacheConfig
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams
from rag_service.search.cache import MISS, PREFETCH, CachedSearch, Served
from rag_service.search.searcher import Searcher

log = logging.getLogger(__name__)


class Prefetcher:
    """`pipeline(collection)` gives what serves that collection now (a reload may swap it while work waits; None
    once it is gone); `live()` the number of live searches in flight."""

    def __init__(self, cache: CachedSearch, config: CacheConfig, metrics: Metrics, *,
                 pipeline: Callable[[str], Searcher | None], live: Callable[[], int]) -> None:
        self.cache = cache
        self.config = config
        self.metrics = metrics
        self._pipeline = pipeline
        self._live = live
        self._queue: deque[tuple[str, SearchParams]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-prefetch")
        self._closed = False

    def busy(self) -> bool:
        return self._live() >= self.config.prefetch_busy_in_flight

    def submit(self, requests: Sequence[tuple[str, SearchParams]]) -> tuple[int, int]:
        """Queues what fits of (collection, params); returns (accepted, dropped). Call on the event loop."""
        accepted = dropped = 0
        for request in requests:
            reason = None
            if self._closed or not self.cache.config.enabled:
                reason = "disabled"
            elif self.busy():
                reason = "busy"
            elif len(self._queue) >= self.config.prefetch_queue:
                reason = "queue_full"
            if reason is not None:
                dropped += 1
                self.metrics.prefetch_dropped.labels(reason).inc()
                continue
            self._queue.append(request)
            accepted += 1
        if accepted:
            self.metrics.prefetch_accepted.inc(accepted)
            self.metrics.prefetch_queued.set(len(self._queue))
            self._ensure_running()
        return accepted, dropped

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done() or self._wakeup is None:
            wakeup = self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._drain(wakeup), name="rag-prefetch")
        self._wakeup.set()

    async def _execute(self, work: Callable[[], Served]) -> Served:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def _drain(self, wakeup: asyncio.Event) -> None:
        while not self._closed:
            if not self._queue:
                wakeup.clear()
                await wakeup.wait()
                continue
            collection, params = self._queue.popleft()
            self.metrics.prefetch_queued.set(len(self._queue))
            pipeline = self._pipeline(collection)
            if pipeline is None or self.busy():
                self.metrics.prefetch_dropped.labels("busy" if pipeline is not None else "disabled").inc()
                continue
            try:
                served = await self.cache.search(pipeline, params, deadline=None, execute=self._execute,
                                                 origin=PREFETCH)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - a failed prefetch must not stop the ones after it
                log.warning("prefetch of a query failed: %s", error)
                self.metrics.prefetch_completed.labels("failed").inc()
                continue
            self.metrics.prefetch_completed.labels("filled" if served.served_from == MISS else "cached").inc()

    def pending(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        """Drops what is queued and stops the background task; the running search (if any) finishes on its thread."""
        self._closed = True
        if self._queue:
            self.metrics.prefetch_dropped.labels("disabled").inc(len(self._queue))
            self._queue.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)
