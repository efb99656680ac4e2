"""Retry pushback: a refusal for load says when to come back (trailing metadata grpc-retry-pushback-ms, gRFC A6), a
client with retries waits that long and succeeds once there is room, and a drain refusal sends no pushback so the
client's own backoff sends the retry to another replica. Real servers, real channels."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest

from rag_service.api.admission import PUSHBACK_MAX_MS, PUSHBACK_MIN_MS
from rag_service.client import RetrieverClient, RetrieverError, replica_target, service_config
from rag_service.core.config import ServerConfig
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

PUSHBACK = "grpc-retry-pushback-ms"


def _shed(running) -> float:
    return running.server.metrics.registry.get_sample_value("rag_requests_shed_total") or 0.0


@pytest.fixture
def full(built_index, encoder, server_thread, wait_for):
    """A server with one pipeline thread and one search in flight at most, that search admitted and stuck behind a
    blocked pipeline thread: every further Search is refused for load until `gate` is set. The stuck search waits as
    long as a test takes, and is answered then (max_queue_wait off: not refused for its wait)."""
    config = ServerConfig(index=built_index, port=0, workers=1, max_in_flight=1, max_queued=1, warmup_queries=0,
                          replica_name="full-replica", max_queue_wait=0.0)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        stub.Search(pb.SearchRequest(query="warm up"), timeout=30)
        gate = threading.Event()
        running.server.executor.submit(gate.wait, 60)
        stuck = stub.Search.future(pb.SearchRequest(query="coffee"), timeout=60)
        assert wait_for(lambda: running.server.servicer.admission.in_flight == 1)
        yield running, stub, gate
        gate.set()
        assert stuck.result().contexts


def test_a_refusal_for_load_carries_a_bounded_pushback_beside_the_other_trailers(full):
    running, stub, _ = full
    servicer = running.server.servicer
    # The blocked job holds the one thread: the gate and the gauge see it busy.
    assert running.server.executor.busy == 1
    assert running.server.metrics.registry.get_sample_value("rag_pipeline_threads_busy") == 1
    # Nothing refused yet: searches with company may keep to their pipeline threads' CPUs (placement.py).
    assert servicer._settled() and running.server.executor.settled == servicer._settled
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(pb.SearchRequest(query="volcano"), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not servicer._settled()  # shedding: they run anywhere, so the event loop finds a CPU for refusals
    trailers = dict(info.value.trailing_metadata())
    assert trailers[PUSHBACK].isdigit()
    assert PUSHBACK_MIN_MS <= int(trailers[PUSHBACK]) <= PUSHBACK_MAX_MS
    assert trailers["x-served-by"] == "full-replica"  # the pushback is added to, not in place of, the trailers

    # The estimate follows what the gate measured: admitted searches holding their slot 0.2 s each, one ahead.
    running.server.servicer.admission.residence = 0.2
    # No retry policy: the refusal reaches the caller.
    with RetrieverClient(f"127.0.0.1:{running.port}") as client, pytest.raises(RetrieverError) as refused:
        client.search("volcano", timeout=5)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.served_by == "full-replica"
    assert refused.value.retry_after_ms is not None and 100 <= refused.value.retry_after_ms < 300


@pytest.mark.parametrize(("max_queue_wait", "overflowing"),
                         [(ServerConfig().max_queue_wait, True), (ServerConfig().max_queue_wait, False), (0.0, True)])
def test_a_search_that_waited_too_long_in_an_overflowing_queue_is_refused_and_not_run(
        built_index, encoder, server_thread, wait_for, max_queue_wait, overflowing):
    config = ServerConfig(index=built_index, port=0, workers=1, max_in_flight=4, max_queued=1, warmup_queries=0,
                          max_queue_wait=max_queue_wait)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        servicer = running.server.servicer
        admission = servicer.admission
        for query in ("warm up", "glacier", "volcano"):
            stub.Search(pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS), timeout=30)
        assert admission.service > 0.0  # the mean search, from the searches so far (the first, cold, weighs long)
        admission.service = 0.05  # as if the searches had taken 50 ms each
        gate = threading.Event()
        running.server.executor.submit(gate.wait, 60)
        queued = stub.Search.future(pb.SearchRequest(query="coffee", cache=pb.CACHE_BYPASS), timeout=60)
        assert wait_for(lambda: admission.queued == 1)
        if overflowing:  # the queue is full: the next search is refused at the gate
            with pytest.raises(grpc.RpcError) as at_gate:
                stub.Search(pb.SearchRequest(query="bread", cache=pb.CACHE_BYPASS), timeout=5)
            assert at_gate.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(0.3)  # six mean searches: stale once a thread takes it (the default allows 1.5)
        shed = _shed(running)
        ran: list[str] = []
        real_search = servicer.pipeline.search

        def counting(params, **kwargs):
            ran.append(params.query)
            return real_search(params, **kwargs)

        servicer.pipeline.search = counting
        gate.set()
        if max_queue_wait == 0.0 or not overflowing:  # off, or a queue with room: never refused for its wait
            assert queued.result().contexts and _shed(running) == shed and ran == ["coffee"]
            return
        with pytest.raises(grpc.RpcError) as info:
            queued.result()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "for a pipeline thread" in info.value.details() and "max_queue_wait" in info.value.details()
        assert PUSHBACK_MIN_MS <= int(dict(info.value.trailing_metadata())[PUSHBACK]) <= PUSHBACK_MAX_MS
        assert _shed(running) == shed + 1 and admission.queued == 0 and admission.in_flight == 0
        assert ran == []  # no pipeline work for it
        # The thread moved on: the next search is answered.
        assert stub.Search(pb.SearchRequest(query="coffee", cache=pb.CACHE_BYPASS), timeout=30).contexts


def test_the_pushback_is_spread_and_bounded(full):
    running, _, _ = full
    admission = running.server.servicer.admission
    admission.residence = 0.2
    delays = {admission.pushback_ms(1) for _ in range(200)}
    assert min(delays) >= 100 and max(delays) < 300 and len(delays) > 20  # spread so a refused burst comes back apart
    admission.residence = 0.0
    assert admission.pushback_ms(1) == PUSHBACK_MIN_MS  # no sooner than a retry could find room
    admission.residence = 60.0
    assert admission.pushback_ms(5) == PUSHBACK_MAX_MS  # no later than a stale estimate should keep a caller away


def test_a_retrying_client_waits_the_pushback_and_succeeds_once_there_is_room(full, wait_for):
    running, _, gate = full
    # Each admitted search held its slot 0.6 s: the refused call is told to come back in 0.3 to 0.9 s, where the
    # client's own backoff would have retried within 0.05 s.
    running.server.servicer.admission.residence = 0.6

    def make_room() -> None:
        wait_for(lambda: _shed(running) >= 1)
        gate.set()  # the stuck search finishes at once and frees the only slot

    threading.Thread(target=make_room, daemon=True).start()
    started = time.monotonic()
    with RetrieverClient(f"127.0.0.1:{running.port}", retries=2) as client:
        result = client.search("glacier", timeout=10)
    elapsed = time.monotonic() - started
    assert result.contexts and result.served_by == "full-replica"
    assert _shed(running) == 1  # refused once, then admitted on the retry
    assert elapsed >= 0.29  # the retry waited for the server's pushback, not the client's 50 ms backoff


def test_a_client_that_opts_out_does_not_retry_a_refusal_for_load(full):
    running, _, _ = full
    config = json.loads(service_config(retries=2, retry_overloaded=False))
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    with RetrieverClient(f"127.0.0.1:{running.port}", retries=2, retry_overloaded=False) as client, \
            pytest.raises(RetrieverError) as refused:
        client.search("volcano", timeout=5)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.retry_after_ms is not None
    assert _shed(running) == 1


def test_a_drain_refusal_sends_no_pushback_and_the_retry_goes_to_another_replica(built_index, encoder,
                                                                                  server_thread, wait_for):
    def config(name: str) -> ServerConfig:
        return ServerConfig(index=built_index, port=0, workers=1, warmup_queries=0, replica_name=name)

    with server_thread(config("draining"), encoder) as draining, server_thread(config("healthy"), encoder) as healthy:
        gate = threading.Event()
        draining.server.executor.submit(gate.wait, 60)
        with grpc.insecure_channel(f"127.0.0.1:{draining.port}") as channel:
            stub = pb_grpc.RetrieverStub(channel)
            # A search in flight keeps the replica draining (and refusing) while the test looks.
            in_flight = stub.Search.future(pb.SearchRequest(query="coffee"), timeout=60)
            assert wait_for(lambda: draining.server.servicer.admission.in_flight == 1)
            stopping = asyncio.run_coroutine_threadsafe(draining.server.stop(10.0), draining.loop)
            assert wait_for(lambda: draining.server.servicer.admission.draining)
            with pytest.raises(grpc.RpcError) as info:
                stub.Search(pb.SearchRequest(query="bread"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # A negative pushback would mean "do not retry at all" (gRFC A6), stopping the retry elsewhere too.
            assert PUSHBACK not in dict(info.value.trailing_metadata())

            target = replica_target([f"127.0.0.1:{draining.port}", f"127.0.0.1:{healthy.port}"])
            with RetrieverClient(target, load_balancing="round_robin", retries=2) as client:
                client.wait_until_serving(timeout=10)  # health answers from either: both connections are up
                served_by = {client.search("bread", timeout=10).served_by for _ in range(4)}
            assert served_by == {"healthy"}
            gate.set()
            assert in_flight.result().contexts
            stopping.result(timeout=30)


def test_a_request_sent_again_before_its_pushback_ends_is_answered_when_it_ends(full):
    running, stub, _ = full
    # Admitted searches held their slot 0.1 s each, one ahead: each refusal says 50 to 150 ms.
    running.server.servicer.admission.residence = 0.1

    def refused(call_stub, query: str = "volcano") -> tuple[float, dict[str, str]]:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            call_stub.Search(pb.SearchRequest(query=query), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return time.monotonic() - started, dict(info.value.trailing_metadata())

    def held() -> float:
        return running.server.metrics.registry.get_sample_value("rag_refusals_held_total") or 0.0

    _, first = refused(stub)  # the request's first refusal: at once, with its pushback
    assert 50 <= int(first[PUSHBACK]) < 150 and held() == 0
    # Another request on the same connection (a caller that fails fast beside it): at once too.
    elapsed, other = refused(stub, "glacier")
    assert elapsed < 0.045 and int(other[PUSHBACK]) >= 50 and held() == 0
    # The first request again at once: answered no sooner than the new pushback it is given, and told the wait is
    # over; and while it is held, any request on that connection (which has shown that it retries early) is too.
    started = time.monotonic()
    again = stub.Search.future(pb.SearchRequest(query="volcano"), timeout=5)
    time.sleep(0.01)
    elapsed, sibling = refused(stub, "coral reef")
    assert elapsed >= 0.045 and sibling[PUSHBACK] == "0"
    with pytest.raises(grpc.RpcError) as retried:
        again.result()
    assert time.monotonic() - started >= 0.045 and dict(retried.value.trailing_metadata())[PUSHBACK] == "0"
    assert held() == 2
    # The same request on another connection, refused there for the first time, is answered at once.
    with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.use_local_subchannel_pool", 1)]) as other:
        elapsed, fresh = refused(pb_grpc.RetrieverStub(other))
    assert elapsed < 0.045 and int(fresh[PUSHBACK]) >= 50 and held() == 2
    # The first connection is still taken to retry early: a new request's refusal there is held as well.
    elapsed, later = refused(stub, "tide pools")
    assert elapsed >= 0.045 and later[PUSHBACK] == "0" and held() == 3


def test_early_returns_are_held_until_the_pushback_ends_within_the_deadline_and_the_memory_is_bounded():
    from rag_service.api.admission import EARLY_CALLERS, HOLD_MARGIN_S, HOLD_MAX_MS, RETRYING_S, EarlyReturns

    now = [100.0]
    early = EarlyReturns(clock=lambda: now[0])
    assert early.hold_s("a", "r1", 40, None) == 0.0  # first refusal: at once
    assert early.hold_s("a", "r2", 40, None) == 0.0  # another request on the connection: at once
    now[0] += 0.010
    assert early.hold_s("a", "r1", 30, None) == pytest.approx(0.030)  # r1 again 10 ms in: held its new 30 ms
    assert early.hold_s("a", "r3", 30, None) == pytest.approx(0.030)  # the connection retried early: any request
    assert early.hold_s("b", "r1", 30, None) == 0.0  # another connection
    now[0] += 0.015
    assert early.hold_s("a", "r1", 30, 0.012) == pytest.approx(0.012 - HOLD_MARGIN_S)  # within the deadline
    assert early.hold_s("a", "r1", 30, 0.001) == 0.0  # no time left to hold
    assert early.hold_s("a", "r1", HOLD_MAX_MS + 1, None) == 0.0  # too long to hold: answered at once as before
    now[0] += 0.5  # every pushback over, but "a" retried early less than RETRYING_S ago
    assert early.hold_s("a", "r4", 30, None) == pytest.approx(0.030)
    now[0] += RETRYING_S
    assert early.hold_s("a", "r5", 30, None) == 0.0 and early.hold_s("b", "r6", 30, None) == 0.0
    bounded = EarlyReturns(clock=lambda: now[0])
    for i in range(EARLY_CALLERS):
        bounded.hold_s("c", f"request-{i}", 5, None)
    assert len(bounded._requests) == EARLY_CALLERS
    now[0] += 1.0
    bounded.hold_s("c", "late", 5, None)  # at the bound: the requests whose pushback has ended are forgotten
    assert list(bounded._requests) == [("c", "late")]
    for i in range(EARLY_CALLERS):  # a flood of requests all within their pushback: at the bound, all are forgotten
        bounded.hold_s("c", f"flood-{i}", 200, None)
    assert len(bounded._requests) <= EARLY_CALLERS // 2 + 1
    assert bounded.hold_s("c", "flood-1", 200, None) == 0.0  # forgotten: refused at once, as a first refusal is


def test_the_gate_counts_free_threads_not_searches_in_flight():
    from rag_service.api.admission import Admission
    from rag_service.core.errors import Overloaded
    from rag_service.core.metrics import Metrics

    busy = [2]
    admission = Admission(ServerConfig(workers=2, max_queued=2, max_in_flight=64), Metrics(), lambda: busy[0])
    admission.queued = 2
    with pytest.raises(Overloaded) as refused, admission.search():  # both threads busy, two waiting: full
        pass
    assert "2 requests queued" in str(refused.value) and refused.value.retry_after_ms >= PUSHBACK_MIN_MS
    busy[0] = 1  # a thread finished its search and is about to take the next queued one
    with admission.search():
        assert admission.in_flight == 1
    admission.queued = 0
    busy[0] = 2
    for queued in (0, 1):  # room in the queue while every thread is busy
        admission.queued = queued
        with admission.search():
            pass
    # Without the executor's count every thread is taken to be busy: the queue's bound alone.
    alone = Admission(ServerConfig(workers=2, max_queued=1), Metrics())
    alone.queued = 1
    with pytest.raises(Overloaded), alone.search():
        pass


@pytest.mark.parametrize("rule", ["free threads", "searches in flight"])
def test_a_search_done_on_its_thread_frees_it_for_the_gate_before_its_reply(
        built_index, encoder, server_thread, wait_for, monkeypatch, rule):
    """One pipeline thread, room for one queued search. While a search's thread hands its answer back (held here),
    two more searches are admitted: the one the thread takes next, and one that waits. Counted as in flight, the
    handing-back search would have kept its thread busy and the second of them would have been refused."""
    from rag_service.api import server as server_module

    config = ServerConfig(index=built_index, port=0, workers=1, max_in_flight=8, max_queued=1, warmup_queries=0,
                          max_queue_wait=0.0)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        admission = running.server.servicer.admission
        stub.Search(pb.SearchRequest(query="warm up", cache=pb.CACHE_BYPASS), timeout=30)
        if rule == "searches in flight":  # the thread counted busy while its search is in flight, as it once was
            monkeypatch.setattr(admission, "busy", lambda: min(admission.in_flight - admission.queued, 1))
        handing_back, gate = threading.Event(), threading.Event()
        real = server_module._hand_back

        def held(loop, answer, job):
            def search_then_wait():
                served = job()  # the search, its thread released
                handing_back.set()
                gate.wait(60)
                return served
            monkeypatch.setattr(server_module, "_hand_back", real)  # the first search only
            real(loop, answer, search_then_wait)

        monkeypatch.setattr(server_module, "_hand_back", held)
        first = stub.Search.future(pb.SearchRequest(query="coffee", cache=pb.CACHE_BYPASS), timeout=60)
        assert handing_back.wait(30) and running.server.executor.busy == 0
        assert running.server.metrics.registry.get_sample_value("rag_pipeline_threads_busy") == 0
        second = stub.Search.future(pb.SearchRequest(query="bread", cache=pb.CACHE_BYPASS), timeout=60)
        assert wait_for(lambda: admission.queued == 1)
        try:
            if rule == "searches in flight":
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Search(pb.SearchRequest(query="glacier", cache=pb.CACHE_BYPASS), timeout=5)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return
            third = stub.Search.future(pb.SearchRequest(query="glacier", cache=pb.CACHE_BYPASS), timeout=60)
            assert wait_for(lambda: admission.queued == 2)
            # Now the thread's one free place is taken: the next is refused.
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(pb.SearchRequest(query="volcano", cache=pb.CACHE_BYPASS), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            gate.set()
            assert first.result().contexts and second.result().contexts and third.result().contexts
        finally:
            gate.set()
            first.result()
            second.result()


def test_the_queue_wait_is_held_to_the_mean_search_only_when_set():
    from rag_service.api.admission import Admission
    from rag_service.core.errors import Overloaded
    from rag_service.core.metrics import Metrics

    for setting in (0.0, 1.5):
        admission = Admission(ServerConfig(max_queue_wait=setting), Metrics())
        admission.last_full = time.monotonic()  # a search was just refused at the gate: the queue overflows
        admission.check_wait(10.0)  # no search yet: no mean to hold a wait to
        admission.served(0.010)
        assert admission.service == pytest.approx(0.010)  # the first search sets the mean
        admission.served(0.030)
        assert admission.service == pytest.approx(0.011)  # then each weighs 1/20
        admission.check_wait(0.016)  # within 1.5 mean searches
        if setting == 0.0:
            admission.check_wait(10.0)  # off: never refused for its wait
            continue
        with pytest.raises(Overloaded) as refused:
            admission.check_wait(0.017)
        assert refused.value.retry_after_ms >= PUSHBACK_MIN_MS and admission.last_shed > 0
        assert "max_queue_wait 1.5" in str(refused.value)
        admission.last_full = time.monotonic() - 1.5  # no refusal at the gate for a while: the queue has room
        admission.check_wait(10.0)
