"""Structured logs: JSON lines (python-json-logger) and one INFO line per RPC with a request id, status and time.

The request id comes from the caller's `x-request-id` metadata when it sends a usable one, else it is generated; it is
echoed back in the trailing metadata and attached to every log record written while the RPC runs on the event loop.
Query text is user data and is logged only when the server is configured to (log_queries).
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
import re
import secrets
import sys
import time

import grpc
from pythonjsonlogger.json import JsonFormatter

from rag_service.api import wire

REQUEST_ID_HEADER = "x-request-id"
SERVED_BY_HEADER = "x-served-by"
_USABLE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # anything else could forge log structure or bloat it

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("rag_request_id", default=None)

access_log = logging.getLogger("rag_service.access")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            rid = request_id.get()
            if rid is not None:
                record.request_id = rid
        return True


def make_handler(fmt: str = "json", stream=None) -> logging.Handler:
    """A stream handler writing JSON lines (or plain text) with request ids attached."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(level: str = "INFO", fmt: str = "json", stream=None) -> None:
    """Root logging for a server process: JSON lines (or plain text) on stderr, request ids attached."""
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _incoming_id(metadata) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            value = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return value if _USABLE_ID.match(value) else None
    return None


class RequestLog:
    """The outermost guard of a service's methods (api/wire.py): sees every call, including those the inner guards
    refuse, and writes one access-log line for it."""

    def __init__(self, *, log_queries: bool = False, served_by: str | None = None) -> None:
        self.log_queries = log_queries
        # Echoed as x-served-by beside the request id, and logged: which replica answered.
        self.served_by = served_by
        # Request ids: 32 hex digits as uuid4().hex gives, a random half per server and a count, without uuid4's
        # call to the OS's random source and UUID object on the event loop for every call.
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(secrets.randbits(48))

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = wire.behavior_of(handler)
        log_queries = self.log_queries
        served_by = self.served_by
        trailing = ((SERVED_BY_HEADER, served_by),) if served_by else ()
        request_streaming = handler.request_streaming

        prefix, ids = self._id_prefix, self._ids

        def begin(context) -> tuple[str, float]:
            rid = _incoming_id(context.invocation_metadata()) or f"{prefix}{next(ids) & 0xFFFFFFFFFFFFFFFF:016x}"
            request_id.set(rid)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, rid), *trailing))
            return rid, time.perf_counter()

        def end(context, rid: str, started: float, request, error: BaseException | None) -> None:
            if isinstance(error, grpc.aio.AbortError) or error is None:
                code = context.code() or grpc.StatusCode.OK
            elif isinstance(error, BaseException) and type(error).__name__ == "CancelledError":
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
            code_name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            if not access_log.isEnabledFor(logging.INFO):
                return
            extra = {"request_id": rid, "method": name, "code": code_name,
                     "ms": round((time.perf_counter() - started) * 1000, 3), "peer": context.peer()}
            if served_by:
                extra["served_by"] = served_by
            if log_queries and request is not None and hasattr(request, "query"):
                extra["query"] = request.query
            access_log.info("%s %s", name, code_name, extra=extra)

        if inspect.isasyncgenfunction(behavior):  # a streaming method may also be a coroutine using context.write
            async def logged_stream(request, context):
                rid, started = begin(context)
                error = None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    end(context, rid, started, None if request_streaming else request, error)

            return wire.method_handler(handler, logged_stream)

        async def logged(request, context):
            rid, started = begin(context)
            error = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                end(context, rid, started, None if request_streaming else request, error)

        return wire.method_handler(handler, logged)
