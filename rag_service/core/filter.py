"""The structured metadata filter: a boolean tree (must / should / must_not) over typed conditions, as plain frozen
data that every tier can name (the request parses it, the cache keys on it, the index evaluates it, the router
forwards it).

Metadata types (chosen at build time, index/metadata.py): keyword, keyword_list, integer, float, date, boolean. A
condition must fit its field's type; `check` says where it does not, naming the condition's path in the tree
(`filter.must[1].range`) and the field, so a caller can fix its request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from rag_service.core.errors import InvalidArgument

KEYWORD = "keyword"
KEYWORD_LIST = "keyword_list"
INTEGER = "integer"
FLOAT = "float"
DATE = "date"
BOOLEAN = "boolean"
TYPES = (KEYWORD, KEYWORD_LIST, INTEGER, FLOAT, DATE, BOOLEAN)

# Condition kinds.
MATCH = "match"  # values: one (kind, value) pair
ANY = "any"  # values: (kind, value) pairs, any may hold (IN)
RANGE = "range"  # bounds: (gt, gte, lt, lte) floats or None
DATE_RANGE = "date_range"  # bounds: (gt, gte, lt, lte) RFC 3339 strings or None
EMPTY = "empty"  # missing, null or []; `negate` makes it "exists"

# Value kinds of match / any, and the field types each fits.
VALUE_FITS = {
    "keyword": (KEYWORD, KEYWORD_LIST, DATE),
    "integer": (INTEGER, FLOAT),
    "number": (FLOAT, INTEGER),
    "boolean": (BOOLEAN,),
}


@dataclass(frozen=True)
class Condition:
    """One test of field `key`. Values carry their kind ("keyword", "integer", "number", "boolean") so that, in a
    cache key, keyword "1", integer 1 and boolean true stay three different requests."""

    path: str
    key: str
    kind: str
    values: tuple[tuple[str, str | int | float | bool], ...] = ()
    bounds: tuple[float | str | None, float | str | None, float | str | None, float | str | None] = (
        None, None, None, None)
    negate: bool = False


@dataclass(frozen=True)
class Tree:
    path: str
    must: tuple[Condition | Tree, ...] = ()
    should: tuple[Condition | Tree, ...] = ()
    must_not: tuple[Condition | Tree, ...] = ()
    min_should: int = 1


Node = Condition | Tree


def conditions(node: Node) -> list[Condition]:
    """Every condition of the tree, depth first."""
    if isinstance(node, Condition):
        return [node]
    return [c for child in (*node.must, *node.should, *node.must_not) for c in conditions(child)]


def keys(node: Node | None) -> set[str]:
    return set() if node is None else {c.key for c in conditions(node)}


# RFC 3339 full-date, or date-time with optional fraction and offset (none means UTC); 'T' or a space between.
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?([Zz]|[+-]\d{2}:\d{2})?")


def parse_date(text: str) -> int:
    """Microseconds since 1970-01-01 UTC of an RFC 3339 date or timestamp; ValueError when it is neither."""
    if not isinstance(text, str) or not (_DATE.fullmatch(text) or _TIMESTAMP.fullmatch(text)):
        raise ValueError(f"{text!r} is not an RFC 3339 date or timestamp (e.g. 2021-06-01 or 2021-06-01T12:00:00Z)")
    value = text.replace("t", "T").replace("z", "Z").replace(" ", "T")
    if "." in value:  # Python keeps microseconds: cut a longer fraction
        head, _, tail = value.partition(".")
        digits = re.match(r"\d+", tail)
        frac = digits.group(0) if digits else ""
        value = f"{head}.{frac[:6].ljust(6, '0')}{tail[len(frac):]}"
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a valid date: {e}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    delta = parsed - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def check(node: Node | None, schema: Mapping[str, str]) -> None:
    """Raises InvalidArgument at the first condition that does not fit `schema` (field name -> type): an unknown
    field, a value or range of the wrong kind, a date that does not parse."""
    if node is None:
        return
    for c in conditions(node):
        name = json.dumps(c.key, ensure_ascii=False)
        kind = schema.get(c.key)
        if kind is None:
            known = ", ".join(sorted(schema)) or "(none)"
            raise InvalidArgument(f"{c.path}.key", f"unknown metadata field {name}; known: {known}")
        where = f"{c.path}.{'exists' if c.kind == EMPTY and c.negate else 'is_empty' if c.kind == EMPTY else c.kind}"
        if c.kind in (MATCH, ANY):
            for value_kind, value in c.values:
                if kind not in VALUE_FITS[value_kind]:
                    raise InvalidArgument(where, f"field {name} is {kind}; a {value_kind} value does not fit it")
                if kind == DATE:
                    try:
                        parse_date(str(value))
                    except ValueError as e:
                        raise InvalidArgument(where, f"field {name} is date: {e}") from None
        elif c.kind == RANGE:
            if kind not in (INTEGER, FLOAT):
                hint = "; use date_range" if kind == DATE else ""
                raise InvalidArgument(where, f"field {name} is {kind}; range needs an integer or float field{hint}")
        elif c.kind == DATE_RANGE:
            if kind != DATE:
                raise InvalidArgument(where, f"field {name} is {kind}; date_range needs a date field")
            for bound in c.bounds:
                if bound is not None:
                    try:
                        parse_date(str(bound))
                    except ValueError as e:
                        raise InvalidArgument(where, f"field {name}: {e}") from None


def finite_bounds(bounds: tuple[float | None, ...], where: str) -> None:
    for name, bound in zip(("gt", "gte", "lt", "lte"), bounds):
        if bound is not None and not math.isfinite(bound):
            raise InvalidArgument(f"{where}.{name}", f"must be a finite number, got {bound}")
