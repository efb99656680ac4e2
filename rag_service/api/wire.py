"""Transport guard: a request body that is not a valid protobuf message (corrupt wire format, bad UTF-8 in a string
field) gets INVALID_ARGUMENT naming the message type, instead of gRPC's generic INTERNAL "Exception deserializing
request!", so callers see their own mistake and monitoring does not count it as a server fault.

The guards of a service's methods (this one, the request log, bearer auth) wrap each method's handler once, when the
service is registered, rather than as gRPC interceptors: an aio interceptor runs Python per call even for a method it
does not guard and builds a new handler per call, which cost ~80 µs a call here (bench/README.md, "The floor")."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError


class Malformed:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError as error:
            return Malformed(str(error))

    return parse


_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def new_handler(request_streaming: bool, response_streaming: bool, behavior: Callable,
                request_deserializer: Callable | None, response_serializer: Callable | None) -> grpc.RpcMethodHandler:
    """A method handler of the given kind that runs `behavior` (an async generator function for a response-streaming
    method, a coroutine function otherwise)."""
    make = _KINDS[(request_streaming, response_streaming)]
    return make(behavior, request_deserializer=request_deserializer, response_serializer=response_serializer)


def method_handler(like: grpc.RpcMethodHandler, behavior: Callable,
                   request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers as `like` that runs `behavior`."""
    return new_handler(like.request_streaming, like.response_streaming, behavior,
                       request_deserializer or like.request_deserializer, like.response_serializer)


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable:
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if behavior is None:
        raise ValueError("a method handler without a behavior")
    return behavior


def guard_malformed(name: str, handler: grpc.RpcMethodHandler,
                    on_malformed: Callable[[str], None] | None = None) -> grpc.RpcMethodHandler:
    """`handler` of method `name` with its request body checked: a body that does not parse is refused with
    INVALID_ARGUMENT (and `on_malformed(name)` told) before the method sees it. Built once per method at
    registration, so a call pays one isinstance check."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    behavior = behavior_of(handler)

    async def refuse(request: Malformed, context: grpc.aio.ServicerContext) -> None:
        if on_malformed is not None:
            on_malformed(name)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.message}")

    if inspect.isasyncgenfunction(behavior):  # a streaming method may also be a coroutine using context.write
        async def guarded_stream(request, context):
            if isinstance(request, Malformed):
                await refuse(request, context)
            async for item in behavior(request, context):
                yield item

        return method_handler(handler, guarded_stream, _safe(handler.request_deserializer))

    async def guarded(request, context):
        if isinstance(request, Malformed):
            await refuse(request, context)
        return await behavior(request, context)

    return method_handler(handler, guarded, _safe(handler.request_deserializer))
