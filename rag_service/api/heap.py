"""The collector and a loaded index: what a server holds for its whole life stays out of the collector's passes.

CPython's collector looks at every container object of the oldest generation in a full pass, holding the GIL. A
loaded index brings ~150,000 of them (the analyzer's tables, the manifest, the model's tokenizer, the modules), so
each full pass took 40-110 ms in a loaded rag-serve, and the passes come every few thousand requests once the cache
fills (its entries are long-lived objects too): a request that arrives meanwhile waits for it. `gc.freeze()` moves
every object alive at that moment to a generation the collector never visits; reference counting still frees them.

So the server settles its heap once an index is in place: it collects (whatever reference cycles an index let go
had are freed here) and freezes what is left. A swap thaws the heap at once: the index let go may be in cycles that
only the collector frees, and searches that started on it may still hold it. The settle then waits until no admitted
search is running and the index let go is gone (at most `SETTLE_WAIT_S`; past it, the settle's collection frees an
index that only cycles kept, and whatever else still holds one is frozen with the rest until the next settle, which
starts by thawing).

What a server keeps after the settle, the cache's entries above all, is long-lived too, and a full pass walks it
and the cache's own tables (20-56 ms at 5,000-20,000 SciFact entries, packed). CPython starts a full pass after every
10 passes over the middle generation once the objects promoted since the last one reach a quarter of the rest; a
settled server waits for FULL_PASS_EVERY of them instead. The quarter rule still bounds the collector's total work,
and the only garbage left longer is reference cycles old enough to reach the oldest generation (~60 objects per
1,600 requests here): the same pauses, several times rarer.

The freeze and the thresholds are the process's, not one server's: a second server in the same process (tests)
settles it again, and `close` on stop gives every object back to the collector and the thresholds back as they were.
While it runs, the server also times every collection of the process (`rag_gc_pause_seconds` by generation), so
what the collector costs the requests stays in view."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Callable

from rag_service.core.metrics import Metrics

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.05  # how often a pending settle looks whether the searches have finished
SETTLE_WAIT_S = 30.0  # a settle waits this long at most for the searches to finish and the index let go to be freed
FULL_PASS_EVERY = 100  # passes over the middle generation between two full passes, at least (CPython's default: 10)


class Heap:
    """Settles the process heap after each index swap (`swapped`). `busy()`: searches admitted and not finished."""

    def __init__(self, enabled: bool, busy: Callable[[], int], metrics: Metrics | None = None) -> None:
        self.enabled = enabled
        self.busy = busy
        self.settles = 0
        self._retired: list[weakref.ref] = []  # the indexes let go since the last settle, until they are freed
        self._pending: asyncio.Task | None = None
        self._pauses = [metrics.gc_pause.labels(str(g)) for g in range(3)] if metrics is not None else []
        self._started = 0.0
        self._thresholds: tuple[int, int, int] | None = None  # the process's before the first settle

    def watch(self) -> None:
        """Times every collection of the process from now until `close`."""
        if self._pauses and self._timed not in gc.callbacks:
            gc.callbacks.append(self._timed)

    def _timed(self, phase: str, info: dict) -> None:
        # Collections do not nest and run holding the GIL: one start time serves every thread.
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses[info["generation"]].observe(time.perf_counter() - self._started)

    def settle(self) -> None:
        """Collects everything unreachable, then freezes what is left (~50-100 ms for a loaded index, holding the
        GIL)."""
        if not self.enabled:
            return
        started = time.perf_counter()
        gc.unfreeze()  # what the last settle froze and has since become garbage in a cycle is found now
        found = gc.collect()
        gc.freeze()
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            gc.set_threshold(self._thresholds[0], self._thresholds[1], max(self._thresholds[2], FULL_PASS_EVERY))
        self.settles += 1
        log.info("heap settled: %d unreachable objects freed, %d frozen, %.0f ms", found, gc.get_freeze_count(),
                 (time.perf_counter() - started) * 1e3)

    def swapped(self, old: object | None) -> None:
        """An index was swapped in or out; `old` is the searcher let go (None: nothing was served before). Call on
        the event loop."""
        if not self.enabled:
            return
        if old is not None:
            gc.unfreeze()
            self._retired.append(weakref.ref(old))
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._settle_when_idle())

    def _held(self) -> bool:
        self._retired = [ref for ref in self._retired if ref() is not None]
        return bool(self._retired)

    async def _settle_when_idle(self) -> None:
        give_up = time.monotonic() + SETTLE_WAIT_S
        while (self.busy() or self._held()) and time.monotonic() < give_up:
            await asyncio.sleep(IDLE_POLL_S)
        self._retired.clear()
        self.settle()

    async def idle(self) -> None:
        """Returns once no settle is waiting (tests)."""
        if self._pending is not None:
            await asyncio.shield(self._pending)

    def close(self) -> None:
        """On stop: every object goes back to the collector, its thresholds are the process's again, a settle still
        waiting is dropped, and collections are no longer timed."""
        if self._pending is not None:
            self._pending.cancel()
        self._retired.clear()
        if self.enabled:
            gc.unfreeze()
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
        if self._timed in gc.callbacks:
            gc.callbacks.remove(self._timed)
