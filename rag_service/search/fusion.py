"""Fusion stage: merges the lexical and dense candidate lists into one ranking (native kernel, NumPy reference)."""

from __future__ import annotations

import numpy as np

from rag_service.kernels import native
from rag_service.kernels.native import FusionResult


def fuse(
    bm25: tuple[np.ndarray, np.ndarray],
    dense: tuple[np.ndarray, np.ndarray],
    *,
    method: str,
    dense_weight: float,
    top_k: int,
    rrf_k: float = 60.0,
) -> FusionResult:
    """bm25 and dense are (ids, scores) in rank order; returns the fused top_k with each retriever's raw score."""
    return native.fuse(bm25[0], bm25[1], dense[0], dense[1], method=method, dense_weight=dense_weight,
                       top_k=top_k, rrf_k=rrf_k)
