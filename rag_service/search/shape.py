"""The query API's shaping of a ranking: recency decay, results by document, pages, score floors, explanations and
highlights. One index (search/pipeline.py) and the shard router (shard/router.py) both run it on their final order,
so a router answers what one index answers.

    final order (rerank, fusion) -> decay (score + weight x factor, reordered) -> groups (at most group_size chunks
    per document) -> context filter -> page (offset, top_k; documents when grouped) -> min_score -> explanations,
    highlights

A page is a slice of the ranking one request with top_k = offset + top_k would return: the searcher ranks that
window (`Shaper.ranking`), with the depth and rerank depth request validation derived from the window, so page 2
continues page 1. A grouped request ranks its whole first-stage pool (top_k = depth), so its documents come in the
order of their best chunk in the ungrouped ranking: the order the quality evaluators use (bench/quality.py).

A plain request never builds a Shaper (SearchParams.shaped is False): none of this runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from rag_service.core.params import (
    ContextResult,
    Decay,
    DocumentGroup,
    Explanation,
    SearchParams,
    SearchResult,
)
from rag_service.kernels.native import FusionResult
from rag_service.search import rerank as rerank_mod
from rag_service.search.context_filter import FilterParams, Selection
from rag_service.search.searcher import replace_context

# The BM25 analyzer's word pattern (retrievers/analysis.py): highlights find the same words it indexes.
_WORD = re.compile(r"\w+")


def decay_factors(dates: np.ndarray, decay: Decay) -> np.ndarray:
    """float64 factor in [0, 1] per date (Unix seconds; NaN, no date: 0), Elasticsearch's decay functions: with
    d = max(0, |date - origin| - offset), exp decay^(d/scale), linear max(0, 1 - (1 - decay) d/scale), gauss
    decay^((d/scale)^2)."""
    distance = np.maximum(np.abs(np.asarray(dates, np.float64) - decay.origin) - decay.offset, 0.0) / decay.scale
    if decay.function == "linear":
        factor = np.maximum(1.0 - (1.0 - decay.decay) * distance, 0.0)
    elif decay.function == "gauss":
        factor = np.power(decay.decay, distance * distance)
    else:
        factor = np.power(decay.decay, distance)
    return np.nan_to_num(factor, nan=0.0)


def occurrences(keys: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same key (0 for a key's first occurrence)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    by_key = np.argsort(keys, kind="stable")
    ordered = keys[by_key]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    out = np.empty(n, np.int64)
    out[by_key] = np.arange(n) - first
    return out


class Shaper:
    """The shaping of one request; the searcher calls `ranking`, `arrange`, `filter_params`, `page`, `finish` in
    that order (per-request state: not shared between threads)."""

    def __init__(self, params: SearchParams) -> None:
        self.params = params
        self.window = params.offset + params.top_k
        self.grouped = params.group_size > 0
        # What the searcher ranks: the window, or (grouped) the whole first-stage pool.
        self.ranking = replace(params, top_k=max(params.depth, self.window) if self.grouped else self.window)
        self._factor: np.ndarray | None = None  # decay factor per fused position
        self._docs: np.ndarray | None = None  # document key per ranking position after grouping
        self.full_page = False  # the page held top_k contexts (documents) before min_score

    def filter_params(self) -> FilterParams:
        """The context filter over the arranged ranking: enough picks for the whole window."""
        return FilterParams.of(self.ranking)

    def arrange(self, fused: FusionResult, reranked: rerank_mod.Reranked | None, order: np.ndarray,
                relevance: np.ndarray, docs: Callable[[np.ndarray], np.ndarray] | None,
                dates: Callable[[np.ndarray], np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, relevance, rows) after decay and grouping; rows[i]: ranking position i's position in final_order's
        output (its row in `reranked` when below the rerank depth). `docs(at)` / `dates(at)`: document keys and Unix
        seconds of fused positions `at`."""
        params = self.params
        rows = np.arange(len(order))
        decay = params.decay
        if decay is not None and dates is not None:
            factor = np.zeros(len(fused.ids))
            factor[order] = decay_factors(dates(order), decay)
            self._factor = factor
            if decay.weight > 0 and len(order):
                head = len(reranked.order) if reranked is not None else 0
                base = np.asarray(fused.scores[order], np.float64)
                if head:
                    base[:head] = np.asarray(reranked.scores, np.float64)[:head]  # type: ignore[union-attr]
                scored = base + decay.weight * factor[order]
                # Candidates past the rerank depth stay below every reranked one, as in final_order.
                if head and head < len(scored):
                    tail = scored[head:]
                    scored[head:] = scored[:head].min() - 1.0 - tail.max() + tail
                perm = np.concatenate([np.argsort(-scored[:head], kind="stable"),
                                       head + np.argsort(-scored[head:], kind="stable")])
                order, relevance, rows = order[perm], scored[perm].astype(np.float32), rows[perm]
        if self.grouped and docs is not None:
            keys = np.asarray(docs(order))
            keep = occurrences(keys) < params.group_size
            order, relevance, rows = order[keep], relevance[keep], rows[keep]
            self._docs = keys[keep]
        return order, relevance, rows

    def page(self, selection: Selection, through: np.ndarray | None = None) -> Selection:
        """The page of the selected ranking positions: [offset, offset + top_k) of them, or of their documents
        (each document's picks together, documents in the order of their first pick). `through[p]`: the arranged
        ranking position of selection position p, when the selection ran over a subset of it."""
        params = self.params
        positions, tokens = selection.positions, selection.tokens or [0] * len(selection.positions)
        if self.grouped and self._docs is not None:
            docs = self._docs if through is None else self._docs[through]
            members: dict[int, list[int]] = {}
            for n, pos in enumerate(positions):
                members.setdefault(int(docs[pos]), []).append(n)
            chosen = list(members.values())[params.offset:self.window]
            picks = [n for group in chosen for n in group]
            self.full_page = len(chosen) == params.top_k
        else:
            picks = list(range(min(params.offset, len(positions)), min(self.window, len(positions))))
            self.full_page = len(picks) == params.top_k
        kept = [tokens[n] for n in picks]
        return Selection(positions=[positions[n] for n in picks], tokens=kept if selection.tokens else [],
                         total_tokens=sum(kept), dropped=selection.dropped)

    def apply(self, result: SearchResult, at: Sequence[int], **inputs) -> None:
        """Finishes `result` (the page's contexts, assembled): see `finish` for `at` and `inputs`."""
        result.contexts, result.groups, result.below_min_score = self.finish(result.contexts, at, **inputs)
        result.offset = self.params.offset
        result.full_page = self.full_page
        result.shaped = True

    def finish(self, contexts: list[ContextResult], at: Sequence[int], *, fused: FusionResult,
               bm25: tuple[np.ndarray, np.ndarray], dense: tuple[np.ndarray, np.ndarray],
               model: rerank_mod.RerankModel | None,
               highlight: Callable[[ContextResult], tuple[tuple[tuple[int, int, str], ...], tuple[int, int] | None]]
               | None) -> tuple[list[ContextResult], list[DocumentGroup] | None, int]:
        """(contexts, groups, dropped by min_score) of the page; `at[i]`: context i's fused position."""
        params = self.params
        decay, factor = params.decay, self._factor
        out = []
        below = 0
        explainer = _Explainer(params, fused, bm25, dense, model) if params.explain else None
        for c, pos in zip(contexts, at, strict=True):
            f = float(factor[pos]) if factor is not None else None
            score = c.score
            changes: dict = {}
            if decay is not None and f is not None:
                score = float(np.float32(c.score + decay.weight * f))
                changes["score"] = score
            if params.min_score is not None and score < params.min_score:
                below += 1
                continue
            if explainer is not None:
                changes["explanation"] = explainer.explain(c, pos, f, decay.weight if decay is not None else 0.0)
            if highlight is not None:
                changes["highlights"], changes["best_window"] = highlight(c)
            out.append(replace_context(c, **changes) if changes else c)
        groups = None
        if self.grouped:
            groups = []
            start = 0
            for n in range(1, len(out) + 1):
                if n == len(out) or out[n].doc_id != out[start].doc_id:
                    best = max(c.score for c in out[start:n])
                    groups.append(DocumentGroup(doc_id=out[start].doc_id, score=best, first=start, count=n - start))
                    out[start:n] = [replace_context(c, document_score=best) for c in out[start:n]]
                    start = n
        return out, groups, below


class _Explainer:
    """Per context: each retriever's rank, normalised score and share of the fused score (the fusion kernel's
    formula, native/src/fusion.cpp), the reranker's weight x value per feature, and the decay's share."""

    def __init__(self, params: SearchParams, fused: FusionResult, bm25: tuple[np.ndarray, np.ndarray],
                 dense: tuple[np.ndarray, np.ndarray], model: rerank_mod.RerankModel | None) -> None:
        self.params, self.fused, self.model = params, fused, model
        self.lists = [self._list(bm25, 1.0 - params.dense_weight), self._list(dense, params.dense_weight)]

    def _list(self, ranked: tuple[np.ndarray, np.ndarray], factor: float):
        ids, scores = np.asarray(ranked[0]), np.asarray(ranked[1], np.float32)
        rank_of = {int(c): i for i, c in enumerate(ids.tolist())}
        lo, hi = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 0.0)
        return rank_of, scores, lo, hi, factor

    def _part(self, which: int, chunk: int) -> tuple[int | None, float | None, float | None]:
        rank_of, scores, lo, hi, factor = self.lists[which]
        i = rank_of.get(chunk)
        if i is None:
            return None, None, None
        if self.params.fusion == "rrf":
            normalised = 1.0 / (self.params.rrf_k + (i + 1))
        else:
            normalised = (float(scores[i]) - lo) / (hi - lo) if hi > lo else 1.0
        return i + 1, normalised, factor * normalised

    def explain(self, c: ContextResult, pos: int, factor: float | None, weight: float) -> Explanation:
        b_rank, b_norm, b_part = self._part(0, c.chunk)
        d_rank, d_norm, d_part = self._part(1, c.chunk)
        contributions, bias = None, None
        if c.rerank_score is not None and c.features is not None and self.model is not None:
            row = dict(zip(c.features, c.features.values(), strict=True))
            contributions = {name: float(w) * row[name]
                             for name, w in zip(self.model.features, self.model.weights.tolist(), strict=True)}
            bias = self.model.bias
        return Explanation(fused_score=float(self.fused.scores[pos]), bm25_rank=b_rank, bm25_normalized=b_norm,
                           bm25_contribution=b_part, dense_rank=d_rank, dense_normalized=d_norm,
                           dense_contribution=d_part, rerank_contributions=contributions, rerank_bias=bias,
                           decay_factor=factor, decay_contribution=None if factor is None else weight * factor)


def term_spans(analyzer, query: str, text: str) -> tuple[tuple[int, int, str], ...]:
    """(start, end, term) of every word of `text` (code point offsets) whose analysis, by the BM25 analyzer, gives
    one of the query's terms: "running" matches a query's "runs" where both stem to "run"."""
    wanted = set(analyzer.tokens(query))
    if not wanted:
        return ()
    out = []
    for m in _WORD.finditer(text):
        for term in analyzer.tokens(m.group()):
            if term in wanted:
                out.append((m.start(), m.end(), term))
                break
    return tuple(out)


def best_window_by_terms(spans: Sequence[tuple[int, int, str]],
                         windows: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The window (character span) holding the most distinct matched terms, the first of equals; None without any."""
    best, best_n = None, 0
    for start, end in windows:
        n = len({t for s, e, t in spans if s >= start and e <= end})
        if n > best_n:
            best, best_n = (start, end), n
    return best

