"""Sentence windows and analysed token streams per chunk: what the reranker reads at query time.

MiniLM was trained on sentence pairs, so a short window matches a query better than the whole chunk does (SciFact
prototype: window MaxSim 0.701 nDCG@10 alone against 0.648 for one vector per document). Each chunk gets its title as
one window plus every run of `window_sentences` consecutive sentences (stride one sentence), each with its own vector
stored int8 with one scale per row. The vector is either the window's text embedded on its own (pooling "encode", a
second encoder pass over the corpus) or the mean of the chunk pass's token vectors over the window's tokens (pooling
"chunk", no second pass; the window read in its chunk's context). params["pooling"] says which; an index without the
key was built with "encode".

The analysed token stream (BM25 term ids, the same analyser and vocabulary as the BM25 index) lets the reranker
compute term proximity, BM25 over the title and BM25 over each window without touching the text.

Files (CSR: rows of chunk i are [offsets[i], offsets[i + 1])):
    windows_offsets.npy      int64 (chunks + 1)     windows per chunk
    windows_vectors.npy      int8 (windows, dim)    value = int8 * scale, L2-normalised before quantisation
    windows_scales.npy       float32 (windows)
    windows_token_spans.npy  int32 (windows, 2)     [start, end) of the window in its chunk's token stream
    tokens_offsets.npy       int64 (chunks + 1)
    tokens_title.npy         int32 (chunks)         how many of a chunk's tokens (the first ones) are its title's
    tokens.npy               int32 (tokens)         BM25 term id of every analysed token of "title text"
    windows.json             parameters and counts
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rag_service.core.errors import IndexFormatError
from rag_service.retrievers.analysis import Analyzer

WINDOW_OFFSETS_FILE = "windows_offsets.npy"
WINDOW_VECTORS_FILE = "windows_vectors.npy"
WINDOW_SCALES_FILE = "windows_scales.npy"
WINDOW_SPANS_FILE = "windows_token_spans.npy"
TOKEN_OFFSETS_FILE = "tokens_offsets.npy"
TOKENS_FILE = "tokens.npy"
TITLE_LENGTHS_FILE = "tokens_title.npy"
PARAMS_FILE = "windows.json"
FILES = (WINDOW_OFFSETS_FILE, WINDOW_VECTORS_FILE, WINDOW_SCALES_FILE, WINDOW_SPANS_FILE, TOKEN_OFFSETS_FILE,
         TOKENS_FILE, TITLE_LENGTHS_FILE, PARAMS_FILE)

DEFAULT_WINDOW_SENTENCES = 2
STORAGE = "int8-rowscale"

# A sentence ends at . ! or ? followed by white space and something that can start a sentence. A regex rather than a
# trained segmenter: windows only need to be short and roughly sentence-shaped, and this runs at 45k windows a second
# where pysbd/nltk would add a dependency and minutes of build time for no measured gain.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
# Lower-cased corpora (Cranfield: "... a slipstream . an experimental study ...") have no capital to look for: there a
# stop followed by white space ends a sentence, except after a single letter ("e.g. ", "u. s.").
_SENTENCE_END_LOWER = re.compile(r"(?<=[.!?])(?<![^\w]\w[.!?])[\"')\]]*\s+(?=\S)")
_UPPER = re.compile(r"[A-Z]")


class DocumentEncoder(Protocol):
    dim: int

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


def _has_upper(text: str) -> bool:
    """any(c.isupper() for c in text), without a Python-level loop over the characters of an all-lower-case text
    (str.islower() is True only when no character is upper case; it was 46% of the windows stage on such text)."""
    if text.islower():
        return False
    return _UPPER.search(text) is not None if text.isascii() else any(c.isupper() for c in text)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text`; together with the white space between them they cover
    the text, so analysing each sentence yields exactly the tokens of the whole text, in order."""
    spans = []
    start = 0
    pattern = _SENTENCE_END if _has_upper(text) else _SENTENCE_END_LOWER
    for m in pattern.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def sentence_windows(n_sentences: int, size: int) -> list[tuple[int, int]]:
    """Runs of `size` consecutive sentences with stride one, as [first, last + 1); one run when there are fewer."""
    if n_sentences == 0:
        return []
    if n_sentences <= size:
        return [(0, n_sentences)]
    return [(i, i + size) for i in range(n_sentences - size + 1)]


@dataclass
class ChunkWindows:
    """Windows of one chunk: texts (title first when there is one) and their spans in the chunk's token stream."""

    texts: list[str]
    token_spans: list[tuple[int, int]]
    tokens: list[str]
    title_length: int
    # [start, end) of each window in the encoder's text of the chunk (chunking.dense_text(title, text)).
    dense_spans: list[tuple[int, int]]


def chunk_windows(analyzer: Analyzer, title: str, text: str, size: int = DEFAULT_WINDOW_SENTENCES) -> ChunkWindows:
    """The windows of a chunk and its analysed tokens (those of chunking.lexical_text(title, text): title first)."""
    title_tokens = analyzer.tokens(title) if title else []
    tokens = list(title_tokens)
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    dense: list[tuple[int, int]] = []
    # The body's offset in dense_text(title, text) = "title. text" (just the text without a title).
    body = len(title) + 2 if title and text else 0
    if title.strip():
        texts.append(title)
        spans.append((0, len(title_tokens)))
        dense.append((0, len(title)))
    sentences = split_sentences(text)
    starts = []  # token position where each sentence begins
    for start, end in sentences:
        starts.append(len(tokens))
        tokens.extend(analyzer.tokens(text[start:end]))
    starts.append(len(tokens))
    for first, last in sentence_windows(len(sentences), size):
        texts.append(text[sentences[first][0]:sentences[last - 1][1]])
        spans.append((starts[first], starts[last]))
        dense.append((body + sentences[first][0], body + sentences[last - 1][1]))
    return ChunkWindows(texts=texts, token_spans=spans, tokens=tokens, title_length=len(title_tokens),
                        dense_spans=dense)


def quantize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows -> (int8 rows, float32 scale per row) with value ~= int8 * scale; symmetric, max |v| -> 127."""
    vectors = np.asarray(vectors, dtype=np.float32)
    peak = np.abs(vectors).max(axis=1) if len(vectors) else np.zeros(0, np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8)
    return q, scales


@dataclass
class WindowData:
    """Windows and token streams of every chunk, in chunk id order, as written to and read from an index."""

    window_offsets: np.ndarray
    vectors: np.ndarray
    scales: np.ndarray
    window_spans: np.ndarray
    token_offsets: np.ndarray
    tokens: np.ndarray
    title_lengths: np.ndarray
    params: dict[str, Any]

    @property
    def n_chunks(self) -> int:
        return len(self.window_offsets) - 1

    @property
    def n_windows(self) -> int:
        return len(self.vectors)

    @property
    def pooling(self) -> str:
        """How the window vectors were made (POOLINGS); indexes built before the choice existed embedded each
        window's text."""
        return str(self.params.get("pooling", "encode"))

    def write(self, directory: Path) -> list[Path]:
        directory = Path(directory)
        arrays = {WINDOW_OFFSETS_FILE: self.window_offsets, WINDOW_VECTORS_FILE: self.vectors,
                  WINDOW_SCALES_FILE: self.scales, WINDOW_SPANS_FILE: self.window_spans,
                  TOKEN_OFFSETS_FILE: self.token_offsets, TOKENS_FILE: self.tokens,
                  TITLE_LENGTHS_FILE: self.title_lengths}
        for name, array in arrays.items():
            np.save(directory / name, np.ascontiguousarray(array))
        with open(directory / PARAMS_FILE, "w", encoding="utf-8") as f:
            json.dump(self.params, f, indent=2)
            f.write("\n")
        return [directory / name for name in FILES]

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.window_offsets, self.vectors, self.scales, self.window_spans,
                                          self.token_offsets, self.tokens, self.title_lengths)))

    @classmethod
    def load(cls, directory: Path | str, *, n_chunks: int, dim: int) -> WindowData:
        """Memory-maps the files and checks dtypes, shapes and that the CSR offsets are consistent; IndexFormatError
        names the file otherwise."""
        directory = Path(directory)
        try:
            with open(directory / PARAMS_FILE, encoding="utf-8") as f:
                params = json.load(f)
            arrays = {name: np.load(directory / name, mmap_mode="r") for name in FILES if name.endswith(".npy")}
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{directory}: cannot read windows: {e}") from e
        expected = {WINDOW_OFFSETS_FILE: (np.int64, 1), WINDOW_VECTORS_FILE: (np.int8, 2),
                    WINDOW_SCALES_FILE: (np.float32, 1), WINDOW_SPANS_FILE: (np.int32, 2),
                    TOKEN_OFFSETS_FILE: (np.int64, 1), TOKENS_FILE: (np.int32, 1),
                    TITLE_LENGTHS_FILE: (np.int32, 1)}
        for name, (dtype, ndim) in expected.items():
            arr = arrays[name]
            if arr.dtype != dtype or arr.ndim != ndim:
                raise IndexFormatError(f"{directory / name}: expected {ndim}-d {np.dtype(dtype)}, got {arr.ndim}-d "
                                       f"{arr.dtype}")
        w_off, vectors, scales, spans = (np.asarray(arrays[n]) for n in FILES[:4])
        t_off, tokens = np.asarray(arrays[TOKEN_OFFSETS_FILE]), np.asarray(arrays[TOKENS_FILE])
        title_lengths = np.asarray(arrays[TITLE_LENGTHS_FILE])
        problems = []
        if len(w_off) != n_chunks + 1 or len(t_off) != n_chunks + 1:
            problems.append(f"offsets cover {len(w_off) - 1} / {len(t_off) - 1} chunks, the index has {n_chunks}")
        elif len(title_lengths) != n_chunks or np.any(title_lengths > np.diff(t_off)) or np.any(title_lengths < 0):
            problems.append(f"{TITLE_LENGTHS_FILE} does not fit the token streams")
        for name, off, total in ((WINDOW_OFFSETS_FILE, w_off, len(vectors)), (TOKEN_OFFSETS_FILE, t_off, len(tokens))):
            if len(off) and (off[0] != 0 or off[-1] != total or np.any(np.diff(off) < 0)):
                problems.append(f"{name} is not a valid CSR index over {total} rows")
        if vectors.shape[1:] != (dim,) or len(scales) != len(vectors) or spans.shape != (len(vectors), 2):
            problems.append(f"window arrays disagree: vectors {vectors.shape}, scales {scales.shape}, spans "
                            f"{spans.shape}, index dim {dim}")
        if not problems and len(spans):
            # The reranker's kernels index the token streams with these spans: out-of-range ones must not load.
            stream = np.repeat(np.diff(t_off), np.diff(w_off))
            if np.any(spans[:, 0] < 0) or np.any(spans[:, 1] < spans[:, 0]) or np.any(spans[:, 1] > stream):
                problems.append(f"{WINDOW_SPANS_FILE} has spans outside their chunk's token stream")
        if problems:
            raise IndexFormatError(f"{directory}: windows: " + "; ".join(problems))
        return cls(window_offsets=w_off, vectors=vectors, scales=scales, window_spans=spans, token_offsets=t_off,
                   tokens=tokens, title_lengths=title_lengths, params=params)


# Unique windows embedded per call above this many: a 1M-passage corpus has about 2.2M distinct windows, whose float32
# vectors (3.4 GB) would otherwise all be held at once before quantisation to int8. Smaller corpora (every test,
# SciFact) are embedded in one call.
EMBED_BLOCK = 262_144


def _embed_quantized(encoder: DocumentEncoder, texts: list[str], batch_size: int,
                     progress: bool) -> tuple[np.ndarray, np.ndarray]:
    if len(texts) <= EMBED_BLOCK:
        return quantize_rows(encoder.encode_documents(texts, batch_size=batch_size, progress=progress))
    q = np.empty((len(texts), int(encoder.dim)), dtype=np.int8)
    scales = np.empty(len(texts), dtype=np.float32)
    for start in range(0, len(texts), EMBED_BLOCK):
        block = texts[start : start + EMBED_BLOCK]
        q[start : start + len(block)], scales[start : start + len(block)] = quantize_rows(
            encoder.encode_documents(block, batch_size=batch_size, progress=progress))
    return q, scales


# How window vectors are made (WindowData.params["pooling"]): "encode" embeds each window's text on its own, a second
# pass over the corpus' text; "chunk" mean-pools the chunk pass's token vectors over each window's tokens, no second
# pass (bench/README.md "Build at the limit"). An index without the key was built with "encode".
POOLINGS = ("encode", "chunk")
DEFAULT_POOLING = "chunk"


@dataclass
class WindowPlan:
    """Every chunk's windows and token streams, before any window is embedded."""

    window_offsets: np.ndarray
    window_spans: list[tuple[int, int]]
    token_offsets: np.ndarray
    tokens: np.ndarray
    title_lengths: np.ndarray
    texts: list[str]  # per window row
    dense_spans: list[np.ndarray]  # per chunk: int64 (windows, 2) character spans in its dense_text

    @property
    def n_windows(self) -> int:
        return len(self.texts)


def plan_windows(titles: Sequence[str], texts: Sequence[str], analyzer: Analyzer, vocab: Mapping[str, int],
                 window_sentences: int = DEFAULT_WINDOW_SENTENCES) -> WindowPlan:
    """Windows of every chunk (titles[i], texts[i]) and the chunks' token streams mapped to `vocab` (-1 for a token
    the vocabulary lacks, which cannot happen when vocab was built from the same chunks)."""
    if window_sentences < 1:
        raise ValueError(f"window_sentences must be >= 1, got {window_sentences}")
    if len(titles) != len(texts):
        raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
    window_texts: list[str] = []
    spans: list[tuple[int, int]] = []
    dense: list[np.ndarray] = []
    w_off = np.zeros(len(texts) + 1, dtype=np.int64)
    t_off = np.zeros(len(texts) + 1, dtype=np.int64)
    token_ids: list[np.ndarray] = []
    title_lengths = np.zeros(len(texts), dtype=np.int32)
    for i, (title, text) in enumerate(zip(titles, texts)):
        cw = chunk_windows(analyzer, title, text, window_sentences)
        window_texts.extend(cw.texts)
        spans.extend(cw.token_spans)
        dense.append(np.asarray(cw.dense_spans, dtype=np.int64).reshape(-1, 2))
        w_off[i + 1] = w_off[i] + len(cw.texts)
        ids = np.fromiter((vocab.get(t, -1) for t in cw.tokens), dtype=np.int32, count=len(cw.tokens))
        token_ids.append(ids)
        t_off[i + 1] = t_off[i] + len(ids)
        title_lengths[i] = cw.title_length
    return WindowPlan(window_offsets=w_off, window_spans=spans, token_offsets=t_off,
                      tokens=np.concatenate(token_ids) if token_ids else np.zeros(0, np.int32),
                      title_lengths=title_lengths, texts=window_texts, dense_spans=dense)


def _assemble(plan: WindowPlan, q: np.ndarray, scales: np.ndarray, dim: int, window_sentences: int,
              extra: dict[str, Any]) -> WindowData:
    params = {
        "window_sentences": window_sentences,
        "stride_sentences": 1,
        "title_window": True,
        "storage": STORAGE,
        "dim": dim,
        "windows": plan.n_windows,
        **extra,
        "tokens": int(plan.token_offsets[-1]),
    }
    return WindowData(
        window_offsets=plan.window_offsets,
        vectors=q if len(q) else np.zeros((0, dim), np.int8),
        scales=scales if len(scales) else np.zeros(0, np.float32),
        window_spans=np.asarray(plan.window_spans, dtype=np.int32).reshape(-1, 2),
        token_offsets=plan.token_offsets,
        tokens=plan.tokens,
        title_lengths=plan.title_lengths,
        params=params,
    )


def build_windows(titles: Sequence[str], texts: Sequence[str], analyzer: Analyzer, vocab: Mapping[str, int],
                  encoder: DocumentEncoder, *, window_sentences: int = DEFAULT_WINDOW_SENTENCES,
                  batch_size: int = 64, progress: bool = False) -> WindowData:
    """Windows of every chunk, each window's text embedded with `encoder` on its own (pooling "encode").

    Identical window texts (the title of a multi-chunk document, the sentences in the overlap of two chunks) are
    embedded once."""
    plan = plan_windows(titles, texts, analyzer, vocab, window_sentences)
    unique: dict[str, int] = {}
    rows = np.fromiter((unique.setdefault(t, len(unique)) for t in plan.texts), dtype=np.int64,
                       count=plan.n_windows)
    q, scales = _embed_quantized(encoder, list(unique), batch_size, progress)
    n_unique = len(unique)
    del unique
    return _assemble(plan, q[rows], scales[rows], int(encoder.dim), window_sentences,
                     {"pooling": "encode", "unique_windows": n_unique})


def pooled_windows(plan: WindowPlan, pooled: np.ndarray, found: np.ndarray, encoder: DocumentEncoder, *,
                   window_sentences: int, batch_size: int = 64) -> WindowData:
    """Windows whose vectors were mean-pooled from their chunk's token vectors (pooling "chunk":
    encode_documents_pooled over the chunks' dense texts with plan.dense_spans). A window with no token inside the
    model's input (past max_seq_length in a chunk whose title is long) is embedded from its own text instead."""
    pooled = np.asarray(pooled, dtype=np.float32)
    if pooled.shape != (plan.n_windows, int(encoder.dim)) or len(found) != plan.n_windows:
        raise ValueError(f"pooled window vectors {pooled.shape} for {plan.n_windows} windows of dim {encoder.dim}")
    missing = np.flatnonzero(~np.asarray(found, dtype=bool))
    if len(missing):
        pooled = pooled.copy()
        pooled[missing] = encoder.encode_documents([plan.texts[i] for i in missing], batch_size=batch_size)
    q, scales = quantize_rows(pooled)
    return _assemble(plan, q, scales, int(encoder.dim), window_sentences,
                     {"pooling": "chunk", "encoded_separately": int(len(missing))})
