"""The router role (`rag-serve --shards ADDR,...`): the Retriever API over a shard set, answering as one index would.

Per request: encode the query once; ask every shard for its BM25 and dense top-depth (raw scores, global chunk ids)
concurrently, within the caller's remaining deadline; merge each retriever's lists (score desc, then global id asc,
the order one index returns) and fuse them with the same fusion code; ask the shards holding the fused pool for the
reranker's per-candidate features, vectors, token counts and texts; then rerank, filter and pack exactly as
Pipeline._rank does. Shards compute the per-candidate features with the corpus' statistics
(rag_service.search.rerank.local_features); the router adds what needs the whole candidate list (ranks, scale by the
best, PRF), from the same code, so with exact (flat) dense search the reply equals the single index's.

A shard that fails or misses the deadline leaves the reply partial (SearchResult.partial, shards_missing) unless the
request sets require_complete, which turns it into UNAVAILABLE (or DEADLINE_EXCEEDED) naming the shard.

ShardedPipeline is a Searcher (search/searcher.py) like Pipeline: the same front (plan, encode, cache stage) and the
same reply assembly, so the server's cache, admission control, deadlines, adaptive routes, metrics and validation run
unchanged in front of it. It never takes the lexical route: a shard answers BM25 and dense together, for a query
vector the router sends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from rag_service.core import filter as flt
from rag_service.core import tracing
from rag_service.core.errors import DeadlineExceeded, IndexFormatError, InvalidArgument, Unavailable
from rag_service.core.params import Capabilities, ContextResult, IndexSummary, SearchResult, check_deadline
from rag_service.core.timing import StageTimer
from rag_service.encoder.encode import SearchEncoder
from rag_service.index.dates import parse_dates
from rag_service.index.windows import DEFAULT_WINDOW_SENTENCES, sentence_windows, split_sentences
from rag_service.kernels.native import FusionResult
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import shard_pb2 as spb
from rag_service.pb.rag.v1 import shard_pb2_grpc as spb_grpc
from rag_service.retrievers.analysis import Analyzer
from rag_service.search import adaptive, context_filter, fusion, shape
from rag_service.search import rerank as rerank_mod
from rag_service.search.searcher import Ahead, ChunkFields, SearcherBase, assemble_contexts, quality_signals
from rag_service.shard.split import read_router

log = logging.getLogger(__name__)

# Channel options: the fused pool's texts and vectors (100 x (1.5 kB + text)) exceed gRPC's 4 MB default only for
# very deep requests, but a deep one must not fail on size.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# Share of the caller's remaining time one fan-out may wait for a shard (the rest finishes the reply).
SHARD_SHARE = 0.5


@dataclass
class ShardClient:
    address: str
    channel: grpc.Channel
    stub: spb_grpc.ShardStub
    info: spb.ShardInfo
    version: str

    @property
    def label(self) -> str:
        return f"{self.info.index}@{self.address}"


@dataclass
class _Rows:
    """Per fused-pool position: chunk vector and (first `depth` positions) the reranker's local features."""

    vectors: np.ndarray
    features: np.ndarray
    missing: set[int] = field(default_factory=set)  # shard positions that did not answer


def filter_message(node: flt.Tree | None) -> pb.Filter | None:
    """The wire form of a parsed filter, for the shards (which parse it back to the same tree)."""
    if node is None:
        return None
    out = pb.Filter()
    for name in ("must", "should", "must_not"):
        target = getattr(out, name)
        for child in getattr(node, name):
            target.append(_condition_message(child))
    if node.min_should != 1:
        out.min_should = node.min_should
    return out


def _condition_message(node: flt.Node) -> pb.Condition:
    if isinstance(node, flt.Tree):
        return pb.Condition(filter=filter_message(node))
    c = pb.Condition(key=node.key)
    if node.kind == flt.EMPTY:
        if node.negate:
            c.exists = True
        else:
            c.is_empty = True
    elif node.kind == flt.MATCH:
        which, value = node.values[0]
        setattr(c.match, which, value)
    elif node.kind == flt.ANY:
        c.any.SetInParent()
        for which, value in node.values:
            getattr(c.any, f"{which}s").append(value)
    else:
        bounds = c.range if node.kind == flt.RANGE else c.date_range
        bounds.SetInParent()
        for name, bound in zip(("gt", "gte", "lt", "lte"), node.bounds):
            if bound is not None:
                setattr(bounds, name, bound)
    return c


class _ShardLost(Exception):
    def __init__(self, shard: int) -> None:
        super().__init__(shard)
        self.shard = shard


class _Details:
    """Reply fields and token counts of pool positions, fetched from their shards when first needed: counting a
    chunk's tokens costs up to a millisecond the first time, so only candidates that may enter the reply are asked
    for (as Pipeline counts only those)."""

    def __init__(self, pipeline: ShardedPipeline, query: str, ids: np.ndarray, where: np.ndarray,
                 versions: dict[int, str], deadline: float | None, complete: bool, block: int) -> None:
        self.pipeline, self.query, self.ids, self.where = pipeline, query, ids, where
        self.versions, self.deadline, self.complete, self.block = versions, deadline, complete, block
        self.chunks: dict[int, spb.ChunkData] = {}
        self.tokens: dict[int, int] = {}
        self.lost: set[int] = set()

    def ensure(self, positions: list[int]) -> None:
        wanted = [p for p in positions if p not in self.chunks]
        if not wanted:
            return
        by_shard: dict[int, list[int]] = {}
        for pos in wanted:
            by_shard.setdefault(int(self.where[pos]), []).append(pos)
        set_id = self.pipeline.router["set_id"]
        requests = {i: spb.FetchRequest(query=self.query, chunks=self.ids[at].tolist(), set_id=set_id,
                                        version=self.versions[i], with_details=True)
                    for i, at in by_shard.items()}
        replies, failures = self.pipeline._call("Fetch", requests, self.deadline, self.complete)
        for i, reply in replies.items():
            for k, pos in enumerate(by_shard[i]):
                self.chunks[pos] = reply.chunks[k]
                self.tokens[pos] = int(reply.tokens[k])
        if failures:
            self.lost |= set(failures)
            raise _ShardLost(min(failures))

    def fields(self, pos: int) -> ChunkFields:
        data = self.chunks[pos]
        return ChunkFields(doc_id=data.doc_id, chunk_id=data.chunk_id, title=data.title, text=data.text,
                           metadata=dict(data.metadata))

    def tokens_at(self, pos: int, upcoming: np.ndarray) -> int:
        """Tokens of position `pos`; a miss also fetches the next `block` unfetched positions of `upcoming` (the
        likely next picks), so a filter walking the ranking costs one round trip per block, not per candidate."""
        if pos not in self.tokens:
            batch = [pos] + [int(p) for p in upcoming if int(p) not in self.chunks and int(p) != pos][:self.block - 1]
            self.ensure(batch)
        return self.tokens[pos]


def _tokens_at(details: _Details, order: np.ndarray, i: int) -> int:
    """Tokens of ranking position i; a miss fetches the positions after it too (the likely next picks)."""
    return details.tokens_at(int(order[i]), order[i + 1:])


def _merge(ids: list[np.ndarray], scores: list[np.ndarray], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard top lists -> the global top `depth`, ordered as one index orders them (score desc, id asc)."""
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    all_ids = np.concatenate(ids).astype(np.int64, copy=False)
    all_scores = np.concatenate(scores).astype(np.float32, copy=False)
    order = np.lexsort((all_ids, -all_scores))[:depth]
    return all_ids[order], all_scores[order]


class ShardedPipeline(SearcherBase):
    """A shard set as a Searcher. Thread-safe: per-request state only, channels are shared."""

    def __init__(self, router_dir: Path | str, addresses: list[str], encoder: SearchEncoder, *,
                 rerank_model: rerank_mod.RerankModel | None = None, policy: adaptive.AdaptivePolicy | None = None,
                 timeout_s: float = 5.0, connect_timeout_s: float = 30.0, token: str | None = None) -> None:
        self.router_dir = Path(router_dir)
        self.router = read_router(self.router_dir)
        self.encoder = encoder
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        model = self.router["model"]
        if encoder.name != model["name"] or encoder.dim != model["dim"]:
            raise IndexFormatError(f"{self.router_dir}: the shard set was built with model {model['name']!r} (dim "
                                   f"{model['dim']}), the router encodes with {encoder.name!r} (dim {encoder.dim})")
        if not addresses:
            raise InvalidArgument("shards", "no shard addresses given")
        self.shards = [self._connect(a, connect_timeout_s) for a in addresses]
        self._check_set()
        self.shards.sort(key=lambda s: s.info.index)
        self.can_rerank = all(s.info.can_rerank for s in self.shards)
        self.rerank_model = rerank_model or (rerank_mod.RerankModel.load() if self.can_rerank else None)
        self._capabilities = Capabilities(rerank=self.can_rerank, lexical_route=False, semantic_guard=False)
        self.policy = policy or adaptive.AdaptivePolicy()
        self.metadata_fields = frozenset(self.router.get("metadata_fields", []))
        self.analyzer = Analyzer()  # highlights only; BM25 runs on the shards
        # A router directory written before typed metadata: keyword fields.
        self.metadata_schema: dict[str, str] = dict(self.router.get("metadata_schema")
                                                    or dict.fromkeys(self.metadata_fields, flt.KEYWORD))
        self._distinct: dict[str, int] = dict(self.router.get("metadata_distinct", {}))
        # The server ANDs each request's tenant into its filter (api/tenancy.py), which goes to the shards as is.
        self.tenant_key = self.router.get("tenant_key") or None
        if self.tenant_key is not None and self.metadata_schema.get(self.tenant_key) != flt.KEYWORD:
            raise IndexFormatError(f"{self.router_dir}: tenant key {self.tenant_key!r} is not a keyword field of "
                                   "the shard set")
        self._lock = threading.Lock()
        self.dim = int(model["dim"])
        first = self.shards[0].info
        self._manifest = {"name": self.router.get("name", "shards"), "version": "", "format_version": 1,
                          "created_at": self.router.get("created_at", "1970-01-01T00:00:00Z"), "model": model,
                          "params": {**dict(first.build_params), "shards": str(len(self.shards)),
                                     "shard_set": self.router["set_id"]},
                          "build_seconds": 0.0}
        self._corpus = (int(first.corpus_document_count), int(first.corpus_chunk_count))
        self._dense_kind = first.build_params.get("dense_index", "")
        self._version = ""
        self._refresh_version()

    # -- set up ----------------------------------------------------------------------------------------------------
    def _connect(self, address: str, timeout_s: float) -> ShardClient:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = spb_grpc.ShardStub(channel)
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                # wait_for_ready: a shard started with the router may not listen yet; UNAVAILABLE from a listening
                # one: its index is still loading. Both are waited out until the connect timeout.
                info = stub.GetShardInfo(spb.GetShardInfoRequest(), timeout=max(give_up - time.monotonic(), 0.01),
                                         wait_for_ready=True, metadata=self.metadata)
                return ShardClient(address=address, channel=channel, stub=stub, info=info, version=info.version)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() + 0.2 < give_up:
                    time.sleep(0.2)
                    continue
                channel.close()
                raise Unavailable(f"shard {address}: {error.code().name}: {error.details()}") from None

    def _check_set(self) -> None:
        router = self.router
        count = int(router["count"])
        problems = []
        for s in self.shards:
            if s.info.set_id != router["set_id"] or s.info.stats_sha256 != router["stats_sha256"]:
                problems.append(f"{s.address} holds shard {s.info.index} of set {s.info.set_id} (statistics "
                                f"{s.info.stats_sha256[:12]}), the router's set is {router['set_id']} (statistics "
                                f"{router['stats_sha256'][:12]})")
            elif s.info.count != count:
                problems.append(f"{s.address}: shard of a {s.info.count}-shard set, the router's has {count}")
        held = sorted(s.info.index for s in self.shards)
        if not problems and held != list(range(count)):
            problems.append(f"the addresses hold shards {held}; the set needs each of 0..{count - 1} exactly once")
        if problems:
            for s in self.shards:
                s.channel.close()
            raise IndexFormatError("shards do not form the router's shard set: " + "; ".join(problems))

    def close(self) -> None:
        for s in self.shards:
            s.channel.close()

    # -- the Searcher's facts ----------------------------------------------------------------------------------------
    def _refresh_version(self) -> None:
        self._version = f"{self.router['set_id']}:" + ",".join(s.version for s in self.shards)

    @property
    def version(self) -> str:
        """The shard set and each shard's serving version: a shard's reload changes it (and so the cache key)."""
        return self._version

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def summary(self) -> IndexSummary:
        return IndexSummary(name=str(self._manifest["name"]), version=self.version, path=str(self.router_dir.resolve()),
                            manifest={**self._manifest, "version": self.version}, n_docs=self._corpus[0],
                            n_chunks=self._corpus[1], metadata_fields=sorted(self.metadata_fields),
                            dense_kind=self._dense_kind,
                            metadata_schema={name: (kind, int(self._distinct.get(name, 0)))
                                             for name, kind in sorted(self.metadata_schema.items())},
                            tenant_key=self.tenant_key)

    # -- fan-out ---------------------------------------------------------------------------------------------------
    def _call(self, method: str, requests: dict[int, Any], deadline: float | None,
              require_complete: bool) -> tuple[dict[int, Any], dict[int, str]]:
        """Sends requests[i] to shard i concurrently; returns (answers, failures) by shard position.

        A shard gets at most SHARD_SHARE of the caller's remaining time: a hung shard then costs part of the budget,
        and the rest still finishes the partial reply before the caller gives up."""
        timeout = self.timeout_s if deadline is None else \
            min(self.timeout_s, max((deadline - time.monotonic()) * SHARD_SHARE, 1e-3))

        def ended(span: Any, call: Any) -> None:  # on gRPC's thread, as the call completes (a grpc.Call and Future)
            code = call.code()
            error = None if code == grpc.StatusCode.OK else f"{code.name}: {call.details()}"
            tracing.finish(span, code.value[0], error)

        traced = tracing.request_tracer() is not None
        futures = {}
        for i, req in requests.items():
            # A span per shard call when the request is traced; the call carries the trace context (an unsampled
            # caller's too, so the shards do not sample what the caller left out).
            span = tracing.client_span(spb.DESCRIPTOR.services_by_name["Shard"].full_name, method,
                                       {"rag.shard": self.shards[i].label}) if traced else None
            futures[i] = getattr(self.shards[i].stub, method).future(
                req, timeout=timeout, metadata=tracing.outgoing(self.metadata, span))
            if span is not None:
                futures[i].add_done_callback(functools.partial(ended, span))
        answers: dict[int, Any] = {}
        failures: dict[int, str] = {}
        for i, future in futures.items():
            try:
                answers[i] = future.result()
            except grpc.RpcError as error:
                failures[i] = f"{error.code().name}: {error.details()}"
                if require_complete:
                    for other in futures.values():
                        other.cancel()
                    label = self.shards[i].label
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None \
                            and time.monotonic() >= deadline:
                        raise DeadlineExceeded(f"shard {label} did not answer {method} before the deadline") \
                            from None
                    raise Unavailable(f"shard {label} failed ({method}): {failures[i]}; the request asked for "
                                      "require_complete") from None
        for i, why in failures.items():
            log.warning("shard %s failed %s: %s", self.shards[i].label, method, why)
        return answers, failures

    # -- the request path ------------------------------------------------------------------------------------------
    def _rank(self, plan: adaptive.Plan, query_vector: np.ndarray | None, deadline: float | None,
              timer: StageTimer, ahead: Ahead | None = None, alone: bool = False) -> SearchResult:
        # `alone` is not read: the shards, each a server of its own, decide their own use of idle cores.
        shaper = shape.Shaper(plan.params) if plan.params.shaped else None
        params = plan.params if shaper is None else shaper.ranking
        filter_params = context_filter.FilterParams.of(params)
        reranking = params.rerank and self.can_rerank
        pool = max(params.top_k, params.rerank_depth) if reranking or not filter_params.is_identity else params.top_k
        with timer.stage("filter"):
            for name in params.filters:
                if name not in self.metadata_fields:
                    known = ", ".join(sorted(self.metadata_fields)) or "(none)"
                    raise InvalidArgument(f"filters[{name}]", f"unknown metadata field; known: {known}")
            if params.decay is not None and params.decay.field not in self.metadata_fields:
                known = ", ".join(sorted(self.metadata_fields)) or "(none)"
                raise InvalidArgument("decay.field", f"unknown metadata field {params.decay.field!r}; known: {known}")
            flt.check(params.filter, self.metadata_schema)
        if query_vector is None:  # never planned: capabilities.lexical_route is False
            raise ValueError("the shard router needs the query vector")
        q = np.ascontiguousarray(query_vector, dtype=np.float32)
        q_bytes = q.astype("<f4", copy=False).tobytes()
        set_id = self.router["set_id"]
        complete = params.require_complete

        check_deadline(deadline, "shards")
        with timer.stage("shards"):
            request = spb.CandidatesRequest(query=params.query, query_vector=q_bytes, depth=params.depth,
                                            filters=params.filters, set_id=set_id,
                                            filter=filter_message(params.filter))
            answers, failures = self._call("Candidates", dict.fromkeys(range(len(self.shards)), request), deadline,
                                           complete)
            if not answers:
                self._no_shard(failures, deadline)
            changed = False
            for i, answer in answers.items():
                if answer.version != self.shards[i].version:
                    with self._lock:
                        self.shards[i].version = answer.version
                    changed = True
            if changed:
                self._refresh_version()
            order = sorted(answers)
            bm25 = _merge([np.asarray(answers[i].bm25_ids, np.int64) for i in order],
                          [np.asarray(answers[i].bm25_scores, np.float32) for i in order], params.depth)
            dense = _merge([np.asarray(answers[i].dense_ids, np.int64) for i in order],
                           [np.asarray(answers[i].dense_scores, np.float32) for i in order], params.depth)
            owner = {int(c): i for i in order for c in (*answers[i].bm25_ids, *answers[i].dense_ids)}
        check_deadline(deadline, "fusion")
        with timer.stage("fusion"):
            fused = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight, top_k=pool,
                                rrf_k=params.rrf_k)
        depth, route, reason = (self.policy.rerank_depth(plan, bm25[0], dense[0], len(fused.ids))
                                if reranking else (0, plan.route, plan.reason))

        check_deadline(deadline, "fetch")
        with timer.stage("fetch"):
            where = np.asarray([owner[int(c)] for c in fused.ids.tolist()], dtype=np.int64)
            versions = {i: answers[i].version for i in answers}
            need_vectors = depth > 0 or not filter_params.is_identity
            rows = self._fetch_rows(params.query, q_bytes, fused.ids, where, depth, versions, deadline, complete,
                                    need_vectors)
        missing = set(failures) | rows.missing
        if rows.missing:
            # Survivors on a shard that failed now cannot be finished: they leave the reply (which is partial).
            keep = ~np.isin(where, list(rows.missing))
            fused = FusionResult(fused.ids[keep], fused.scores[keep], fused.bm25[keep], fused.dense[keep])
            kept_features = keep[:len(rows.features)]
            rows = _Rows(vectors=rows.vectors[keep], features=rows.features[kept_features], missing=rows.missing)
            where = where[keep]
            depth = min(depth, len(rows.features))

        reranked = None
        if depth > 0 and self.rerank_model is not None:
            check_deadline(deadline, "rerank")
            with timer.stage("rerank"):
                cands = fused.ids[:depth]
                features = rerank_mod.finish_features(rows.features[:depth], rows.vectors[:depth], q, cands,
                                                      fused.scores[:depth], bm25[0], dense[0])
                reranked = rerank_mod.rank(self.rerank_model, cands, features)
        check_deadline(deadline, "contexts")
        with timer.stage("contexts"):
            ranked, relevance = rerank_mod.final_order(fused.scores, reranked)
            details = _Details(self, params.query, fused.ids, where, versions, deadline, complete,
                               block=max(params.top_k, 1))
            rerank_rows = np.arange(len(ranked))
            if shaper is not None:
                ranked, relevance, rerank_rows = self._arrange(shaper, details, fused, reranked, ranked, relevance)
            while True:
                # `alive`: ranking positions whose shard still answers; a shard lost while fetching details takes
                # its candidates out and the filter runs again on the rest.
                alive = np.flatnonzero(~np.isin(where[ranked], list(details.lost)))
                order_ = ranked[alive]
                vectors = (rows.vectors[order_] if not filter_params.is_identity
                           else np.zeros((len(order_), 0), np.float32))
                try:
                    if filter_params.is_identity:
                        details.ensure(order_[:params.top_k].tolist())
                    selection = context_filter.select(
                        relevance[alive], vectors, functools.partial(self._text, details, order_),
                        self.encoder.count_tokens, filter_params,
                        count_at=functools.partial(_tokens_at, details, order_))
                    if shaper is not None:
                        selection = shaper.page(selection, alive)
                    details.ensure([int(order_[i]) for i in selection.positions])
                    break
                except _ShardLost:
                    continue
        missing |= details.lost
        check_deadline(deadline, "assemble")
        with timer.stage("assemble"):
            contexts = assemble_contexts(fused, order_, selection, reranked, details.fields,
                                         ranks=rerank_rows[alive])
        # The adaptive cost model knows Pipeline's stages: the fan-out stands for lexical + dense, and the fetch of
        # features is part of what a rerank costs here.
        us = timer.us
        self.policy.observe({**us, "lexical": us.get("shards", 0), "dense": 0,
                             "rerank": us.get("rerank", 0) + us.get("fetch", 0)}, depth)
        labels = [s.label for s in self.shards]
        result = SearchResult(contexts=contexts, index_version=self.version, stage_us=timer.us,
                              context_tokens=selection.total_tokens, route=route, route_reason=reason,
                              partial=bool(missing), shards_answered=[labels[i] for i in range(len(labels))
                                                                      if i not in missing],
                              shards_missing=[labels[i] for i in sorted(missing)],
                              legs=("bm25", "dense", "rerank") if reranked is not None else ("bm25", "dense"),
                              signals=quality_signals(fused, bm25[0], dense[0]))
        if shaper is not None:
            with timer.stage("shape"):
                query = shaper.params.query
                highlight = (lambda c: self._highlight(query, c)) if shaper.params.highlight else None
                shaper.apply(result, [int(order_[p]) for p in selection.positions], fused=fused, bm25=bm25,
                             dense=dense, model=self.rerank_model, highlight=highlight)
        return result

    def _arrange(self, shaper: shape.Shaper, details: _Details, fused: FusionResult,
                 reranked: rerank_mod.Reranked | None, ranked: np.ndarray,
                 relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decay and groups over the fused pool: the documents and dates of its candidates come from their shards
        (one fetch of the whole pool, paid only by requests that group or decay)."""
        params = shaper.params
        docs = dates = None
        if params.group_size or params.decay is not None:
            # A shard lost here takes its candidates out below (details.lost): the reply is partial.
            with contextlib.suppress(_ShardLost):
                details.ensure(ranked.tolist())
        chunks = details.chunks
        if params.group_size:
            def docs(at: np.ndarray) -> np.ndarray:
                names = [chunks[p].doc_id if p in chunks else f"\0{p}" for p in at.tolist()]
                _, keys = np.unique(np.asarray(names, dtype=object), return_inverse=True)
                return keys
        if params.decay is not None:
            name = params.decay.field

            def dates(at: np.ndarray) -> np.ndarray:
                return parse_dates([chunks[p].metadata.get(name, "") if p in chunks else "" for p in at.tolist()])
        return shaper.arrange(fused, reranked, ranked, relevance, docs, dates)

    def _highlight(self, query: str, c: ContextResult):
        """Matched query terms (the shards' default analyzer); the best window by matched terms, since the window
        vectors stay on the shards."""
        spans = shape.term_spans(self.analyzer, query, c.text)
        sentences = split_sentences(c.text)
        runs = [(sentences[a][0], sentences[b - 1][1]) for a, b in sentence_windows(len(sentences),
                                                                                   DEFAULT_WINDOW_SENTENCES)]
        return spans, shape.best_window_by_terms(spans, runs)

    @staticmethod
    def _text(details: _Details, order_: np.ndarray, i: int) -> str:
        details.ensure([int(order_[i])])
        return details.chunks[int(order_[i])].text

    def _no_shard(self, failures: dict[int, str], deadline: float | None) -> None:
        detail = "; ".join(f"{self.shards[i].label}: {why}" for i, why in sorted(failures.items()))
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"no shard answered before the deadline ({detail})")
        raise Unavailable(f"no shard answered: {detail}")

    def _fetch_rows(self, query: str, q_bytes: bytes, ids: np.ndarray, where: np.ndarray, depth: int,
                    versions: dict[int, str], deadline: float | None, complete: bool, with_vectors: bool) -> _Rows:
        """Vectors of every pooled candidate and local features of the first `depth`, from the shards that hold
        them, concurrently; rows in pool order."""
        m = len(ids)
        vectors = np.zeros((m, self.dim if with_vectors else 0), np.float32)
        features = np.zeros((min(depth, m), len(rerank_mod.LOCAL_FEATURES)), np.float32)
        if not with_vectors and depth == 0:
            return _Rows(vectors=vectors, features=features)
        requests: dict[int, spb.FetchRequest] = {}
        positions: dict[int, np.ndarray] = {}
        for i in sorted(set(where.tolist())):
            at = np.flatnonzero(where == i)
            positions[i] = at
            requests[i] = spb.FetchRequest(query=query, query_vector=q_bytes, chunks=ids[at].tolist(),
                                           features=int(np.count_nonzero(at < depth)),
                                           set_id=self.router["set_id"], version=versions[i],
                                           with_vectors=with_vectors)
        replies, failures = self._call("Fetch", requests, deadline, complete)
        if not replies and m:
            self._no_shard(failures, deadline)
        for i, reply in replies.items():
            at = positions[i]
            if with_vectors:
                vectors[at] = np.frombuffer(reply.vectors, dtype="<f4").reshape(len(at), self.dim)
            n = int(np.count_nonzero(at < depth))
            if n:
                features[at[:n]] = np.frombuffer(reply.features, dtype="<f4").reshape(n, -1)
        return _Rows(vectors=vectors, features=features, missing=set(failures))
