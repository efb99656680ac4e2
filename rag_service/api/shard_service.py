"""The shard side of sharded serving: the internal rag.v1.Shard service, served by `rag-serve` beside Retriever.

A shard server is an ordinary server of a shard index (it answers Retriever too, over its own documents). For the
router it returns first-stage candidates with raw scores and global chunk ids, and, for the candidates that survive
fusion, the reranker's per-candidate features, chunk vectors, token counts and reply fields. Work runs on the
server's pipeline threads, never on the event loop; every handler runs inside the RPC wrapper (api/rpc.py), so a shard
call continues the router's trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from rag_service.api import request as request_mod
from rag_service.api import rpc
from rag_service.core import filter as flt
from rag_service.core import tracing
from rag_service.core.config import Limits
from rag_service.core.errors import IndexFormatError, InvalidArgument, Unavailable
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import shard_pb2 as spb
from rag_service.pb.rag.v1 import shard_pb2_grpc as spb_grpc
from rag_service.search import rerank as rerank_mod
from rag_service.search.pipeline import Pipeline
from rag_service.search.searcher import Searcher

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["Shard"].full_name
MAX_DEPTH = 2000
MAX_FETCH = 4000
# A forwarded filter passed the router's limits; the shard does not apply its own again.
FORWARDED_LIMITS = Limits(max_filter_conditions=1 << 30, max_filter_depth=1 << 30, max_filter_values=1 << 30,
                          max_filter_value_chars=1 << 30)


@dataclass(frozen=True)
class ShardState:
    """What a loaded shard index adds to its pipeline: its place in the set and its chunks' global ids."""

    pipeline: Pipeline
    shard: dict[str, Any]
    global_ids: np.ndarray  # int64, ascending: local chunk i is global chunk global_ids[i]
    global_fields: frozenset[str]
    global_schema: dict[str, str]  # the corpus' metadata types, field -> type (core/filter.py)

    @classmethod
    def of(cls, pipeline: Pipeline) -> ShardState:
        index = pipeline.index
        shard = index.manifest.get("shard")
        if shard is None:
            raise IndexFormatError(f"{index.path} is not a shard (no 'shard' entry in its manifest); build one with "
                                   "rag-index build --shards N")
        ids = np.load(index.path / shard["chunk_ids"], mmap_mode="r")
        if ids.dtype != np.int64 or ids.shape != (index.n_chunks,) or np.any(np.diff(ids) <= 0):
            raise IndexFormatError(f"{index.path / shard['chunk_ids']}: expected {index.n_chunks} ascending int64 "
                                   "chunk ids")
        return cls(pipeline=pipeline, shard=shard, global_ids=np.asarray(ids),
                   global_fields=frozenset(shard.get("metadata_fields", [])),
                   # A shard set split before typed metadata: keyword fields.
                   global_schema=dict(shard.get("metadata_schema") or {
                       name: index.store.metadata_schema.get(name, flt.KEYWORD)
                       for name in shard.get("metadata_fields", [])}))

    def local(self, chunks: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.global_ids, chunks)
        at = np.minimum(at, len(self.global_ids) - 1)
        bad = self.global_ids[at] != chunks
        if np.any(bad):
            raise InvalidArgument("chunks", f"chunk {int(chunks[np.argmax(bad)])} is not held by shard "
                                            f"{self.shard['index']}")
        return at.astype(np.int64)


def query_vector(data: bytes, dim: int) -> np.ndarray:
    if len(data) != 4 * dim:
        raise InvalidArgument("query_vector", f"has {len(data)} bytes; expected {dim} float32 values ({4 * dim} "
                                              "bytes)")
    q = np.frombuffer(data, dtype="<f4")
    if not np.all(np.isfinite(q)):
        raise InvalidArgument("query_vector", "has non-finite values")
    return q


class ShardServicer(spb_grpc.ShardServicer):
    def __init__(self, pipeline: Callable[[], Searcher | None], executor: ThreadPoolExecutor, calls: rpc.Rpc) -> None:
        self._pipeline = pipeline
        self.executor = executor
        self.rpc = calls
        self._state: ShardState | None = None

    def state(self) -> ShardState:
        pipeline = self._pipeline()
        if pipeline is None:
            raise Unavailable("the index is still loading; retry when health reports SERVING")
        if not isinstance(pipeline, Pipeline):
            raise IndexFormatError("this server routes to shards; it holds no shard index to answer for")
        state = self._state
        if state is None or state.pipeline is not pipeline:  # first call, or a reload swapped the index in
            state = self._state = ShardState.of(pipeline)
        return state

    async def _run(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, tracing.carry(work))

    @rpc.unary
    async def GetShardInfo(self, request: spb.GetShardInfoRequest, context: grpc.aio.ServicerContext) -> spb.ShardInfo:
        return await self._run(self._info)

    def _info(self) -> spb.ShardInfo:
        state = self.state()
        index, shard = state.pipeline.index, state.shard
        manifest = index.manifest
        return spb.ShardInfo(
            index=shard["index"], count=shard["count"], set_id=shard["set_id"], stats_sha256=shard["stats_sha256"],
            version=index.version, name=index.name, chunk_count=index.n_chunks, document_count=index.n_docs,
            embedding_model=manifest["model"]["name"], embedding_dim=manifest["model"]["dim"],
            metadata_fields=sorted(state.global_fields),
            metadata_schema=[pb.MetadataField(name=n, type=t) for n, t in sorted(state.global_schema.items())],
            can_rerank=state.pipeline.capabilities.rerank,
            corpus_chunk_count=shard["corpus"]["chunks"], corpus_document_count=shard["corpus"]["documents"],
            build_params={k: str(v) for k, v in manifest["params"].items()})

    def _check_set(self, state: ShardState, set_id: str) -> None:
        if set_id != state.shard["set_id"]:
            raise IndexFormatError(f"shard {state.shard['index']} belongs to shard set {state.shard['set_id']}, the "
                                   f"router to {set_id!r}: restart the router with this set's router directory")

    @rpc.unary
    async def Candidates(self, request: spb.CandidatesRequest,
                         context: grpc.aio.ServicerContext) -> spb.CandidatesResponse:
        return await self._run(lambda: self._candidates(request))

    def _candidates(self, request: spb.CandidatesRequest) -> spb.CandidatesResponse:
        state = self.state()
        self._check_set(state, request.set_id)
        index = state.pipeline.index
        if not 1 <= request.depth <= MAX_DEPTH:
            raise InvalidArgument("depth", f"must be between 1 and {MAX_DEPTH}, got {request.depth}")
        q = query_vector(request.query_vector, index.dense.dim)
        filters = dict(request.filters)
        for name in filters:
            if name not in state.global_fields:
                known = ", ".join(sorted(state.global_fields)) or "(none)"
                raise InvalidArgument(f"filters[{name}]", f"unknown metadata field; known: {known}")
        # The router checked the filter against the same limits; its tree is parsed back as it was sent.
        tree = request_mod.parse_filter(request.filter, FORWARDED_LIMITS) if request.HasField("filter") else None
        if any(name not in index.metadata_fields for name in filters):
            # A field of the corpus that none of this shard's documents has: nothing here matches.
            mask: np.ndarray | None = np.zeros(index.n_chunks, dtype=np.bool_)
        else:
            mask = index.store.filter_mask(filters, tree, schema=state.global_schema)
        b_ids, b_scores = index.bm25.search(request.query, request.depth, mask)
        d_ids, d_scores = index.dense.search(q, request.depth, mask)
        g = state.global_ids
        return spb.CandidatesResponse(bm25_ids=g[b_ids].tolist(), bm25_scores=b_scores.tolist(),
                                      dense_ids=g[d_ids].tolist(), dense_scores=d_scores.tolist(),
                                      version=index.version)

    @rpc.unary
    async def Fetch(self, request: spb.FetchRequest, context: grpc.aio.ServicerContext) -> spb.FetchResponse:
        return await self._run(lambda: self._fetch(request))

    def _fetch(self, request: spb.FetchRequest) -> spb.FetchResponse:
        state = self.state()
        self._check_set(state, request.set_id)
        pipeline = state.pipeline
        index = pipeline.index
        if request.version != index.version:
            raise IndexFormatError(f"shard {state.shard['index']} serves version {index.version} now, the candidates "
                                   f"came from {request.version!r}")
        if len(request.chunks) > MAX_FETCH:
            raise InvalidArgument("chunks", f"has {len(request.chunks)} entries; the limit is {MAX_FETCH}")
        if request.features > len(request.chunks):
            raise InvalidArgument("features", f"is {request.features}, more than the {len(request.chunks)} chunks")
        local = state.local(np.asarray(request.chunks, dtype=np.int64))
        response = spb.FetchResponse(version=index.version)
        if request.with_vectors:
            response.vectors = np.ascontiguousarray(index.dense.vectors[local], dtype="<f4").tobytes()
        if request.features:
            if pipeline.rerank_store is None:
                raise IndexFormatError(f"shard {state.shard['index']} has no sentence windows: it cannot rerank")
            q = query_vector(request.query_vector, index.dense.dim)
            local_rows = rerank_mod.local_features(pipeline.rerank_store, request.query, q,
                                                   local[:request.features])
            response.features = np.ascontiguousarray(local_rows, dtype="<f4").tobytes()
            response.feature_names.extend(rerank_mod.LOCAL_FEATURES)
        if not request.with_details:
            return response
        store = index.store
        response.tokens.extend(pipeline.chunk_tokens(int(c)) for c in local.tolist())
        for c in local.tolist():
            doc = store.chunk_doc(c)
            response.chunks.add(doc_id=store.doc_id(doc), chunk_id=store.chunk_id(c), title=store.doc_title(doc),
                                text=store.chunk_text(c), metadata=store.doc_metadata(doc))
        return response
