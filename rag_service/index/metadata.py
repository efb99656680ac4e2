"""Typed metadata: each field's type (inferred from the corpus' JSON values or declared in a schema file), typed
columns written beside the document store, and the structured filter (core/filter.py) evaluated over them as a mask.

Types (core.filter.TYPES): keyword (strings; a field of mixed JSON types is keyword, compared by its text),
keyword_list (a list of scalars: a condition holds when some element fits), integer, float, date (RFC 3339 strings,
stored as microseconds since the epoch, UTC), boolean. A value that is missing, null or an empty list is "empty".

Columns, one set per field k (listed in meta_fields.json with the field's type; memory-mapped at load):
    meta_codes_<k>.npy     int32 per chunk: the keyword code (also what the equality `filters` map compares)
    meta_present_<k>.npy   bool per chunk: the field is not empty
    meta_values_<k>.npy    per chunk: int64 (integer, date in µs), float64 (float) or bool (boolean)
    meta_list_docs_<k>.npy int32 per list element: its document (keyword_list, elements in document order)
    meta_list_codes_<k>.npy int32 per list element: index into the field's `elements`

Every condition is a vectorised compare over a column (a keyword list's over its elements, then gathered to chunks),
combined with boolean ops: no Python loop over documents. An index written before types existed lists no types:
its fields load as keyword, with "empty" meaning absent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.core import filter as flt
from rag_service.core.errors import BuildError, IndexFormatError
from rag_service.index.chunking import Document


def value_text(value: Any) -> str:
    """How a metadata value compares as a keyword: strings as they are, anything else as its JSON text."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, list) and not value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_date(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        flt.parse_date(value)
    except ValueError:
        return False
    return True


def infer_type(values: Sequence[Any]) -> str:
    """The narrowest type every non-empty value fits (keyword when they disagree)."""
    present = [v for v in values if not _is_empty(v)]
    if present and all(isinstance(v, list) for v in present):
        return flt.KEYWORD_LIST if all(not isinstance(e, (list, dict)) for v in present for e in v) \
            else flt.KEYWORD
    if not present or any(isinstance(v, (list, dict)) for v in present):
        return flt.KEYWORD
    if all(isinstance(v, bool) for v in present):
        return flt.BOOLEAN
    if all(_is_int(v) for v in present):
        return flt.INTEGER
    if all(_is_int(v) or isinstance(v, float) for v in present):
        return flt.FLOAT
    if all(_is_date(v) for v in present):
        return flt.DATE
    return flt.KEYWORD


def read_schema_file(path: Path | str) -> dict[str, str]:
    """A schema file: a JSON object, field name -> type (keyword, keyword_list, integer, float, date, boolean)."""
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"{path}: cannot read the metadata schema: {e}") from e
    if not isinstance(body, dict):
        raise BuildError(f"{path}: the metadata schema must be a JSON object of field name -> type")
    return check_schema(body, str(path))


def check_schema(schema: Mapping[str, Any], where: str = "metadata schema") -> dict[str, str]:
    for name, kind in schema.items():
        if not name or kind not in flt.TYPES:
            raise BuildError(f"{where}: field {name!r}: type must be one of {', '.join(flt.TYPES)}, got {kind!r}")
    return {str(k): str(v) for k, v in schema.items()}


def resolve_schema(docs: Sequence[Document], declared: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every field's type: declared ones as declared (each value checked to fit), the rest inferred."""
    declared = check_schema(declared or {})
    values: dict[str, list[Any]] = {}
    for d in docs:
        for key, value in d.metadata.items():
            values.setdefault(key, []).append(value)
    schema = {name: declared.get(name) or infer_type(vals) for name, vals in values.items()}
    for name, kind in declared.items():
        schema.setdefault(name, kind)
        if name in values:
            for d in docs:
                if name in d.metadata and not _fits(d.metadata[name], kind):
                    raise BuildError(f"document {d.id!r}: metadata field {name!r} = {d.metadata[name]!r} is not "
                                     f"a {kind} value (declared in the metadata schema)")
    return dict(sorted(schema.items()))


def tenant_key_problem(key: str, schema: Mapping[str, str]) -> str | None:
    """Why field `key` cannot be a tenant key under `schema` (it must be a keyword field), or None when it can."""
    kind = schema.get(key)
    if kind is None:
        known = ", ".join(sorted(schema)) or "(none)"
        return f"tenant key {key!r} is not a metadata field of the corpus; fields: {known}"
    if kind != flt.KEYWORD:
        return (f"tenant key {key!r} is a {kind} field; it must be keyword (one string per document; declare it "
                f"keyword in --metadata-schema when its values are numbers)")
    return None


def check_tenant_key(key: str, docs: Sequence[Document], schema: Mapping[str, str]) -> None:
    """A build's tenant key: a keyword field every document has a value for (a passage without a tenant would be
    searchable by none)."""
    problem = tenant_key_problem(key, schema)
    if problem is not None:
        raise BuildError(problem)
    for d in docs:
        if _is_empty(d.metadata.get(key)):
            raise BuildError(f"document {d.id!r}: no value for the tenant key {key!r}; every document needs one")


def _fits(value: Any, kind: str) -> bool:
    if _is_empty(value) or kind == flt.KEYWORD:
        return True
    if kind == flt.KEYWORD_LIST:
        items = value if isinstance(value, list) else [value]
        return all(not isinstance(e, (list, dict)) for e in items)
    if kind == flt.INTEGER:
        return _is_int(value)
    if kind == flt.FLOAT:
        return _is_int(value) or isinstance(value, float)
    if kind == flt.DATE:
        return _is_date(value)
    return isinstance(value, bool)


# Writing ----------------------------------------------------------------------------------------------------------


def write_columns(directory: Path, docs: Sequence[Document], chunk_doc: np.ndarray,
                  schema: Mapping[str, str]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Writes every field's columns; returns the meta_fields.json entries and the files written."""
    entries: list[dict[str, Any]] = []
    files: list[Path] = []
    n_chunks = len(chunk_doc)

    def save(name: str, arr: np.ndarray) -> str:
        np.save(directory / name, arr)
        files.append(directory / name)
        return name

    def per_chunk(doc_values: np.ndarray) -> np.ndarray:
        return doc_values[chunk_doc] if n_chunks else np.zeros(0, doc_values.dtype)

    for k, field in enumerate(sorted(schema)):
        kind = schema[field]
        codes_of: dict[str, int] = {}
        doc_codes = np.full(len(docs), -1, dtype=np.int32)
        present = np.zeros(len(docs), dtype=np.bool_)
        for i, d in enumerate(docs):
            if field in d.metadata:
                value = d.metadata[field]
                doc_codes[i] = codes_of.setdefault(value_text(value), len(codes_of))
                present[i] = not _is_empty(value)
        distinct = len({value_text(d.metadata[field]) for i, d in enumerate(docs) if present[i]})
        entry: dict[str, Any] = {"name": field, "type": kind, "values": list(codes_of), "distinct": distinct,
                                 "codes": save(f"meta_codes_{k}.npy", per_chunk(doc_codes)),
                                 "present": save(f"meta_present_{k}.npy", per_chunk(present))}
        if kind == flt.KEYWORD_LIST:
            elements: dict[str, int] = {}
            list_docs: list[int] = []
            list_codes: list[int] = []
            for i, d in enumerate(docs):
                value = d.metadata.get(field)
                if _is_empty(value):
                    continue
                for e in value if isinstance(value, list) else [value]:
                    list_docs.append(i)
                    list_codes.append(elements.setdefault(value_text(e), len(elements)))
            entry["elements"] = list(elements)
            entry["list_docs"] = save(f"meta_list_docs_{k}.npy", np.asarray(list_docs, dtype=np.int32))
            entry["list_codes"] = save(f"meta_list_codes_{k}.npy", np.asarray(list_codes, dtype=np.int32))
        elif kind in (flt.INTEGER, flt.FLOAT, flt.DATE, flt.BOOLEAN):
            dtype = {flt.INTEGER: np.int64, flt.FLOAT: np.float64, flt.DATE: np.int64, flt.BOOLEAN: np.bool_}[kind]
            doc_values: np.ndarray = np.zeros(len(docs), dtype=dtype)
            for i, d in enumerate(docs):
                if present[i]:
                    value = d.metadata[field]
                    doc_values[i] = flt.parse_date(value) if kind == flt.DATE else value
            entry["column"] = save(f"meta_values_{k}.npy", per_chunk(doc_values))
        entries.append(entry)
    return entries, files


# Reading and evaluating -------------------------------------------------------------------------------------------


def _mapped(path: Path) -> np.ndarray:
    return np.asarray(np.load(path, mmap_mode="r"))


class Field:
    """One field's columns, read-only after load (shareable between threads)."""

    def __init__(self, directory: Path, entry: Mapping[str, Any], codes: np.ndarray, n_docs: int) -> None:
        self.name: str = entry["name"]
        # An index from before typed metadata: keyword, empty = absent.
        self.type: str = entry.get("type", flt.KEYWORD)
        if self.type not in flt.TYPES:
            raise IndexFormatError(f"{directory}: metadata field {self.name!r} has unknown type {self.type!r}")
        self.codes = codes
        self.values: list[str] = list(entry["values"])
        self._distinct = int(entry.get("distinct", len(self.values)))
        self.value_codes = {v: i for i, v in enumerate(self.values)}
        self.present = _mapped(directory / entry["present"]) if "present" in entry else codes >= 0
        self.column: np.ndarray | None = _mapped(directory / entry["column"]) if "column" in entry else None
        self.elements: list[str] = list(entry.get("elements", []))
        self.element_codes = {v: i for i, v in enumerate(self.elements)}
        self.list_docs: np.ndarray | None = None
        self.list_codes: np.ndarray | None = None
        if self.type == flt.KEYWORD_LIST:
            self.list_docs = _mapped(directory / entry["list_docs"])
            self.list_codes = _mapped(directory / entry["list_codes"])
            if len(self.list_docs) != len(self.list_codes) or (len(self.list_docs) and (
                    int(self.list_docs.max()) >= n_docs or int(self.list_docs.min()) < 0)):
                raise IndexFormatError(f"{directory}: metadata field {self.name!r}: list columns disagree")
        elif self.type != flt.KEYWORD and self.column is None:
            raise IndexFormatError(f"{directory}: metadata field {self.name!r} ({self.type}) has no value column")
        for what, arr in (("present", self.present), ("values", self.column)):
            if arr is not None and len(arr) != len(codes):
                raise IndexFormatError(f"{directory}: metadata field {self.name!r}: {what} has {len(arr)} entries "
                                       f"for {len(codes)} chunks")

    @property
    def distinct_values(self) -> int:
        if self.type == flt.KEYWORD_LIST:
            return len(self.elements)
        return self._distinct if self.type == flt.KEYWORD else 0


class FilterEvaluator:
    """Evaluates a filter tree to a bool mask over chunks; `chunk_docs` maps chunks to documents (keyword lists are
    held per document)."""

    def __init__(self, fields: Mapping[str, Field], chunk_docs: np.ndarray, n_docs: int) -> None:
        self.fields = fields
        self.chunk_docs = chunk_docs
        self.n_docs = n_docs
        self.n = len(chunk_docs)

    def mask(self, node: flt.Node) -> np.ndarray:
        if isinstance(node, flt.Condition):
            return self._condition(node)
        out = np.ones(self.n, dtype=np.bool_)
        for child in node.must:
            out &= self.mask(child)
        if node.should:
            if node.min_should <= 1:
                hit = np.zeros(self.n, dtype=np.bool_)
                for child in node.should:
                    hit |= self.mask(child)
            else:
                count = np.zeros(self.n, dtype=np.int32)
                for child in node.should:
                    count += self.mask(child)
                hit = count >= node.min_should
            out &= hit
        for child in node.must_not:
            out &= ~self.mask(child)
        return out

    def _condition(self, c: flt.Condition) -> np.ndarray:
        f = self.fields.get(c.key)
        if f is None:  # a field this index lacks (see DocStore.filter_mask): empty everywhere
            return np.full(self.n, c.kind == flt.EMPTY and not c.negate, dtype=np.bool_)
        if c.kind == flt.EMPTY:
            return np.array(f.present, dtype=np.bool_, copy=True) if c.negate else ~f.present
        if c.kind in (flt.MATCH, flt.ANY):
            return self._match(f, [v for _, v in c.values])
        lo, lo_open, hi, hi_open = self._bounds(c)
        column = f.column
        if column is None:  # check() admits ranges on typed fields only
            raise ValueError(f"{c.path}: field {c.key!r} has no value column")
        out = np.array(f.present, dtype=np.bool_, copy=True)
        if lo is not None:
            out &= (column > lo) if lo_open else (column >= lo)
        if hi is not None:
            out &= (column < hi) if hi_open else (column <= hi)
        return out

    @staticmethod
    def _bounds(c: flt.Condition) -> tuple[Any, bool, Any, bool]:
        """The tighter lower and upper bound, each with whether it is strict."""
        gt, gte, lt, lte = (None if b is None else flt.parse_date(str(b)) if c.kind == flt.DATE_RANGE else float(b)
                            for b in c.bounds)
        lo, lo_open = (gt, True) if gt is not None and (gte is None or gt >= gte) else (gte, False)
        hi, hi_open = (lt, True) if lt is not None and (lte is None or lt <= lte) else (lte, False)
        return lo, lo_open, hi, hi_open

    def _match(self, f: Field, values: list[Any]) -> np.ndarray:
        if not values:
            return np.zeros(self.n, dtype=np.bool_)
        if f.type == flt.KEYWORD_LIST:
            wanted = [f.element_codes[v] for v in map(str, values) if v in f.element_codes]
            if not wanted or f.list_docs is None or f.list_codes is None:
                return np.zeros(self.n, dtype=np.bool_)
            hit = np.zeros(self.n_docs, dtype=np.bool_)
            elements = f.list_codes == wanted[0] if len(wanted) == 1 else np.isin(f.list_codes, wanted)
            hit[f.list_docs[elements]] = True
            return hit[self.chunk_docs]
        if f.type == flt.KEYWORD:
            wanted = [f.value_codes[v] for v in map(str, values) if v in f.value_codes]
            if not wanted:
                return np.zeros(self.n, dtype=np.bool_)
            out = f.codes == wanted[0] if len(wanted) == 1 else np.isin(f.codes, wanted)
            return out & f.present
        column = f.column
        if column is None:
            raise ValueError(f"field {f.name!r} has no value column")
        if f.type == flt.DATE:
            values = [flt.parse_date(str(v)) for v in values]
        elif f.type == flt.INTEGER:  # a number that is not a whole one equals no integer
            values = [int(v) for v in values if float(v).is_integer()]
            if not values:
                return np.zeros(self.n, dtype=np.bool_)
        out = column == values[0] if len(values) == 1 else np.isin(column, np.asarray(values, dtype=column.dtype))
        return out & f.present
