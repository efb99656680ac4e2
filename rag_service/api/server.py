"""gRPC server: the Retriever service, health and reflection.

CPU work (the pipeline) runs on a thread pool, never on the event loop; the event loop only validates, admits
(api/admission.py) and replies. Every handler runs inside the one RPC wrapper (api/rpc.py: status mapping, counters,
the RPC's span). Requests name a collection (or an alias of one; the registry is api/collections.py); each
collection is loaded and warmed before its health service (named after it) reports SERVING, and the server's overall
health reports SERVING once every collection has finished loading. A SearchResponse goes out as wire bytes joined from
what the index prepared at load (api/reply.py), not as a message built per reply; SearchBatch (api/batch.py)
answers with those same replies, one per request, inside its own wire bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from rag_service.api import auth, logs, pages, reply, rpc, tenancy, wire
from rag_service.api.admission import Admission
from rag_service.api.batch import BatchSearch
from rag_service.api.collections import SERVING, Collections, Loaders, ReloadResult, collection_specs
from rag_service.api.heap import Heap
from rag_service.api.loader import EncoderPool, load_searcher
from rag_service.api.placement import PipelineExecutor, Placement
from rag_service.api.request import PlainParams, search_params
from rag_service.api.shard_service import SERVICE_NAME as SHARD_SERVICE
from rag_service.api.shard_service import ShardServicer
from rag_service.core import tracing
from rag_service.core.config import SearchDefaults, ServerConfig
from rag_service.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import SearchEncoder
from rag_service.index.publish import CURRENT
from rag_service.index.reply_bytes import ContextBytes
from rag_service.kernels import native
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc
from rag_service.pb.rag.v1 import shard_pb2
from rag_service.search.cache import EXACT, MISS, PREFETCHED, SEMANTIC, CachedSearch, Served
from rag_service.search.pipeline import Pipeline
from rag_service.search.prefetch import Prefetcher
from rag_service.search.searcher import Searcher
from rag_service.search.speculate import DraftSession

log = logging.getLogger(__name__)

# How long after a search last had company a lone one still runs spread (placement.py): at two closed-loop clients
# the searches overlap most of the time, and one started in a gap beside the event loop was in the way of the next.
COMPANY_NS = 50_000_000
# How long after a refusal for load searches with company still run on any CPU (placement.py): the event loop needs
# a CPU free for refusals while the excess lasts; 0.1 s is tens of searches' worth.
SETTLED_SECONDS = 0.1

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retriever"].full_name

# A drain waits for this long without new Search calls (bounded by the grace period) before the server stops.
DRAIN_QUIET_SECONDS = 0.2


def index_root_of(config: ServerConfig) -> Path:
    """The directory ReloadIndex paths must stay inside, and the one aliases persist in: configured, else the
    collections root, else the root `index` belongs to."""
    if config.index_root is not None:
        return Path(config.index_root).resolve()
    if config.collections_root is not None:
        return Path(config.collections_root).resolve()
    index = Path(config.index)
    return (index if (index / CURRENT).is_symlink() or (index / CURRENT).exists() else index.parent).resolve()


def confine(path: str, root: Path) -> Path:
    """`path` (relative to `root`, or absolute) resolved with every symlink followed; it must stay inside `root`."""
    if "\0" in path:
        raise InvalidArgument("path", "contains a NUL character")
    given = Path(path)
    if ".." in given.parts:
        raise InvalidArgument("path", f"{path[:200]!r} contains '..'; give a path inside the index root")
    try:
        resolved = (given if given.is_absolute() else root / given).resolve()
    except OSError as error:  # a name too long for the file system, a symlink loop, ...
        raise InvalidArgument("path", f"cannot be resolved: {error.strerror or error}") from None
    if not resolved.is_relative_to(root):
        raise InvalidArgument("path", f"{path[:200]!r} resolves outside the index root {root}")
    return resolved


SERVED_FROM = {MISS: pb.SERVED_FROM_MISS, EXACT: pb.SERVED_FROM_EXACT, SEMANTIC: pb.SERVED_FROM_SEMANTIC,
               PREFETCHED: pb.SERVED_FROM_PREFETCHED}


def searcher_defaults(searcher: Searcher | None, config: ServerConfig) -> SearchDefaults:
    """The defaults requests take on `searcher`: its index's (a tuned index carries fitted ones), else the server's."""
    own = searcher.search_defaults if searcher is not None else None
    return own if own is not None else config.defaults


def request_params(request: pb.SearchRequest, searcher: Searcher, config: ServerConfig,
                   scope: auth.Scope, validate: Callable[..., SearchParams] = search_params) -> SearchParams:
    """A search request as the caller's token `scope` may run it on `searcher` (whose collection the scope has
    allowed): validated with the searcher's defaults (by `validate`: search_params, or a server's PlainParams), then
    on a tenant-keyed collection restricted to the caller's tenant (api/tenancy.py)."""
    params = validate(request, searcher_defaults(searcher, config), config.limits)
    return tenancy.apply(params, request.tenant, scope, searcher.tenant_key, config.limits)


def prefetch_target(i: int, request: pb.SearchRequest,
                    target: Callable[[pb.SearchRequest], tuple[Searcher, SearchParams]]) -> tuple[str, SearchParams]:
    """Resolves and validates the i-th request of a Prefetch; errors name it (requests[2].top_k). Returns the
    collection (an alias resolved now) and the parameters."""
    try:
        searcher, params = target(request)
    except InvalidArgument as error:
        raise InvalidArgument(f"requests[{i}].{error.field}", str(error).split(": ", 1)[-1]) from error
    except NotFound as error:
        raise NotFound(f"requests[{i}].{error.field}", str(error).split(": ", 1)[-1]) from error
    if params.cache == "bypass":
        raise InvalidArgument(f"requests[{i}].cache", "CACHE_BYPASS cannot be prefetched: it never fills the cache")
    return searcher.collection, params


def prepared_bytes(searcher: Searcher | None) -> ContextBytes | None:
    """The static reply bytes of the searcher's index; None for a searcher without a local index (the shard router,
    whose contexts come from its shards)."""
    return searcher.index.context_bytes() if isinstance(searcher, Pipeline) else None


Guard = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


def add_service(server: grpc.aio.Server, service, module, servicer: object, guards: Sequence[Guard] = ()) -> None:
    """Registers `servicer`'s methods of `service` (a protobuf ServiceDescriptor whose messages are in `module`) as
    the generated add_*Servicer_to_server does, with each method's handler wrapped once by `guards` (outermost
    first), and with replies of type SearchResponse and SearchBatchResponse allowed to be their wire bytes
    (api/reply.py, api/batch.py), which go out without being parsed again."""
    handlers = {}
    for method in service.methods:
        output = getattr(module, method.output_type.name)
        joined = output is pb.SearchResponse or output is pb.SearchBatchResponse
        handler = wire.new_handler(
            method.client_streaming, method.server_streaming, getattr(servicer, method.name),
            request_deserializer=getattr(module, method.input_type.name).FromString,
            response_serializer=reply.serialize if joined else output.SerializeToString)
        for guard in reversed(guards):
            handler = guard(method.name, handler)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _hand_back(loop: asyncio.AbstractEventLoop, answer: asyncio.Future, job: Callable[[], Served]) -> None:
    """Runs `job` on a pipeline thread and settles `answer` on `loop` with its result or its error."""
    try:
        result: Served | None = job()
        error: BaseException | None = None
    except BaseException as raised:  # noqa: BLE001 - every outcome goes back to the awaiting coroutine
        result, error = None, raised
    # RuntimeError: the loop closed (shutdown) while the search ran, and nobody is left to answer.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, answer, result, error)


def _settle(answer: asyncio.Future, result: Served | None, error: BaseException | None) -> None:
    if answer.done():  # the caller gave up (its deadline, a cancel) while the search ran
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)


class RetrieverServicer(pb_grpc.RetrieverServicer):
    def __init__(self, config: ServerConfig, executor: PipelineExecutor, metrics: Metrics, calls: rpc.Rpc,
                 collections: Collections) -> None:
        self.config = config
        self.executor = executor
        self._company_ns = 0  # monotonic ns when a search last started with another in flight
        self.metrics = metrics
        self.rpc = calls
        self.collections = collections
        self.admission = Admission(config, metrics, lambda: executor.busy)
        executor.settled = self._settled
        # Set by RagServer: loads, validates, warms and swaps in the index at a path ("" = the configured one) as a
        # collection ("" = the default one).
        self.reloader: Callable[[str, str], Awaitable[ReloadResult]] | None = None
        # Set by RagServer: stops serving a collection (and removes its folder).
        self.deleter: Callable[[str, bool], Awaitable[str]] | None = None
        self.cache = CachedSearch(config.cache, metrics)
        self._plain = PlainParams()
        # Search replies joined from the index's prepared bytes (api/reply.py); False builds them field by field
        # (bench/experiments/reply_bytes.py compares the two).
        self.joined_replies = True
        self.prefetcher = Prefetcher(self.cache, config.cache, metrics, pipeline=collections.serving,
                                     live=lambda: self.admission.in_flight)
        self.batch = BatchSearch(config, executor, metrics, self.admission, self.cache, self.target, self._respond)
        metrics.threads_busy.set_function(lambda: executor.busy)  # read at scrape time, nothing per request
        # Read at scrape time from whichever pipeline serves the default collection (a reload swaps in a new policy).
        metrics.full_share.set_function(
            lambda: self.pipeline.policy.brownout_level() if self.pipeline is not None else 1.0)

    @property
    def pipeline(self) -> Searcher | None:
        """What serves the default collection now (None while it loads or when there is none)."""
        default = self.collections.default_collection()
        return None if default is None else default.searcher

    @pipeline.setter
    def pipeline(self, searcher: Searcher) -> None:
        default = self.collections.default_collection()
        if default is None:
            raise ValueError("this server has no default collection")
        self.collections.replace(default.name, searcher)

    def target(self, request: pb.SearchRequest) -> tuple[Searcher, SearchParams]:
        """The searcher serving the collection `request` names (an alias followed, "" the default) and the request
        as the caller's token may run it there (request_params: validated with that collection's defaults, held to
        the caller's tenant). Raises PermissionDenied (checked first, so a refusal says nothing of what exists),
        NotFound, InvalidArgument, Unavailable (still loading) or FailedPrecondition (failed to load)."""
        scope, searcher = self.resolve(request.collection)
        return searcher, request_params(request, searcher, self.config, scope, self._plain)

    def resolve(self, collection: str) -> tuple[auth.Scope, Searcher]:
        """The caller's scope, once it has allowed `collection`, and the searcher serving that name now."""
        scope = self.check_scope(collection)
        return scope, self.collections.searcher(collection)

    def check_scope(self, collection: str) -> auth.Scope:
        """The caller's scope, once it has allowed `collection` (as the request names it; "" is the default name)."""
        scope = auth.current_scope()
        if scope.restricted:
            scope.check(collection or self.collections.default or "")
        return scope

    @staticmethod
    def _deadline(context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @rpc.unary
    async def Search(self, request: pb.SearchRequest,
                     context: grpc.aio.ServicerContext) -> bytes | pb.SearchResponse:
        start = time.perf_counter_ns()
        with self.admission.search() as admitted:
            self.executor.placement.loop(self._alone())
            # Resolved once: the whole request runs on this searcher, even across a reload or an alias swap.
            scope, searcher = self.resolve(request.collection)
            # A repeat of a request's bytes that an entry answered exactly, under the same scope and index version,
            # is that entry's prepared reply: nothing to validate or key (the bytes decided both the first time).
            wire_key = (request.SerializeToString(), scope) if self.joined_replies else None
            if wire_key is not None:
                replayed = self.cache.replay(wire_key, (searcher.collection, searcher.version))
                if replayed is not None:
                    return self._replayed(*replayed, start, request.profile)
            params = request_params(request, searcher, self.config, scope, self._plain)
            if request.page_token:
                pages.check(pages.decode(request.page_token), searcher.version, request)
            deadline = self._deadline(context)
            validated = time.perf_counter_ns()
            # Exact hits are answered here on the event loop; misses run on a pipeline thread via _execute.
            served = await self.cache.search(searcher, params, deadline=deadline, execute=self._execute,
                                             arrival=admitted.arrival, store_after=True)
            if served.finished_ns:
                # From the pipeline thread's last step to this coroutine running again: the wake-up of the loop.
                served.result.stage_us["handback"] = (time.perf_counter_ns() - served.finished_ns) // 1000
        response, _ = self._respond(request, params, served, start, validated, searcher, wire_key)
        return response

    def _replayed(self, body: bytes, served_from: str, start: int, profile: bool) -> bytes:
        total_us = (time.perf_counter_ns() - start) // 1000
        stage_us = {"cache": total_us}
        self.metrics.observe_stages(stage_us)
        out = body + reply.call_fields(SERVED_FROM[served_from], None, total_us)
        return out + reply.stage_fields(stage_us) if profile else out

    def _respond(self, request: pb.SearchRequest, params: SearchParams, served: Served, start: int, validated: int,
                 searcher: Searcher, wire_key: tuple[bytes, auth.Scope] | None = None,
                 ) -> tuple[bytes | pb.SearchResponse, int]:
        """The reply and the server time it reports (µs). `wire_key`: the request's bytes and the caller's scope,
        kept with the entry of an exact hit so that a repeat of them is replayed (CachedSearch.replay)."""
        result = served.result
        result.stage_us["validate"] = (validated - start) // 1000
        total_us = (time.perf_counter_ns() - start) // 1000
        self.metrics.observe_stages(result.stage_us)
        if served.served_from == MISS:
            self.metrics.observe_quality(result)
        served_from = SERVED_FROM[served.served_from]
        token = ""
        if params.paged and result.full_page:
            token = pages.encode(result.index_version, params.offset + params.top_k, request, params)
        if not self.joined_replies:
            return reply.message(result, served_from, served.similarity, request.debug, total_us, token,
                                 searcher.collection, request.profile), total_us
        # Contexts index the prepared bytes of the index they came from; a result of another version (none reaches
        # here: the cache drops entries of a replaced index) is encoded field by field rather than mislabelled.
        prepared = prepared_bytes(searcher) if result.index_version == searcher.version else None
        entry = served.entry
        if entry is not None and not request.debug and not result.shaped:
            # A hit: the entry's reply, encoded by its first hit and kept with it, then this call's fields.
            body = entry.reply or reply.body(result, prepared, searcher.collection)
            keep = wire_key if served.served_from in (EXACT, PREFETCHED) else None
            if entry.reply is None or (keep is not None and keep not in entry.requests):
                self.cache.keep_reply(entry, body, keep)
            out = body + reply.call_fields(served_from, served.similarity, total_us)
            return (out + reply.stage_fields(result.stage_us) if request.profile else out), total_us
        return reply.joined(result, served_from, served.similarity, request.debug, total_us, prepared,
                            token, searcher.collection, request.profile), total_us

    def _execute(self, work: Callable[[], Served]) -> Awaitable[Served]:
        """Runs the cache's miss path on a pipeline thread, counted as queued until a thread picks it up. The
        thread runs in the request's context, so its stage spans are children of the RPC's span. The thread hands
        its answer straight to an asyncio future of this loop (_hand_back): asyncio.wrap_future's chain through the
        thread pool's own future (its lock, its callbacks, a copy of its state on the loop) cost ~15 µs of each
        hand-back on the caches a search leaves."""
        self.admission.enqueue()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Served] = loop.create_future()
        job = tracing.carry(self._timed_search, work, time.perf_counter_ns())
        return self._await_work(self.executor.submit_search(self._alone, _hand_back, loop, answer, job), answer)

    def _alone(self) -> bool:
        """Whether a search is the only one in the server and none had company in the last COMPANY_NS (so callers
        that come and go in turn keep to the spread placement): asked as a search arrives (where the event loop
        runs) and as a pipeline thread starts it (whether it runs beside the loop); placement.py. Plain reads and
        one write of an int, from either thread."""
        now = time.monotonic_ns()
        if self.admission.in_flight > 1:
            self._company_ns = now
            return False
        return now - self._company_ns > COMPANY_NS

    def _settled(self) -> bool:
        """Whether the server has refused nothing for load in the last SETTLED_SECONDS: searches with company may
        then keep each to its pipeline thread's CPU (placement.py). A plain read, from a pipeline thread."""
        return time.monotonic() - self.admission.last_shed > SETTLED_SECONDS

    async def _await_work(self, future: concurrent.futures.Future, answer: asyncio.Future[Served]) -> Served:
        try:
            return await answer
        except asyncio.CancelledError:
            # The caller gave up (deadline passed or cancelled) while its work was still queued: drop the work, and
            # count it out of the queue here, since no pipeline thread ever will.
            if future.cancel():
                self.admission.dequeue()
                self.metrics.deadline_stops.inc()
            raise

    def _timed_search(self, work: Callable[[], Served], submitted_ns: int) -> Served:
        self.admission.dequeue()
        # Time spent waiting for a worker thread is latency too; report it as its own stage.
        picked = time.perf_counter_ns()
        queued_us = (picked - submitted_ns) // 1000
        try:
            self.admission.check_wait(queued_us / 1e6)  # a search that waited too long is refused, not run
            served = work()  # CachedSearch.run: checks the deadline first (stage "queue")
        except DeadlineExceeded:
            self.metrics.deadline_stops.inc()
            raise
        finally:
            # Free before the hand-back: a search that arrives while the loop replies to this one may take it.
            self.executor.release()
        finished = time.perf_counter_ns()
        self.admission.served((finished - picked) / 1e9)
        served.result.stage_us["queue"] = queued_us
        return dataclasses.replace(served, finished_ns=finished)

    @rpc.unary
    async def SearchBatch(self, request: pb.SearchBatchRequest,
                          context: grpc.aio.ServicerContext) -> bytes | pb.SearchBatchResponse:
        return await self.batch.run(request, self._deadline(context))

    @rpc.unary
    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchResponse:
        self.admission.open()
        limit = self.config.cache.max_prefetch_requests
        if len(request.requests) > limit:
            raise InvalidArgument("requests", f"has {len(request.requests)} entries; the limit is {limit}")
        batch = [prefetch_target(i, r, self.target) for i, r in enumerate(request.requests)]
        accepted, dropped = self.prefetcher.submit(batch)
        return pb.PrefetchResponse(accepted=accepted, dropped=dropped)

    @rpc.stream
    async def StreamSearch(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # Reads and writes through the context, not an async generator: a generator left suspended by a cancelled
        # stream was followed by a segfault in grpc's cygrpc here (grpcio 1.85, bench/experiments/stream_search.py on
        # SciFact).
        session = DraftSession(self.cache, self._execute, self.metrics,
                               debounce_s=self.config.cache.stream_debounce_ms / 1000,
                               allowed=lambda: self.admission.in_flight < self.config.cache.speculative_busy_in_flight)
        try:
            while True:
                draft = await context.read()
                if draft is grpc.aio.EOF:
                    break
                start = time.perf_counter_ns()
                if not draft.final:
                    self.admission.open()
                    try:
                        searcher, params = self.target(draft.request)
                    except (InvalidArgument, NotFound):
                        continue  # a draft mid-typing may be blank or incomplete: nothing to speculate on
                    session.draft(searcher, params)
                    continue
                # The final request is admitted as a Search is (in flight and queue, api/admission.py).
                with self.admission.search():
                    searcher, params = self.target(draft.request)
                    if draft.request.page_token:
                        pages.check(pages.decode(draft.request.page_token), searcher.version, draft.request)
                    deadline = self._deadline(context)
                    validated = time.perf_counter_ns()
                    served = await session.final(searcher, params, deadline)
                response, total_us = self._respond(draft.request, params, served, start, validated, searcher)
                self.rpc.answered("StreamSearch", total_us / 1e6)
                await context.write(response)
        finally:
            session.close()

    @rpc.unary
    async def ReloadIndex(self, request: pb.ReloadIndexRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReloadIndexResponse:
        if self.reloader is None:
            raise Unavailable("this server cannot reload its index")
        result = await self.reloader(request.path, request.collection)
        return pb.ReloadIndexResponse(previous_version=result.previous_version, version=result.version,
                                      load_seconds=result.load_seconds)

    @rpc.unary
    async def ListCollections(self, request: pb.ListCollectionsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ListCollectionsResponse:
        return collection_list(self.collections, auth.current_scope())

    @rpc.unary
    async def SetAlias(self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext) -> pb.SetAliasResponse:
        return pb.SetAliasResponse(previous=await self.collections.set_alias(request.alias, request.collection))

    @rpc.unary
    async def DeleteAlias(self, request: pb.DeleteAliasRequest,
                          context: grpc.aio.ServicerContext) -> pb.DeleteAliasResponse:
        return pb.DeleteAliasResponse(previous=await self.collections.delete_alias(request.alias))

    @rpc.unary
    async def DeleteCollection(self, request: pb.DeleteCollectionRequest,
                               context: grpc.aio.ServicerContext) -> pb.DeleteCollectionResponse:
        if self.deleter is None:
            raise Unavailable("this server cannot delete collections")
        return pb.DeleteCollectionResponse(version=await self.deleter(request.collection, request.remove_files))

    @rpc.unary
    async def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.aio.ServicerContext) -> pb.IndexInfo:
        self.check_scope(request.collection)
        searcher = self.collections.searcher(request.collection)
        index = searcher.summary()
        manifest = index.manifest
        built = Timestamp()
        built.FromJsonString(manifest["created_at"])
        backends = native.backend_info()
        return pb.IndexInfo(
            name=manifest["name"], version=manifest["version"], document_count=index.n_docs,
            chunk_count=index.n_chunks, embedding_model=manifest["model"]["name"],
            embedding_dim=manifest["model"]["dim"],
            build_params={k: str(v) for k, v in manifest["params"].items()}, build_time=built,
            build_seconds=float(manifest.get("build_seconds", 0.0)), format_version=manifest["format_version"],
            metadata_fields=list(index.metadata_fields), native_has_cuda=backends["built_with_cuda"],
            cuda_device_available=backends["cuda_device_available"], fusion_backend=backends["fusion_backend"],
            dense_index_type=index.dense_kind,
            metadata_schema=[pb.MetadataField(name=name, type=kind, distinct_values=distinct)
                             for name, (kind, distinct) in index.metadata_schema.items()],
            tenant_key=index.tenant_key or "",
            collection=searcher.collection, aliases=self.collections.aliases_of(searcher.collection),
        )


def collection_list(collections: Collections, scope: auth.Scope = auth.EVERYTHING) -> pb.ListCollectionsResponse:
    """The collections `scope` may read (by their name or an alias naming them) with their state, and the aliases
    it may use; nothing else is shown, so a scoped caller learns no other tenant's names."""
    default = collections.default_collection()
    aliases = {alias: target for alias, target in collections.aliases.items() if scope.allows(alias)}
    out = pb.ListCollectionsResponse(aliases=aliases)
    for name in sorted(collections.collections):
        named_by = [alias for alias in collections.aliases_of(name) if alias in aliases]
        if not (scope.allows(name) or named_by):
            continue
        entry = collections.collections[name]
        info = out.collections.add(name=name, status=entry.status, error=entry.error, aliases=named_by,
                                   is_default=default is not None and default.name == name)
        if entry.searcher is not None:
            summary = entry.searcher.summary()
            info.version, info.document_count, info.chunk_count = summary.version, summary.n_docs, summary.n_chunks
            info.embedding_model = str(summary.manifest["model"]["name"])
            info.tenant_key = summary.tenant_key or ""
    return out


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rag-service")
    except PackageNotFoundError:
        return "source"


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """TLS from PEM files; with a client CA the server also demands and checks client certificates (mTLS)."""
    tls = config.tls
    if tls.key_file is None or tls.cert_file is None:  # the configuration checks they come together
        raise ValueError("TLS needs tls.cert_file and tls.key_file")
    client_ca = None if tls.client_ca_file is None else Path(tls.client_ca_file).read_bytes()
    return grpc.ssl_server_credentials([(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


class RagServer:
    """A rag-service server: bind, start, load and warm its collections, report SERVING; stop drains in-flight
    work."""

    # Called as hook(collection, old, new) after every swap (new None: the collection was deleted): the cache drops
    # that collection's entries of the old version here.
    on_index_swap: list[Callable[[str, Searcher | None, Searcher | None], None]]

    def __init__(self, config: ServerConfig, *, encoder: SearchEncoder | None = None,
                 tracer_provider: TracerProvider | None = None) -> None:
        """`tracer_provider`: where the spans go; by default the OTLP exporter of `config.tracing` when it names an
        endpoint, else the global provider the process installed, else none (no spans, rag_service/core/tracing.py)."""
        self.config = config
        self.metrics = Metrics()
        self.metrics.quality_floor = config.metrics.quality_floor
        # A provider made here from the configuration is this server's to flush and shut down on stop.
        self._own_tracer_provider = tracing.provider_from(config.tracing) if tracer_provider is None else None
        provider = tracer_provider or self._own_tracer_provider or tracing.installed_provider()
        tracer = None if provider is None else tracing.tracer(provider)
        self.metrics.build_info.info({"version": _package_version(), **{k: str(v) for k, v in
                                                                        native.backend_info().items()}})
        self.placement = Placement(config.placement)
        self.executor = PipelineExecutor(config.workers, self.placement, thread_name_prefix="rag-pipeline",
                                         nice=config.pipeline_nice)
        # Reloads load and warm beside the serving index on their own thread, never on a pipeline thread; the
        # encoders they load start their thread pools with every allowed CPU.
        self._reload_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-reload",
                                                   initializer=self.placement.spread_thread)
        self.index_root = index_root_of(config)
        # One query encoder per distinct model, shared by the collections built with it; a lone search's encode
        # workers are held to the CPUs beside the home one (placement.py).
        self.encoders = EncoderPool(config, encoder, self.placement.encode_cpus())
        # A lone search's BM25 on a large index runs here while its query is encoded (Pipeline._before_encode), held
        # to the CPUs beside the home one, as the encode's own workers would be.
        self._beside = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rag-beside",
                                          initializer=self.placement.beside_thread)
        self.on_index_swap = [self._swapped]
        # The loaded indexes stay out of the collector's full passes (api/heap.py).
        self.heap = Heap(config.freeze_heap, lambda: self.servicer.admission.in_flight, self.metrics)
        specs, default = collection_specs(config)
        self.collections = Collections(specs, default, self.index_root, self.metrics, Loaders(
            load=self._load_searcher, executor=self.executor, changed=self._publish,
            swapped=self._run_swap_hooks))
        self.servicer = RetrieverServicer(config, self.executor, self.metrics,
                                          rpc.Rpc(SERVICE_NAME, self.metrics, tracer), self.collections)
        self.servicer.reloader = self.reload
        self.servicer.deleter = self.delete
        self.health = HealthServicer()
        self._metrics_http = None
        self.metrics_port: int | None = None
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", 64 << 20),
                   ("grpc.so_reuseport", 0)]
        if config.max_connection_age_seconds is not None:
            options += [("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_seconds * 1000))]
        self.replica_name = config.replica_name or f"{socket.gethostname()}:{os.getpid()}"
        admin_token = auth.load_token(config.auth.admin_token, config.auth.admin_token_file, "auth.admin_token")
        search_token = auth.load_token(config.auth.search_token, config.auth.search_token_file, "auth.search_token")
        scoped = auth.load_scopes(config.auth)

        def refused(method: str, code: grpc.StatusCode) -> None:
            self.metrics.requests.labels(method, code.name).inc()

        request_log = logs.RequestLog(log_queries=config.log_queries, served_by=self.replica_name)
        bearer = auth.BearerAuth(admin_token=admin_token, search_token=search_token, on_refused=refused,
                                 scoped=scoped)

        def malformed(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
            return wire.guard_malformed(method, handler, lambda name: refused(name, grpc.StatusCode.INVALID_ARGUMENT))

        # No interceptors: each method's handler is wrapped once here (api/wire.py says why).
        self.server = grpc.aio.server(options=options)
        add_service(self.server, pb.DESCRIPTOR.services_by_name["Retriever"], pb, self.servicer,
                    (request_log.wrap, malformed, bearer.wrap))
        self.shard_servicer = ShardServicer(lambda: self.servicer.pipeline, self.executor,
                                            rpc.Rpc(SHARD_SERVICE, self.metrics, tracer))
        # The internal Shard service (api/shard_service.py) answers on a shard index; its callers need the search token.
        # Never with scoped tokens: a Shard request carries any filter, so a tenant's token would reach every tenant.
        shard_bearer = auth.BearerAuth(admin_token=admin_token, search_token=search_token, on_refused=refused,
                                       strict=bool(scoped))
        add_service(self.server, shard_pb2.DESCRIPTOR.services_by_name["Shard"], shard_pb2, self.shard_servicer,
                    (shard_bearer.wrap,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{config.host}:{config.port}"
        if config.tls.cert_file is not None:
            self.port = self.server.add_secure_port(address, server_credentials(config))
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _publish(self, names: list[str]) -> None:
        """Health of the collections and aliases `names` (an alias shows its collection's state; a name no longer
        served shows SERVICE_UNKNOWN), then the overall health: SERVING once every collection finished loading and
        one serves."""
        status = health_pb2.HealthCheckResponse
        for name in names:
            try:
                self.collections.searcher(name)
                state = status.SERVING
            except NotFound:
                state = status.SERVICE_UNKNOWN
            except (Unavailable, FailedPrecondition, InvalidArgument):  # loading or failed
                state = status.NOT_SERVING
            await self.health.set(name, state)
        if not self.servicer.admission.draining:
            await self._set_health(status.SERVING if self.collections.loaded() else status.NOT_SERVING)

    def _run_swap_hooks(self, collection: str, old: Searcher | None, new: Searcher | None) -> None:
        for hook in self.on_index_swap:
            hook(collection, old, new)

    def _load_searcher(self, path: Path, shards: tuple[str, ...]) -> Searcher:
        router = self.config.router.model_copy(update={"shards": list(shards)})
        return load_searcher(self.config.model_copy(update={"index": path, "router": router}), None, self._admitted,
                             self.encoders, self._beside)

    def _swapped(self, collection: str, old: Searcher | None, new: Searcher | None) -> None:
        if new is None:
            self.servicer.cache.drop(collection)
        else:
            self.servicer.cache.invalidate(collection, new.version)
        default = self.collections.default_collection()
        if new is not None and default is not None and default.name == collection:
            self.metrics.set_index(new.summary())
        if old is not None:
            self.encoders.keep(c.searcher.encoder for c in self.collections.collections.values()
                               if c.searcher is not None and c.searcher is not old)
        self.heap.swapped(old)

    def _admitted(self) -> int:
        """Searches admitted now, running or queued (read from the pipeline threads: a plain int read)."""
        return self.servicer.admission.in_flight

    async def listen(self) -> None:
        """Starts answering RPCs; health says NOT_SERVING and Search UNAVAILABLE until load() has finished."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in [*self.collections.collections, *self.collections.aliases]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d", self.config.host, self.port)

    async def load(self) -> None:
        """Loads and warms every collection off the event loop, each reporting SERVING (its health service) when it
        is ready; the overall health follows once all have finished. Raises when none could be loaded."""
        started = time.perf_counter()
        await self.collections.load_all()
        serving = [c for c in self.collections.collections.values() if c.status == SERVING]
        log.info("serving %d of %d collections after %.1f s", len(serving), len(self.collections.collections),
                 time.perf_counter() - started)
        self.placement.pin_loop()

    async def reload(self, path: str = "", collection: str = "") -> ReloadResult:
        """Loads the index at `path` (inside the index root; "" = the collection's configured path, CURRENT followed
        anew) beside what `collection` serves ("" = the default collection; a folder of the index root the server
        does not serve yet becomes a new collection), validates (format, checksums, model) and warms it, then swaps
        it in. Requests in flight finish on the index they started on; a failure leaves the serving index untouched
        and raises."""
        return await self.collections.reload(collection, path, lambda p: confine(p, self.index_root),
                                             self._reload_executor)

    async def reload_all(self) -> None:
        """SIGHUP: index folders new under the collections root load as collections, the aliases file is read anew
        and every collection whose CURRENT moved reloads (api/collections.py, `Collections.refresh`)."""
        specs, _ = collection_specs(self.config)
        await self.collections.refresh(specs, lambda p: confine(p, self.index_root), self._reload_executor)

    async def delete(self, collection: str, remove_files: bool = False) -> str:
        """Stops serving `collection` (refused while an alias names it); `remove_files` also deletes its folder,
        which must be inside the index root. Returns the version it served."""
        return await self.collections.delete(collection, remove_files, lambda p: confine(p, self.index_root))

    async def start(self) -> int:
        if self.config.metrics.port is not None:
            self._metrics_http, self.metrics_port = self.metrics.serve_http(self.config.metrics.port,
                                                                            self.config.metrics.host)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics_port)
        self.heap.watch()
        await self.listen()
        await self.load()
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, then (after the configured notice, when called without an explicit grace) refuses new
        requests and lets in-flight ones finish within the grace period; health keeps answering while they drain."""
        loop = asyncio.get_running_loop()
        notice = self.config.shutdown_notice_seconds if grace is None else 0.0
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.metrics.draining.set(1)
        if notice > 0:
            await asyncio.sleep(notice)
        admission = self.servicer.admission
        admission.draining = True
        drain_until = loop.time() + grace
        # Until in-flight work is done and callers have stopped arriving (each now gets UNAVAILABLE from us, a clean
        # answer to retry elsewhere): gRPC cancels calls still in transit when the server itself stops.
        while loop.time() < drain_until and (
                admission.in_flight or time.monotonic() - admission.last_arrival < DRAIN_QUIET_SECONDS):
            await asyncio.sleep(0.01)
        await self.server.stop(max(0.0, drain_until - loop.time()))
        await self.servicer.prefetcher.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._beside.shutdown(wait=True, cancel_futures=True)
        self._reload_executor.shutdown(wait=False, cancel_futures=True)
        self.heap.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._own_tracer_provider is not None:
            # Exports what is still batched; off the loop, since a collector that is down makes it wait.
            await loop.run_in_executor(None, self._own_tracer_provider.shutdown)
            self._own_tracer_provider = None

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_server(config: ServerConfig, *, encoder: SearchEncoder | None = None,
                        tracer_provider: TracerProvider | None = None) -> tuple[RagServer, int]:
    """Binds, starts and loads; returns once the index is warm and health says SERVING."""
    server = RagServer(config, encoder=encoder, tracer_provider=tracer_provider)
    try:
        port = await server.start()
    except BaseException:
        await server.stop(0)
        raise
    return server, port
