"""The server's heap after an index swap (api/heap.py): collected, then frozen out of the collector's passes; thawed
first on every settle, so nothing frozen that became garbage since stays; a settle after a swap waits for the
searches running; every collection is timed by generation while a server runs; a real server settles after its load
and after a reload, and thaws on stop."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest

from rag_service.api import heap as heap_module
from rag_service.api.heap import Heap
from rag_service.client import RetrieverClient
from rag_service.core.config import ServerConfig
from rag_service.core.metrics import Metrics
from rag_service.index.build import BuildConfig, build_index

DOCS = [
    {"_id": "tides", "title": "Tides", "text": "The moon's gravity pulls the oceans, so the sea rises and falls twice "
     "a day along most coasts."},
    {"_id": "bread", "title": "Bread", "text": "Yeast ferments the sugars in dough and the carbon dioxide it gives "
     "off makes bread rise."},
    {"_id": "owls", "title": "Owls", "text": "Owls hunt at night; soft edges on their feathers keep their flight "
     "almost silent."},
]


class Node:
    """An object in a reference cycle with itself: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_settle_collects_then_freezes_and_a_thaw_gives_everything_back():
    heap = Heap(True, lambda: 0)
    try:
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        heap.settle()
        assert gone() is None  # collected before the freeze
        assert gc.get_freeze_count() > 0 and heap.settles == 1
        kept = Node()
        assert any(o is kept for o in gc.get_objects())  # made after the freeze: the collector's...
        heap.settle()
        assert gc.is_tracked(kept) and not any(o is kept for o in gc.get_objects())  # ...until the next settle
    finally:
        heap.close()
    assert gc.get_freeze_count() == 0


def test_a_settled_heap_waits_longer_between_full_passes_until_close():
    before = gc.get_threshold()
    heap = Heap(True, lambda: 0)
    try:
        heap.settle()
        heap.settle()
        assert gc.get_threshold() == (before[0], before[1], max(before[2], heap_module.FULL_PASS_EVERY))
    finally:
        heap.close()
    assert gc.get_threshold() == before


def test_a_settle_frees_what_the_last_one_froze_and_became_garbage_since():
    heap = Heap(True, lambda: 0)
    try:
        node = Node()
        gone = weakref.ref(node)
        heap.settle()
        del node  # garbage in a cycle, and frozen: a plain collection does not see it
        gc.collect()
        assert gone() is not None
        heap.settle()
        assert gone() is None
    finally:
        heap.close()


def test_every_collection_is_timed_by_generation_until_close():
    metrics = Metrics()
    heap = Heap(False, lambda: 0, metrics)

    def count(generation: int) -> float:
        return metrics.registry.get_sample_value("rag_gc_pause_seconds_count", {"generation": str(generation)}) or 0

    heap.watch()
    heap.watch()  # once only
    try:
        gc.collect()
        gc.collect(0)
        assert count(2) == 1 and count(0) >= 1
        assert metrics.registry.get_sample_value("rag_gc_pause_seconds_sum", {"generation": "2"}) > 0
    finally:
        heap.close()
    assert heap._timed not in gc.callbacks
    gc.collect()
    assert count(2) == 1


def test_a_disabled_heap_freezes_nothing():
    before = gc.get_freeze_count()
    heap = Heap(False, lambda: 0)
    heap.settle()
    heap.close()
    assert heap.settles == 0 and gc.get_freeze_count() == before


def test_a_settle_after_a_swap_waits_until_no_search_runs_and_covers_every_swap_meanwhile():
    busy = [2]

    async def main() -> None:
        heap = Heap(True, lambda: busy[0])
        try:
            heap.swapped(None)
            heap.swapped(None)
            await asyncio.sleep(5 * heap_module.IDLE_POLL_S)
            assert heap.settles == 0  # searches that may hold the index let go are still running
            busy[0] = 0
            await asyncio.wait_for(heap.idle(), 10)
            assert heap.settles == 1
        finally:
            heap.close()

    asyncio.run(main())


def test_a_settle_after_a_swap_waits_until_the_index_let_go_is_freed():
    async def main() -> None:
        heap = Heap(True, lambda: 0)
        try:
            old = Node()
            gone = weakref.ref(old)
            heap.settle()  # `old` frozen, as a loaded index is
            heap.swapped(old)
            assert gc.get_freeze_count() == 0  # thawed at once: `old` may be in cycles only the collector frees
            await asyncio.sleep(5 * heap_module.IDLE_POLL_S)
            assert heap.settles == 1  # a search may still hold it
            old.me = None  # the last holder lets go: freed without the collector
            del old
            await asyncio.wait_for(heap.idle(), 10)
            assert heap.settles == 2 and gone() is None and gc.get_freeze_count() > 0
        finally:
            heap.close()

    asyncio.run(main())


def test_an_index_let_go_that_only_cycles_hold_is_freed_by_the_settle_after_the_limit(monkeypatch):
    monkeypatch.setattr(heap_module, "SETTLE_WAIT_S", 0.3)

    async def main() -> None:
        heap = Heap(True, lambda: 0)
        try:
            old = Node()
            gone = weakref.ref(old)
            gc.disable()  # no automatic pass may free it first
            heap.swapped(old)
            del old
            await asyncio.wait_for(heap.idle(), 10)
            assert heap.settles == 1 and gone() is None
        finally:
            gc.enable()
            heap.close()

    asyncio.run(main())


def test_a_settle_stops_waiting_after_its_limit(monkeypatch):
    monkeypatch.setattr(heap_module, "SETTLE_WAIT_S", 0.2)

    async def main() -> None:
        heap = Heap(True, lambda: 1)  # a search that never ends
        try:
            heap.swapped(None)
            await asyncio.wait_for(heap.idle(), 10)
            assert heap.settles == 1
        finally:
            heap.close()

    asyncio.run(main())


def test_a_close_drops_a_settle_still_waiting():
    async def main() -> None:
        heap = Heap(True, lambda: 1)
        heap.swapped(None)
        await asyncio.sleep(0)
        heap.close()
        with pytest.raises(asyncio.CancelledError):
            await heap.idle()
        assert heap.settles == 0

    asyncio.run(main())


def _idle(running) -> None:
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(running.server.heap.idle(), 60), running.loop).result(70)


def test_a_server_settles_after_its_load_and_after_a_reload_and_thaws_on_stop(server_thread, encoder, write_corpus,
                                                                             tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", DOCS)
    root = tmp_path / "idx"
    build_index(corpus, root, BuildConfig(), encoder=encoder, progress=False)
    config = ServerConfig(index=root, port=0, warmup_queries=0, auth={"admin_token": "secret"})
    with server_thread(config, encoder) as r, RetrieverClient(f"127.0.0.1:{r.port}", admin_token="secret",
                                                               timeout=60) as client:
        _idle(r)
        assert r.server.heap.settles == 1 and gc.get_freeze_count() > 0
        # The settle's own collection, timed.
        assert r.server.metrics.registry.get_sample_value("rag_gc_pause_seconds_count", {"generation": "2"}) >= 1
        assert client.search("why does the sea rise and fall").contexts[0].doc_id == "tides"
        old = weakref.ref(r.server.collections.default_collection().searcher)
        time.sleep(1.1)  # versions are named by build time: a new one, whose reload drops the old one's cache entries
        build_index(corpus, root, BuildConfig(), encoder=encoder, progress=False)
        client.reload()
        _idle(r)
        assert r.server.heap.settles == 2 and gc.get_freeze_count() > 0
        assert old() is None  # the index let go was freed, not frozen
        assert client.search("what makes bread rise").contexts[0].doc_id == "bread"
    assert gc.get_freeze_count() == 0


def test_a_server_told_not_to_freezes_nothing(server_thread, encoder, built_index):
    config = ServerConfig(index=built_index, port=0, warmup_queries=0, freeze_heap=False)
    with server_thread(config, encoder) as r:
        _idle(r)
        assert r.server.heap.settles == 0
