"""gRPC server: the Retriever service, health, reflection, admission control and the error-to-status mapping.

CPU work (the pipeline) runs on a thread pool, never on the event loop; the event loop only validates, admits and
replies. The index is loaded and warmed before health reports SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rag_service import native
from rag_service.config import ServerConfig
from rag_service.encode import Encoder
from rag_service.errors import DeadlineExceeded, IndexFormatError, InvalidArgument, Overloaded, RagError, Unavailable
from rag_service.index.load import load_index
from rag_service.metrics import Metrics
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc
from rag_service.pipeline import Pipeline, SearchParams, SearchResult
from rag_service.request import search_params

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retriever"].full_name

# The one mapping from domain errors to status codes.
STATUS_FOR: dict[type[RagError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    IndexFormatError: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(error: RagError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in STATUS_FOR:
            return STATUS_FOR[kind]
    return grpc.StatusCode.INTERNAL


# Warm-up touches every stage (numba compilation, faiss pages, the encoder's first call) before SERVING.
WARMUP_QUERIES = ("what is the effect of", "how does it work", "definition and examples", "error handling",
                  "performance of the method", "history", "configuration options", "results compared")


def load_pipeline(config: ServerConfig, encoder: Encoder | None = None) -> Pipeline:
    # A misconfigured RAG_SERVICE_BACKEND must stop the start, not fail every request later.
    log.info("native backends: %s", native.backend_info())
    index = load_index(config.index, verify_checksums=config.verify_checksums)
    encoder = encoder or Encoder(config.model_path)
    model = index.manifest["model"]
    if encoder.name != model["name"]:
        raise IndexFormatError(f"{index.path}/manifest.json: index was built with model {model['name']!r}, "
                               f"the server encodes queries with {encoder.name!r}")
    pipeline = Pipeline(index, encoder)
    defaults = config.defaults
    for query in WARMUP_QUERIES[: config.warmup_queries]:
        pipeline.search(SearchParams(query=query, top_k=defaults.top_k, depth=defaults.depth, fusion=defaults.fusion,
                                     dense_weight=defaults.dense_weight, rrf_k=defaults.rrf_k))
    return pipeline


def to_context(context, debug: bool) -> pb.Context:
    msg = pb.Context(doc_id=context.doc_id, chunk_id=context.chunk_id, title=context.title, text=context.text,
                     metadata=context.metadata, score=context.score, tokens=context.tokens)
    if debug:
        msg.fused_score = context.score
        if context.bm25_score is not None:
            msg.bm25_score = context.bm25_score
        if context.dense_score is not None:
            msg.dense_score = context.dense_score
        if context.rerank_score is not None:
            msg.rerank_score = context.rerank_score
        if context.features:
            msg.features.update(context.features)
    return msg


class RetrieverServicer(pb_grpc.RetrieverServicer):
    def __init__(self, config: ServerConfig, executor: ThreadPoolExecutor, metrics: Metrics) -> None:
        self.config = config
        self.executor = executor
        self.metrics = metrics
        self.pipeline: Pipeline | None = None
        self.in_flight = 0  # touched only on the event loop thread

    def _pipeline(self) -> Pipeline:
        if self.pipeline is None:
            raise Unavailable("the index is still loading; retry when health reports SERVING")
        return self.pipeline

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
        if isinstance(error, RagError):
            code, message = status_for(error), str(error)
        else:
            log.exception("internal error in %s", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"
        self.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, message)

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        start = time.perf_counter_ns()
        admitted = False
        try:
            pipeline = self._pipeline()
            if self.in_flight >= self.config.max_in_flight:
                self.metrics.shed.inc()
                raise Overloaded(f"{self.in_flight} requests in flight (limit {self.config.max_in_flight}); retry later")
            self.in_flight += 1
            self.metrics.in_flight.inc()
            admitted = True
            params = search_params(request, self.config.defaults, self.config.limits)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            validated = time.perf_counter_ns()
            result = await asyncio.get_running_loop().run_in_executor(self.executor, self._timed_search, pipeline,
                                                                      params, validated, deadline)
        except Exception as error:  # noqa: BLE001 - every failure becomes a status, never a crash
            await self._fail(context, "Search", error)
            raise  # unreachable: abort raises
        finally:
            if admitted:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
        result.stage_us["validate"] = (validated - start) // 1000
        total_us = (time.perf_counter_ns() - start) // 1000
        self.metrics.observe_stages(result.stage_us)
        self.metrics.request_seconds.labels("Search").observe(total_us / 1e6)
        self.metrics.requests.labels("Search", "OK").inc()
        response = pb.SearchResponse(contexts=[to_context(c, request.debug) for c in result.contexts],
                                     index_version=result.index_version, server_time_us=total_us,
                                     context_tokens=result.context_tokens, route=result.route,
                                     route_reason=result.route_reason)
        if request.debug:
            response.stage_time_us.update(result.stage_us)
        return response

    @staticmethod
    def _timed_search(pipeline: Pipeline, params: SearchParams, submitted_ns: int,
                      deadline: float | None) -> SearchResult:
        # Time spent waiting for a worker thread is latency too; report it as its own stage.
        queued_us = (time.perf_counter_ns() - submitted_ns) // 1000
        result = pipeline.search(params, deadline=deadline)
        result.stage_us["queue"] = queued_us
        return result

    async def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.aio.ServicerContext) -> pb.IndexInfo:
        try:
            index = self._pipeline().index
        except Exception as error:  # noqa: BLE001
            await self._fail(context, "GetIndexInfo", error)
            raise
        manifest = index.manifest
        built = Timestamp()
        built.FromJsonString(manifest["created_at"])
        backends = native.backend_info()
        self.metrics.requests.labels("GetIndexInfo", "OK").inc()
        return pb.IndexInfo(
            name=manifest["name"], version=manifest["version"], document_count=index.n_docs,
            chunk_count=index.n_chunks, embedding_model=manifest["model"]["name"],
            embedding_dim=manifest["model"]["dim"],
            build_params={k: str(v) for k, v in manifest["params"].items()}, build_time=built,
            build_seconds=float(manifest.get("build_seconds", 0.0)), format_version=manifest["format_version"],
            metadata_fields=list(index.metadata_fields), native_has_cuda=backends["built_with_cuda"],
            cuda_device_available=backends["cuda_device_available"], fusion_backend=backends["fusion_backend"],
            dense_index_type=index.dense.kind,
        )


class RagServer:
    """A rag-service server: bind, start, load and warm the index, report SERVING; stop drains in-flight work."""

    def __init__(self, config: ServerConfig, *, encoder: Encoder | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rag-pipeline")
        self.servicer = RetrieverServicer(config, self.executor, self.metrics)
        self.health = HealthServicer()
        self._encoder = encoder
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(options=options)
        pb_grpc.add_RetrieverServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{config.host}:{config.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def listen(self) -> None:
        """Starts answering RPCs; health says NOT_SERVING and Search UNAVAILABLE until load() has finished."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d", self.config.host, self.port)

    async def load(self) -> None:
        """Loads and warms the index off the event loop, then reports SERVING."""
        started = time.perf_counter()
        pipeline = await asyncio.get_running_loop().run_in_executor(
            self.executor, load_pipeline, self.config, self._encoder)
        self.servicer.pipeline = pipeline
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving index %s version %s (%d chunks) after %.1f s", pipeline.index.name, pipeline.version,
                 pipeline.index.n_chunks, time.perf_counter() - started)

    async def start(self) -> int:
        await self.listen()
        await self.load()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, refuses new RPCs and lets in-flight ones finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(config: ServerConfig, *, encoder: Encoder | None = None) -> tuple[RagServer, int]:
    """Binds, starts and loads; returns once the index is warm and health says SERVING."""
    server = RagServer(config, encoder=encoder)
    try:
        port = await server.start()
    except BaseException:
        await server.stop(0)
        raise
    return server, port
