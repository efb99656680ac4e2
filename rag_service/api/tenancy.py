"""Tenants of one collection: a collection built with a tenant key (`rag-index build --tenant-key FIELD`, a keyword
metadata field) answers each request from its tenant's passages only.

The tenant is the token's (a scoped token may fix one, api/auth.py) or else the request's `tenant`; a request naming
another tenant than its token's is PERMISSION_DENIED. It becomes an equality condition on the tenant field ANDed above
the request's own filter, so everything after validation sees an ordinary filtered request: the first stages search
the allowed set (the filtered recall of core/filter.py's masks), the cache keys differ per tenant (exact, semantic and
prefetched entries alike), and the shard router forwards the condition to its shards as part of the filter.
"""

from __future__ import annotations

import dataclasses

from rag_service.api.auth import Scope
from rag_service.core import filter as flt
from rag_service.core.config import Limits
from rag_service.core.errors import InvalidArgument, PermissionDenied
from rag_service.core.params import SearchParams

# The condition's path in error messages: a tenant that fails a check is the request's `tenant`.
TENANT_PATH = "tenant"


def tenant_of(requested: str, scope: Scope, tenant_key: str | None, limits: Limits) -> str | None:
    """The tenant a request searches as; None on a collection without a tenant key."""
    if scope.tenant is not None and requested and requested != scope.tenant:
        raise PermissionDenied("tenant: this token reads as another tenant; leave tenant unset or give the token's")
    if tenant_key is None:
        if requested:
            raise InvalidArgument("tenant", "this collection has no tenant key (rag-index build --tenant-key FIELD); "
                                  "leave tenant unset")
        # A token's tenant does not apply here: the collection is not divided by tenant, and the token's
        # collections say it may read it.
        return None
    tenant = scope.tenant or requested
    if not tenant:
        raise InvalidArgument("tenant", f"is required: this collection keeps each tenant's passages apart by the "
                              f"metadata field {tenant_key!r}; name the tenant (or use a token scoped to one)")
    if len(tenant) > limits.max_filter_value_chars:
        raise InvalidArgument("tenant", f"longer than {limits.max_filter_value_chars} characters")
    return tenant


def tenant_filter(tenant_key: str, tenant: str, tree: flt.Tree | None) -> flt.Tree:
    """`tree` (the request's filter, or none) ANDed with tenant_key == tenant."""
    condition = flt.Condition(path=TENANT_PATH, key=tenant_key, kind=flt.MATCH, values=(("keyword", tenant),))
    return flt.Tree(path="filter", must=(condition,) if tree is None else (condition, tree))


def apply(params: SearchParams, requested: str, scope: Scope, tenant_key: str | None, limits: Limits) -> SearchParams:
    """`params` as the caller may search: on a tenant-keyed collection, restricted to the caller's tenant."""
    tenant = tenant_of(requested, scope, tenant_key, limits)
    if tenant is None or tenant_key is None:
        return params
    return dataclasses.replace(params, filter=tenant_filter(tenant_key, tenant, params.filter))
