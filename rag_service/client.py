"""A small typed client for backend services.

    from rag_service.client import RetrieverClient
    with RetrieverClient("localhost:50051") as client:
        for ctx in client.search("how do I parse JSON?", top_k=5).contexts:
            print(ctx.score, ctx.doc_id, ctx.title)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

FUSION = {None: pb.FUSION_UNSPECIFIED, "rrf": pb.FUSION_RRF, "weighted": pb.FUSION_WEIGHTED}


@dataclass(frozen=True)
class Context:
    doc_id: str
    chunk_id: str
    title: str
    text: str
    metadata: dict[str, str]
    score: float
    # Filled with debug=True only; None when that retriever did not return the chunk.
    bm25_score: float | None = None
    dense_score: float | None = None
    fused_score: float | None = None


@dataclass(frozen=True)
class SearchResult:
    contexts: list[Context]
    index_version: str
    server_time_us: int
    stage_time_us: dict[str, int] = field(default_factory=dict)


class RetrieverError(Exception):
    """A failed call: `code` is the gRPC status code, `details` the server's message (it names the bad field)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def _optional(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _context(msg: pb.Context) -> Context:
    return Context(doc_id=msg.doc_id, chunk_id=msg.chunk_id, title=msg.title, text=msg.text,
                   metadata=dict(msg.metadata), score=msg.score, bm25_score=_optional(msg, "bm25_score"),
                   dense_score=_optional(msg, "dense_score"), fused_score=_optional(msg, "fused_score"))


class RetrieverClient:
    """Blocking client over one channel. `target` is any gRPC target ("host:port", "dns:///name:port")."""

    def __init__(self, target: str, *, timeout: float = 5.0, channel: grpc.Channel | None = None,
                 options: list[tuple[str, object]] | None = None) -> None:
        self._own_channel = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=options or [])
        self.timeout = timeout
        self._stub = pb_grpc.RetrieverStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> RetrieverClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as error:
            raise RetrieverError(error.code(), error.details() or "") from error

    def search(self, query: str, *, top_k: int | None = None, depth: int | None = None,
               fusion: Literal["rrf", "weighted"] | None = None, dense_weight: float | None = None,
               filters: dict[str, str] | None = None, debug: bool = False,
               timeout: float | None = None) -> SearchResult:
        if fusion not in FUSION:
            raise ValueError(f"fusion must be 'rrf', 'weighted' or None, got {fusion!r}")
        request = pb.SearchRequest(query=query, fusion=FUSION[fusion], filters=filters or {}, debug=debug)
        if top_k is not None:
            request.top_k = top_k
        if depth is not None:
            request.depth = depth
        if dense_weight is not None:
            request.dense_weight = dense_weight
        reply = self._call(self._stub.Search, request, timeout)
        return SearchResult(contexts=[_context(c) for c in reply.contexts], index_version=reply.index_version,
                            server_time_us=reply.server_time_us, stage_time_us=dict(reply.stage_time_us))

    def index_info(self, *, timeout: float | None = None) -> pb.IndexInfo:
        return self._call(self._stub.GetIndexInfo, pb.GetIndexInfoRequest(), timeout)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Polls health until SERVING (the server loads and warms its index first)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=1.0) == "SERVING":
                    return
            except RetrieverError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout} s")
            time.sleep(0.1)
