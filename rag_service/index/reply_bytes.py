"""Each chunk's reply fields, serialized once: the static part of a `rag.v1.Context` message.

A reply context is doc_id, chunk_id, title, text and metadata (the same for every request that returns the chunk)
plus a few per-request fields (score, tokens, debug scores). Building a protobuf message per context per reply cost
about half of the server's own Python time on an exact cache hit (bench/README.md, "The floor"), so the static fields
of every chunk are encoded here once, when the server loads the index, into one bytes buffer with offsets. The server
then joins a reply from these slices and a few bytes of per-request fields (api/reply.py): a protobuf message may be
the concatenation of its fields' encodings, in any order.

The encoding is protobuf's wire format written by hand (varints and length-delimited fields); the field numbers are
those of protos/rag/v1/retrieval.proto, and tests/test_wire_bytes.py checks every encoding here parses to the message
the generated classes build field by field.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rag_service.core.errors import IndexFormatError
from rag_service.index.store import CHUNK_TEXT, DOC_ID, DOC_TITLE, DocStore

log = logging.getLogger(__name__)

LEN, FIXED32, VARINT = 2, 5, 0


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def _varint_slow(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"varint: {n} is negative; only unsigned fields are encoded here")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Lengths of reply contexts and of their fields are almost always below 2**14: two bytes at most, looked up.
_SMALL = [_varint_slow(n) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 16384 else _varint_slow(n)


def field_bytes(field_tag: bytes, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, message, map entry): tag, length, data."""
    return field_tag + varint(len(data)) + data


# rag.v1.Context: the static fields and its map entries (key = 1, value = 2).
DOC_ID_FIELD, CHUNK_ID, TITLE, TEXT, METADATA = (tag(n, LEN) for n in (1, 2, 3, 4, 5))
ENTRY_KEY, ENTRY_STRING_VALUE = tag(1, LEN), tag(2, LEN)


def string_field(field_tag: bytes, value: str) -> bytes:
    """proto3 leaves an empty string out; so does this."""
    return field_bytes(field_tag, value.encode("utf-8")) if value else b""


def string_map(field_tag: bytes, values: Mapping[str, str]) -> bytes:
    """A map<string, string> field: one length-delimited entry message per key."""
    return b"".join(field_bytes(field_tag, string_field(ENTRY_KEY, k) + string_field(ENTRY_STRING_VALUE, v))
                    for k, v in values.items())


class StaticFields(NamedTuple):
    doc_id: str
    chunk_id: str
    title: str
    text: str
    metadata: Mapping[str, str]


def static_bytes(fields: StaticFields) -> bytes:
    """doc_id, chunk_id, title, text and metadata of a Context, encoded."""
    return (string_field(DOC_ID_FIELD, fields.doc_id) + string_field(CHUNK_ID, fields.chunk_id)
            + string_field(TITLE, fields.title) + string_field(TEXT, fields.text)
            + string_map(METADATA, fields.metadata))


def _column(directory: Path, name: str) -> tuple[bytes, list[int]]:
    """A string column of the document store (index/store.py) as raw UTF-8 and offsets: the reply wants the bytes,
    so nothing is decoded."""
    offsets = np.load(directory / f"{name}_offsets.npy", mmap_mode="r").tolist()
    blob = (directory / f"{name}.bin").read_bytes()
    if len(blob) != offsets[-1]:
        raise IndexFormatError(f"{directory / name}.bin: {len(blob)} bytes but offsets end at {offsets[-1]}")
    return blob, offsets


def _raw_field(field_tag: bytes, data: bytes) -> bytes:
    return field_tag + varint(len(data)) + data if data else b""


class ContextBytes:
    """The static Context bytes of every chunk of one index: one buffer and n + 1 offsets (array('q'): indexing it
    gives a Python int without NumPy's scalar overhead). Read-only once built, so threads share it without a lock."""

    __slots__ = ("blob", "offsets", "n_chunks")

    def __init__(self, blob: bytes, offsets: array) -> None:
        if offsets.typecode != "q" or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(blob):
            raise ValueError(f"offsets: expected int64 from 0 to the buffer's {len(blob)} bytes")
        self.blob = blob
        self.offsets = offsets
        self.n_chunks = len(offsets) - 1

    @classmethod
    def from_fields(cls, chunks: Iterable[StaticFields]) -> ContextBytes:
        parts = [static_bytes(f) for f in chunks]
        offsets = array("q", [0])
        end = 0
        for p in parts:
            end += len(p)
            offsets.append(end)
        return cls(b"".join(parts), offsets)

    @classmethod
    def for_store(cls, store: DocStore) -> ContextBytes:
        """Every chunk of `store`, with the fields exactly as the searcher's reply takes them (Pipeline.read_chunk;
        tests/test_wire_bytes.py compares the two on every chunk of an index)."""
        started = time.perf_counter()
        directory = store.path
        text, text_at = _column(directory, CHUNK_TEXT)
        ids, ids_at = _column(directory, DOC_ID)
        titles, titles_at = _column(directory, DOC_TITLE)
        # A document's fields are shared by its chunks: encoded once per document.
        heads = [_raw_field(DOC_ID_FIELD, ids[ids_at[d]:ids_at[d + 1]])
                 + _raw_field(TITLE, titles[titles_at[d]:titles_at[d + 1]])
                 + string_map(METADATA, store.doc_metadata(d)) for d in range(store.n_docs)]
        parts = []
        for i, (d, no) in enumerate(zip(store.chunk_docs.tolist(), store.chunk_nos.tolist(), strict=True)):
            # chunk_id is "<doc_id>#<n>" (index/chunking.py), written from the doc id's bytes.
            parts.append(heads[d] + _raw_field(CHUNK_ID, b"%s#%d" % (ids[ids_at[d]:ids_at[d + 1]], no))
                         + _raw_field(TEXT, text[text_at[i]:text_at[i + 1]]))
        offsets = array("q", [0])
        end = 0
        for p in parts:
            end += len(p)
            offsets.append(end)
        table = cls(b"".join(parts), offsets)
        log.info("reply bytes of %d chunks prepared in %.2f s (%.1f MB)", table.n_chunks,
                 time.perf_counter() - started, table.nbytes / 1e6)
        return table

    @property
    def nbytes(self) -> int:
        return len(self.blob) + self.offsets.itemsize * len(self.offsets)

    def __getitem__(self, chunk: int) -> bytes:
        offsets = self.offsets
        return self.blob[offsets[chunk]:offsets[chunk + 1]]
