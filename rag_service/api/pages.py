"""Page tokens: where the next page of a ranking starts, for one query, its parameters and one index version.

A token is URL-safe base64 of a small JSON object: the index version, the next offset, a fingerprint of the request
(every field but the offset, the token and the cache mode) and, for a decay whose origin was left to the server, the
origin page 1 used. The server keeps no state for it; a token of another index
version is refused (FAILED_PRECONDITION: the ranking it continues no longer exists), one of another query or other
parameters is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from rag_service.core.errors import FailedPrecondition, InvalidArgument
from rag_service.core.params import SearchParams
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.search.cache import normalise

MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class PageToken:
    version: str
    offset: int
    fingerprint: str
    origin: float | None = None  # the decay origin page 1 resolved "now" to, so later pages rank alike


def fingerprint(request: pb.SearchRequest) -> str:
    """What a token binds: the request as the caller gave it, less the page it asks for and how to use the cache."""
    bound = pb.SearchRequest()
    bound.CopyFrom(request)
    for name in ("offset", "page_token", "cache"):
        bound.ClearField(name)
    bound.query = normalise(request.query)
    return hashlib.blake2b(bound.SerializeToString(deterministic=True), digest_size=12).hexdigest()


def encode(version: str, offset: int, request: pb.SearchRequest, params: SearchParams) -> str:
    body: dict = {"v": version, "o": offset, "f": fingerprint(request)}
    if params.decay is not None and not request.decay.HasField("origin"):
        body["d"] = params.decay.origin
    text = json.dumps(body, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")


def decode(token: str) -> PageToken:
    """InvalidArgument (field page_token) for anything this server did not issue."""
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument("page_token", f"is {len(token)} characters; a token is at most {MAX_TOKEN_CHARS}")
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        parsed = PageToken(version=body["v"], offset=body["o"], fingerprint=body["f"], origin=body.get("d"))
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError):
        raise InvalidArgument("page_token", "is not a page token this service issued") from None
    if not (isinstance(parsed.version, str) and isinstance(parsed.fingerprint, str)
            and isinstance(parsed.offset, int) and not isinstance(parsed.offset, bool) and parsed.offset >= 0
            and (parsed.origin is None or (isinstance(parsed.origin, float | int)
                                           and not isinstance(parsed.origin, bool)
                                           and abs(parsed.origin) < 253402300800))):
        raise InvalidArgument("page_token", "is not a page token this service issued")
    return parsed


def check(token: PageToken, version: str, request: pb.SearchRequest) -> None:
    """The token continues this request on the index version being served, or the request is refused."""
    if token.version != version:
        raise FailedPrecondition(f"page_token: issued for index version {token.version[:80]!r}, the server now "
                                 f"serves {version!r}; start again from the first page")
    if token.fingerprint != fingerprint(request):
        raise InvalidArgument("page_token", "was issued for another query or other parameters")
