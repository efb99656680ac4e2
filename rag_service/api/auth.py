"""Bearer-token authorisation of the Retriever service, as one gRPC server interceptor.

Admin RPCs (those that change what the server serves) need the admin token, and are refused outright when none is
configured: an unconfigured server must not be reconfigurable by anyone who can reach its port. The read RPCs need
the search token only when one is configured. Health and reflection stay open so load balancers and tooling work
without credentials. Tokens are compared with hmac.compare_digest, so the time taken says nothing about the token.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from pydantic import SecretStr

# Everything that changes server state. New admin RPCs must be added here: the interceptor keys on method names.
ADMIN_METHODS = frozenset({"ReloadIndex"})
AUTH_HEADER = "authorization"


def load_token(value: SecretStr | None, file: Path | None, what: str) -> bytes | None:
    """The configured token, from the value (environment/config file) or from a file; None when neither is set."""
    if value is not None and file is not None:
        raise ValueError(f"{what}: give the token or a token file, not both")
    if file is not None:
        try:
            token = Path(file).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ValueError(f"{what}_file {file}: cannot read: {error.strerror or error}") from None
        if not token:
            raise ValueError(f"{what}_file {file}: empty")
    elif value is not None:
        token = value.get_secret_value().strip()
        if not token:
            raise ValueError(f"{what}: empty")
    else:
        return None
    return token.encode("utf-8")


def _header(metadata: Iterable | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def check_bearer(metadata: Iterable | None, expected: bytes | None, *,
                 admin: bool) -> tuple[grpc.StatusCode, str] | None:
    """None when the call may proceed, else the status code and message to refuse it with."""
    if expected is None:
        if admin:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    "admin RPCs are disabled: the server has no admin token "
                    "(set RAG_AUTH__ADMIN_TOKEN or auth.admin_token_file)")
        return None
    header = _header(metadata, AUTH_HEADER)
    if header is None:
        return grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
    if not hmac.compare_digest(token.strip().encode("utf-8"), expected):
        return grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid for this RPC"
    return None


def _refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts: the request is never given to the servicer."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks bearer tokens on `service`'s methods; `on_refused(method, code)` is told of every refusal."""

    def __init__(self, service: str, *, admin_token: bytes | None, search_token: bytes | None,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.prefix = f"/{service}/"
        self.admin_token = admin_token
        self.search_token = search_token
        self.on_refused = on_refused

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if not method.startswith(self.prefix):
            return await continuation(handler_call_details)
        name = method[len(self.prefix):]
        admin = name in ADMIN_METHODS
        refusal = check_bearer(handler_call_details.invocation_metadata,
                               self.admin_token if admin else self.search_token, admin=admin)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        if self.on_refused is not None:
            self.on_refused(name, refusal[0])
        return _refusing_handler(handler, *refusal)
