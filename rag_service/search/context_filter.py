"""Context filter stage: near-duplicate removal, MMR diversity and the token budget, after rerank.

Input: the candidates in ranking order with a relevance score each and their (unit) chunk vectors. Output: which of
them become the reply's contexts, in order, with each one's token count.

1. MMR (native kernel): greedy picks maximising lambda * relevance - (1 - lambda) * max cosine to the passages picked
   so far; relevance is min-max scaled to [0, 1] per query so that lambda means the same for any score scale. The
   kernel also drops every passage whose cosine with a picked one is above dedup_threshold.
2. Shingle overlap: a passage sharing more than shingle_threshold of its word 5-shingles (Jaccard) with a picked one
   is dropped; this catches the same text under different embeddings' noise (overlapping chunks of one document,
   boilerplate) that a cosine bound would only catch while also dropping legitimate paraphrases.
3. Budget: passages are taken in that order while they fit max_context_tokens, counted with the model's tokenizer on
   the text the reply carries; one that does not fit is skipped and smaller ones after it may still fit. At most
   top_k passages are returned.

With lambda = 1, dedup_threshold >= 1, no shingle bound and no budget the output is the input's first top_k: the
filter is then skipped outright.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rag_service.core.params import SearchParams
from rag_service.kernels import native

SHINGLE_WORDS = 5
# Jaccard bound of the shingle dedup the pipeline applies (no request field): chosen with
# bench/experiments/context_recall.py.
SHINGLE_THRESHOLD = 1.0
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class FilterParams:
    top_k: int
    mmr_lambda: float = 1.0
    dedup_threshold: float = 1.0  # cosine above which a passage is a near duplicate of a picked one
    shingle_threshold: float = SHINGLE_THRESHOLD  # Jaccard of word 5-shingles above which it is one too; 1.0: off
    max_context_tokens: int = 0  # 0: no budget

    @classmethod
    def of(cls, params: SearchParams) -> FilterParams:
        """The filter a search request asks for."""
        return cls(top_k=params.top_k, mmr_lambda=params.mmr_lambda, dedup_threshold=params.dedup_threshold,
                   max_context_tokens=params.max_context_tokens)

    @property
    def is_identity(self) -> bool:
        return (self.mmr_lambda >= 1.0 and self.dedup_threshold >= 1.0 and self.shingle_threshold >= 1.0
                and self.max_context_tokens <= 0)


@dataclass
class Selection:
    positions: list[int]  # into the input candidates, in context order
    tokens: list[int]  # per selected passage; empty when nothing needed counting (identity filter)
    total_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # why candidates were left out: duplicate, shingle, budget


def shingles(text: str, n: int = SHINGLE_WORDS) -> frozenset[int]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return frozenset([hash(tuple(words))]) if words else frozenset()
    return frozenset(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def select(relevance: np.ndarray, vectors: np.ndarray, texts: Callable[[int], str] | Sequence[str],
           count_tokens: Callable[[str], int], params: FilterParams,
           count_at: Callable[[int], int] | None = None) -> Selection:
    """Chooses contexts among m candidates. `relevance` float (m,), higher is better, in ranking order; `vectors`
    float32 (m, d), unit rows; `texts(i)` (or texts[i]) the text of candidate i, read only when needed."""
    m = len(relevance)
    text_of = texts if callable(texts) else texts.__getitem__
    # count_at(i), when given, counts candidate i without its text (the pipeline memoises counts per chunk).
    tokens_at = count_at or (lambda i: count_tokens(text_of(i)))
    count_all = params.max_context_tokens > 0
    if params.is_identity:
        keep = list(range(min(params.top_k, m)))
        kept = [tokens_at(i) for i in keep]
        return Selection(positions=keep, tokens=kept, total_tokens=sum(kept))
    dropped = {"duplicate": 0, "shingle": 0, "budget": 0}
    if m == 0:
        return Selection(positions=[], tokens=[], dropped=dropped)
    rel = np.asarray(relevance, dtype=np.float64)
    span = float(rel.max() - rel.min())
    rel01 = ((rel - rel.min()) / span if span > 0 else np.ones(m)).astype(np.float32)
    if params.mmr_lambda >= 1.0 and params.dedup_threshold >= 1.0:
        order = np.argsort(-rel01, kind="stable")  # pure relevance: no similarity matrix needed
    else:
        sim = native.similarity_matrix(np.ascontiguousarray(vectors, dtype=np.float32))
        # The kernel stops at k picks; with a budget, passages skipped for size need successors, so take all.
        k = m if count_all or params.shingle_threshold < 1.0 else min(params.top_k, m)
        order = native.mmr_select(rel01, sim, params.mmr_lambda, k, params.dedup_threshold)
        dropped["duplicate"] = m - len(order) if k == m else 0
    picked: list[int] = []
    picked_shingles: list[frozenset[int]] = []
    counts: list[int] = []
    total = 0
    for i in order.tolist():
        if len(picked) == params.top_k:
            break
        if params.shingle_threshold < 1.0:
            # Only the shingle bound reads the text: a chunk's text is cold memory (the store is memory-mapped).
            sh = shingles(text_of(i))
            if any(jaccard(sh, other) > params.shingle_threshold for other in picked_shingles):
                dropped["shingle"] += 1
                continue
        n = tokens_at(i)
        if count_all and total + n > params.max_context_tokens:
            dropped["budget"] += 1
            continue
        picked.append(i)
        counts.append(n)
        total += n
        if params.shingle_threshold < 1.0:
            picked_shingles.append(sh)
    return Selection(positions=picked, tokens=counts, total_tokens=total, dropped=dropped)
