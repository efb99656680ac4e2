"""Bearer-token authorisation of the Retriever and Shard services, a guard on each method's handler (api/wire.py).

Admin RPCs (those that change what the server serves) need the admin token, and are refused outright when none is
configured: an unconfigured server must not be reconfigurable by anyone who can reach its port. The read RPCs need
a token only when the search token or scoped tokens are configured. Health and reflection stay open so load balancers
and tooling work without credentials. Tokens are compared with hmac.compare_digest, so the time taken says nothing
about the token.

Each token has a Scope: the collections it may read (None: all) and its tenant (None: none fixed). The guard makes the
caller's scope the handler's `current_scope()` (a context variable: every RPC runs in its own asyncio task, so one
call's scope never reaches another); a call on a server without read tokens reads everything.
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import SecretStr

from rag_service.api import wire
from rag_service.core.config import AuthSettings
from rag_service.core.errors import PermissionDenied

# Everything that changes server state. New admin RPCs must be added here: the guard keys on method names.
ADMIN_METHODS = frozenset({"ReloadIndex", "SetAlias", "DeleteAlias", "DeleteCollection"})
AUTH_HEADER = "authorization"


# One message for every collection outside a scope, whether or not it exists: a caller learns nothing of the names
# other tenants use.
OUT_OF_SCOPE = "this token may not read the requested collection"


@dataclass(frozen=True)
class Scope:
    """What a caller's token may read: `collections` (None: every one) and `tenant` (None: the token fixes none)."""

    collections: frozenset[str] | None = None
    tenant: str | None = None

    @property
    def restricted(self) -> bool:
        return self.collections is not None

    def allows(self, collection: str) -> bool:
        """Whether the scope names `collection` (what a listing of collections shows this caller)."""
        return self.collections is None or collection in self.collections

    def check(self, collection: str) -> None:
        """Raises PermissionDenied unless `collection` (the name a request gives, before any alias is followed; the
        default collection's name for a request that gives none) is in the scope."""
        if not self.allows(collection):
            raise PermissionDenied(OUT_OF_SCOPE)


EVERYTHING = Scope()

_scope: contextvars.ContextVar[Scope] = contextvars.ContextVar("rag_scope", default=EVERYTHING)


def current_scope() -> Scope:
    """The scope of the token the current RPC was authorised with; EVERYTHING when its method needs no token."""
    return _scope.get()


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


def load_scopes(settings: AuthSettings) -> list[tuple[bytes, Scope]]:
    """The scoped read tokens with their scopes. A token configured twice (or equal to the search or admin token)
    is refused: which scope it carries would be ambiguous."""
    scoped = []
    for i, entry in enumerate(settings.scoped_tokens):
        token = load_token(entry.token, entry.token_file, f"auth.scoped_tokens[{i}].token")
        if token is None:  # the configuration checks one of the two is given
            raise ValueError(f"auth.scoped_tokens[{i}]: give token or token_file")
        scoped.append((token, Scope(collections=frozenset(entry.collections), tenant=entry.tenant)))
    others = [load_token(settings.admin_token, settings.admin_token_file, "auth.admin_token"),
              load_token(settings.search_token, settings.search_token_file, "auth.search_token")]
    seen = [t for t in others if t is not None]
    for i, (token, _) in enumerate(scoped):
        if any(hmac.compare_digest(token, other) for other in seen):
            raise ValueError(f"auth.scoped_tokens[{i}]: the same token as the admin, search or another scoped token")
        seen.append(token)
    return scoped


def _header(metadata: Iterable | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return None


def _bearer(metadata: Iterable | None) -> tuple[bytes | None, tuple[grpc.StatusCode, str] | None]:
    """The bearer token of the call, or the refusal of a call without a well-formed one."""
    header = _header(metadata, AUTH_HEADER)
    if header is None:
        return None, (grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, (grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'")
    return token.strip().encode("utf-8"), None


INVALID = (grpc.StatusCode.PERMISSION_DENIED, "the bearer token is not valid for this RPC")


def check_bearer(metadata: Iterable | None, expected: bytes | None, *,
                 admin: bool) -> tuple[grpc.StatusCode, str] | None:
    """None when the call may proceed, else the status code and message to refuse it with."""
    if expected is None:
        if admin:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    "admin RPCs are disabled: the server has no admin token "
                    "(set RAG_AUTH__ADMIN_TOKEN or auth.admin_token_file)")
        return None
    token, refusal = _bearer(metadata)
    if refusal is not None:
        return refusal
    return None if token is not None and hmac.compare_digest(token, expected) else INVALID


def scope_of(metadata: Iterable | None,
             tokens: Sequence[tuple[bytes, Scope]]) -> tuple[Scope | None, tuple[grpc.StatusCode, str] | None]:
    """The scope of the call's token among `tokens`, or the refusal. Every token is compared (no early exit), so the
    time taken does not say which one nearly matched."""
    token, refusal = _bearer(metadata)
    if refusal is not None or token is None:
        return None, refusal
    found = None
    for candidate, scope in tokens:
        if hmac.compare_digest(token, candidate) and found is None:
            found = scope
    return (found, None) if found is not None else (None, INVALID)


class BearerAuth:
    """Checks bearer tokens on a service's methods; `on_refused(method, code)` is told of every refusal.

    Read methods take the search token (scope: everything) or one of `scoped` (token, scope) pairs; admin methods the
    admin token. `scoped` is for the Retriever service only: the internal Shard service (whose requests carry any
    filter) must never take a token limited to a tenant, so its guard is made without them and with `strict`: its read
    methods then need the search token even when none is configured (and are refused while none is)."""

    def __init__(self, *, admin_token: bytes | None, search_token: bytes | None,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
                 scoped: Sequence[tuple[bytes, Scope]] = (), strict: bool = False) -> None:
        self.admin_token = admin_token
        self.search_token = search_token
        self.on_refused = on_refused
        self.read_tokens: list[tuple[bytes, Scope]] = \
            ([(search_token, EVERYTHING)] if search_token is not None else []) + list(scoped)
        self.strict = strict

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of method `name`, refused unless the caller's token fits, and run with the token's scope as
        `current_scope()`; unchanged (no cost per call) for a read method of a server without read tokens."""
        admin = name in ADMIN_METHODS
        if not admin and not self.read_tokens and not self.strict:
            return handler
        behavior = wire.behavior_of(handler)
        on_refused = self.on_refused
        admin_token, read_tokens = self.admin_token, self.read_tokens

        async def check(context: grpc.aio.ServicerContext) -> None:
            scope: Scope | None = EVERYTHING
            if admin:
                refusal = check_bearer(context.invocation_metadata(), admin_token, admin=True)
            elif not read_tokens:
                refusal = (grpc.StatusCode.PERMISSION_DENIED,
                           "this service needs auth.search_token when scoped tokens are configured")
            else:
                scope, refusal = scope_of(context.invocation_metadata(), read_tokens)
            if refusal is not None or scope is None:
                refusal = refusal or INVALID
                if on_refused is not None:
                    on_refused(name, refusal[0])
                await context.abort(*refusal)
                return
            # This call's own task holds it (gRPC runs each RPC in a task of its own).
            _scope.set(scope)

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
