"""NumPy references of every native kernel: readable, slow, and the specification the C++ (and any CUDA) code must meet.

Each kernel has its own section below. A reference takes the same arguments as the native kernel, raises the same
ValueErrors (messages name the argument) and returns the same result type; tests compare the two on seeded random
inputs. A reference is strict about dtypes and shapes like the native boundary (rag_service.kernels.native does the
lenient conversions); it accepts any memory layout, which is a C++ concern rather than part of the semantics.

Kernels:
  * fusion -- fuse_reference: merge a BM25 and a dense candidate list into one ranking.
  * rerank features -- window_maxsim_reference (MaxSim of the query against each candidate's stored window vectors),
    proximity_reference (shortest token span covering the query terms present), linear_scores_reference (the fitted
    linear model over assembled features).
  * rerank stage -- lexical_features_reference (BM25 of chunk, title and best window, coverage; numba),
    local_features_reference (every per-candidate feature), finish_features_reference (what needs the whole candidate
    list), rank_reference (model scores and the stable sort).
  * context filter -- similarity_matrix_reference (pairwise dot products of the candidates' vectors) and
    mmr_select_reference (greedy maximal marginal relevance with near-duplicate removal).
  * first stage -- bm25_top_reference (BM25 top-depth over impact postings), dense_top_reference (flat inner-product
    top-depth over float rows, or over sq8 codes with exact rescoring; sq8_quantize builds the codes) and
    retrieve_reference (both, then fusion).
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import numpy as np
from numba import njit

__all__ = [
    "FUSION_METHODS",
    "Postings",
    "RetrieveResult",
    "RowCodes",
    "SQ8Codes",
    "bm25_top_reference",
    "dense_above_reference",
    "dense_top_reference",
    "retrieve_reference",
    "row_quantize_reference",
    "sq8_quantize",
    "SOFTMAX_TEMPERATURE",
    "FusionResult",
    "PRF_TOP",
    "RANK_K",
    "RERANK_FEATURES",
    "RERANK_LOCAL_FEATURES",
    "finish_features_reference",
    "fuse_reference",
    "lexical_features_reference",
    "local_features_reference",
    "rank_reference",
    "linear_scores_reference",
    "mmr_select_reference",
    "proximity_reference",
    "similarity_matrix_reference",
    "window_maxsim_reference",
]


# --------------------------------------------------------------------------------------------------------------------
# Shared argument checks
# --------------------------------------------------------------------------------------------------------------------

def _check_vector(value: object, name: str, dtype: type[np.generic]) -> np.ndarray:
    """value must be a 1-D ndarray of exactly `dtype` (native byte order); returns it unchanged."""
    expected = np.dtype(dtype)
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray of {expected}, got {type(value).__name__}")
    if value.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {value.ndim}-D")
    if value.dtype != expected or not value.dtype.isnative:
        raise ValueError(f"{name} must have dtype {expected}, got {value.dtype}")
    return value


def _check_finite(scores: np.ndarray, name: str) -> None:
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{name} must be finite, got {scores[bad[0]]:g} at index {bad[0]}")


def _check_unique(ids: np.ndarray, name: str) -> None:
    """Reports the first position (scanning in list order) whose id occurred earlier, as the C++ kernel does."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    repeats = np.flatnonzero(first[inverse] != np.arange(ids.size))
    if repeats.size:
        j = repeats[0]
        raise ValueError(f"{name} must not repeat an id: {ids[j]} at positions {first[inverse[j]]} and {j}")


# --------------------------------------------------------------------------------------------------------------------
# Kernel: fusion
# --------------------------------------------------------------------------------------------------------------------

FUSION_METHODS = ("rrf", "weighted")


class FusionResult(NamedTuple):
    """The fused top-k, best first. bm25/dense are each retriever's raw score, NaN where the id is absent."""

    ids: np.ndarray     # int64[k]
    scores: np.ndarray  # float32[k], the fused score
    bm25: np.ndarray    # float32[k]
    dense: np.ndarray   # float32[k]


def _fusion_contributions(scores: np.ndarray, method: str, factor: float, rrf_k: float) -> np.ndarray:
    """One list's contribution to the fused score of each of its ids, in list (rank) order, as float64.

    weighted: factor * min-max normalised score, where a list whose scores are all equal normalises to 1.0.
    rrf:      factor / (rrf_k + rank), rank 1-based.
    The operation order is the C++ kernel's, so the two agree bit for bit (which makes tie-breaking agree).
    """
    if scores.size == 0:
        return np.zeros(0, dtype=np.float64)
    if method == "rrf":
        ranks = np.arange(1, scores.size + 1, dtype=np.float64)
        return factor / (rrf_k + ranks)
    lo, hi = np.float64(scores.min()), np.float64(scores.max())
    normalised = ((scores.astype(np.float64) - lo) / (hi - lo) if hi > lo
                  else np.ones(scores.size, dtype=np.float64))
    return factor * normalised


def fuse_reference(
    bm25_ids: np.ndarray,
    bm25_scores: np.ndarray,
    dense_ids: np.ndarray,
    dense_scores: np.ndarray,
    *,
    method: str,
    dense_weight: float,
    top_k: int,
    rrf_k: float = 60.0,
) -> FusionResult:
    """Fuse two candidate lists, each in rank order (position 0 is rank 1; either may be empty).

    Inputs: ids int64 1-D, scores float32 1-D and finite, equal length per list, no id twice in one list;
    method "rrf" or "weighted"; 0 <= dense_weight (w) <= 1; top_k >= 1; rrf_k finite and > 0. Otherwise ValueError.

    For every id in the union of both lists (an id absent from a list contributes 0 from it):
      weighted: fused = (1 - w) * norm(bm25) + w * norm(dense), norm(s) = (s - min) / (max - min) over that list,
                or 1.0 when max == min
      rrf:      fused = (1 - w) / (rrf_k + rank_bm25) + w / (rrf_k + rank_dense)
    computed in float64. The result is sorted by fused descending, exact ties by id ascending, cut to
    min(top_k, |union|), with fused cast to float32 at the end and each retriever's raw score (NaN when absent).
    """
    _check_vector(bm25_ids, "bm25_ids", np.int64)
    _check_vector(bm25_scores, "bm25_scores", np.float32)
    if bm25_ids.size != bm25_scores.size:
        raise ValueError(f"bm25_ids and bm25_scores must have the same length, got {bm25_ids.size} and "
                         f"{bm25_scores.size}")
    _check_vector(dense_ids, "dense_ids", np.int64)
    _check_vector(dense_scores, "dense_scores", np.float32)
    if dense_ids.size != dense_scores.size:
        raise ValueError(f"dense_ids and dense_scores must have the same length, got {dense_ids.size} and "
                         f"{dense_scores.size}")
    if method not in FUSION_METHODS:
        raise ValueError(f"method must be 'rrf' or 'weighted', got {method!r}")
    if not 0.0 <= dense_weight <= 1.0:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight:g}")
    top_k = operator.index(top_k)  # an int, as the native boundary requires (a float raises TypeError)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not (np.isfinite(rrf_k) and rrf_k > 0):
        raise ValueError(f"rrf_k must be finite and > 0, got {rrf_k:g}")
    _check_finite(bm25_scores, "bm25_scores")
    _check_finite(dense_scores, "dense_scores")
    _check_unique(bm25_ids, "bm25_ids")
    _check_unique(dense_ids, "dense_ids")

    w = float(dense_weight)
    union = np.union1d(bm25_ids, dense_ids)  # sorted ascending, so a stable sort below breaks ties by id
    at_bm25 = np.searchsorted(union, bm25_ids)
    at_dense = np.searchsorted(union, dense_ids)

    fused = np.zeros(union.size, dtype=np.float64)
    fused[at_bm25] = _fusion_contributions(bm25_scores, method, 1.0 - w, float(rrf_k))
    fused[at_dense] += _fusion_contributions(dense_scores, method, w, float(rrf_k))

    raw_bm25 = np.full(union.size, np.nan, dtype=np.float32)
    raw_bm25[at_bm25] = bm25_scores
    raw_dense = np.full(union.size, np.nan, dtype=np.float32)
    raw_dense[at_dense] = dense_scores

    order = np.argsort(-fused, kind="stable")[: min(top_k, union.size)]
    return FusionResult(ids=union[order], scores=fused[order].astype(np.float32), bm25=raw_bm25[order],
                        dense=raw_dense[order])


# --------------------------------------------------------------------------------------------------------------------
# Shared checks for the rerank and context-filter kernels
# --------------------------------------------------------------------------------------------------------------------

def _check_matrix(value: object, name: str, dtypes: tuple[type[np.generic], ...]) -> np.ndarray:
    """value must be a 2-D ndarray of one of `dtypes` (native byte order); returns it unchanged."""
    expected = " or ".join(str(np.dtype(d)) for d in dtypes)
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray of {expected}, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {value.ndim}-D")
    if value.dtype not in [np.dtype(d) for d in dtypes] or not value.dtype.isnative:
        raise ValueError(f"{name} must have dtype {expected}, got {value.dtype}")
    return value


def _check_finite_matrix(values: np.ndarray, name: str) -> None:
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"{name} must be finite, got {values[i, j]:g} at [{i}, {j}]")


def _check_offsets(offsets: np.ndarray, name: str, total: int, total_name: str) -> None:
    """CSR offsets: at least one entry (n_chunks + 1). Ranges are checked per candidate (_check_ranges): a call reads
    only its candidates' rows, and checking the whole index on every call would cost more than the kernel."""
    if offsets.size == 0:
        raise ValueError(f"{name} must have at least one entry (n_chunks + 1)")


def _check_ranges(offsets: np.ndarray, name: str, candidates: np.ndarray, total: int, total_name: str) -> None:
    """For each candidate c: 0 <= offsets[c] <= offsets[c + 1] <= total (rows of total_name)."""
    start, stop = offsets[candidates], offsets[candidates + 1]
    bad = np.flatnonzero((start < 0) | (stop < start) | (stop > total))
    if bad.size:
        c = candidates[bad[0]]
        raise ValueError(f"{name} of chunk {c} are [{offsets[c]}, {offsets[c + 1]}), not a range within the {total} "
                         f"rows of {total_name}")


def _check_ids(ids: np.ndarray, name: str, n: int) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= n))
    if bad.size:
        raise ValueError(f"{name} must be in [0, {n}), got {ids[bad[0]]} at index {bad[0]}")


def _check_float(value: object, name: str, *, allow_inf: bool = False) -> float:
    """value as a Python float (an int or a NumPy scalar is fine); NaN (and inf unless allowed) raise ValueError."""
    try:
        number = float(value)  # type: ignore[arg-type]  # any object: float() raising TypeError is the check
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if np.isnan(number) or (not allow_inf and np.isinf(number)):
        raise ValueError(f"{name} must be {'a number' if allow_inf else 'finite'}, got {number:g}")
    return number


# --------------------------------------------------------------------------------------------------------------------
# Kernel: window MaxSim (rerank feature)
# --------------------------------------------------------------------------------------------------------------------

SOFTMAX_TEMPERATURE = 0.05


def _check_window_store(offsets: object, vectors: object, scales: object, d: int | None) -> tuple[int, int]:
    """Checks the CSR window store; returns (n_chunks, n_windows)."""
    offsets_array = _check_vector(offsets, "offsets", np.int64)
    vectors_array = _check_matrix(vectors, "vectors", (np.int8, np.float16, np.float32))
    n_windows, width = vectors_array.shape
    if d is not None and width != d:
        raise ValueError(f"vectors must have {d} columns (the query's dimension), got {width}")
    if vectors_array.dtype == np.int8:
        if scales is None:
            raise ValueError("scales is required (float32[n_windows]) when vectors are int8")
        scales_array = _check_vector(scales, "scales", np.float32)
        if scales_array.size != n_windows:
            raise ValueError(f"scales must have one entry per row of vectors ({n_windows}), got {scales_array.size}")
    elif scales is not None:
        raise ValueError(f"scales must be None when vectors are {vectors_array.dtype} (only int8 vectors are scaled)")
    _check_offsets(offsets_array, "offsets", n_windows, "vectors")
    return offsets_array.size - 1, n_windows


def window_maxsim_reference(
    query: np.ndarray,
    offsets: np.ndarray,
    vectors: np.ndarray,
    scales: np.ndarray | None,
    candidates: np.ndarray,
    *,
    temperature: float = SOFTMAX_TEMPERATURE,
) -> np.ndarray:
    """MaxSim of a query against each candidate chunk's window vectors.

    Inputs: query float32[d], finite (unit norm, so the dot products are cosines); offsets int64[n_chunks + 1], a CSR
    index: chunk c owns rows offsets[c]:offsets[c + 1] of vectors (for each candidate c, 0 <= offsets[c] <=
    offsets[c + 1] <= n_windows; only the candidates' entries are checked);
    vectors int8[n_windows, d] with scales float32[n_windows] (a row's value is int8 * scale), or float16 / float32
    [n_windows, d] with scales=None; candidates int64[m], chunk ids in [0, n_chunks) (repeats allowed); temperature
    finite and > 0. Otherwise ValueError naming the argument. A non-finite window score (NaN or inf in a candidate's
    rows or scales) raises ValueError too: only the candidates' rows are read, so only they are checked.

    Returns float32[m, 3], per candidate: [max window score, mean of the two best (the max when only one window),
    soft max = T * log(sum exp(s / T)) - T * log(count) (<= max; T = temperature)]. A candidate without windows gets
    NaN in all three columns (the caller substitutes its own value). Scores accumulate in float32 (int8 rows are
    dotted with the query, then multiplied by the row's scale); the soft max is computed in float64 from them.
    """
    _check_vector(query, "query", np.float32)
    _check_finite(query, "query")
    _, n_windows = _check_window_store(offsets, vectors, scales, query.size)
    n_chunks = offsets.size - 1
    _check_vector(candidates, "candidates", np.int64)
    _check_ids(candidates, "candidates", n_chunks)
    _check_ranges(offsets, "offsets", candidates, n_windows, "vectors")
    temperature = _check_float(temperature, "temperature")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature:g}")

    out = np.full((candidates.size, 3), np.nan, dtype=np.float32)
    for row, chunk in enumerate(candidates):
        start, stop = int(offsets[chunk]), int(offsets[chunk + 1])
        if stop == start:
            continue
        scores = vectors[start:stop].astype(np.float32) @ query
        if scales is not None:
            scores = scores * scales[start:stop]
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"vectors (or scales) of chunk {chunk} (rows {start}:{stop}) hold non-finite values")
        best = np.sort(scores)[::-1]
        top = best[0]
        top2 = (best[0] + best[1]) / np.float32(2) if best.size > 1 else top
        s = best.astype(np.float64)
        soft = temperature * np.log(np.sum(np.exp((s - s[0]) / temperature))) + s[0] - temperature * np.log(s.size)
        out[row] = (top, top2, min(soft, float(top)))  # rounding may put the soft max a hair above the max
    return out


# --------------------------------------------------------------------------------------------------------------------
# Kernel: term proximity (rerank feature)
# --------------------------------------------------------------------------------------------------------------------

def proximity_reference(
    query_terms: np.ndarray,
    token_offsets: np.ndarray,
    tokens: np.ndarray,
    candidates: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Shortest span of each candidate's token stream that covers every query term it contains.

    Inputs: query_terms int32[q], distinct term ids >= 0; token_offsets int64[n_chunks + 1] (CSR over tokens, like
    window_maxsim's offsets); tokens int32[n_tokens], each chunk's analysed tokens as term ids in position order (any
    value not among query_terms, e.g. -1 for a token that is not a term, simply never matches); candidates int64[m]
    in [0, n_chunks). Otherwise ValueError naming the argument.

    Returns (span int32[m], matched int32[m]): matched = how many distinct query terms occur in the chunk; span = the
    length in tokens of the shortest run of positions containing each of those terms (1 when matched == 1, 0 when
    matched == 0).
    """
    _check_vector(query_terms, "query_terms", np.int32)
    _check_vector(token_offsets, "token_offsets", np.int64)
    _check_vector(tokens, "tokens", np.int32)
    _check_vector(candidates, "candidates", np.int64)
    negative = np.flatnonzero(query_terms < 0)
    if negative.size:
        raise ValueError(f"query_terms must be >= 0, got {query_terms[negative[0]]} at index {negative[0]}")
    _check_unique(query_terms.astype(np.int64), "query_terms")
    _check_offsets(token_offsets, "token_offsets", tokens.size, "tokens")
    _check_ids(candidates, "candidates", token_offsets.size - 1)
    _check_ranges(token_offsets, "token_offsets", candidates, tokens.size, "tokens")

    span = np.zeros(candidates.size, dtype=np.int32)
    matched = np.zeros(candidates.size, dtype=np.int32)
    for row, chunk in enumerate(candidates):
        stream = tokens[token_offsets[chunk]: token_offsets[chunk + 1]]
        positions = np.flatnonzero(np.isin(stream, query_terms))
        terms = stream[positions]
        need = np.unique(terms).size
        matched[row] = need
        if need == 0:
            continue
        # Sliding window over the hits: grow on the right, shrink on the left while every present term stays inside.
        counts: dict[int, int] = {}
        best = len(stream)
        left = 0
        for right, term in enumerate(terms.tolist()):
            counts[term] = counts.get(term, 0) + 1
            while len(counts) == need:
                best = min(best, int(positions[right] - positions[left]) + 1)
                leaving = int(terms[left])
                counts[leaving] -= 1
                if counts[leaving] == 0:
                    del counts[leaving]
                left += 1
        span[row] = best
    return span, matched


# --------------------------------------------------------------------------------------------------------------------
# Kernel: linear scores (the fitted rerank model)
# --------------------------------------------------------------------------------------------------------------------

def linear_scores_reference(features: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """features @ weights + bias, per candidate.

    Inputs: features float32[m, f], finite; weights float32[f], finite; bias a finite number. Otherwise ValueError.
    Returns float32[m], computed in float64 (sum over features in column order, then + bias) and rounded once.
    """
    _check_matrix(features, "features", (np.float32,))
    _check_vector(weights, "weights", np.float32)
    if features.shape[1] != weights.size:
        raise ValueError(f"weights must have one entry per column of features ({features.shape[1]}), got "
                         f"{weights.size}")
    _check_finite(weights, "weights")
    _check_finite_matrix(features, "features")
    bias = _check_float(bias, "bias")
    total = np.zeros(features.shape[0], dtype=np.float64)
    for j in range(features.shape[1]):
        total += features[:, j].astype(np.float64) * np.float64(weights[j])
    return (total + bias).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Kernels: similarity matrix and MMR (context filter)
# --------------------------------------------------------------------------------------------------------------------

def similarity_matrix_reference(vectors: np.ndarray) -> np.ndarray:
    """float32[m, m] of the rows' pairwise dot products (cosines for unit rows). vectors: float32[m, d], finite."""
    _check_matrix(vectors, "vectors", (np.float32,))
    _check_finite_matrix(vectors, "vectors")
    return vectors @ vectors.T


def mmr_select_reference(
    relevance: np.ndarray,
    sim: np.ndarray,
    mmr_lambda: float,
    k: int,
    dedup_threshold: float,
) -> np.ndarray:
    """Greedy maximal marginal relevance with near-duplicate removal; returns the chosen indices in pick order.

    Inputs: relevance float32[m], finite; sim float32[m, m] (expected symmetric; row i is the similarity of candidate
    i to the others); 0 <= mmr_lambda <= 1; k >= 0; dedup_threshold a number (inf disables dedup). Otherwise
    ValueError naming the argument. Only the rows of picked candidates are read (the row of the k-th pick is not:
    nothing follows it), so only they must be finite (a non-finite value there raises ValueError): checking all
    m * m entries would cost more than the selection.

    The first pick is the most relevant candidate. Then, while fewer than k are chosen and candidates remain, pick the
    remaining i maximising lambda * relevance[i] - (1 - lambda) * max(sim[j, i] for chosen j), computed in float64 in
    that operation order. Ties go to the lower index. After each pick j, every remaining i with sim[j, i] >
    dedup_threshold is dropped for good. With lambda = 1 and no similarity above dedup_threshold the result is the
    relevance order (ties by index), cut to k. Returns int64[<= k].
    """
    _check_vector(relevance, "relevance", np.float32)
    _check_matrix(sim, "sim", (np.float32,))
    m = relevance.size
    if sim.shape != (m, m):
        raise ValueError(f"sim must be ({m}, {m}) (one row and column per relevance entry), got {sim.shape}")
    mmr_lambda = _check_float(mmr_lambda, "mmr_lambda")
    if not 0.0 <= mmr_lambda <= 1.0:
        raise ValueError(f"mmr_lambda must be in [0, 1], got {mmr_lambda:g}")
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    dedup_threshold = _check_float(dedup_threshold, "dedup_threshold", allow_inf=True)
    _check_finite(relevance, "relevance")

    chosen: list[int] = []
    if m == 0 or k == 0:
        return np.zeros(0, dtype=np.int64)
    alive = np.ones(m, dtype=bool)
    nearest = np.full(m, -np.inf, dtype=np.float64)  # max similarity to the chosen ones
    rel = relevance.astype(np.float64)
    pick = int(np.argmax(relevance))  # argmax returns the first maximum: the lower index wins ties
    while True:
        chosen.append(pick)
        alive[pick] = False
        if len(chosen) == min(k, m):
            break
        row = sim[pick].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(row))
        if bad.size:
            raise ValueError(f"sim must be finite, got {row[bad[0]]:g} at [{pick}, {bad[0]}]")
        alive &= ~(row > dedup_threshold)
        nearest = np.maximum(nearest, row)
        if not alive.any():
            break
        gain = mmr_lambda * rel - (1.0 - mmr_lambda) * nearest
        gain[~alive] = -np.inf
        pick = int(np.argmax(gain))
    return np.asarray(chosen, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------------------
# The rerank stage: lexical and local features, the features that need the whole candidate list, rank
# --------------------------------------------------------------------------------------------------------------------

# Every feature the rerank stage computes, in column order (a model names the subset it uses).
RERANK_FEATURES = (
    "fused",        # the fusion score (min-max weighted), as fusion ranked the candidates
    "bm25",         # BM25 of the chunk, exact for every candidate, / the query's best candidate
    "dense",        # exact cosine of the query with the chunk vector
    "win_max",      # max cosine over the chunk's sentence windows (title included)
    "win_top2",     # mean of the two best window cosines
    "win_soft",     # soft max (log-sum-exp, T = 0.05) of the window cosines
    "bm25_title",   # BM25 over the title tokens only, / the query's best
    "bm25_window",  # best BM25 over the chunk's windows, / the query's best
    "proximity",    # distinct query terms matched / shortest span covering them (0 when fewer than 2 match)
    "coverage",     # idf-weighted share of the query terms the chunk contains
    "rr_bm25",      # 10 / (10 + BM25 rank), 0 when BM25 did not return the chunk
    "rr_dense",     # 10 / (10 + dense rank), 0 when dense did not return the chunk
    "prf",          # cosine with the centroid of the 3 best fused candidates' vectors
)
# What depends on one candidate alone (and corpus statistics): a shard that holds the candidate computes it bit for
# bit as one index would.
RERANK_LOCAL_FEATURES = ("bm25_raw", "bm25_title_raw", "bm25_window_raw", "coverage", "win_max", "win_top2",
                         "win_soft", "proximity")
RANK_K = 10.0
PRF_TOP = 3


@njit(cache=True, nogil=True)
def _lexical_kernel(tokens, t_off, title_len, w_off, w_spans, cands, qterms, qcount, idf, k1, b,
                    avgdl, avg_title, avg_window):
    m = cands.shape[0]
    nq = qterms.shape[0]
    out = np.zeros((m, 4), dtype=np.float32)
    total_idf = 0.0
    for j in range(nq):
        total_idf += idf[j]
    tf = np.zeros(nq, dtype=np.float64)
    for r in range(m):
        c = cands[r]
        start = t_off[c]
        n = t_off[c + 1] - start
        qi = np.full(n, -1, dtype=np.int64)
        for p in range(n):
            t = tokens[start + p]
            for j in range(nq):
                if qterms[j] == t:
                    qi[p] = j
                    break
        # whole chunk
        tf[:] = 0.0
        for p in range(n):
            if qi[p] >= 0:
                tf[qi[p]] += 1.0
        score = 0.0
        covered = 0.0
        norm = k1 * (1.0 - b + b * n / max(avgdl, 1e-9))
        for j in range(nq):
            if tf[j] > 0:
                score += qcount[j] * idf[j] * tf[j] * (k1 + 1.0) / (tf[j] + norm)
                covered += idf[j]
        out[r, 0] = score
        out[r, 3] = covered / total_idf if total_idf > 0 else 0.0
        # title: the first title_len tokens
        tl = title_len[c]
        tf[:] = 0.0
        for p in range(tl):
            if qi[p] >= 0:
                tf[qi[p]] += 1.0
        score = 0.0
        norm = k1 * (1.0 - b + b * tl / max(avg_title, 1e-9))
        for j in range(nq):
            if tf[j] > 0:
                score += qcount[j] * idf[j] * tf[j] * (k1 + 1.0) / (tf[j] + norm)
        out[r, 1] = score
        # windows
        best = 0.0
        for w in range(w_off[c], w_off[c + 1]):
            a = w_spans[w, 0]
            e = w_spans[w, 1]
            tf[:] = 0.0
            for p in range(a, e):
                if qi[p] >= 0:
                    tf[qi[p]] += 1.0
            score = 0.0
            norm = k1 * (1.0 - b + b * (e - a) / max(avg_window, 1e-9))
            for j in range(nq):
                if tf[j] > 0:
                    score += qcount[j] * idf[j] * tf[j] * (k1 + 1.0) / (tf[j] + norm)
            if score > best:
                best = score
        out[r, 2] = best
    return out


def lexical_features_reference(tokens: np.ndarray, token_offsets: np.ndarray, title_lengths: np.ndarray,
                               window_offsets: np.ndarray, window_spans: np.ndarray, candidates: np.ndarray,
                               query_terms: np.ndarray, query_counts: np.ndarray, query_idf: np.ndarray,
                               k1: float, b: float, avgdl: float, avg_title: float, avg_window: float) -> np.ndarray:
    """Per candidate: BM25 of the chunk, of its title, best over its windows, and idf-weighted query coverage.

    Chunk c owns tokens[token_offsets[c]:token_offsets[c + 1]] (int32 term ids, -1 for a stop word), whose first
    title_lengths[c] are its title, and windows window_offsets[c]:window_offsets[c + 1] of window_spans (int32 rows
    [start, stop) within the chunk's tokens). query_terms int32 (distinct, >= 0) with query_counts (times in the
    query) and query_idf, float64. BM25 per term: count * idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg)),
    summed in float64 over the query terms in order, with avg avgdl / avg_title / avg_window for chunk / title /
    window. Coverage: sum of idf of the terms present / sum of all idf (0 when that is 0). Returns float32[m, 4].
    Numba, not NumPy: this loop is the reference the C++ kernel must meet bit for bit and it runs per request in the
    fallback, where a NumPy version would cost a millisecond.
    """
    _check_vector(candidates, "candidates", np.int64)
    _check_ids(candidates, "candidates", token_offsets.size - 1)
    return _lexical_kernel(tokens, token_offsets, title_lengths, window_offsets, window_spans, candidates,
                           query_terms, query_counts, query_idf, float(k1), float(b), float(avgdl), float(avg_title),
                           float(avg_window))


def local_features_reference(window_offsets: np.ndarray, window_vectors: np.ndarray, window_scales: np.ndarray | None,
                             window_spans: np.ndarray, tokens: np.ndarray, token_offsets: np.ndarray,
                             title_lengths: np.ndarray, query: np.ndarray, query_terms: np.ndarray,
                             query_counts: np.ndarray, query_idf: np.ndarray, candidates: np.ndarray, *, k1: float,
                             b: float, avgdl: float, avg_title: float, avg_window: float,
                             temperature: float = SOFTMAX_TEMPERATURE) -> np.ndarray:
    """float32[m, len(RERANK_LOCAL_FEATURES)]: lexical_features_reference (columns 0-3), window_maxsim_reference
    (4-6, NaN for a chunk without windows) and proximity matched / max(span, 1) where at least 2 terms match, else 0
    (7). Each row depends on its candidate alone."""
    out = np.zeros((candidates.size, len(RERANK_LOCAL_FEATURES)), dtype=np.float32)
    out[:, 4:7] = window_maxsim_reference(query, window_offsets, window_vectors, window_scales, candidates,
                                          temperature=temperature)
    out[:, 0:4] = lexical_features_reference(tokens, token_offsets, title_lengths, window_offsets, window_spans,
                                             candidates, query_terms, query_counts, query_idf, k1, b, avgdl,
                                             avg_title, avg_window)
    span, matched = proximity_reference(query_terms, token_offsets, tokens, candidates)
    out[:, 7] = np.where(matched >= 2, matched / np.maximum(span, 1), 0.0)
    return out


def _by_max(values: np.ndarray) -> np.ndarray:
    top = float(values.max()) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _reciprocal_ranks(ranked: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    rank = {c: r for r, c in enumerate(ranked.tolist())}  # an id listed twice keeps its last rank
    return np.asarray([RANK_K / (RANK_K + rank[c]) if c in rank else 0.0 for c in candidates.tolist()],
                      dtype=np.float32)


def finish_features_reference(local: np.ndarray, vectors: np.ndarray, query: np.ndarray, candidates: np.ndarray,
                              fused_scores: np.ndarray, bm25_ranked: np.ndarray,
                              dense_ranked: np.ndarray) -> np.ndarray:
    """float32[m, len(RERANK_FEATURES)] from the candidates' local rows (RERANK_LOCAL_FEATURES) and unit vectors
    float32[m, d], in fused order (best first), plus what needs the whole list: BM25 columns scaled by the best
    candidate's (0 when that is <= 0), the window columns falling back on the chunk's own cosine where NaN (a chunk
    without windows), 10 / (10 + rank) in each retriever's ranked ids (0 when absent), and the cosine with the unit
    centroid of the first PRF_TOP vectors."""
    m = candidates.size
    out = np.zeros((m, len(RERANK_FEATURES)), dtype=np.float32)
    if m == 0:
        return out
    q = np.asarray(query, dtype=np.float32)
    vecs = np.asarray(vectors, dtype=np.float32)
    dense = vecs @ q
    maxsim = np.where(np.isnan(local[:, 4:7]), dense[:, None], local[:, 4:7])
    centroid = vecs[:PRF_TOP].mean(axis=0)
    centroid /= max(float(np.linalg.norm(centroid)), 1e-12)
    columns = {
        "fused": fused_scores,
        "bm25": _by_max(local[:, 0]),
        "dense": dense,
        "win_max": maxsim[:, 0],
        "win_top2": maxsim[:, 1],
        "win_soft": maxsim[:, 2],
        "bm25_title": _by_max(local[:, 1]),
        "bm25_window": _by_max(local[:, 2]),
        "proximity": local[:, 7],
        "coverage": local[:, 3],
        "rr_bm25": _reciprocal_ranks(bm25_ranked, candidates),
        "rr_dense": _reciprocal_ranks(dense_ranked, candidates),
        "prf": vecs @ centroid,
    }
    for j, name in enumerate(RERANK_FEATURES):
        out[:, j] = columns[name]
    return out


def rank_reference(features: np.ndarray, columns: np.ndarray, weights: np.ndarray,
                   bias: float) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32[m] best first, order int64[m]): linear_scores_reference of features[:, columns], sorted by
    score descending, equal scores in the given order (order[k] = position of the k-th best)."""
    m = features.shape[0]
    scores = linear_scores_reference(np.ascontiguousarray(features[:, columns]), weights, bias) if m \
        else np.zeros(0, np.float32)
    order = np.argsort(-scores, kind="stable")
    return scores[order], order.astype(np.int64)


# Kernels: the first stage (BM25 top-depth, flat dense top-depth, fusion)
# --------------------------------------------------------------------------------------------------------------------

class Postings(NamedTuple):
    """BM25 impact postings (rag_service/retrievers/lexical.py's layout): the postings of term t are
    [indptr[t], indptr[t + 1]) of docs / weights. `blocks`: the extension's bounds per block of chunks, made from
    these arrays (kernels.native.block_bounds), which only decide which postings the C++ bm25_top reads; the
    references ignore them."""

    indptr: np.ndarray   # int64[vocab + 1]
    docs: np.ndarray     # int32[postings]
    weights: np.ndarray  # float32[postings], idf folded in
    n_docs: int
    blocks: Any = None


class SQ8Codes(NamedTuple):
    """One signed byte per dimension: row ~= base + scale * code (per dimension); optionally the rows' centred sign
    bits (`sign_bits`), which choose the rows whose codes an unfiltered scan of a large index reads."""

    codes: np.ndarray  # int8[n, d]
    scale: np.ndarray  # float32[d]
    base: np.ndarray   # float32[d]
    bits: np.ndarray | None = None  # uint64[n, ceil(d / 64)]


# How many rows the sign bits keep for a scan that takes wide_k candidates from the codes, and from what index size
# they are read: native/src/retrieve.hpp (kBitsFactor, kBitsMinKeep, kBitsMinRatio) says why.
BITS_FACTOR = 5
BITS_MIN_KEEP = 1024
BITS_MIN_RATIO = 4


def bits_keep(wide_k: int) -> int:
    """Rows the sign bits keep when the codes are to pass on wide_k candidates."""
    return wide_k * BITS_FACTOR if wide_k > BITS_MIN_KEEP // BITS_FACTOR else BITS_MIN_KEEP


def sign_bits(vectors: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """uint64[n, ceil(d / 64)]: bit j of row i set where vectors[i, j] > mean[j] (the column means, float32, unless
    given), bit j in word j // 64 at bit j % 64; the padding bits are clear."""
    v = np.asarray(vectors, np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got {v.ndim}-D")
    n, d = v.shape
    centre = v.mean(axis=0, dtype=np.float64).astype(np.float32) if mean is None else np.asarray(mean, np.float32)
    words = (d + 63) // 64
    out = np.zeros((n, words * 8), np.uint8)
    # A block of rows at a time: the comparison's boolean matrix of a large index stays small.
    for start in range(0, n, 65536):
        block = v[start:start + 65536] > centre
        out[start:start + len(block), :(d + 7) // 8] = np.packbits(block, axis=1, bitorder="little")
    return out.view("<u8").astype(np.uint64, copy=False)


def bits_top_reference(bits: np.ndarray, query: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` rows with the largest sum of the int8 query (`quantize_query` without a scale) over their set sign
    bits, ties by id ascending, in ascending id order."""
    n, words = bits.shape
    d = query.size
    unpacked = np.unpackbits(bits.astype("<u8").view(np.uint8), axis=1, bitorder="little")[:, :d].astype(bool)
    q = quantize_query(query, np.ones(d, np.float32)).astype(np.int64)
    sums = np.where(unpacked, q, 0).sum(axis=1)
    kept, _ = _ranked(np.arange(n, dtype=np.int64), sums.astype(np.float64), keep)
    return np.sort(kept)


class RowCodes(NamedTuple):
    """Each row as int8 codes with its own scale, row ~= scale * code (the row's largest magnitude at 127), and how
    far the decode may be off: slack >= ||row - scale * code|| and norm >= ||scale * code||, rounded up to float32.
    For a matrix that grows a row at a time, where per-dimension codes (SQ8Codes) would need refitting."""

    codes: np.ndarray  # int8[n, d]
    scale: np.ndarray  # float32[n]
    slack: np.ndarray  # float32[n]
    norm: np.ndarray   # float32[n]


class RetrieveResult(NamedTuple):
    bm25: tuple[np.ndarray, np.ndarray]   # (ids int64, scores float32), best first
    dense: tuple[np.ndarray, np.ndarray]
    fused: FusionResult
    times_ns: tuple[int, int, int]        # (bm25, dense, fusion); 0 where not measured


def distinct_query_terms(term_ids: np.ndarray, idf_table: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rerank's query terms from BM25's input `term_ids` (int64, repeats kept): the distinct ids ascending
    (int32), how often each occurs (float64) and its idf, `idf_table[id]` (float64). An id outside the table is a
    ValueError."""
    ids = np.asarray(term_ids, dtype=np.int64)
    table = np.asarray(idf_table, dtype=np.float64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(table)):
        bad = ids[(ids < 0) | (ids >= len(table))][0]
        raise ValueError(f"term_ids must be in [0, {len(table)}) (the idf table), got {bad}")
    terms, counts = np.unique(ids, return_counts=True)
    return terms.astype(np.int32), counts.astype(np.float64), table[terms]


def agreement_reference(bm25_ids: np.ndarray, dense_ids: np.ndarray, top: int) -> int:
    """How many of the top `top` (>= 0) ids of two ranked lists (each without repeats) are the same: the confidence
    rule of the adaptive pipeline (rag_service.search.adaptive.agreement)."""
    return len(np.intersect1d(np.asarray(bm25_ids[:top]), np.asarray(dense_ids[:top]), assume_unique=True))


def sq8_quantize(vectors: np.ndarray, rows_per_step: int = 65536) -> SQ8Codes:
    """Per-dimension min/max scalar quantization of float32[n, d] rows to 256 levels (stored as code - 128, so the
    native scan can use its int8 dot product). A dimension with one value gets scale 1 and code -128 throughout."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got {vectors.ndim}-D")
    n, d = vectors.shape
    if n == 0:
        return SQ8Codes(np.zeros((0, d), np.int8), np.ones(d, np.float32), np.zeros(d, np.float32))
    lo = vectors.min(axis=0).astype(np.float32)
    hi = vectors.max(axis=0).astype(np.float32)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ValueError("vectors must be finite")
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[scale <= 0] = 1.0
    codes = np.empty((n, d), np.int8)
    for start in range(0, n, rows_per_step):
        block = (np.asarray(vectors[start:start + rows_per_step], np.float32) - lo) / scale
        codes[start:start + rows_per_step] = (np.clip(np.rint(block), 0, 255) - 128).astype(np.int8)
    base = (lo + np.float32(128) * scale).astype(np.float32)
    return SQ8Codes(codes, scale, base)


def _check_depth(depth: int) -> int:
    depth = operator.index(depth)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return depth


def _check_mask(mask: np.ndarray | None, n: int) -> np.ndarray | None:
    if mask is None:
        return None
    mask = _check_vector(mask, "mask", np.bool_)
    if mask.size != n:
        raise ValueError(f"mask must have one entry per chunk ({n}), got {mask.size}")
    return mask


def _ranked(ids: np.ndarray, scores: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Score descending, then id ascending, cut to depth."""
    order = np.lexsort((ids, -scores.astype(np.float64)))[:depth]
    return ids[order].astype(np.int64), scores[order].astype(np.float32)


def bm25_top_reference(postings: Postings, term_ids: np.ndarray, mask: np.ndarray | None,
                       depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The top min(depth, n_docs) chunks with a BM25 score > 0, allowed by mask, as (ids int64, scores float32).

    A chunk's score is the float32 sum, query term by query term (a repeated term counts again) and posting by
    posting, of its impacts: the numba scorer's additions in its order, so scores agree bit for bit."""
    indptr = _check_vector(postings.indptr, "indptr", np.int64)
    docs = _check_vector(postings.docs, "docs", np.int32)
    weights = _check_vector(postings.weights, "weights", np.float32)
    if indptr.size < 1:
        raise ValueError("indptr must have at least one entry (vocabulary + 1)")
    if docs.size != weights.size:
        raise ValueError(f"docs and weights must have the same length, got {docs.size} and {weights.size}")
    n = operator.index(postings.n_docs)
    if n < 0:
        raise ValueError(f"n_docs must be >= 0, got {n}")
    terms = _check_vector(term_ids, "term_ids", np.int64)
    mask = _check_mask(mask, n)
    depth = _check_depth(depth)
    n_terms = indptr.size - 1
    for k, t in enumerate(terms.tolist()):
        if not 0 <= t < n_terms:
            raise ValueError(f"term_ids[{k}] = {t} is outside [0, {n_terms})")
        lo, hi = int(indptr[t]), int(indptr[t + 1])
        if lo < 0 or hi < lo or hi > docs.size:
            raise ValueError(f"indptr[{t}:{t + 2}] = [{lo}, {hi}] is not a range of the {docs.size} postings")
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n == 0 or terms.size == 0:
        return empty
    positions = np.concatenate([np.arange(indptr[t], indptr[t + 1]) for t in terms.tolist()])
    touched = docs[positions].astype(np.int64)
    bad = np.flatnonzero((touched < 0) | (touched >= n))
    if bad.size:
        raise ValueError(f"docs[{positions[bad[0]]}] = {touched[bad[0]]} is outside [0, {n})")
    acc = np.zeros(n, np.float32)
    np.add.at(acc, touched, weights[positions])  # unbuffered, in index order: the scorer's order of additions
    ids = np.unique(touched)
    scores = acc[ids]
    keep = ~(scores <= 0)
    if mask is not None:
        keep &= mask[ids]
    return _ranked(ids[keep], scores[keep], depth)


def row_quantize_reference(vectors: np.ndarray) -> RowCodes:
    """RowCodes of float32[n, d] rows (finite): code = rint(row * 127 / max|row|) in float32, a zero row codes to
    zeros with scale 0; slack and norm are computed in float64 and rounded up."""
    v = np.asarray(vectors, np.float32)
    if v.ndim != 2:
        raise ValueError(f"vectors must be 2-D, got {v.ndim}-D")
    if not np.isfinite(v).all():
        raise ValueError("vectors must be finite")
    largest = np.abs(v).max(axis=1) if v.shape[1] else np.zeros(len(v), np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(largest > 0, np.float32(127) / largest, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(v * inv[:, None]), -127, 127).astype(np.int8)
    scale = (largest / np.float32(127)).astype(np.float32)
    decoded = codes.astype(np.float64) * scale.astype(np.float64)[:, None]

    def up(x: np.ndarray) -> np.ndarray:
        return np.nextafter(x.astype(np.float32), np.float32(np.inf))

    return RowCodes(codes, scale, up(np.linalg.norm(v - decoded, axis=1)), up(np.linalg.norm(decoded, axis=1)))


def quantize_query(query: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """query * scale as int8, symmetric with its largest magnitude at 127, every step in float32 (rounding half to
    even): the vector the sq8 scan ranks codes by. A zero query quantizes to zeros."""
    qs = np.asarray(query, np.float32) * np.asarray(scale, np.float32)
    largest = np.float32(np.max(np.abs(qs))) if qs.size else np.float32(0)
    inv = np.float32(127) / largest if largest > 0 else np.float32(0)
    return np.rint(qs * inv).astype(np.int8)


def dense_top_reference(vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None, depth: int,
                        codes: SQ8Codes | None = None, oversample: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The top min(depth, allowed) rows of vectors (float32[n, d]) by inner product with query (float32[d]), as
    (ids int64, scores float32). oversample >= 1 first takes the best oversample * depth rows by the integer inner
    product of their codes with the quantized query (`quantize_query`), which ranks them as the decoded codes' inner
    product would up to the query's rounding, then ranks those by the exact one (so only recall, never a score,
    depends on the codes). With the codes' sign bits, no mask and at least BITS_MIN_RATIO * bits_keep(...) rows,
    only the codes of `bits_top_reference`'s rows are ranked.
    Scores are float32 dot products: the summation order (and so the last bit) is the implementation's own."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ValueError("vectors must be a 2-D float32 numpy.ndarray")
    n, d = vectors.shape
    q = _check_vector(query, "query", np.float32)
    if q.size != d:
        raise ValueError(f"query must have {d} entries (the columns of vectors), got {q.size}")
    mask = _check_mask(mask, n)
    depth = _check_depth(depth)
    oversample = operator.index(oversample)
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    if oversample > 0 and codes is None:
        raise ValueError("oversample > 0 needs codes (the sq8 codes of the vectors)")
    _check_finite(q, "query")
    allowed = np.arange(n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
    if oversample == 0 or codes is None:
        return _ranked(allowed, np.asarray(vectors[allowed] @ q, np.float32), depth)
    wide_k = min(depth * oversample, max(n, 1))
    if mask is None and codes.bits is not None and bits_keep(wide_k) * BITS_MIN_RATIO <= n:
        allowed = bits_top_reference(codes.bits, q, bits_keep(wide_k))
    # float32 of the exact integer dot products with the int8 query: exact below d = 1032, as the native scan has it.
    exact = codes.codes[allowed].astype(np.int64) @ quantize_query(q, codes.scale).astype(np.int64)
    wide, _ = _ranked(allowed, exact.astype(np.float32), depth * oversample)
    wide = np.sort(wide)
    return _ranked(wide, np.asarray(vectors[wide] @ q, np.float32), depth)


def dense_above_reference(vectors: np.ndarray, codes: RowCodes, query: np.ndarray, mask: np.ndarray | None,
                          min_score: float, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The top min(depth, ...) rows of vectors (float32[n, d]) allowed by mask whose inner product with query is >=
    min_score, as (ids int64, scores float32), best first (ties: id ascending). `codes` (row_quantize_reference of
    vectors) speed the native scan and never change its result: here they are only checked."""
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ValueError("vectors must be a 2-D float32 numpy.ndarray")
    n, d = vectors.shape
    if codes.codes.shape != (n, d):
        raise ValueError(f"codes must have the shape of vectors ({n}, {d}), got {codes.codes.shape}")
    for name, column in (("code_scale", codes.scale), ("code_slack", codes.slack), ("code_norm", codes.norm)):
        if len(column) != n:
            raise ValueError(f"{name} must have one entry per row of vectors ({n}), got {len(column)}")
    q = _check_vector(query, "query", np.float32)
    if q.size != d:
        raise ValueError(f"query must have {d} entries (the columns of vectors), got {q.size}")
    mask = _check_mask(mask, n)
    depth = _check_depth(depth)
    if math.isnan(min_score):
        raise ValueError("min_score must be a number, got NaN")
    _check_finite(q, "query")
    allowed = np.arange(n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
    scores = np.asarray(vectors[allowed] @ q, np.float32)
    keep = scores.astype(np.float64) >= min_score
    return _ranked(allowed[keep], scores[keep], depth)


def retrieve_reference(postings: Postings, term_ids: np.ndarray, mask: np.ndarray | None, depth: int, *,
                       vectors: np.ndarray | None = None, query: np.ndarray | None = None,
                       codes: SQ8Codes | None = None, oversample: int = 0,
                       dense: tuple[np.ndarray, np.ndarray] | None = None, method: str = "weighted",
                       dense_weight: float = 0.5, top_k: int = 10, rrf_k: float = 60.0,
                       bm25: tuple[np.ndarray, np.ndarray] | None = None) -> RetrieveResult:
    """bm25_top_reference (or the given `bm25` list, ranked beforehand), then the dense list (dense_top_reference
    over vectors/query, or the given `dense` hits, or none), then fuse_reference over the two."""
    if bm25 is None:
        bm25 = bm25_top_reference(postings, term_ids, mask, depth)
    elif len(bm25[0]) != len(bm25[1]):
        raise ValueError(f"bm25_ids and bm25_scores must have the same length, got {len(bm25[0])} and "
                         f"{len(bm25[1])}")
    if (vectors is None) != (query is None):
        raise ValueError("vectors and query come together (both None or both arrays)")
    if vectors is not None:
        if dense is not None:
            raise ValueError("dense_ids and dense_scores must be None when vectors are scanned")
        if vectors.shape[0] != postings.n_docs:
            raise ValueError(f"vectors must have one row per chunk (n_docs = {postings.n_docs}), got "
                             f"{vectors.shape[0]}")
        hits = dense_top_reference(vectors, query, mask, depth, codes, oversample)  # type: ignore[arg-type]
    elif dense is not None:
        hits = dense
    else:
        hits = np.zeros(0, np.int64), np.zeros(0, np.float32)
    fused = fuse_reference(bm25[0], bm25[1], hits[0], hits[1], method=method, dense_weight=dense_weight,
                           top_k=top_k, rrf_k=rrf_k)
    return RetrieveResult(bm25, hits, fused, (0, 0, 0))
