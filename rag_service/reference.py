"""NumPy references of every native kernel: readable, slow, and the specification the C++ (and any CUDA) code must meet.

Each kernel has its own section below. A reference takes the same arguments as the native kernel, raises the same
ValueErrors (messages name the argument) and returns the same result type; tests compare the two on seeded random
inputs. A reference is strict about dtypes and shapes like the native boundary (rag_service.native does the lenient
conversions); it accepts any memory layout, which is a C++ concern rather than part of the semantics.

Kernels:
  * fusion -- fuse_reference: merge a BM25 and a dense candidate list into one ranking.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np

__all__ = ["FUSION_METHODS", "FusionResult", "fuse_reference"]


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
    if hi > lo:
        normalised = (scores.astype(np.float64) - lo) / (hi - lo)
    else:
        normalised = np.ones(scores.size, dtype=np.float64)
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
