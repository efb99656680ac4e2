"""Thread placement: the event loop and gRPC's poller on a home CPU, a lone search beside them, everything else on
any allowed CPU (rag_service/api/placement.py), with the operating system's calls recorded by a fake, then for
real in a server."""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from rag_service.api import placement as placement_module
from rag_service.api.placement import PipelineExecutor, Placement


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, frozenset[int]]] = []
        self.lock = threading.Lock()

    def __call__(self, native_id: int, cpus) -> None:
        with self.lock:
            self.calls.append((native_id, frozenset(cpus)))


def test_a_lone_search_goes_home_and_the_rest_spreads_with_one_call_per_change():
    setter = Recorder()
    placement = Placement("auto", setter=setter, allowed={3, 1, 2})
    assert placement.enabled and placement.home == {1} and placement.spread == {1, 2, 3}
    placement.place(alone=True)
    placement.place(alone=True)
    placement.place(alone=False)
    placement.place(alone=False)
    placement.place(alone=True)
    assert setter.calls == [(0, frozenset({1})), (0, frozenset({1, 2, 3})), (0, frozenset({1}))]


def test_the_beside_thread_keeps_off_the_home_cpu():
    setter = Recorder()
    Placement("auto", setter=setter, allowed={3, 1, 2}).beside_thread()
    assert setter.calls == [(0, frozenset({2, 3}))]
    off = Recorder()
    Placement("off", setter=off, allowed={0, 1}).beside_thread()
    assert off.calls == []


@pytest.mark.parametrize("mode, allowed, has_setter", [("off", {0, 1}, True), ("auto", {5}, True),
                                                       ("auto", set(range(9)), True), ("auto", set(), True),
                                                       ("auto", {0, 1}, False)])
def test_nothing_is_pinned_when_off_on_one_cpu_or_without_the_call(mode, allowed, has_setter, monkeypatch):
    setter = Recorder()
    if not has_setter:  # a platform without os.sched_setaffinity
        monkeypatch.setattr(placement_module, "_default_setter", lambda: None)
    placement = Placement(mode, setter=setter if has_setter else None, allowed=allowed)
    assert not placement.enabled
    placement.place(alone=True)
    placement.spread_thread()
    assert placement.pin_loop() == []
    assert setter.calls == []
    assert placement.describe() == "off"


def test_pin_loop_takes_the_calling_thread_and_grpc_poller_threads():
    setter = Recorder()
    placement = Placement("auto", setter=setter, allowed={0, 1})
    stop = threading.Event()
    poller = threading.Thread(target=stop.wait, name="Thread-99 (_poll_wrapper)", daemon=True)
    other = threading.Thread(target=stop.wait, name="bystander", daemon=True)
    poller.start()
    other.start()
    try:
        pinned = placement.pin_loop()
    finally:
        stop.set()
    assert pinned[0] == threading.current_thread().name and "Thread-99 (_poll_wrapper)" in pinned
    assert "bystander" not in pinned
    # Home is the lowest allowed CPU, known before the loop is pinned (the encoder's workers go beside it).
    assert placement.home == {0}
    loop_id = threading.get_native_id()
    assert (loop_id, frozenset({0})) in setter.calls
    assert (poller.native_id, frozenset({0})) in setter.calls
    assert all(cpus == {0} for _, cpus in setter.calls)
    # Searches with company free the loop and the pollers; alone again, they go home; one call each per change.
    calls = len(setter.calls)  # the process may hold other gRPC poller threads: each is pinned too
    placement.loop(alone=True)
    assert len(setter.calls) == calls
    placement.loop(alone=False)
    placement.loop(alone=False)
    freed = setter.calls[calls:]
    assert len(freed) == calls and all(cpus == {0, 1} for _, cpus in freed)
    assert {native_id for native_id, _ in freed} == {native_id for native_id, _ in setter.calls[:calls]}
    placement.loop(alone=True)
    assert len(setter.calls) == 3 * calls and all(cpus == {0} for _, cpus in setter.calls[2 * calls:])


def test_a_lone_encode_s_workers_go_beside_the_home_cpu():
    placement = Placement("auto", setter=Recorder(), allowed={6, 2, 3, 5})
    assert placement.home == {2} and placement.encode_cpus() == [3, 5, 6]
    assert "workers on CPUs [3, 5, 6]" in placement.describe()
    for off in (Placement("off", setter=Recorder(), allowed={0, 1}), Placement("auto", setter=Recorder(), allowed={4})):
        assert off.encode_cpus() == []


def test_the_executor_places_each_job_as_it_starts():
    setter = Recorder()
    placement = Placement("auto", setter=setter, allowed={0, 1})
    seen: list[bool] = []
    with PipelineExecutor(1, placement, thread_name_prefix="t") as executor:
        assert executor.submit(lambda x: x + 1, 1).result() == 2
        assert executor.submit_search(lambda: True, lambda: "lone").result() == "lone"
        assert executor.submit_search(lambda: seen.append(True) or False, lambda: "busy").result() == "busy"
        with pytest.raises(ZeroDivisionError):
            executor.submit_search(lambda: True, lambda: 1 / 0).result()
    # One worker thread: spread (a plain job), home (lone search), spread (search with company), home again.
    assert [cpus for _, cpus in setter.calls] == [{0, 1}, {0}, {0, 1}, {0}]
    assert seen == [True]  # `alone` is asked once, on the worker, as the job starts


def test_the_executor_counts_its_busy_threads_and_a_job_may_free_its_own_before_it_ends():
    placement = Placement("off")
    started, released, finish = threading.Event(), threading.Event(), threading.Event()
    with PipelineExecutor(2, placement, thread_name_prefix="t") as executor:
        assert executor.busy == 0

        def job() -> str:
            started.set()
            finish.wait(10)
            return "done"

        def search() -> str:
            executor.release()  # all that is left is the hand-back
            executor.release()  # once per job: a second call changes nothing
            released.set()
            finish.wait(10)
            return "handed back"

        first = executor.submit(job)
        assert started.wait(10) and executor.busy == 1
        second = executor.submit_search(lambda: False, search)
        assert released.wait(10) and executor.busy == 1  # the search's thread counts as free already
        finish.set()
        assert first.result() == "done" and second.result() == "handed back"
        with pytest.raises(ZeroDivisionError):
            executor.submit_search(lambda: False, lambda: 1 / 0).result()
        assert executor.busy == 0  # every job's end frees its thread, a failed one's too


class ThreadRecorder(Recorder):
    """Records the calling thread's id where the call names the calling thread (0)."""

    def __call__(self, native_id: int, cpus) -> None:
        super().__call__(native_id or threading.get_native_id(), cpus)


@pytest.mark.parametrize("workers, settled", [(2, True), (2, False), (3, True)])
def test_a_settled_server_keeps_each_pipeline_thread_to_its_own_cpu(workers, settled):
    setter = ThreadRecorder()
    placement = Placement("auto", setter=setter, allowed={4, 7})
    started = threading.Barrier(workers)

    def search() -> int:
        started.wait(timeout=30)  # every thread takes one, so each starts
        return threading.get_native_id()

    with PipelineExecutor(workers, placement) as executor:
        executor.settled = lambda: settled
        ran = {f.result() for f in [executor.submit_search(lambda: False, search) for _ in range(workers)]}
        searches = list(setter.calls)
        plain = executor.submit(threading.get_native_id).result()
    assert len(ran) == workers and len(searches) == workers  # one call per thread
    placed = dict(searches)
    assert set(placed) == ran
    if workers == 2 and settled:
        # One CPU each: the two threads' CPUs are the two allowed ones; a plain job afterwards spreads again.
        assert sorted(placed.values(), key=min) == [{4}, {7}]
        assert setter.calls[-1] == (plain, frozenset({4, 7}))
    else:
        # Shedding load (the event loop needs a free CPU), or more threads than CPUs (two would share one while
        # the other idled): searches with company run anywhere.
        assert all(cpus == {4, 7} for cpus in placed.values())


def _affinity(native_id: int) -> set[int]:
    return set(os.sched_getaffinity(native_id))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not 2 <= len(os.sched_getaffinity(0)) <= 8,
                    reason="needs Linux and 2 to 8 allowed CPUs (placement's range)")
@pytest.mark.parametrize("placement", ["auto", "off"])
def test_a_server_pins_its_loop_once_loaded_and_answers(built_index, encoder, server_thread, placement):
    from rag_service.core.config import ServerConfig
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    allowed = _affinity(0)
    config = ServerConfig(index=built_index, port=0, warmup_queries=0, placement=placement)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        reply = stub.Search(pb.SearchRequest(query="glacier ice", debug=True, cache=pb.CACHE_BYPASS), timeout=30)
        assert reply.contexts and "handback" in reply.stage_time_us
        loop_cpus = _affinity(running.thread.native_id)
        home = running.server.placement.home
        if placement == "auto":
            assert len(home) == 1 and home <= allowed and loop_cpus == home
            # The encoders this server loads hold a lone search's encode workers beside the home CPU.
            assert running.server.encoders.idle_cpus == sorted(allowed - home)
        else:
            assert loop_cpus == allowed and running.server.encoders.idle_cpus == []
        # The pipeline thread that ran the lone search ran beside the loop; a plain job runs anywhere.
        workers = list(running.server.executor._threads)  # this server's, not another test's
        placed = [_affinity(t.native_id) for t in workers]
        assert (home in placed) if placement == "auto" else all(cpus == allowed for cpus in placed)
        ran = running.server.executor.submit(lambda: _affinity(0)).result(timeout=30)
        assert ran == allowed
        reload_cpus = running.server._reload_executor.submit(lambda: _affinity(0)).result(timeout=30)
        assert reload_cpus == allowed
        if _LINUX:  # the pipeline threads at the configured lower priority; the event loop at the process's
            base = os.getpriority(os.PRIO_PROCESS, 0)
            expected = min(19, base + running.server.config.pipeline_nice)
            assert running.server.config.pipeline_nice > 0  # the default
            assert [_nice(t.native_id) for t in workers] == [expected] * len(workers)
            assert _nice(running.thread.native_id) == base
    assert _affinity(0) == allowed  # the test's own thread was never touched


_LINUX = os.uname().sysname == "Linux"


def _nice(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


@pytest.mark.skipif(not _LINUX, reason="a thread's own niceness is Linux's")
@pytest.mark.parametrize("nice", [0, 3, 40])
def test_pipeline_threads_lower_their_own_priority_and_no_other_threads(nice):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    placement = Placement("off")
    with PipelineExecutor(2, placement, nice=nice) as executor:
        seen = {executor.submit(lambda: (threading.get_native_id(), _nice(0))).result(timeout=30) for _ in range(8)}
        assert {n for _, n in seen} == {min(19, base + nice)}
        # Each thread lowered its own priority once, as it started: a thread that ran many jobs is not lowered again.
        assert all(_nice(t.native_id) == min(19, base + nice) for t in executor._threads)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's thread keeps its priority


def test_a_search_counts_as_alone_only_well_after_the_last_one_with_company(monkeypatch):
    from types import SimpleNamespace

    from rag_service.api import server as server_module

    clock = [10_000_000_000]
    monkeypatch.setattr(server_module, "time", SimpleNamespace(monotonic_ns=lambda: clock[0]))
    servicer = SimpleNamespace(admission=SimpleNamespace(in_flight=1), _company_ns=0)
    alone = server_module.RetrieverServicer._alone
    assert alone(servicer)
    servicer.admission.in_flight = 2
    assert not alone(servicer) and servicer._company_ns == clock[0]
    servicer.admission.in_flight = 1
    clock[0] += server_module.COMPANY_NS  # not yet: callers that take turns keep the spread placement
    assert not alone(servicer)
    clock[0] += 1
    assert alone(servicer)


def test_a_failing_call_turns_placement_off_and_the_job_still_runs():
    def refuse(native_id, cpus):
        raise OSError(22, "Invalid argument")

    placement = Placement("auto", setter=refuse, allowed={0, 1})
    with PipelineExecutor(1, placement) as executor:
        assert executor.submit_search(lambda: True, lambda: "answered").result() == "answered"
    assert not placement.enabled
    assert placement.pin_loop() == []
