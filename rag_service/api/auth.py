"""Bearer-token authorisation of the Retriever and Shard services, a guard on each method's handler (api/wire.py).

Admin RPCs (those that change what the server serves) need the admin token, and are refused outright when none is
configured: an unconfigured server must not be reconfigurable by anyone who can reach its port. The read RPCs need
the search token only when one is configured. Health and reflection stay open so load balancers and tooling work
without credentials. Tokens are compared with hmac.compare_digest, so the time taken says nothing about the token.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
from pydantic import SecretStr

from rag_service.api import wire

# Everything that changes server state. New admin RPCs must be added here: the guard keys on method names.
ADMIN_METHODS = frozenset({"ReloadIndex", "SetAlias", "DeleteAlias", "DeleteCollection"})
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


class BearerAuth:
    """Checks bearer tokens on a service's methods; `on_refused(method, code)` is told of every refusal."""

    def __init__(self, *, admin_token: bytes | None, search_token: bytes | None,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.admin_token = admin_token
        self.search_token = search_token
        self.on_refused = on_refused

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of method `name`, refused unless the caller's token fits; unchanged (no cost per call) for a
        read method of a server without a search token."""
        admin = name in ADMIN_METHODS
        expected = self.admin_token if admin else self.search_token
        if expected is None and not admin:
            return handler
        behavior = wire.behavior_of(handler)
        on_refused = self.on_refused

        async def check(context: grpc.aio.ServicerContext) -> None:
            refusal = check_bearer(context.invocation_metadata(), expected, admin=admin)
            if refusal is not None:
                if on_refused is not None:
                    on_refused(name, refusal[0])
                await context.abort(*refusal)

        if inspect.isasyncgenfunction(behavior):  # a streaming method may also be a coroutine using context.write
            async def checked_stream(request_or_iterator, context):
                await check(context)
                async for item in behavior(request_or_iterator, context):
                    yield item

            return wire.method_handler(handler, checked_stream)

        async def checked(request_or_iterator, context):
            await check(context)
            return await behavior(request_or_iterator, context)

        return wire.method_handler(handler, checked)
