"""Transport guard: a request body that is not a valid protobuf message (corrupt wire format, bad UTF-8 in a string
field) gets INVALID_ARGUMENT naming the message type, instead of gRPC's generic INTERNAL "Exception deserializing
request!", so callers see their own mistake and monitoring does not count it as a server fault."""

from __future__ import annotations

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


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """For unary-request methods of `service`; `on_malformed(method)` is told of every refusal."""

    def __init__(self, service: str, on_malformed: Callable[[str], None] | None = None) -> None:
        self.prefix = f"/{service}/"
        self.on_malformed = on_malformed

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_streaming or handler.request_deserializer is None \
                or not method.startswith(self.prefix):
            return handler
        name = method[len(self.prefix):]
        behavior = handler.unary_unary or handler.unary_stream
        on_malformed = self.on_malformed

        async def guarded(request, context):
            if isinstance(request, Malformed):
                if on_malformed is not None:
                    on_malformed(name)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.message}")
            return await behavior(request, context)

        async def guarded_stream(request, context):
            if isinstance(request, Malformed):
                if on_malformed is not None:
                    on_malformed(name)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.message}")
            async for item in behavior(request, context):
                yield item

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                guarded_stream, request_deserializer=_safe(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            guarded, request_deserializer=_safe(handler.request_deserializer),
            response_serializer=handler.response_serializer)
