"""Which CPUs the server's threads run on.

A lone search crosses threads four times: gRPC's poller thread hands the call to the event loop, the loop hands the
search to a pipeline thread and back, and the loop hands the reply to gRPC again. Each hand-over wakes a sleeping
thread, and when the two threads sit on different CPUs the wake-up is an inter-processor interrupt to a CPU that has
gone idle: ~100 µs each on the 2-vCPU VMs of bench/README.md ("Issue 15", "Thread placement"), against ~20 µs when
the woken thread runs where its waker runs. So while searches come alone, the event loop and gRPC's poller thread
share a home CPU and each search runs there too; while searches have company, the loop and the poller may run
anywhere (under load the loop's own work needs whichever CPU is free), and so may every other job (index loads,
batches, shard calls), which is what spreads concurrent work over the cores. A search with company keeps to its
pipeline thread's own CPU while the server is settled (it has refused nothing lately; PipelineExecutor.settled) and
there are no more pipeline threads than CPUs: a guest kernel that packs threads onto few vCPUs queued two busy
pipeline threads on one vCPU while the other idled. While the server sheds load those searches run anywhere too:
held each to a CPU, they left the event loop, which refuses the excess, too little of one (admitted calls waited
1.4-1.7 s at 4x the capacity, bench/README.md, "Pipeline threads with company").

A lone search's encode spreads over the idle cores (the encoder's idle threads): its calling thread on the home CPU,
each worker thread held to one of the other CPUs (encode_cpus). Left free, the workers were woken onto the busy home
CPU: the packing kernel (the 2-vCPU VMs of bench/README.md) kept a worker queued there behind the spinning caller
for 5-15 ms while the other vCPU sat idle, the compare's p99.

Linux only (`os.sched_setaffinity` sets the calling thread's CPUs there), and only for a process allowed 2 to
MAX_CPUS CPUs (a VM, a container with its own CPU set, a `taskset`): on a large shared host the scheduler's freedom to
move the loop off a busy CPU is worth more than a local wake-up. The home CPU is the lowest allowed one, known
before anything loads, so that the encoder's workers can be created on the others. Otherwise, or off, nothing is
pinned.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Setter = Callable[[int, Iterable[int]], None]

# gRPC's asyncio integration runs its completion-queue poller on a Python thread of this target's name.
_POLLER_NAME = "_poll_wrapper"
MAX_CPUS = 8


def _default_setter() -> Setter | None:
    return getattr(os, "sched_setaffinity", None)


def _default_allowed() -> frozenset[int]:
    getter = getattr(os, "sched_getaffinity", None)
    return frozenset(getter(0)) if getter is not None else frozenset()


class Placement:
    """The home CPU and the thread placement around it. `setter` and `allowed` are the operating system's unless a
    test passes its own."""

    def __init__(self, mode: Literal["auto", "off"] = "auto", *, setter: Setter | None = None,
                 allowed: Iterable[int] | None = None) -> None:
        self.setter = setter if setter is not None else _default_setter()
        self.spread = frozenset(allowed) if allowed is not None else _default_allowed()
        self.enabled = mode == "auto" and self.setter is not None and 2 <= len(self.spread) <= MAX_CPUS
        self.order = sorted(self.spread)  # the allowed CPUs ascending: the home one first
        self.home = frozenset(self.order[:1])
        self._local = threading.local()  # the CPUs each thread was last given, so a job sets them only on change
        self._loop_threads: list[int] = []  # native ids of the event loop's thread and gRPC's poller threads
        self._loop_home = False  # whether those are on the home CPU now

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return (f"event loop on CPU {min(self.home)}, a lone search beside it, its encode's workers on CPUs "
                f"{self.encode_cpus()}, other work on CPUs {sorted(self.spread)}")

    def encode_cpus(self) -> list[int]:
        """The CPUs a lone search's encode workers are held to, one each in turn (every allowed CPU but the home
        one, ascending); empty when placement is off: the workers then run where the scheduler puts them."""
        return self.order[1:] if self.enabled else []

    def _set(self, cpus: frozenset[int], native_id: int = 0) -> None:
        if self.setter is None or not self.enabled:
            return
        try:
            self.setter(native_id, cpus)
        except OSError as error:
            # A CPU set changed under the process (a container resized, a CPU taken offline): a search must not
            # fail for where it runs, so placement stops and the scheduler places every thread from now on.
            self.enabled = False
            log.warning("thread placement off: setting CPUs %s failed (%s)", sorted(cpus), error)
            return
        if native_id == 0:
            self._local.cpus = cpus

    def pin_loop(self) -> list[str]:
        """Called on the event loop's thread once gRPC is serving: that thread and gRPC's poller thread go to the
        home CPU. Returns the names of the threads pinned."""
        if not self.enabled:
            return []
        pinned = [threading.current_thread().name]
        self._loop_threads = [threading.get_native_id()]
        for thread in threading.enumerate():
            if _POLLER_NAME in thread.name and thread.native_id is not None:
                self._loop_threads.append(thread.native_id)
                pinned.append(thread.name)
        self._loop_home = False
        self.loop(alone=True)
        log.info("thread placement: %s (pinned: %s)", self.describe(), ", ".join(pinned))
        return pinned if self.enabled else []

    def loop(self, alone: bool) -> None:
        """Called on the event loop as a search arrives: the loop and gRPC's poller keep to the home CPU while
        searches come alone, and may run anywhere while they have company (under load the loop's own work, refusals
        included, needs whichever CPU is free: pinned there, goodput with callers that retry at once fell from 0.80
        to 0.67 of capacity)."""
        if not self.enabled or not self._loop_threads or alone == self._loop_home:
            return
        cpus = self.home if alone else self.spread
        for native_id in self._loop_threads:
            self._set(cpus, native_id)
        self._loop_home = alone

    def place(self, alone: bool, own: int | None = None) -> None:
        """Called by a pipeline thread as a job starts: the home CPU for a lone search; the `own`-th allowed CPU
        (ascending) for one that keeps to its thread's CPU; every allowed CPU else."""
        if not self.enabled:
            return
        if alone:
            cpus = self.home
        elif own is not None and own < len(self.order):
            cpus = frozenset({self.order[own]})
        else:
            cpus = self.spread
        if getattr(self._local, "cpus", None) != cpus:
            self._set(cpus)

    def beside_thread(self) -> None:
        """Holds the calling thread to the CPUs beside the home one (encode_cpus), or gives it every allowed CPU when
        placement is off (the initializer of the thread where a lone search's BM25 runs while it encodes)."""
        if self.enabled:
            self._set(frozenset(self.encode_cpus()))

    def spread_thread(self) -> None:
        """Gives the calling thread every allowed CPU (an executor's initializer: threads started by the pinned event
        loop inherit its one CPU, and so would the thread pools they create)."""
        self.place(alone=False)


def lower_priority(nice: int) -> None:
    """Adds `nice` to the calling thread's niceness (at most 19), so that the threads at the process's own priority
    (the event loop, which admits, refuses and replies; gRPC's poller) run as soon as they have work while this one
    computes, instead of waiting for their share of a CPU behind it (bench/README.md, "Issue 15", "The pipeline
    threads at a lower priority"). Linux only: there a thread is a task of its own, and PRIO_PROCESS 0 names the
    calling one; elsewhere it would name the whole process, so nothing is changed. An unprivileged thread may lower
    its priority, never raise it again: the thread keeps it for its life."""
    if not sys.platform.startswith("linux") or nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except OSError as error:  # a sandbox that forbids it: the thread runs at the process's priority
        log.warning("could not lower a pipeline thread's priority: %s", error)


class PipelineExecutor(ThreadPoolExecutor):
    """The pipeline threads, with each job placed (Placement.place) as it starts: a search submitted with
    submit_search runs beside the event loop when `alone()` says so then, and with company on its thread's own CPU
    while `settled()` says so (and there are no more threads than CPUs); everything else may run anywhere.
    `settled` is the server's to set (RetrieverServicer: nothing refused lately); until then, never. `nice`: added to
    each pipeline thread's niceness as it starts (Linux; lower_priority). `busy`: how many threads run a job now, for
    the admission gate; a job that has only its hand-back left calls `release` first."""

    def __init__(self, max_workers: int, placement: Placement, thread_name_prefix: str = "", nice: int = 0) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix,
                         initializer=lower_priority, initargs=(nice,))
        self.placement = placement
        self.settled: Callable[[], bool] = lambda: False
        self._numbers = threading.local()  # each thread's number, taken at its first search
        self._count = itertools.count()
        self._one_cpu_each = max_workers <= len(placement.spread)
        self.busy = 0
        self._busy_lock = threading.Lock()
        self._held = threading.local()  # whether this thread's job still counts in `busy`

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(self._placed, False, fn, *args, **kwargs)

    def submit_search(self, alone: Callable[[], bool], fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(self._placed, alone, fn, *args, **kwargs)

    def release(self) -> None:
        """Called by a job on its pipeline thread when all it has left is to hand its answer back: the thread no
        longer counts in `busy`. Once per job at most; the job's end releases it otherwise."""
        if getattr(self._held, "value", False):
            self._held.value = False
            with self._busy_lock:
                self.busy -= 1

    def _placed(self, alone: Callable[[], bool] | bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._busy_lock:
            self.busy += 1
        self._held.value = True
        try:
            if not callable(alone):  # a plain job
                self.placement.place(alone)
                return fn(*args, **kwargs)
            number = getattr(self._numbers, "value", None)
            if number is None:
                number = self._numbers.value = next(self._count)  # next() on a count is atomic under the GIL
            lone = alone()
            self.placement.place(lone, number if not lone and self._one_cpu_each and self.settled() else None)
            return fn(*args, **kwargs)
        finally:
            self.release()
