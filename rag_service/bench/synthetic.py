"""Synthetic corpora for scale runs: generated text of any size, known-item queries, and a cheap embedding.

Passages are words drawn from a Zipf distribution over a generated vocabulary (so postings lists have the skew of
real text), seeded, written in BEIR layout. Each query is a few words taken from one passage, judged relevant to it
(a known-item search), so recall can be sanity-checked at any size.

Encoding a million passages with the real model is far too slow on a 2-core machine, so `hash_embed` stands in for the
document encoder: a signed feature-hashing bag of words in the model's 384 dimensions, L2-normalised. Its vectors cost
the dense index exactly what real ones do (same dimension, same count); they are not semantically meaningful, so scale
runs report latency and the lexical known-item recall only, and say which embedding they used.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SYLLABLES = ("ka", "lo", "mi", "ter", "an", "sul", "pra", "vo", "ne", "dri", "os", "quen", "tu", "bel", "ram", "ix",
             "cor", "fen", "gal", "hu", "jor", "ly", "mon", "pet", "ri", "sa", "tho", "ur", "ves", "wi", "zen", "ep")


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    words: set[str] = set()
    out: list[str] = []
    while len(out) < size:
        word = "".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5))))
        if word not in words:
            words.add(word)
            out.append(word)
    return out


def generate(folder: Path, passages: int, *, queries: int = 300, seed: int = 0, vocab_size: int = 50_000,
             zipf: float = 1.1, words: tuple[int, int] = (40, 90)) -> Path:
    """Writes corpus.jsonl, queries.jsonl and qrels/test.tsv under `folder` (skipped when already complete)."""
    folder = Path(folder)
    done = folder / "COMPLETE"
    if done.exists():
        return folder
    rng = np.random.default_rng(seed)
    vocab = np.asarray(vocabulary(vocab_size, rng))
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    p = ranks ** -zipf
    p /= p.sum()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    chosen = set(rng.choice(passages, size=min(queries, passages), replace=False).tolist())
    picked: dict[int, str] = {}
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, passages, 10_000):
            n = min(10_000, passages - start)
            lengths = rng.integers(words[0], words[1] + 1, size=n)
            tokens = vocab[rng.choice(vocab_size, size=int(lengths.sum()), p=p)]
            cuts = np.cumsum(lengths)[:-1]
            for i, passage in enumerate(np.split(tokens, cuts)):
                doc = start + i
                title = " ".join(passage[:4]).capitalize()
                text = " ".join(passage[4:])
                f.write(json.dumps({"_id": f"p{doc}", "title": title, "text": text}) + "\n")
                if doc in chosen:
                    # A query: some of the passage's rarer words, as a person remembering it would type them.
                    body = passage[4:]
                    order = np.argsort([-len(w) for w in body], kind="stable")[: int(rng.integers(3, 6))]
                    picked[doc] = " ".join(body[sorted(order)])
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as q, \
            open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for doc, text in sorted(picked.items()):
            q.write(json.dumps({"_id": f"q{doc}", "text": text}) + "\n")
            r.write(f"q{doc}\tp{doc}\t1\n")
    done.write_text(json.dumps({"passages": passages, "queries": len(picked), "seed": seed}) + "\n")
    return folder


def hash_embed(texts: Sequence[str], dim: int = 384) -> np.ndarray:
    """Signed feature hashing of lower-cased words into `dim` dimensions, L2-normalised (deterministic: crc32)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    # Each distinct word's (dimension, sign) is hashed once; rows are summed with one bincount per block of rows
    # (the counts are small integers, so the sums are exact in any order).
    codes: dict[str, int] = {}  # word -> dimension + 1, negated for a negative sign
    block = max(1, (1 << 24) // dim)
    for begin in range(0, len(texts), block):
        words = [text.lower().split() for text in texts[begin : begin + block]]
        flat: list[int] = []
        for ws in words:
            try:
                flat.extend([codes[w] for w in ws])
            except KeyError:
                for w in ws:
                    if w not in codes:
                        h = zlib.crc32(w.encode())
                        codes[w] = (h % dim + 1) * (1 if (h >> 16) & 1 else -1)
                flat.extend(map(codes.__getitem__, ws))
        signed = np.asarray(flat, dtype=np.int64)
        rows = np.repeat(np.arange(len(words), dtype=np.int64), [len(ws) for ws in words])
        sums = np.bincount(rows * dim + np.abs(signed) - 1, weights=np.sign(signed), minlength=len(words) * dim)
        out[begin : begin + len(words)] = sums.reshape(len(words), dim)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.maximum(norms, 1e-12)
    return out


class HashingDocumentEncoder:
    """The real encoder for tokenising and for queries, `hash_embed` for documents: lets rag-index build a large
    synthetic index in minutes. The index it builds claims the real model (the server checks the name, and does encode
    its queries with it); such an index is for latency runs only."""

    def __init__(self, encoder) -> None:
        self._encoder = encoder

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        return hash_embed(list(texts), self._encoder.dim)
