"""Dates in document metadata, as Unix seconds per chunk: what a recency decay (search/shape.py) reads.

The store keeps each metadata field as a code per chunk into the field's distinct values (index/store.py), so a
field's values are parsed once each and spread to the chunks by one NumPy take. Accepted values: RFC 3339 / ISO 8601
strings ("2024-05-01", "2024-05-01T12:30:00Z", "2024-05-01T12:30:00+02:00"; a time without a zone is UTC) and numbers
(Unix seconds, the JSON text of a number). This is the one place that knows how dates are stored: a typed date column
built at index time can replace it behind `DateColumns.column`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import numpy as np

from rag_service.core.errors import InvalidArgument


def parse_date(value: str) -> float:
    """Unix seconds of one metadata value; NaN when it is not a date."""
    text = value.strip()
    if not text:
        return math.nan
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) else math.nan
    if len(text) >= 2 and text[0] == text[-1] == '"':  # a JSON string inside a list or object value
        text = text[1:-1]
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        return math.nan
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_dates(values: Sequence[str]) -> np.ndarray:
    """float64 Unix seconds per value, NaN where a value is not a date."""
    return np.fromiter((parse_date(v) for v in values), dtype=np.float64, count=len(values))


class DateColumns:
    """The date fields of one index: per chunk Unix seconds (NaN: the document has no date), parsed at load.

    A field is a date field when every value it takes parses; other fields are refused by name."""

    def __init__(self, codes: Mapping[str, np.ndarray], values: Mapping[str, Sequence[str]]) -> None:
        self._columns: dict[str, np.ndarray] = {}
        self._fields = frozenset(codes)
        for name, field_codes in codes.items():
            parsed = parse_dates(values[name])
            if len(parsed) == 0 or np.isnan(parsed).any():
                continue
            # Code -1 (the document lacks the field) reads the NaN appended at the end.
            table = np.append(parsed, np.nan)
            self._columns[name] = table[np.where(field_codes < 0, len(parsed), field_codes)]

    @classmethod
    def of(cls, store) -> DateColumns:
        """The date fields of a DocStore (index/store.py)."""
        return cls(store.field_codes(), store.field_values())

    @property
    def fields(self) -> list[str]:
        return sorted(self._columns)

    def column(self, name: str, where: str = "decay.field") -> np.ndarray:
        """float64 per chunk; InvalidArgument naming `where` for an unknown field or one that does not hold dates."""
        column = self._columns.get(name)
        if column is None:
            if name not in self._fields:
                known = ", ".join(sorted(self._fields)) or "(none)"
                raise InvalidArgument(where, f"unknown metadata field {name!r}; known: {known}")
            dated = ", ".join(self.fields) or "(none)"
            raise InvalidArgument(where, f"metadata field {name!r} does not hold dates (RFC 3339 or Unix seconds) in "
                                  f"every document that has it; date fields: {dated}")
        return column
