"""Admission control: the one gate a request passes before it may take a pipeline thread.

- Every request that needs an index is refused with UNAVAILABLE while the server drains for shutdown (`open`); which
  collection it searches, and whether that one is loaded, the registry says (api/collections.py). The gate is one
  for the whole server, whatever collection a request names: they share the pipeline threads.
- A search holds an in-flight slot while it runs (`search`): Search, and the final request of a StreamSearch. Past
  `max_in_flight` searches in flight, or with `max_queued` searches waiting for a pipeline thread while every thread is
  busy, it is refused at once with RESOURCE_EXHAUSTED and counted in rag_requests_shed. A thread is busy while it runs
  a job, and a search's thread is free again once the search is done, before the event loop replies (`busy`, the
  executor's count; PipelineExecutor.release): counted by the searches in flight instead, a thread that had just
  finished and was about to take the next queued search looked busy and that search still waiting, and callers no
  more than the threads and the queue hold were refused (bench/README.md, "Issue 15", "A gate that counts a finished
  search's thread as free").
- While the queue overflows (a search was refused at the gate within the last FULL_S), a search that waited in it
  longer than `max_queue_wait` mean search times (a moving mean of a pipeline thread's time per search) is refused
  with RESOURCE_EXHAUSTED when a thread takes it, rather than run: the controlled delay of CoDel and of Facebook's
  RPC queues, which act on a standing queue, not on a burst. This bounds what an admitted search waits while more
  comes than the server can serve, where the queue's bound alone lets one wait about two searches. Its time in the
  queue is lost to that caller, but no pipeline thread works for it: the thread takes the next search. A queue that
  has room (callers no more than the threads and the queue hold, however long a search takes) refuses nothing for
  its wait. Too tight a bound trades answers for latency (bench/README.md, "Issue 15", "A queue that refuses its
  stale searches").
- A StreamSearch final counts against the queue like a Search: unless its speculation already answered it, it runs on
  the same pipeline threads, so letting it past a full queue would lengthen the wait of every admitted request. Drafts
  (non-final requests) are not admitted as searches: they only start speculation, which runs while fewer than
  `cache.speculative_busy_in_flight` searches are in flight, and whose work waiting for a thread counts in the queue.
- Prefetch needs only an open server: its work runs on its own thread while the server is idle (search/prefetch.py).

A refusal for load tells the caller when to come back (`Overloaded.retry_after_ms`, sent by api/rpc.py as gRPC retry
pushback, trailing metadata `grpc-retry-pushback-ms`, gRFC A6). The gate keeps a moving mean of how long an admitted
search holds its slot (`residence`, seconds). By Little's law, with `in_flight` searches each holding a slot that
long, a slot frees every residence / in_flight seconds, so the requests `ahead` of the refused one (1 for the
in-flight limit: the next slot; the queue plus itself for the queue limit) will be gone in ahead x residence /
in_flight. That estimate is spread by a factor drawn from [0.5, 1.5), so callers refused in one burst come back
spread over the window rather than together, and bounded to [PUSHBACK_MIN_MS, PUSHBACK_MAX_MS]: no sooner than a
retry could find room, no later than a stale estimate should keep a caller away. It costs a few float operations per
refusal; nothing is logged. UNAVAILABLE (draining, loading) carries no pushback on purpose: gRFC A6 reads a negative
pushback as "do not retry at all", which would also stop the retry that round_robin sends to another replica, and
without pushback the client's own backoff applies.

A caller that sends the same request again before its pushback ends is answered when it ends (`EarlyReturns`). A
request refused for load (its connection, method and bytes) is remembered until the end of the pushback it was told.
Sent again on that connection before then, its refusal is held that long (a timer on the event loop: no pipeline
thread, no slot) and carries a pushback of 0, its wait being over; and for the next second (RETRYING_S), so is the
refusal of any request on that connection, which has shown that its callers retry at once. Clients that do would
otherwise spend the cores on refusals, theirs and the server's (bench/README.md, "Issue 15", "Refusals held for
callers that come back early"). On a connection that has not retried early, every refusal comes at once as before:
a caller that fails fast on a refusal, or that honours the pushback, sees no change. The same request from two
callers of one connection within one pushback is taken for a retry.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rag_service.core.config import ServerConfig
from rag_service.core.errors import Overloaded, Unavailable
from rag_service.core.metrics import Metrics

PUSHBACK_MIN_MS = 5
PUSHBACK_MAX_MS = 1000
HOLD_MAX_MS = 250  # an early return's refusal is held this long at most: past it, answered at once as before
HOLD_MARGIN_S = 0.005  # a held refusal still reaches its caller this long before the call's deadline
RETRYING_S = 1.0  # a connection that sent a request again too soon is taken to keep doing so this long
EARLY_CALLERS = 4096  # refused requests, and connections that retried early, remembered at most (EarlyReturns)
RESIDENCE_WEIGHT = 0.05  # of the latest search in the moving mean: about the last 20 searches count
SERVICE_WEIGHT = 0.05  # likewise for a pipeline thread's time per search (`service`)
FULL_S = 1.0  # a gate refusal this recent means the queue overflows: its stale searches are refused (check_wait)


@dataclass(frozen=True)
class Admitted:
    arrival: float  # time.monotonic() when the request came, for the adaptive budget


class Admission:
    def __init__(self, config: ServerConfig, metrics: Metrics, busy: Callable[[], int] | None = None) -> None:
        """`busy`: how many pipeline threads are running a job now (the executor's count); None: all of them."""
        self.config = config
        self.metrics = metrics
        self.busy = busy if busy is not None else (lambda: config.workers)
        self.in_flight = 0  # touched only on the event loop thread
        # Admitted work not yet picked up by a pipeline thread; the workers decrement it, hence the lock.
        self.queued = 0
        self._queued_lock = threading.Lock()
        self.draining = False
        self.last_arrival = 0.0  # time.monotonic() of the latest search, so a drain can wait for a quiet moment
        self.last_shed = -math.inf  # time.monotonic() of the latest refusal for load (placement's `settled`)
        self.last_full = -math.inf  # time.monotonic() of the latest refusal at the gate (check_wait)
        self.residence = 0.0  # moving mean of the seconds an admitted search holds its slot, for the pushback
        # Moving mean of the seconds a pipeline thread takes over a search, for the queue's wait (check_wait); 0.0
        # until the first search. Written by the pipeline threads: a lost update of a mean costs nothing.
        self.service = 0.0

    def open(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down; retry on another replica")

    @contextmanager
    def search(self) -> Iterator[Admitted]:
        """Admits one search and holds its in-flight slot until the block ends."""
        arrival = self.last_arrival = time.monotonic()
        self.open()
        limit = self.config.max_in_flight
        if self.in_flight >= limit:
            self.last_shed = self.last_full = arrival
            self.metrics.shed.inc()
            raise Overloaded(f"{self.in_flight} requests in flight (limit {limit}); retry later", self.pushback_ms(1))
        # The searches that would wait for a thread, this one included, once each free thread has taken one.
        waiting = self.queued + 1 - max(self.config.workers - self.busy(), 0)
        if waiting > self.config.max_queued:
            self.last_shed = self.last_full = arrival
            self.metrics.shed.inc()
            raise Overloaded(f"{self.queued} requests queued for a pipeline thread (limit "
                             f"{self.config.max_queued}); retry later", self.pushback_ms(waiting))
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield Admitted(arrival)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.residence += (time.monotonic() - arrival - self.residence) * RESIDENCE_WEIGHT

    def pushback_ms(self, ahead: int) -> int:
        """Milliseconds until a request refused behind `ahead` others may find room (module docstring)."""
        estimate = self.residence * 1000.0 * ahead / max(self.in_flight, 1) * (0.5 + random.random())
        return int(min(max(estimate, PUSHBACK_MIN_MS), PUSHBACK_MAX_MS))

    def served(self, seconds: float) -> None:
        """A pipeline thread took `seconds` over a search."""
        self.service = self.service + (seconds - self.service) * SERVICE_WEIGHT if self.service else seconds

    def check_wait(self, waited: float) -> None:
        """Refuses (Overloaded, with a pushback) a search that a pipeline thread takes after it waited `waited` seconds
        for one, longer than `max_queue_wait` mean search times, while the queue overflows (module docstring); called
        by that thread."""
        limit = self.config.max_queue_wait * self.service
        if limit <= 0.0 or waited <= limit:
            return
        now = time.monotonic()
        if now - self.last_full > FULL_S:
            return
        self.last_shed = now
        self.metrics.shed.inc()
        raise Overloaded(f"waited {waited * 1000:.1f} ms for a pipeline thread, past {limit * 1000:.1f} ms "
                         f"(max_queue_wait {self.config.max_queue_wait:g} x the mean search); retry later",
                         self.pushback_ms(self.queued + 1))

    def enqueue(self) -> None:
        """Work was submitted to the pipeline threads."""
        with self._queued_lock:
            self.queued += 1
        self.metrics.queued.inc()

    def dequeue(self) -> None:
        """Submitted work was picked up by a thread, or dropped before one did."""
        with self._queued_lock:
            self.queued -= 1
        self.metrics.queued.dec()


class EarlyReturns:
    """The requests refused for load and the connections that sent one again too soon, each with when its pushback
    ends, so that a refusal of a request sent again before then, or of any request on a connection that did that, is
    held until then (module docstring). Touched only on the event loop thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[Hashable, float] = {}  # (connection, request) -> clock() when its pushback ends
        self._retrying: dict[Hashable, float] = {}  # connection -> clock() until which it is taken to retry early

    def hold_s(self, connection: Hashable, request: Hashable, pushback_ms: int, remaining_s: float | None) -> float:
        """Seconds to hold this refusal of `request` (what tells its retries: its method and bytes) on `connection`,
        told to come back in `pushback_ms` (0: answer at once), within the call's `remaining_s` (None: no
        deadline)."""
        now = self.clock()
        ends = now + pushback_ms / 1000.0
        key = (connection, request)
        retried = now < self._requests.get(key, -math.inf)
        if retried:
            self._retrying = _bounded(self._retrying, now)
            self._retrying[connection] = now + RETRYING_S
        early = retried or now < self._retrying.get(connection, -math.inf)
        self._requests = _bounded(self._requests, now)
        self._requests[key] = max(self._requests.get(key, -math.inf), ends)
        if not early or pushback_ms > HOLD_MAX_MS:
            return 0.0
        hold = pushback_ms / 1000.0
        if remaining_s is not None:
            hold = min(hold, remaining_s - HOLD_MARGIN_S)
        return max(hold, 0.0)


def _bounded(ends: dict[Hashable, float], now: float) -> dict[Hashable, float]:
    """`ends` with room for one more: at EARLY_CALLERS entries, those whose pushback has ended are forgotten, and if
    most have not (a flood of callers), all are, so that this pass comes at most once per EARLY_CALLERS / 2 new ones."""
    if len(ends) < EARLY_CALLERS:
        return ends
    live = {key: end for key, end in ends.items() if end > now}
    return live if len(live) <= EARLY_CALLERS // 2 else {}
