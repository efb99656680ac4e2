"""The adaptive pipeline's policy: which route a request takes, so it finishes within its latency budget.

Routes, most to least work:
    full        first stage at the asked depth, rerank of the asked rerank_depth
    light       rerank of fewer candidates (as many as the budget allows, at least LIGHT_MIN)
    confident   no rerank: BM25 and dense agree on the top results, so the fused order is already trusted
    fused       no rerank: not asked for, no windows in the index, not affordable within the budget, or load
    shallow     a shallower first stage and no rerank: even the first stage at full depth would not fit
    lexical     BM25 alone, no query encode, no dense retrieval, no rerank (its features need the query vector):
                the budget left cannot pay for the encode and the first stage, but can for BM25 and the contexts;
                or the brownout dimmer (below) sends it there under sustained load.
                On a CPU the encode is most of a request (~6 of ~8 ms at p50 here, ONNX int8), so this is the one
                route that cuts what load makes expensive. Quality is BM25's (SciFact test nDCG@10 0.6865 against
                0.7448 for the full pipeline). Only a pipeline with a local BM25 index plans it (not the shard
                router), and only before the query is encoded: SearcherBase.search plans before its encode.

Brownout (a dimmer, after Klein et al., "Brownout: building more robust cloud applications", ICSE 2014): under
sustained load no per-request rule helps, because a request that finds its budget spent has already waited behind
requests that took the full pipeline, and the cores are saturated by all of them. The dimmer watches the server
time of recent budgeted requests as a share of their budgets and keeps its 95th percentile under a target share by
letting only a fraction of requests (its level, 0..1) take the full pipeline; the others take the lexical route, which
costs a fraction of the CPU (no encode, no dense, no rerank). The level moves by integral control every few finished
requests, so it falls as load rises and climbs back when the tail has room; requests are chosen by error diffusion, so
exactly `level` of them get the full pipeline, deterministically. Only requests planned while another search is in
flight are dimmed: on an idle server the full pipeline delays nobody. Figures: bench/README.md, "Brownout".

The budget is the tighter of SearchParams.budget_ms and the call's deadline. Costs come from the pipeline's own stage
timings (an exponentially weighted mean per stage, and per reranked candidate), so they follow the machine's current
load; the in-flight count adds an immediate signal: with more searches in flight than `busy_in_flight`, the rerank is
shortened or skipped before queues build up. The confidence rule (top-N agreement of the two retrievers) was chosen on
SciFact train (bench/experiments/adaptive.py, bench/README.md "Issue 5").

The policy object is shared by all pipeline threads; its state (a handful of floats, a counter, the dimmer's window of
recent budget shares) is under one lock.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from rag_service.core.params import SearchParams

FULL, LIGHT, CONFIDENT, FUSED, SHALLOW, LEXICAL = "full", "light", "confident", "fused", "shallow", "lexical"
LIGHT_MIN = 20
SHALLOW_DEPTH = 30
# Cold-start costs (ms) on the 2-core reference machine, replaced by measurements after a few requests.
_INITIAL_MS = {"encode": 3.0, "lexical": 2.0, "dense": 1.0, "fusion": 0.2, "contexts": 0.3, "assemble": 0.2}
_INITIAL_RERANK_MS_PER_CANDIDATE = 0.05
_ALPHA = 0.1  # weight of the newest sample in the moving means
# Share of the remaining budget that planning keeps in reserve for what the model does not see (queueing, GC, reply).
_SAFETY = 0.8


@dataclass(frozen=True)
class AdaptiveConfig:
    enabled: bool = True
    # Skip the rerank when the two retrievers' top `agree_top` share at least `agree_min` chunks.
    confidence: bool = True
    agree_top: int = 5
    agree_min: int = 4
    # More searches than this in flight in the pipeline: the cheaper route (light rerank, or none).
    busy_in_flight: int = 2
    busy_rerank_depth: int = 30
    # A rerank of fewer candidates than this is not worth its fixed cost: the fused order is kept instead.
    light_min: int = LIGHT_MIN
    # The lexical route (BM25 alone) when the budget left cannot pay for the query encode.
    lexical: bool = True
    # Lexical requests do not encode, so they do not refresh the encode cost: once its last measurement is older than
    # this, a request encodes anyway (a probe), so a cost inflated by a past burst cannot keep every request lexical.
    # With the moving mean's weight (_ALPHA) a probe every 0.25 s brings an inflated estimate back within ~3 s; at
    # 1 s it took >10 s, and at 40 req/s most requests went lexical long after the burst
    # (bench/experiments/latency_ab.py).
    lexical_probe_s: float = 0.25
    # Brownout (module docstring): keep the p95 of recent budgeted requests' server time (arrival to result) under
    # `brownout_target` of their budget. The rest of the budget is for what the server cannot see: the network, the
    # client's own send lag, and the p95-to-p99 gap. Updated every `brownout_period` finished budgeted requests from
    # the last `brownout_window`; `brownout_gain` is the largest change of the level in one update.
    brownout: bool = True
    brownout_target: float = 0.5
    brownout_window: int = 40
    brownout_period: int = 10
    brownout_gain: float = 0.25
    # A lone search whose query terms have at least this many postings ranks its BM25 on the beside thread while it
    # encodes the query (Pipeline._before_encode); 0: never. Below it, the encode's second thread saves more than
    # running BM25 beside it would.
    lexical_beside_postings: int = 200_000


@dataclass(frozen=True)
class Plan:
    params: SearchParams  # with depth possibly lowered
    route: str
    reason: str
    budget_end: float | None  # monotonic time the request should be done by; None: no budget
    in_flight: int
    start: float | None = None  # monotonic time the budget counts from (the arrival)
    # The first stage's estimated ms (without the encode) that a plan within its budget was judged against; None when
    # no budget decided the route.
    first_ms: float | None = None


def agreement(bm25_ids: np.ndarray, dense_ids: np.ndarray, top: int) -> int:
    """How many of the top `top` chunks of the two retrievers are the same."""
    return len(np.intersect1d(np.asarray(bm25_ids[:top]), np.asarray(dense_ids[:top]), assume_unique=True))


class Dimmer:
    """The brownout dimmer: the share of budgeted requests that may take the full pipeline. Not thread-safe on its
    own: AdaptivePolicy calls it under its lock."""

    def __init__(self, target: float, window: int, period: int, gain: float) -> None:
        if not 0.0 < target <= 1.0:
            raise ValueError(f"brownout_target must be in (0, 1], got {target}")
        if window < 1 or period < 1 or gain <= 0.0:
            raise ValueError("brownout_window and brownout_period must be >= 1 and brownout_gain > 0")
        self.target, self.period, self.gain = target, period, gain
        self.level = 1.0
        self.tail = 0.0  # the p95 of the window at the last update, as a share of the budget
        self._shares: collections.deque[float] = collections.deque(maxlen=window)
        self._since_update = 0
        self._credit = 0.0

    def observe(self, share: float) -> None:
        """One finished request's server time as a share of its budget (1.0: it used all of it)."""
        self._shares.append(share)
        self._since_update += 1
        if self._since_update >= self.period:
            self._since_update = 0
            self.tail = float(np.percentile(np.fromiter(self._shares, np.float64), 95))
            # Relative error, capped: a tail 10x over target must not slam the level to 0 from one bad window.
            error = max(-1.0, min(1.0, (self.target - self.tail) / self.target))
            self.level = min(1.0, max(0.0, self.level + self.gain * error))

    def admit_full(self) -> bool:
        """Whether this request may take the full pipeline: `level` of the calls over time say yes."""
        if self.level >= 1.0:
            return True
        self._credit += self.level
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


# alone(): each search's weight in the moving share of searches that found company, and the share above which no
# search counts as alone (about 1 in 5 recent searches with company: the server is not idle).
_SHARED_WEIGHT = 0.1
_SHARED_MAX = 0.2


class AdaptivePolicy:
    def __init__(self, config: AdaptiveConfig = AdaptiveConfig(), load: Callable[[], int] | None = None) -> None:
        """`load`: how many searches the server holds now (admitted: running, or queued for a pipeline thread);
        None: those in `search` only (`in_flight`)."""
        self.config = config
        self._load = load
        self._shared = 0.0  # moving share of recent searches that found company in the server (alone())
        self._lock = threading.Lock()
        self._stage_ms = dict(_INITIAL_MS)
        self._rerank_ms_per_candidate = _INITIAL_RERANK_MS_PER_CANDIDATE
        self.in_flight = 0
        self._encode_seen: float | None = None  # time.monotonic() of the latest encode timing observed
        self.dimmer = Dimmer(config.brownout_target, config.brownout_window, config.brownout_period,
                             config.brownout_gain)

    # Bookkeeping -----------------------------------------------------------------------------------------------------

    def enter(self) -> int:
        with self._lock:
            self.in_flight += 1
            return self.in_flight

    def alone(self) -> bool:
        """Whether the search asking may take the cores it does not need: it is the only one the server holds, and
        the recent searches mostly were too. A search alone now may have company within a millisecond when the
        server is busy (two closed-loop callers leave it alone between one's reply and its next call), and a
        second search arriving while the first spreads its encode over every core waits for them: so an instant
        alone is not enough, the recent history must agree (bench/README.md, "Issue 15", "Idle cores")."""
        load = max(self.in_flight, self._load() if self._load is not None else 0)
        shared = load > 1
        with self._lock:
            self._shared += _SHARED_WEIGHT * (shared - self._shared)
            return not shared and self._shared < _SHARED_MAX

    def leave(self, plan: Plan | None = None) -> None:
        """The request planned as `plan` is done (answered or failed): its server time feeds the dimmer."""
        now = time.monotonic()
        with self._lock:
            self.in_flight -= 1
            if plan is not None and plan.budget_end is not None and plan.start is not None and self.config.brownout:
                self.dimmer.observe((now - plan.start) / max(plan.budget_end - plan.start, 1e-6))

    def brownout_level(self) -> float:
        """The share of budgeted requests currently let through to the full pipeline (a metric)."""
        with self._lock:
            return self.dimmer.level

    def observe(self, stage_us: dict[str, int], reranked: int) -> None:
        """Folds one finished request's stage timings into the cost model."""
        if "analyze" in stage_us:
            # The query's analysis is a stage of its own on the native path; the model counts it as lexical work,
            # which it is on the stage-by-stage path.
            stage_us = {**stage_us, "lexical": stage_us.get("lexical", 0) + stage_us["analyze"]}
        with self._lock:
            for stage, us in stage_us.items():
                if stage in self._stage_ms:
                    self._stage_ms[stage] += _ALPHA * (us / 1000.0 - self._stage_ms[stage])
            if "encode" in stage_us:
                self._encode_seen = time.monotonic()
            if reranked > 0 and "rerank" in stage_us:
                per = stage_us["rerank"] / 1000.0 / reranked
                self._rerank_ms_per_candidate += _ALPHA * (per - self._rerank_ms_per_candidate)

    def estimates(self) -> dict[str, float]:
        with self._lock:
            return {**self._stage_ms, "rerank_per_candidate": self._rerank_ms_per_candidate}

    # Decisions -------------------------------------------------------------------------------------------------------

    def plan(self, params: SearchParams, deadline: float | None, in_flight: int, encoded: bool,
             rerank_available: bool, arrival: float | None = None, lexical_available: bool = False) -> Plan:
        """Before the first stage: the budget, whether to skip the encoder (lexical) and whether the first stage must
        be made shallower.

        `arrival`: when the server received the request (time.monotonic()); `budget_ms` counts from then, so time
        spent queued for a pipeline thread is charged to the budget as it is to the deadline.
        `lexical_available`: the caller can answer from BM25 alone (a local index); False for the shard router."""
        now = time.monotonic()
        start = now if arrival is None else min(arrival, now)
        ends = [e for e in (deadline, None if params.budget_ms is None else start + params.budget_ms / 1000.0)
                if e is not None]
        budget_end = min(ends) if ends else None
        return self._plan(params, budget_end, now, start, in_flight, encoded, rerank_available, lexical_available)

    def _plan(self, params: SearchParams, budget_end: float | None, now: float, start: float, in_flight: int,
              encoded: bool, rerank_available: bool, lexical_available: bool) -> Plan:
        if lexical_available and not encoded and budget_end is not None and self.config.enabled \
                and self.config.lexical:
            lexical = self._lexical_plan(params, budget_end, now, start, in_flight)
            if lexical is not None:
                return lexical
        if not params.rerank:
            return Plan(params, FUSED, "rerank not requested", budget_end, in_flight, start)
        if not rerank_available:
            return Plan(params, FUSED, "index has no sentence windows for the reranker", budget_end, in_flight, start)
        if not self.config.enabled or budget_end is None:
            return Plan(params, FULL, "no latency budget" if self.config.enabled else "adaptive routing off",
                        budget_end, in_flight, start)
        est = self.estimates()
        stage = est["lexical"] + est["dense"] + est["fusion"] + est["contexts"] + est["assemble"]
        first = stage if encoded else stage + est["encode"]
        left_ms = (budget_end - now) * 1000.0 * _SAFETY
        if first > left_ms and params.depth > SHALLOW_DEPTH:
            shallow = replace(params, depth=SHALLOW_DEPTH, rerank_depth=min(params.rerank_depth, SHALLOW_DEPTH))
            return Plan(shallow, SHALLOW, f"{left_ms / _SAFETY:.1f} ms left, first stage needs ~{first:.1f} ms: "
                        f"depth {params.depth} -> {SHALLOW_DEPTH}, no rerank", budget_end, in_flight, start)
        return Plan(params, FULL, "within budget", budget_end, in_flight, start, first_ms=stage)

    def replan_after_encode(self, plan: Plan) -> bool:
        """Whether a plan made before the encode must be made again once the encode is paid (SearcherBase.search).
        Not when no budget decided its route (none given, adaptive routing off, a fused route), nor when it is
        within its budget by ten times its first stage's estimate: planned again it would be the same plan, and
        planning costs ~17 µs on the caches an encode leaves. Most requests carry a deadline of seconds against a
        first stage of about a millisecond. A shallow plan is made again: the encode's real cost may restore the
        full route."""
        if plan.budget_end is None or not self.config.enabled or plan.route == FUSED:
            return False
        if plan.route == FULL and plan.first_ms is not None:
            return (plan.budget_end - time.monotonic()) * 1000.0 * _SAFETY < 10.0 * plan.first_ms
        return True

    def _lexical_plan(self, params: SearchParams, budget_end: float, now: float, start: float,
                      in_flight: int) -> Plan | None:
        """The lexical route when encode + first stage do not fit the budget left and BM25 + contexts do."""
        with self._lock:
            est = {**self._stage_ms}
            seen = self._encode_seen
            # Only while another search is in flight: dimming an idle server's one request frees no capacity for
            # anyone, it only costs that request quality (a closed loop at a tight budget would go lexical).
            dimmed = self.config.brownout and in_flight > 1 and not self.dimmer.admit_full()
            level, tail = self.dimmer.level, self.dimmer.tail
        if dimmed:
            return Plan(params, LEXICAL, f"brownout: recent p95 server time {tail:.0%} of the budget (target "
                        f"{self.config.brownout_target:.0%}), full pipeline for {level:.0%} of requests: BM25 alone",
                        budget_end, in_flight, start)
        if seen is None or now - seen > self.config.lexical_probe_s:
            return None  # no recent measurement of the encode: this request measures it
        left_ms = (budget_end - now) * 1000.0 * _SAFETY
        tail = est["contexts"] + est["assemble"]
        needed = est["encode"] + est["lexical"] + est["dense"] + est["fusion"] + tail
        alone = est["lexical"] + tail
        if needed <= left_ms or alone > left_ms:
            return None
        return Plan(params, LEXICAL, f"{left_ms / _SAFETY:.1f} ms left, encode + first stage need ~{needed:.1f} ms "
                    f"(encode ~{est['encode']:.1f} ms): BM25 alone (~{alone:.1f} ms), no dense, no rerank",
                    budget_end, in_flight, start)

    def rerank_plan(self, plan: Plan) -> RerankPlan:
        """Before the first stage: what of the rerank decision does not depend on it (the route, load), so the
        first stage, the confidence rule and the rerank can run as one native call (Pipeline._rank)."""
        params, cfg = plan.params, self.config
        if plan.route in (FUSED, SHALLOW, LEXICAL):
            return RerankPlan(plan, skip=True, limit=0)
        if not cfg.enabled:
            return RerankPlan(plan, skip=False, limit=params.rerank_depth)
        busy_depth = max(cfg.busy_rerank_depth, params.top_k)
        busy = plan.in_flight > cfg.busy_in_flight
        return RerankPlan(plan, skip=False, limit=min(params.rerank_depth, busy_depth) if busy else params.rerank_depth,
                          confidence=(cfg.agree_top, cfg.agree_min) if cfg.confidence else None,
                          busy_depth=busy_depth if busy else None, busy_above=cfg.busy_in_flight,
                          budgeted=self.budget_may_bind(plan))

    def budget_may_bind(self, plan: Plan) -> bool:
        """Whether the request's budget could shrink its rerank. False when, even if the first stage took ten times
        its estimate, twice the asked depth would stay affordable: then rerank_depth's budget step cannot change the
        answer, the decision needs nothing measured after the first stage, and the request may run as one native
        call. Most requests carry a deadline of seconds against a rerank of about a millisecond."""
        if plan.budget_end is None:
            return False
        est = self.estimates()
        first = est["lexical"] + est["dense"] + est["fusion"]
        left_ms = ((plan.budget_end - time.monotonic()) * 1000.0 * _SAFETY - est["contexts"] - est["assemble"]
                   - 10.0 * first)
        return left_ms < 2.0 * plan.params.rerank_depth * est["rerank_per_candidate"]

    def rerank_depth(self, plan: Plan, bm25_ids: np.ndarray, dense_ids: np.ndarray,
                     available: int) -> tuple[int, str, str]:
        """After the first stage: how many candidates to rerank (0: none), the route and the reason."""
        early = self.rerank_plan(plan)
        agree = agreement(bm25_ids, dense_ids, early.confidence[0]) if early.confidence is not None else 0
        depth, route, reason = early.finish(agree, available)
        if not early.budgeted or route == CONFIDENT or plan.budget_end is None:
            return depth, route, reason
        params = plan.params
        asked = min(params.rerank_depth, available)
        # The reranked candidates are the reply's pool: never fewer than top_k of them.
        least = max(self.config.light_min, params.top_k)
        est = self.estimates()
        left_ms = (plan.budget_end - time.monotonic()) * 1000.0 * _SAFETY - est["contexts"] - est["assemble"]
        affordable = int(left_ms / max(est["rerank_per_candidate"], 1e-6))
        if affordable < min(least, asked):
            return 0, FUSED, (f"{max(left_ms, 0.0) / _SAFETY:.1f} ms left: rerank of {least} candidates "
                              f"would need ~{least * est['rerank_per_candidate']:.1f} ms")
        if affordable < depth:
            depth, route = affordable, LIGHT
            reason = f"{left_ms / _SAFETY:.1f} ms left: rerank {depth} of {asked}"
        return depth, route, reason


@dataclass(frozen=True)
class RerankPlan:
    """The rerank decision as far as it is known before the first stage; finish() completes it from the first
    stage's outcome (the confidence rule's agreement and the fused count). A budgeted request (`budgeted`) also
    needs the time the first stage took: AdaptivePolicy.rerank_depth decides it after the first stage."""

    plan: Plan
    skip: bool  # the route reranks nothing (fused, shallow, lexical)
    limit: int  # most candidates to rerank, before the fused count caps it
    confidence: tuple[int, int] | None = None  # (agree_top, agree_min) of the confidence rule; None: not applied
    busy_depth: int | None = None  # the load caps the rerank at this depth
    busy_above: int = 0  # the in-flight count above which the load caps it (for the reason)
    budgeted: bool = False

    def finish(self, agree: int, available: int) -> tuple[int, str, str]:
        """(candidates to rerank, route, reason) given the two retrievers' agreement on their top
        confidence[0] ids and the fused count, for a request that is not budgeted."""
        plan = self.plan
        if self.skip:
            return 0, plan.route, plan.reason
        if self.confidence is not None and agree >= self.confidence[1]:
            return 0, CONFIDENT, f"bm25 and dense agree on {agree} of their top {self.confidence[0]}"
        asked = min(plan.params.rerank_depth, available)
        if self.busy_depth is not None and asked > self.busy_depth:
            return self.busy_depth, LIGHT, (f"{plan.in_flight} searches in flight (busy above {self.busy_above}): "
                                            f"rerank {self.busy_depth} of {asked}")
        return asked, FULL, plan.reason
