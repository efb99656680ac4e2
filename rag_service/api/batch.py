"""SearchBatch: many searches in one call, answered in order, each with its own status.

    validate each request (target: searcher + params; an invalid one becomes its status)
    -> exact cache hits answered here, on the event loop, without work
    -> the misses' queries encoded in one encode step per searcher (a pipeline thread), where the encoder's vectors
       do not depend on the batch (fp32): sorted by length, ENCODE_CALL queries per encoder call. An int8 encoder's
       do (cosine ~0.994 to the query's vector alone, and only 21-34 of 128 SciFact test queries kept their top 10:
       bench/README.md, "Batch search"), so there each query is encoded alone inside its search, as Search does, and
       a batch answers exactly what Search would
    -> each miss's cache stage and search stages with its vector, BATCH_CHUNK misses per pipeline task
    -> one SearchResponse per request, as Search would return it, inside its BatchResult

Admission: a batch is admitted as one unit of work, through the same gate as a Search (api/admission.py): it holds
one in-flight slot, and its work takes one pipeline thread at a time (the encode, then its chunks one after another,
each counted in the queue while it waits for a thread). So a batch costs other callers what one long Search does: it
never holds more than one thread, and the requests queued behind one of its chunks run before its next chunk. Admitting
it as N would refuse every batch above max_in_flight and let one batch fill the queue, shedding every Search behind
it; the cost is that one batch does not use every core: to use them, send batches concurrently. A batch that finds
the gate full is refused at once with RESOURCE_EXHAUSTED (with retry pushback), as a Search is, never queued.

Deadline: the call's deadline bounds all of its work. When it passes, the remaining work is stopped (a chunk stops at
its next query, queued chunks are dropped) and the call fails with DEADLINE_EXCEEDED: gRPC cancels a call at its
deadline, so a reply with per-query DEADLINE_EXCEEDED statuses could never be delivered. The queries answered before
it filled the cache, so sending the same batch again resumes where it stopped. A request's `budget_ms` counts from
when its own search starts, not from the call's arrival: otherwise a batch's later queries would find their budget
spent waiting for the earlier ones.

Identical requests in one batch (same searcher, normalised query and result-changing parameters) are searched once;
the others are answered as exact hits of it, as a coalesced Search would be. A batch does not join the single flight
of concurrent Search calls (search/cache.py): a query searched by both at the same moment is computed twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np

from rag_service.api import pages, rpc
from rag_service.api.admission import Admission
from rag_service.core import tracing
from rag_service.core.config import ServerConfig
from rag_service.core.errors import DeadlineExceeded, InvalidArgument, RagError
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams, check_deadline
from rag_service.index.reply_bytes import LEN, VARINT, field_bytes, string_field, tag, varint
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.search.cache import CachedSearch, Served, shared
from rag_service.search.searcher import Searcher

log = logging.getLogger(__name__)

# Misses one pipeline task searches: small enough that requests queued behind a batch wait for one chunk at most
# (about 16 x 2 ms after the encode), large enough that the per-task overhead (a future, a wake-up of the event loop,
# ~0.1 ms) is a few µs per query.
BATCH_CHUNK = 16

# Queries per encoder call of a batch's encode step. A call pads its queries to the longest, and padding costs more
# than one call per 8 queries saves beyond that: per query, the fp32 encoders on SciFact test queries sorted by length
# cost 0.75x (ONNX) and 0.43x (torch) of an encode alone in calls of 8, 1.07x / 0.48x in calls of 32, 1.55x / 0.68x in
# one call of 128 (bench/experiments/batch_search.py, bench/README.md "Batch search").
ENCODE_CALL = 8

# rag.v1.SearchBatchResponse.results, and BatchResult's code, message and response.
_RESULT = tag(1, LEN)
_CODE, _MESSAGE, _RESPONSE = tag(1, VARINT), tag(2, LEN), tag(3, LEN)

# What a Search answers: (request, params, served, start ns, validated ns, searcher) -> (reply, server time µs).
Respond = Callable[[pb.SearchRequest, SearchParams, Served, int, int, Searcher],
                   tuple[bytes | pb.SearchResponse, int]]
# Resolves a request to the searcher it names and its validated parameters (RetrieverServicer.target).
Target = Callable[[pb.SearchRequest], tuple[Searcher, SearchParams]]


@dataclass(eq=False)
class _Item:
    """One request of a batch on its way through."""

    index: int
    request: pb.SearchRequest
    searcher: Searcher | None = None
    params: SearchParams | None = None
    key: tuple | None = None  # the cache's key; None for a request that bypasses the cache
    vector: np.ndarray | None = None
    served: Served | None = None
    error: Exception | None = None
    encode_us: int = 0  # this query's share of its encoder batch
    leader: _Item | None = None  # an identical earlier request of the batch, whose answer this one shares


def field_error(index: int, error: Exception) -> str:
    """The message of request `index`'s error, naming its field as a caller would address it: requests[3].top_k."""
    if isinstance(error, InvalidArgument):
        return f"requests[{index}].{error.field}: {str(error).split(': ', 1)[-1]}"
    if isinstance(error, RagError):
        return f"requests[{index}]: {error}"
    return f"requests[{index}]: internal error ({type(error).__name__}); see the server log"


def status_of(error: Exception) -> grpc.StatusCode:
    return rpc.status_for(error) if isinstance(error, RagError) else grpc.StatusCode.INTERNAL


def result_bytes(code: grpc.StatusCode, message: str, response: bytes | pb.SearchResponse | None) -> bytes:
    """One BatchResult of the reply, as wire bytes; a joined Search reply (api/reply.py) goes in as it is."""
    body = b""
    number = code.value[0]
    if number:
        body += _CODE + varint(number)
    body += string_field(_MESSAGE, message)
    if response is not None:
        body += field_bytes(_RESPONSE, response if isinstance(response, bytes) else response.SerializeToString())
    return field_bytes(_RESULT, body)


class BatchSearch:
    """The SearchBatch method of a Retriever servicer; it shares the servicer's gate, cache, threads and replies."""

    def __init__(self, config: ServerConfig, executor: ThreadPoolExecutor, metrics: Metrics, admission: Admission,
                 cache: CachedSearch, target: Target, respond: Respond) -> None:
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.admission = admission
        self.cache = cache
        self.target = target
        self.respond = respond

    async def run(self, request: pb.SearchBatchRequest, deadline: float | None) -> bytes:
        """The SearchBatchResponse of `request` as wire bytes; `deadline` on the time.monotonic() clock."""
        start = time.perf_counter_ns()
        limit = self.config.limits.max_batch
        if len(request.requests) > limit:
            raise InvalidArgument("requests", f"has {len(request.requests)} entries; the limit is {limit}")
        with self.admission.search():
            items = [self._validate(i, r) for i, r in enumerate(request.requests)]
            validated = time.perf_counter_ns()
            misses = self._lookup(items)
            stop = threading.Event()
            try:
                await self._compute(misses, deadline, stop)
            except asyncio.CancelledError:
                stop.set()  # the caller is gone: the chunk running now stops at its next query
                raise
        for item in items:
            if item.leader is not None:
                item.served, item.error = self._follow(item.leader)
        return b"".join(self._result(item, start, validated) for item in items)

    # -- on the event loop ------------------------------------------------------------------------------------------
    def _validate(self, index: int, request: pb.SearchRequest) -> _Item:
        item = _Item(index, request)
        try:
            item.searcher, item.params = self.target(request)
            if request.page_token:
                pages.check(pages.decode(request.page_token), item.searcher.version, request)
        except RagError as error:
            item.error = error
        return item

    def _lookup(self, items: list[_Item]) -> list[_Item]:
        """Answers the exact hits; returns the requests that need a search, an identical request only once."""
        misses: list[_Item] = []
        leaders: dict[tuple, _Item] = {}
        for item in items:
            if item.error is not None or item.searcher is None or item.params is None:
                continue
            if self.cache.mode(item.params, item.searcher) == "bypass":
                misses.append(item)  # asked for the full path every time: never shared
                continue
            item.key = self.cache.key(item.searcher, item.params)
            hit = self.cache.lookup_exact(item.searcher, item.params, item.key)
            if hit is not None:
                item.served = hit
                continue
            same = (id(item.searcher), item.key)
            leader = leaders.get(same)
            if leader is not None:
                item.leader = leader
                continue
            leaders[same] = item
            misses.append(item)
        return misses

    @staticmethod
    def _follow(leader: _Item) -> tuple[Served | None, Exception | None]:
        """The answer of a request identical to `leader`: its result as an exact hit (as a coalesced Search)."""
        if leader.served is None:
            return None, leader.error
        return shared(leader.served, 0), None

    def _result(self, item: _Item, start: int, validated: int) -> bytes:
        served, error = item.served, item.error
        if served is None or item.params is None or item.searcher is None:
            error = error or RuntimeError("a batch request was left without an answer")
            code = status_of(error)
            self.metrics.batch_queries.labels(code.name).inc()
            return result_bytes(code, field_error(item.index, error), None)
        if item.encode_us:
            served.result.stage_us["encode"] = item.encode_us
        response, _ = self.respond(item.request, item.params, served, start, validated, item.searcher)
        self.metrics.batch_queries.labels("OK").inc()
        return result_bytes(grpc.StatusCode.OK, "", response)

    async def _compute(self, misses: list[_Item], deadline: float | None, stop: threading.Event) -> None:
        """Encodes the misses per searcher in one batch, then searches them chunk by chunk, one pipeline task at a
        time."""
        groups: dict[int, tuple[Searcher, list[_Item]]] = {}
        for item in misses:
            if item.searcher is not None:
                groups.setdefault(id(item.searcher), (item.searcher, []))[1].append(item)
        for searcher, group in groups.values():
            # An encoder whose vectors depend on the batch (int8) encodes each query alone, inside its search, as a
            # Search does: the answers and the cache entries stay those of Search (bench/README.md, "Batch search").
            if len(group) > 1 and getattr(searcher.encoder, "batch_invariant", True):
                await self._submit(self._encode, searcher, group, deadline)
        for first in range(0, len(misses), BATCH_CHUNK):
            await self._submit(self._search, misses[first:first + BATCH_CHUNK], deadline, stop)

    async def _submit(self, work: Callable[..., None], *args: object) -> None:
        """Runs `work(*args)` on a pipeline thread, counted in the queue until a thread takes it (as a Search)."""
        self.admission.enqueue()
        future = self.executor.submit(tracing.carry(self._dequeued, work, *args))
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.cancel():  # never started: no thread will count it out of the queue
                self.admission.dequeue()
                self.metrics.deadline_stops.inc()
            raise

    def _dequeued(self, work: Callable[..., None], *args: object) -> None:
        self.admission.dequeue()
        work(*args)

    # -- on a pipeline thread ---------------------------------------------------------------------------------------
    def _encode(self, searcher: Searcher, group: list[_Item], deadline: float | None) -> None:
        """The queries of `searcher`'s misses in one encode step: longest first, ENCODE_CALL queries per encoder call,
        so each call pads its queries to about the same length."""
        check_deadline(deadline, "encode")
        started = time.perf_counter_ns()
        ordered = sorted(group, key=lambda item: -len(item.params.query) if item.params is not None else 0)
        try:
            for first in range(0, len(ordered), ENCODE_CALL):
                calls = ordered[first:first + ENCODE_CALL]
                # A micro-batcher passes a batch of several queries straight through to its encoder.
                vectors = searcher.encoder.encode_queries([item.params.query for item in calls
                                                           if item.params is not None])
                for item, vector in zip(calls, vectors, strict=True):
                    item.vector = vector
        except Exception as error:  # the group's queries fail with it; other groups still answer
            if not isinstance(error, RagError):
                log.exception("internal error in SearchBatch encoding %d queries", len(group))
            for item in group:
                item.error = error
            return
        share = (time.perf_counter_ns() - started) // 1000 // len(group)
        for item in group:
            item.encode_us = share

    def _search(self, chunk: list[_Item], deadline: float | None, stop: threading.Event) -> None:
        submitted = time.perf_counter_ns()
        for n, item in enumerate(chunk):
            if stop.is_set():
                return
            if item.searcher is None or item.params is None or item.error is not None:
                continue
            try:
                served = self.cache.run(item.searcher, item.params, deadline, query_vector=item.vector,
                                        key=item.key)
            except DeadlineExceeded:
                self.metrics.deadline_stops.inc()
                raise  # the call's deadline: every later query would stop at the same check
            except RagError as error:
                item.error = error
                continue
            except Exception as error:  # one query's fault is its status; the others still answer
                log.exception("internal error in SearchBatch, requests[%d]", item.index)
                item.error = error
                continue
            if n == 0:
                served.result.stage_us["queue"] = (time.perf_counter_ns() - submitted) // 1000
            item.served = served


__all__ = ["BATCH_CHUNK", "BatchSearch", "field_error", "result_bytes", "status_of"]
