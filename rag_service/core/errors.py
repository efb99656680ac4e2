"""Domain errors. The server maps each kind to one gRPC status code (api/rpc.py STATUS_FOR); stages raise these and know
nothing of gRPC."""


class RagError(Exception):
    """Base class of every error rag-service reports to a caller."""


class InvalidArgument(RagError, ValueError):
    """A request field is outside its contract. `field` names it, so the caller can fix its request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class PermissionDenied(RagError):
    """The caller's token does not allow the request: a collection outside its scope, a tenant other than its own.
    Messages never say whether a named collection exists."""


class NotFound(RagError, LookupError):
    """A request names something the server does not have (a collection or alias). `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Overloaded(RagError):
    """Admission control refused the request: too much work in flight. `retry_after_ms`: when the caller may come
    back, as the gate estimates it (None: no estimate); the server sends it as gRPC retry pushback."""

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(RagError):
    """The server cannot serve now (no index loaded, draining)."""


class DeadlineExceeded(RagError):
    """The request's deadline or latency budget passed before its work finished; the work was stopped."""


class FailedPrecondition(RagError):
    """The request depends on state the server no longer has (a page token of an index version no longer served)."""


class IndexFormatError(RagError):
    """An index on disk is missing, corrupt or of another format; the message names the file and the problem."""


class BuildError(RagError):
    """An index build failed; the previously published index is untouched."""
