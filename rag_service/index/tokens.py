"""Model tokens per chunk (`chunk_tokens.npy`): every reply reports its contexts' token counts, so they are counted
once, at build time, rather than per request.

The count is the query encoder's `count_tokens` of the chunk's stored text (`DocStore.chunk_text`): the index's
model is the query encoder's model (checked at load), so the index's tokenizer gives the counts a reply reports.
An index built before the file existed gets its counts once, when a searcher is built over it (`Index.token_counts`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from rag_service.core.errors import IndexFormatError

log = logging.getLogger(__name__)

TOKENS_FILE = "chunk_tokens.npy"
# Texts per tokenizer batch call: bounds the memory of the encodings while keeping every core busy.
_BATCH = 4096


class TokenCounter(Protocol):
    def count_tokens(self, text: str) -> int: ...


class ChunkTexts(Protocol):
    """A store's stored chunk texts (DocStore)."""

    def chunk_text(self, i: int) -> str: ...


def count_texts(texts: Sequence[str], counter: TokenCounter) -> np.ndarray:
    """int32 count_tokens of every text; through the counter's `count_tokens_batch` where it has one (all encoders
    do, and a wrapper that forwards attributes to one), else one call per text."""
    batch = getattr(counter, "count_tokens_batch", None)
    if batch is None:
        return np.fromiter((counter.count_tokens(t) for t in texts), dtype=np.int32, count=len(texts))
    out = np.empty(len(texts), np.int32)
    for start in range(0, len(texts), _BATCH):
        part = texts[start : start + _BATCH]
        out[start : start + len(part)] = batch(part)
    return out


def count_chunks(store: ChunkTexts, n_chunks: int, counter: TokenCounter) -> np.ndarray:
    """Counts of the stored texts of chunks 0..n_chunks-1."""
    out = np.empty(n_chunks, np.int32)
    for start in range(0, n_chunks, _BATCH):
        stop = min(start + _BATCH, n_chunks)
        out[start:stop] = count_texts([store.chunk_text(i) for i in range(start, stop)], counter)
    return out


def write_tokens(directory: Path, counts: np.ndarray) -> Path:
    path = Path(directory) / TOKENS_FILE
    np.save(path, np.ascontiguousarray(counts, dtype=np.int32))
    return path


def load_tokens(directory: Path, n_chunks: int) -> np.ndarray:
    """The memory-mapped counts; IndexFormatError when the file does not hold one int32 per chunk."""
    path = Path(directory) / TOKENS_FILE
    try:
        counts = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{path}: unreadable: {e}") from e
    if counts.dtype != np.int32 or counts.shape != (n_chunks,):
        raise IndexFormatError(f"{path}: expected int32 of shape ({n_chunks},), got {counts.dtype} {counts.shape}")
    # A plain ndarray view of the mapping: np.memmap would leak its subclass into every result computed from it.
    return np.asarray(counts)


def count_at_load(directory: Path, store: ChunkTexts, n_chunks: int, counter: TokenCounter) -> np.ndarray:
    """The counts of an index without TOKENS_FILE, counted now, with a log line saying so and what it cost."""
    started = time.perf_counter()
    counts = count_chunks(store, n_chunks, counter)
    log.warning("index %s has no %s (built before token counts were stored): counted %d chunks' tokens at load in "
                "%.3fs; rebuild it with rag-index build to skip this", directory, TOKENS_FILE, n_chunks,
                time.perf_counter() - started)
    return counts
