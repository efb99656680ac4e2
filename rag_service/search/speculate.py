"""Speculative retrieval on query drafts (StreamSearch): search while the user is still typing, answer the final draft
from that work when it matches.

Per stream, on the event loop:
- a draft starts a timer (debounce); a newer draft before it fires cancels it, so a fast typist costs nothing;
- when it fires, one speculative search runs (through the cache, so it also fills it); a newer draft does not stop a
  search already on a thread (it cannot be interrupted) but no second one starts until it ends, and its result is
  stale (counted);
- the final draft is answered from the speculative search when their keys match (same normalised query, parameters,
  cache mode and index version), waiting for it if it is still running; otherwise it is searched at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams
from rag_service.search.cache import EXACT, LIVE, MISS, PREFETCHED, SPECULATIVE, CachedSearch, Execute, Served
from rag_service.search.searcher import Searcher


@dataclass(eq=False)
class _Speculation:
    key: tuple
    task: asyncio.Task | None = None
    started: bool = False


def _retrieve_exception(task: asyncio.Task) -> None:
    # A stale speculation nobody awaits may fail (deadline, reload); that is not worth a "never retrieved" warning.
    if not task.cancelled():
        task.exception()


class DraftSession:
    """One StreamSearch call. `allowed()` says whether the server has room for speculative work now."""

    def __init__(self, cache: CachedSearch, execute: Execute, metrics: Metrics, *, debounce_s: float,
                 allowed: Callable[[], bool]) -> None:
        self.cache = cache
        self.execute = execute
        self.metrics = metrics
        self.debounce_s = debounce_s
        self.allowed = allowed
        self._latest: _Speculation | None = None
        self._running: asyncio.Task | None = None

    def draft(self, pipeline: Searcher, params: SearchParams) -> None:
        """A non-final draft: (re)start speculation for it unless it is the draft already being worked on."""
        key = (self.cache.key(pipeline, params), self.cache.mode(params, pipeline))
        if self._latest is not None and self._latest.key == key:
            return  # the same normalised draft (a trailing space, a case change): keep its work
        self._discard()
        if not self.allowed():
            self.metrics.speculative.labels("skipped_busy").inc()
            return
        spec = _Speculation(key)
        spec.task = asyncio.get_running_loop().create_task(self._speculate(spec, pipeline, params))
        spec.task.add_done_callback(_retrieve_exception)
        self._latest = spec

    async def _speculate(self, spec: _Speculation, pipeline: Searcher, params: SearchParams) -> Served:
        await asyncio.sleep(self.debounce_s)
        while self._running is not None and not self._running.done():
            await asyncio.wait([self._running])  # at most one speculative search per stream on a thread
        spec.started = True
        self._running = spec.task
        self.metrics.speculative.labels("started").inc()
        return await self.cache.search(pipeline, params, deadline=None, execute=self.execute, origin=SPECULATIVE)

    def _discard(self) -> None:
        spec, self._latest = self._latest, None
        if spec is None:
            return
        if not spec.started and spec.task is not None:
            spec.task.cancel()
            self.metrics.speculative.labels("cancelled").inc()
        else:
            self.metrics.speculative.labels("stale").inc()

    async def final(self, pipeline: Searcher, params: SearchParams, deadline: float | None) -> Served:
        """The answer to a final draft."""
        key = (self.cache.key(pipeline, params), self.cache.mode(params, pipeline))
        spec = self._latest
        if spec is not None and spec.key == key and spec.started and spec.task is not None:
            self._latest = None
            try:
                served = await asyncio.shield(spec.task)
            except Exception:  # noqa: BLE001 - the speculation failed: search now instead
                served = None
            if served is not None:
                self.metrics.speculative.labels("used").inc()
                served_from = served.served_from
                if served_from == MISS or (served_from == EXACT and served.origin != LIVE):
                    served_from = PREFETCHED
                result = dataclasses.replace(served.result, stage_us=dict(served.result.stage_us))
                return Served(result, served_from, served.similarity, served.origin)
        else:
            self._discard()
        return await self.cache.search(pipeline, params, deadline=deadline, execute=self.execute)

    def close(self) -> None:
        """The stream ended: pending speculation is cancelled (a running search finishes and fills the cache)."""
        self._discard()
