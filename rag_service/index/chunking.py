"""Splitting documents into chunks that fit the encoder.

Both BM25 and the dense index work on chunks. A chunk's text is always an exact substring of its document's text (cut
on the tokenizer's character offsets), so a caller can highlight it in the original.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # encode imports torch; the store and the loader import this module and need neither
    from rag_service.encoder.encode import TokenSpans


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    doc: int  # index of the document in build order
    no: int  # position of the chunk within its document, from 0
    start: int  # character span in the document text
    end: int
    text: str


def chunk_id(doc_id: str, no: int) -> str:
    return f"{doc_id}#{no}"


def dense_text(title: str, text: str) -> str:
    """What the encoder sees: the title gives a chunk from the middle of a paper its topic. Joined with ". " so the
    title reads as its own sentence; the chunk budget counts these prefix tokens."""
    if not title:
        return text
    if not text:
        return title
    return f"{title}. {text}"


def lexical_text(title: str, text: str) -> str:
    """What BM25 indexes: every chunk carries its document's title terms."""
    if not title:
        return text
    return f"{title} {text}"


class TokenizerLike(Protocol):
    max_seq_length: int
    num_special_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def token_spans_batch(self, texts: Sequence[str]) -> list[TokenSpans]: ...


@dataclass(frozen=True)
class ChunkPlan:
    """Token budget for one document."""

    window: int  # body tokens per chunk
    overlap: int


class Chunker:
    """Windows of `chunk_tokens` model tokens overlapping by `chunk_overlap`, title prefix included.

    Sizes are counted without special tokens. The window is capped at max_seq_length - special tokens (254 for
    MiniLM's 256) so that nothing the BM25 side indexes is silently truncated away from the dense side.
    """

    def __init__(self, tokenizer: TokenizerLike, chunk_tokens: int = 256, chunk_overlap: int = 64) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if not 0 <= chunk_overlap < chunk_tokens:
            raise ValueError(f"chunk_overlap must be in [0, chunk_tokens), got {chunk_overlap}")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.chunk_overlap = chunk_overlap
        model_room = tokenizer.max_seq_length - tokenizer.num_special_tokens
        self.effective_chunk_tokens = max(1, min(chunk_tokens, model_room))

    def plan(self, title: str) -> ChunkPlan:
        prefix = self.tokenizer.count_tokens(f"{title}. ") if title else 0
        # A title longer than half the window would leave room for only a sliver of body per chunk; the body keeps at
        # least half the window and such chunks lose their tail in the dense embedding (BM25 still sees everything).
        window = max(self.effective_chunk_tokens - prefix, max(1, self.effective_chunk_tokens // 2))
        overlap = self.chunk_overlap if self.chunk_overlap < window else window // 2
        return ChunkPlan(window=window, overlap=overlap)

    def chunk_documents(self, docs: Sequence[Document], batch: int = 256) -> Iterator[list[Chunk]]:
        """Yields, per document in order, its chunks. Tokenises in batches (the Rust tokenizer is multi-threaded)."""
        for begin in range(0, len(docs), batch):
            part = docs[begin : begin + batch]
            for offset, (doc, spans) in enumerate(zip(part, self.tokenizer.token_spans_batch([d.text for d in part]))):
                yield self.chunk_one(begin + offset, doc, spans)

    def chunk_one(self, doc_index: int, doc: Document, spans: TokenSpans) -> list[Chunk]:
        plan = self.plan(doc.title)
        if len(spans) <= plan.window:
            return [Chunk(doc=doc_index, no=0, start=0, end=len(doc.text), text=doc.text)]
        return [
            Chunk(doc=doc_index, no=no, start=start, end=end, text=doc.text[start:end])
            for no, (start, end) in enumerate(window_spans(spans, plan.window, plan.overlap))
        ]


def window_spans(spans: TokenSpans, window: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of overlapping token windows.

    Window edges are moved back to word boundaries where possible, so a chunk never starts or ends inside a word
    ("##piece" continuation): re-tokenising the chunk then gives exactly the tokens counted here. Moving the next start
    back only grows the overlap. A single "word" longer than half a window (say a DNA string) is cut mid-word.
    """
    n = len(spans)
    word = spans.word_ids
    offsets = spans.offsets
    if n == 0:
        return []

    def inside_word(i: int) -> bool:  # is token i a continuation of token i-1's word?
        return 0 < i < n and word[i] != -1 and word[i] == word[i - 1]

    out: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + window, n)
        snapped = end
        while snapped > start and inside_word(snapped):
            snapped -= 1
        if snapped - start >= max(1, window // 2):
            end = snapped
        out.append((int(offsets[start, 0]), int(offsets[end - 1, 1])))
        if end >= n:
            return out
        nxt = max(end - overlap, start + 1)
        snapped = nxt
        while snapped > start + 1 and inside_word(snapped):
            snapped -= 1
        # Keep the mid-word cut only when no word starts between this window's start and the planned next start.
        start = nxt if inside_word(snapped) else snapped
