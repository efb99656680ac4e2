"""Facade over the native kernels in rag_service._native, with the NumPy references as fallback.

Import this module, never rag_service._native directly. Like faiss's loader, it tries the compiled extension and,
when that fails, logs why and serves every kernel from rag_service.kernels.reference instead (same results, slower).

Backend choice, made per call (or per explicit fusion_backend() resolve), never frozen at import:
  RAG_SERVICE_BACKEND=auto   (default) C++ when the extension imports, else NumPy; a kernel with a CUDA twin
                             (window_maxsim, similarity_matrix, mmr_select) runs on CUDA when the extension was built
                             with CUDA, a device answers and the call is large enough to pay for the transfers
                             (CUDA_MIN_WORK)
                      cpp    C++; RuntimeError if the extension is missing
                      cuda   the CUDA kernel where one exists, C++ for the others; RuntimeError if the extension was
                             built without CUDA or no device answers
                      numpy  the NumPy references

Kernels: fuse (score fusion); window_maxsim, proximity, linear_scores (rerank features and model);
similarity_matrix, mmr_select (context filter); bm25_top, dense_top, retrieve (the first stage: BM25 top-depth, flat
dense top-depth over float rows or sq8 codes, and fusion, in one GIL-released call); lexical_features,
finish_features, rank_features and RerankCore (the rerank stage in one call). Semantics: the *_reference functions in
rag_service.kernels.reference.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rag_service.kernels.reference import (
    RERANK_FEATURES,
    RERANK_LOCAL_FEATURES,
    SOFTMAX_TEMPERATURE,
    FusionResult,
    Postings,
    RetrieveResult,
    RowCodes,
    SQ8Codes,
    agreement_reference,
    bm25_top_reference,
    dense_above_reference,
    dense_top_reference,
    distinct_query_terms,
    finish_features_reference,
    fuse_reference,
    lexical_features_reference,
    linear_scores_reference,
    local_features_reference,
    mmr_select_reference,
    proximity_reference,
    rank_reference,
    retrieve_reference,
    row_quantize_reference,
    sign_bits,
    similarity_matrix_reference,
    sq8_quantize,
    window_maxsim_reference,
)

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "CUDA_MIN_WORK",
    "HAS_CUDA",
    "HAS_NATIVE",
    "NATIVE_IMPORT_ERROR",
    "FusionResult",
    "RerankCore",

    "Postings",
    "RetrieveResult",
    "RowCodes",
    "SQ8Codes",
    "BLOCK_SHIFT",
    "backend_info",
    "block_bounds",
    "bm25_top",
    "dense_above",
    "dense_top",
    "retrieve",
    "retrieve_backend",
    "search_core",
    "search_core_backend",
    "SearchCall",
    "SearchCoreResult",
    "row_quantize",
    "sign_bits",
    "sign_bits_pay",
    "sq8_quantize",
    "cuda_device_status",
    "fuse",
    "finish_features",
    "fusion_backend",
    "kernel_backend",
    "lexical_features",
    "linear_scores",
    "mmr_select",
    "proximity",
    "rank_features",
    "requested_backend",
    "rerank_core_backend",
    "similarity_matrix",
    "simd_level",
    "window_maxsim",
]

logger = logging.getLogger(__name__)

BACKEND_ENV = "RAG_SERVICE_BACKEND"
BACKENDS = ("auto", "cuda", "cpp", "numpy")

_BUILD_HINT = "install rag-service from source with `pip install .` (needs a C++17 compiler and CMake >= 3.24)"
_CUDA_HINT = ("rebuild it with nvcc on PATH (or CUDACXX set) and CUDA forced on: `RAG_SERVICE_CUDA=ON pip install .` "
              "(no GPU is needed to build)")

try:
    from rag_service import _native
except ImportError as _error:
    _native = None  # type: ignore[assignment]  # no extension: the facade serves the NumPy references
    NATIVE_IMPORT_ERROR: str | None = f"{type(_error).__name__}: {_error}"
    logger.warning("rag_service._native is not available (%s); using the NumPy reference kernels, which are slower. "
                   "To get the native kernels, %s.", NATIVE_IMPORT_ERROR, _BUILD_HINT)
else:
    NATIVE_IMPORT_ERROR = None
    logger.debug("loaded %s", _native.BUILD_INFO)

HAS_NATIVE: bool = _native is not None
HAS_CUDA: bool = bool(_native.HAS_CUDA) if _native is not None else False  # the extension was built with CUDA
# The rerank / context-filter kernels arrived after fusion: an extension built from older sources lacks them.
_HAS_RERANK_KERNELS: bool = _native is not None and hasattr(_native, "window_maxsim")
# Likewise the first-stage kernels (bm25_top, dense_top, retrieve, and the semantic cache's row_quantize).
_HAS_RETRIEVE_KERNELS: bool = _native is not None and all(hasattr(_native, f) for f in ("retrieve", "row_quantize"))
# And the whole ranking in one call (search_core).
_HAS_SEARCH_CORE: bool = _native is not None and hasattr(_native, "search_core")
# And the reply's contexts joined natively (join_contexts).
_HAS_JOIN: bool = _native is not None and hasattr(_native, "join_contexts")
# And an ASCII query's term ids in one call (WordIds).
_HAS_WORD_IDS: bool = _native is not None and hasattr(_native, "WordIds")
# And the query encoder's token ids for ASCII text (WordPiece).
_HAS_WORDPIECE: bool = _native is not None and hasattr(_native, "WordPiece")

# Blocks of 64 chunks: at 1M chunks BM25 then reads a few percent of a query's postings at p50 (bench/README.md,
# "BM25 block by block"; 16 and 32 bound tighter but cost more per query), and the bounds of the lists longer than
# the blocks take ~10% of the postings' bytes.
BLOCK_SHIFT = 6
if _native is not None and not _HAS_RERANK_KERNELS:
    logger.warning("rag_service._native predates the rerank kernels; they run on the NumPy references until it is "
                   "rebuilt (`python setup.py build_ext --inplace` or `pip install .`)")


@functools.lru_cache(maxsize=1)
def cuda_device_status() -> tuple[bool, str]:
    """(available, reason): whether a CUDA device answers; reason says why not ("" when available). Cached."""
    if _native is None:
        return False, f"rag_service._native is not available ({NATIVE_IMPORT_ERROR})"
    if not HAS_CUDA:
        return False, "rag_service._native was built without CUDA"
    count, error = _native.cuda_device_count()
    if count > 0:
        return True, ""
    return False, error or "no CUDA device found"


def requested_backend() -> str:
    """The backend RAG_SERVICE_BACKEND asks for, read now: one of BACKENDS ("auto" when unset or empty)."""
    raw = os.environ.get(BACKEND_ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={raw!r} is not one of {', '.join(BACKENDS)}")
    return value


@functools.cache
def _log_no_cuda_twin(kernel: str) -> None:
    """Logs once per kernel that the CUDA backend serves it on C++ (the cache makes it once)."""
    logger.info("backend 'cuda': kernel %r has no CUDA implementation and runs on the C++ backend", kernel)


def _resolve(kernel: str, has_cuda_twin: bool, backend: str | None) -> str:
    """The backend ("cuda", "cpp" or "numpy") that runs `kernel`, for an explicit `backend` or, when None, the
    environment's choice. Raises ValueError for an unknown name and RuntimeError when the choice cannot be met."""
    if backend is None:
        requested, source = requested_backend(), BACKEND_ENV
    else:
        requested, source = backend, "backend"
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if requested == "numpy":
        return "numpy"
    if requested == "auto":
        # auto never picks CUDA by itself: a device transfer pays off only for large inputs, so a kernel that gets a
        # CUDA twin should be chosen for it explicitly ("cuda") until there is a measured size threshold.
        return "cpp" if HAS_NATIVE else "numpy"
    if not HAS_NATIVE:
        raise RuntimeError(f"{source}={requested!r} needs the native extension rag_service._native, which is not "
                           f"available ({NATIVE_IMPORT_ERROR}); {_BUILD_HINT}")
    if requested == "cpp":
        return "cpp"
    if not HAS_CUDA:
        raise RuntimeError(f"{source}='cuda' but rag_service._native was built without CUDA; {_CUDA_HINT}")
    available, reason = cuda_device_status()
    if not available:
        raise RuntimeError(f"{source}='cuda' but no CUDA device is usable: {reason}")
    if has_cuda_twin:
        return "cuda"
    _log_no_cuda_twin(kernel)
    return "cpp"


def fusion_backend(backend: str | None = None) -> str:
    """The backend fuse() runs on: "cpp" or "numpy". backend=None resolves RAG_SERVICE_BACKEND now."""
    # Fusion has no CUDA twin: with candidate lists of a few hundred ids the kernel takes microseconds on the CPU,
    # less than a single host-to-device transfer and launch would, so "cuda" runs it on C++.
    return _resolve("fusion", False, backend)


_INT64 = np.dtype(np.int64)
_FLOAT32 = np.dtype(np.float32)


def _as_vector(values: Any, dtype: np.dtype, name: str) -> np.ndarray:
    """values as a 1-D C-contiguous array of dtype (int64 ids or float32 scores); ValueError naming the argument when
    it cannot be one without losing information (float ids, out-of-range values, non-numbers)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {array.ndim}-D")
    if array.dtype == dtype:  # the common case: no conversion
        return np.ascontiguousarray(array)
    kinds = "iu" if dtype == _INT64 else "fiu"
    if array.size and array.dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {'integers' if kinds == 'iu' else 'numbers'}, got dtype {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has ids beyond the int64 range")
    with np.errstate(over="ignore"):
        converted = np.ascontiguousarray(array, dtype=dtype)
    if dtype == _FLOAT32 and array.dtype.kind == "f" and array.size:
        out_of_range = np.isfinite(array) & ~np.isfinite(converted)
        if out_of_range.any():
            at = int(np.flatnonzero(out_of_range)[0])
            raise ValueError(f"{name} must fit in float32, got {array[at]} at index {at}")
    return converted


def fuse(
    bm25_ids: Any,
    bm25_scores: Any,
    dense_ids: Any,
    dense_scores: Any,
    *,
    method: str = "weighted",
    dense_weight: float = 0.5,
    top_k: int = 10,
    rrf_k: float = 60.0,
    backend: str | None = None,
) -> FusionResult:
    """Fuse a BM25 and a dense candidate list (each in rank order) into the top_k of their union.

    Semantics: rag_service.kernels.reference.fuse_reference. Inputs are converted to int64 ids / float32 scores, 1-D and
    C-contiguous; anything else wrong raises ValueError naming the argument. backend=None uses RAG_SERVICE_BACKEND
    (see fusion_backend); "cpp" or "numpy" (or any of BACKENDS) pick one explicitly.
    """
    chosen = fusion_backend(backend)
    b_ids = _as_vector(bm25_ids, _INT64, "bm25_ids")
    b_scores = _as_vector(bm25_scores, _FLOAT32, "bm25_scores")
    d_ids = _as_vector(dense_ids, _INT64, "dense_ids")
    d_scores = _as_vector(dense_scores, _FLOAT32, "dense_scores")
    if chosen == "cpp":
        return FusionResult(*_native.fuse(b_ids, b_scores, d_ids, d_scores, method, dense_weight, top_k, rrf_k))
    return fuse_reference(b_ids, b_scores, d_ids, d_scores, method=method, dense_weight=dense_weight, top_k=top_k,
                          rrf_k=rrf_k)


def backend_info() -> dict[str, Any]:
    """What this process runs on: built_with_cuda, cuda_device_available, cuda_reason ("" when available) and
    fusion_backend ("cpp"/"numpy", as RAG_SERVICE_BACKEND resolves now; raises like fuse() when it cannot)."""
    available, reason = cuda_device_status()
    return {
        "built_with_cuda": HAS_CUDA,
        "cuda_device_available": available,
        "cuda_reason": reason,
        "fusion_backend": fusion_backend(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Rerank and context-filter kernels
# --------------------------------------------------------------------------------------------------------------------

# Below these amounts of work (multiply-adds) "auto" keeps a kernel with a CUDA twin on the CPU: the C++ kernel reads
# the rows once at memory speed, while CUDA must first gather and copy them over PCIe (~25 GB/s) and pay ~10-20 us of
# launches and synchronisation. Estimates from those costs, not measured on a GPU (none was available): a request's
# 100-200 candidates stay well below them; bulk scoring (benchmarks, offline evaluation) crosses them.
CUDA_MIN_WORK = {
    "window_maxsim": 64 << 20,      # candidate windows x d
    "similarity_matrix": 256 << 20,  # m x m x d
    "mmr_select": 64 << 20,          # m x m x k (the greedy loop; the matrix itself must come over too)
}

_KERNEL_CUDA_TWIN = {"window_maxsim": True, "similarity_matrix": True, "mmr_select": True, "proximity": False,
                     "linear_scores": False}


def kernel_backend(kernel: str, backend: str | None = None, *, work: int = 0) -> str:
    """The backend ("cuda", "cpp" or "numpy") that runs `kernel` for a call of `work` multiply-adds.

    backend=None resolves RAG_SERVICE_BACKEND now. "auto" picks CUDA only for a kernel with a CUDA twin, when the
    extension was built with CUDA, a device answers and work >= CUDA_MIN_WORK[kernel]; else C++ (NumPy when the
    extension is missing or predates these kernels). Forcing "cpp" or "cuda" when it cannot be met raises
    RuntimeError saying how to get it; an unknown name raises ValueError.
    """
    if kernel not in _KERNEL_CUDA_TWIN:
        raise ValueError(f"kernel must be one of {', '.join(sorted(_KERNEL_CUDA_TWIN))}, got {kernel!r}")
    twin = _KERNEL_CUDA_TWIN[kernel]
    chosen = _resolve(kernel, twin, backend)
    if chosen != "numpy" and not _HAS_RERANK_KERNELS:
        if (backend or requested_backend()) == "auto":
            return "numpy"
        raise RuntimeError(f"rag_service._native was built from sources older than the {kernel} kernel; rebuild it "
                           "(`python setup.py build_ext --inplace` or `pip install .`)")
    if chosen == "cpp" and twin and HAS_CUDA and work >= CUDA_MIN_WORK[kernel] \
            and (backend or requested_backend()) == "auto" and cuda_device_status()[0]:
        return "cuda"
    return chosen


def _on_device(kernel: str, backend: str | None, cuda_call, cpp_call):
    """cuda_call(); when "auto" chose CUDA and the device fails (out of memory, a reset, a lost driver), logs why and
    returns cpp_call() instead: the request still gets its answer. A forced "cuda" raises."""
    try:
        return cuda_call()
    except RuntimeError as error:
        if (backend or requested_backend()) == "cuda":
            raise
        logger.warning("CUDA %s failed (%s); running it on the C++ backend", kernel, error)
        return cpp_call()


def simd_level() -> str:
    """The widest SIMD instruction set the C++ kernels use on this CPU: "avx512", "avx2" or "scalar" ("none" when
    the native extension or its rerank kernels are missing)."""
    return str(_native.simd_level()) if _HAS_RERANK_KERNELS else "none"


def sign_bits_pay() -> bool:
    """Whether a flat dense scan gains from reading the rows' sign bits before their sq8 codes on this CPU: only
    with AVX-512 VNNI, where the bits' kernel is a masked move and a multiply-add per 64 dimensions (False without
    the extension)."""
    return bool(_native.sign_bits_pay()) if _HAS_RETRIEVE_KERNELS and hasattr(_native, "sign_bits_pay") else False


def _as_float32_matrix(values: Any, name: str) -> np.ndarray:
    """values as a 2-D float32 array: float32 input is used as is (the native boundary checks its layout), other
    numbers are converted (a copy); anything else raises ValueError naming the argument."""
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {array.ndim}-D")
    if array.dtype == _FLOAT32:
        return array
    if array.size and array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def window_maxsim(
    query: Any,
    offsets: np.ndarray,
    vectors: np.ndarray,
    scales: np.ndarray | None,
    candidates: Any,
    *,
    temperature: float = SOFTMAX_TEMPERATURE,
    backend: str | None = None,
) -> np.ndarray:
    """Window MaxSim features of each candidate chunk: float32[m, 3] = [max, mean of the top 2, soft max].

    query: float32[d] (converted from other float/int arrays); offsets int64[n_chunks + 1] CSR over vectors' rows;
    vectors int8[n_windows, d] with scales float32[n_windows], or float16/float32[n_windows, d] with scales=None (the
    store is not converted: it is usually a memory map, and a copy per call would cost more than the kernel);
    candidates: chunk ids (converted to int64). A candidate without windows gets NaN in all three columns. Semantics
    and errors: rag_service.kernels.reference.window_maxsim_reference.
    """
    q = _as_vector(query, _FLOAT32, "query")
    ids = _as_vector(candidates, _INT64, "candidates")
    work = 0
    if isinstance(offsets, np.ndarray) and isinstance(vectors, np.ndarray) and offsets.ndim == 1 and offsets.size \
            and vectors.ndim == 2 and ids.size:
        # an upper bound without touching the windows: the candidates' share of the store
        work = int(ids.size * max(int(offsets[-1]) - int(offsets[0]), 0) // max(offsets.size - 1, 1)) \
            * int(vectors.shape[1])
    chosen = kernel_backend("window_maxsim", backend, work=work)
    if chosen == "numpy":
        return window_maxsim_reference(q, offsets, vectors, scales, ids, temperature=temperature)

    def run(cuda: bool) -> np.ndarray:
        return _native.window_maxsim(q, offsets, vectors, scales, ids, float(temperature), cuda)

    return _on_device("window_maxsim", backend, lambda: run(True), lambda: run(False)) if chosen == "cuda" \
        else run(False)


def proximity(query_terms: Any, token_offsets: np.ndarray, tokens: np.ndarray, candidates: Any,
              *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(span int32[m], matched int32[m]): per candidate chunk, how many distinct query terms occur in its token
    stream and the shortest span of tokens covering all of them (1 for one term, 0 for none). query_terms are
    converted to int32 (distinct, >= 0), candidates to int64; token_offsets int64 and tokens int32 as stored.
    Semantics and errors: rag_service.kernels.reference.proximity_reference."""
    terms = np.asarray(query_terms)
    if terms.ndim == 1 and terms.dtype != np.int32:
        if terms.size and terms.dtype.kind not in "iu":
            raise ValueError(f"query_terms must hold integers, got dtype {terms.dtype}")
        if terms.size and (terms.min() < np.iinfo(np.int32).min or terms.max() > np.iinfo(np.int32).max):
            raise ValueError("query_terms must fit in int32")
        terms = terms.astype(np.int32)
    terms = _as_vector(terms, np.dtype(np.int32), "query_terms")
    ids = _as_vector(candidates, _INT64, "candidates")
    if kernel_backend("proximity", backend) == "numpy":
        return proximity_reference(terms, token_offsets, tokens, ids)
    return _native.proximity(terms, token_offsets, tokens, ids)


def linear_scores(features: Any, weights: Any, bias: float, *, backend: str | None = None) -> np.ndarray:
    """float32[m]: features float32[m, f] @ weights float32[f] + bias, summed in float64. Semantics and errors:
    rag_service.kernels.reference.linear_scores_reference."""
    f = _as_float32_matrix(features, "features")
    w = _as_vector(weights, _FLOAT32, "weights")
    if kernel_backend("linear_scores", backend) == "numpy":
        return linear_scores_reference(f, w, bias)
    return _native.linear_scores(np.ascontiguousarray(f), w, float(bias))


def similarity_matrix(vectors: Any, *, backend: str | None = None) -> np.ndarray:
    """float32[m, m] of pairwise dot products of vectors' rows (float32[m, d], unit rows give cosines). Semantics and
    errors: rag_service.kernels.reference.similarity_matrix_reference."""
    v = _as_float32_matrix(vectors, "vectors")
    chosen = kernel_backend("similarity_matrix", backend, work=v.shape[0] * v.shape[0] * v.shape[1])
    if chosen == "numpy":
        return similarity_matrix_reference(v)
    if chosen == "cuda":
        return _on_device("similarity_matrix", backend, lambda: _native.similarity_matrix(v, True),
                          lambda: _native.similarity_matrix(v, False))
    return _native.similarity_matrix(v, False)


def mmr_select(relevance: Any, sim: Any, mmr_lambda: float, k: int, dedup_threshold: float,
               *, backend: str | None = None) -> np.ndarray:
    """int64[<= k]: indices picked by greedy MMR (first the most relevant; then max lambda * relevance - (1 - lambda)
    * max similarity to those picked; ties to the lower index), dropping every candidate whose similarity to a pick
    is above dedup_threshold. Semantics and errors: rag_service.kernels.reference.mmr_select_reference."""
    rel = _as_vector(relevance, _FLOAT32, "relevance")
    s = _as_float32_matrix(sim, "sim")
    k = operator.index(k)
    chosen = kernel_backend("mmr_select", backend, work=s.shape[0] * s.shape[0] * max(min(k, s.shape[0]), 0))
    if chosen == "numpy":
        return mmr_select_reference(rel, s, mmr_lambda, k, dedup_threshold)

    def run(cuda: bool) -> np.ndarray:
        return _native.mmr_select(rel, s, float(mmr_lambda), k, float(dedup_threshold), cuda)

    return _on_device("mmr_select", backend, lambda: run(True), lambda: run(False)) if chosen == "cuda" \
        else run(False)


# --------------------------------------------------------------------------------------------------------------------
# The rerank stage in one call
# --------------------------------------------------------------------------------------------------------------------

# An extension built from older sources lacks these; one whose column orders differ from the references' would
# compute other features, so it is not used either.
_HAS_RERANK_CORE: bool = _native is not None and hasattr(_native, "RerankCore") \
    and tuple(_native.RERANK_FEATURES) == RERANK_FEATURES \
    and tuple(_native.RERANK_LOCAL_FEATURES) == RERANK_LOCAL_FEATURES
if _native is not None and _HAS_RERANK_KERNELS and not _HAS_RERANK_CORE:
    logger.warning("rag_service._native lacks the one-call rerank kernels (or computes other columns); the rerank "
                   "stage runs kernel by kernel until it is rebuilt (`pip install .`)")


def rerank_core_backend(backend: str | None = None) -> str:
    """The backend ("cpp" or "numpy") of the one-call rerank kernels (lexical_features, finish_features,
    rank_features, RerankCore). They have no CUDA twin: a request's 100 candidates take tens of microseconds on the
    CPU, less than one transfer; "cuda" runs them on C++. "auto" falls back to NumPy when the extension lacks them;
    forcing "cpp" then raises RuntimeError."""
    chosen = _resolve("rerank_core", False, backend)
    if chosen == "numpy" or _HAS_RERANK_CORE:
        return "numpy" if chosen == "numpy" else "cpp"
    if (backend or requested_backend()) == "auto":
        return "numpy"
    raise RuntimeError("rag_service._native was built from sources older than the one-call rerank kernels; rebuild "
                       "it (`pip install .`)")


def _as_int32_ids(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {array.ndim}-D")
    if array.dtype == np.int32:
        return np.ascontiguousarray(array)
    if array.size and array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} must fit in int32")
    return np.ascontiguousarray(array, dtype=np.int32)


def _as_float64(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {array.ndim}-D")
    if array.size and array.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float64)


def _query_terms(terms: Any, counts: Any, idf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _as_int32_ids(terms, "query_terms"), _as_float64(counts, "query_counts"), _as_float64(idf, "query_idf")


def lexical_features(tokens: np.ndarray, token_offsets: np.ndarray, title_lengths: np.ndarray,
                     window_offsets: np.ndarray, window_spans: np.ndarray, candidates: Any, query_terms: Any,
                     query_counts: Any, query_idf: Any, *, k1: float, b: float, avgdl: float, avg_title: float,
                     avg_window: float, backend: str | None = None) -> np.ndarray:
    """float32[m, 4]: BM25 of each candidate's chunk, title and best window, and idf-weighted coverage. The store
    arrays are used as stored (int32 tokens / title_lengths / window_spans, int64 offsets); the query's arrays and
    candidates are converted. Semantics: rag_service.kernels.reference.lexical_features_reference."""
    ids = _as_vector(candidates, _INT64, "candidates")
    terms, counts, idf = _query_terms(query_terms, query_counts, query_idf)
    if rerank_core_backend(backend) == "numpy":
        return lexical_features_reference(tokens, token_offsets, title_lengths, window_offsets, window_spans, ids,
                                          terms, counts, idf, k1, b, avgdl, avg_title, avg_window)
    return _native.lexical_features(tokens, token_offsets, title_lengths, window_offsets, window_spans, ids, terms,
                                    counts, idf, float(k1), float(b), float(avgdl), float(avg_title),
                                    float(avg_window))


def finish_features(local: Any, vectors: Any, query: Any, candidates: Any, fused_scores: Any, bm25_ranked: Any,
                    dense_ranked: Any, *, backend: str | None = None) -> np.ndarray:
    """float32[m, len(RERANK_FEATURES)] from the candidates' local rows and unit vectors (fused order) and the
    retrievers' ranked ids. Semantics: rag_service.kernels.reference.finish_features_reference."""
    loc = np.ascontiguousarray(_as_float32_matrix(local, "local_features"))
    vecs = np.ascontiguousarray(_as_float32_matrix(vectors, "vectors"))
    q = _as_vector(query, _FLOAT32, "query")
    ids = _as_vector(candidates, _INT64, "candidates")
    fused = _as_vector(fused_scores, _FLOAT32, "fused_scores")
    bm25 = _as_vector(bm25_ranked, _INT64, "bm25_ranked")
    dense = _as_vector(dense_ranked, _INT64, "dense_ranked")
    if rerank_core_backend(backend) == "numpy":
        return finish_features_reference(loc, vecs, q, ids, fused, bm25, dense)
    return _native.finish_features(loc, vecs, q, ids, fused, bm25, dense)


def rank_features(features: Any, columns: Any, weights: Any, bias: float,
                  *, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32[m] best first, order int64[m]): the linear model over features[:, columns], sorted by score,
    ties in the given order. Semantics: rag_service.kernels.reference.rank_reference."""
    f = np.ascontiguousarray(_as_float32_matrix(features, "features"))
    cols = _as_vector(columns, _INT64, "columns")
    w = _as_vector(weights, _FLOAT32, "weights")
    if rerank_core_backend(backend) == "numpy":
        return rank_reference(f, cols, w, bias)
    scores, order = _native.rank_features(f, cols, w, float(bias))
    return scores, order


class RerankCore:
    """The rerank stage over one loaded index: its windows (CSR offsets, int8/float16/float32 vectors with scales
    for int8, int32 [start, stop) token spans), token streams (int32 tokens, int64 offsets, int32 title lengths),
    float32 dense vectors of every chunk and BM25 statistics, given once at load. The native object checks and holds
    them, so a request passes only the query and its candidates across the boundary.

    local_features and rerank run on C++ or, for backend "numpy" (or "auto" without the extension), on
    local_features_reference / finish_features_reference / rank_reference: same results to float32 rounding."""

    def __init__(self, *, window_offsets: np.ndarray, window_vectors: np.ndarray, window_scales: np.ndarray | None,
                 window_spans: np.ndarray, tokens: np.ndarray, token_offsets: np.ndarray, title_lengths: np.ndarray,
                 dense_vectors: np.ndarray, k1: float, b: float, avgdl: float, avg_title: float, avg_window: float,
                 temperature: float = SOFTMAX_TEMPERATURE) -> None:
        self.window_offsets, self.window_vectors, self.window_scales = window_offsets, window_vectors, window_scales
        self.window_spans, self.tokens, self.token_offsets = window_spans, tokens, token_offsets
        self.title_lengths, self.dense_vectors = title_lengths, dense_vectors
        self.k1, self.b, self.avgdl = float(k1), float(b), float(avgdl)
        self.avg_title, self.avg_window, self.temperature = float(avg_title), float(avg_window), float(temperature)
        self._native: Any = None  # the extension's RerankCore, when it has one
        if _HAS_RERANK_CORE:
            self._native = _native.RerankCore(window_offsets, window_vectors, window_scales, window_spans, tokens,
                                              token_offsets, title_lengths, dense_vectors, self.k1, self.b,
                                              self.avgdl, self.avg_title, self.avg_window, self.temperature)

    def _backend(self, backend: str | None) -> str:
        chosen = rerank_core_backend(backend)
        return "numpy" if self._native is None else chosen

    def place_helper(self, cpus: Sequence[int]) -> None:
        """Holds the worker thread that takes part of a lone search's work (`helper=True`) to `cpus` (Linux; empty:
        anywhere): those of the lone search's encode workers (api/placement.py), not the CPU of the thread that
        started it. Nothing without the extension."""
        if self._native is not None:
            self._native.place_helper([int(c) for c in cpus])

    def rouse_helper(self) -> None:
        """Wakes the worker thread ahead of a lone search's call with `helper=True` (which lets it rest when it ends),
        so that its wake-up overlaps the work before the call; it spins 2 ms at most. Nothing without the
        extension."""
        if self._native is not None:
            self._native.rouse_helper()

    @property
    def helper_jobs(self) -> int:
        """Jobs the worker thread has taken part in (a diagnostic: how often a search's work was shared)."""
        return int(self._native.helper_jobs) if self._native is not None else 0

    def _local_reference(self, q: np.ndarray, terms: np.ndarray, counts: np.ndarray, idf: np.ndarray,
                         ids: np.ndarray) -> np.ndarray:
        return local_features_reference(self.window_offsets, self.window_vectors, self.window_scales,
                                        self.window_spans, self.tokens, self.token_offsets, self.title_lengths, q,
                                        terms, counts, idf, ids, k1=self.k1, b=self.b, avgdl=self.avgdl,
                                        avg_title=self.avg_title, avg_window=self.avg_window,
                                        temperature=self.temperature)

    def local_features(self, query: Any, query_terms: Any, query_counts: Any, query_idf: Any, candidates: Any,
                       *, backend: str | None = None) -> np.ndarray:
        """float32[m, len(RERANK_LOCAL_FEATURES)] (see local_features_reference)."""
        q = _as_vector(query, _FLOAT32, "query")
        terms, counts, idf = _query_terms(query_terms, query_counts, query_idf)
        ids = _as_vector(candidates, _INT64, "candidates")
        if self._backend(backend) == "numpy":
            return self._local_reference(q, terms, counts, idf, ids)
        return self._native.local_features(q, terms, counts, idf, ids)

    def rerank(self, query: Any, query_terms: Any, query_counts: Any, query_idf: Any, candidates: Any,
               fused_scores: Any, bm25_ranked: Any, dense_ranked: Any, columns: Any, weights: Any, bias: float,
               *, backend: str | None = None, helper: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids int64[m], scores float32[m], features float32[m, len(RERANK_FEATURES)], order int64[m]) in rank
        order: local features, finish_features over the candidates' dense vectors, the linear model over
        features[:, columns] and the stable sort by score, in one call with the GIL released. `helper` (C++): part
        of the candidates' local features on the core's worker thread, the same result."""
        q = _as_vector(query, _FLOAT32, "query")
        terms, counts, idf = _query_terms(query_terms, query_counts, query_idf)
        ids = _as_vector(candidates, _INT64, "candidates")
        fused = _as_vector(fused_scores, _FLOAT32, "fused_scores")
        bm25 = _as_vector(bm25_ranked, _INT64, "bm25_ranked")
        dense = _as_vector(dense_ranked, _INT64, "dense_ranked")
        cols = _as_vector(columns, _INT64, "columns")
        w = _as_vector(weights, _FLOAT32, "weights")
        if self._backend(backend) == "cpp":
            return self._native.rerank(q, terms, counts, idf, ids, fused, bm25, dense, cols, w, float(bias), helper)
        if len(fused) != len(ids):
            raise ValueError(f"fused_scores must have one entry per candidate ({len(ids)}), got {len(fused)}")
        local = self._local_reference(q, terms, counts, idf, ids)
        features = finish_features_reference(local, np.asarray(self.dense_vectors[ids], dtype=np.float32), q, ids,
                                             fused, bm25, dense)
        scores, order = rank_reference(features, cols, w, bias)
        return ids[order], scores, features[order], order

# First stage: BM25 top-depth, flat dense top-depth, fusion
# --------------------------------------------------------------------------------------------------------------------

def retrieve_backend(backend: str | None = None) -> str:
    """The backend the first-stage kernels run on: "cpp" or "numpy" (no CUDA twin: one query's scan of a flat index
    that fits in memory is cheaper than its transfer to a device). backend=None resolves RAG_SERVICE_BACKEND now;
    "auto" falls back to NumPy when the extension is missing or predates these kernels, a forced "cpp" raises."""
    chosen = _resolve("retrieve", False, backend)
    if chosen != "numpy" and not _HAS_RETRIEVE_KERNELS:
        if (backend or requested_backend()) == "auto":
            return "numpy"
        raise RuntimeError("rag_service._native was built from sources older than the retrieve kernels; rebuild it "
                           "(`python setup.py build_ext --inplace` or `pip install .`)")
    return chosen


def _term_ids(term_ids: Any) -> np.ndarray:
    return _as_vector(term_ids, _INT64, "term_ids")


def _mask(mask: Any) -> np.ndarray | None:
    if mask is None:
        return None
    array = np.asarray(mask)
    if array.dtype != np.bool_:
        raise ValueError(f"mask must have dtype bool, got {array.dtype}")
    return np.ascontiguousarray(array)


def bm25_top(postings: Postings, term_ids: Any, depth: int, *, mask: Any = None,
             backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, scores float32) of the top min(depth, n_docs) chunks with a BM25 score > 0, best first (ties: id
    ascending), allowed by mask (bool per chunk). Semantics: rag_service.kernels.reference.bm25_top_reference."""
    terms, m = _term_ids(term_ids), _mask(mask)
    if retrieve_backend(backend) == "numpy":
        return bm25_top_reference(postings, terms, m, depth)
    return _native.bm25_top(postings.indptr, postings.docs, postings.weights, int(postings.n_docs), terms, m,
                            operator.index(depth), blocks=postings.blocks)


def block_bounds(postings: Postings, *, shift: int = BLOCK_SHIFT, min_postings: int | None = None) -> Any:
    """The extension's bounds per block of 2^shift chunks for these postings (_native.BlockBounds), for
    `postings._replace(blocks=...)`; rows for the lists of at least min_postings postings (None: as many as there
    are blocks). None without the extension, whose NumPy references read every posting anyway. Raises ValueError
    naming the first posting out of ascending chunk order or range."""
    if not _HAS_RETRIEVE_KERNELS:
        return None
    return _native.BlockBounds(postings.indptr, postings.docs, postings.weights, int(postings.n_docs),
                               operator.index(shift), -1 if min_postings is None else operator.index(min_postings))


def dense_top(vectors: np.ndarray, query: Any, depth: int, *, mask: Any = None, codes: SQ8Codes | None = None,
              oversample: int = 0, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, scores float32) of the top min(depth, allowed) rows of vectors by inner product with query, best
    first (ties: id ascending); oversample >= 1 scans the sq8 codes for oversample * depth candidates and rescores
    them exactly. Semantics: rag_service.kernels.reference.dense_top_reference."""
    q, m = _as_vector(query, _FLOAT32, "query"), _mask(mask)
    if retrieve_backend(backend) == "numpy":
        return dense_top_reference(vectors, q, m, depth, codes, oversample)
    c = codes if codes is not None else (None, None, None)
    return _native.dense_top(vectors, q, m, operator.index(depth), c[0], c[1], c[2], operator.index(oversample),
                             code_bits=None if codes is None else codes.bits)


def row_quantize(vectors: np.ndarray, *, out: RowCodes | None = None, start: int = 0,
                 backend: str | None = None) -> RowCodes:
    """The int8 codes and error bounds of float32[n, d] rows (finite), as RowCodes; with `out`, written into its rows
    start .. start + n (a growing matrix's columns) and `out` returned. Semantics:
    rag_service.kernels.reference.row_quantize_reference (the bounds may differ from it in the last bit of the float:
    the double sums run in another order; both are upper bounds)."""
    v = np.asarray(vectors)
    if v.ndim != 2 or v.dtype != _FLOAT32:
        raise ValueError(f"vectors must be a 2-D float32 array, got {v.ndim}-D {v.dtype}")
    n, d = v.shape
    if out is None:
        out = RowCodes(np.empty((n, d), np.int8), *(np.empty(n, np.float32) for _ in range(3)))
        start = 0
    elif not 0 <= start <= len(out.codes) - n:
        raise ValueError(f"start must leave room for {n} rows in out's {len(out.codes)}, got {start}")
    rows = slice(start, start + n)
    if retrieve_backend(backend) == "numpy":
        for column, value in zip(out, row_quantize_reference(v), strict=True):
            column[rows] = value
        return out
    _native.row_quantize(np.ascontiguousarray(v), *(column[rows] for column in out))
    return out


def dense_above(vectors: np.ndarray, codes: RowCodes, query: Any, min_score: float, depth: int, *,
                mask: Any = None, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, scores float32) of the top min(depth, ...) rows of vectors allowed by mask whose inner product
    with query is >= min_score, best first (ties: id ascending); `codes` = row_quantize(vectors) rule rows out
    without changing the result. Semantics: rag_service.kernels.reference.dense_above_reference."""
    q, m = _as_vector(query, _FLOAT32, "query"), _mask(mask)
    if retrieve_backend(backend) == "numpy":
        return dense_above_reference(vectors, codes, q, m, float(min_score), depth)
    return _native.dense_above(vectors, codes.codes, codes.scale, codes.slack, codes.norm, q, m, float(min_score),
                               operator.index(depth))


def retrieve(postings: Postings, term_ids: Any, depth: int, *, mask: Any = None, vectors: np.ndarray | None = None,
             query: Any = None, codes: SQ8Codes | None = None, oversample: int = 0,
             dense: tuple[np.ndarray, np.ndarray] | None = None, method: str = "weighted", dense_weight: float = 0.5,
             top_k: int = 10, rrf_k: float = 60.0, backend: str | None = None,
             bm25: tuple[np.ndarray, np.ndarray] | None = None) -> RetrieveResult:
    """BM25 top-depth, the dense list (a scan of `vectors` with `query`, the given `dense` hits of an index scanned
    elsewhere, or none: the lexical route) and their fusion, in one native call with the GIL released. `bm25`: the
    BM25 list ranked beforehand (bm25_top's (ids, scores) for these term_ids, mask and depth), taken as it is.
    Semantics: rag_service.kernels.reference.retrieve_reference; times_ns holds the three parts' durations (C++
    only; BM25's is 0 when it was given)."""
    terms, m = _term_ids(term_ids), _mask(mask)
    q = None if query is None else _as_vector(query, _FLOAT32, "query")
    if dense is not None:
        dense = (_as_vector(dense[0], _INT64, "dense_ids"), _as_vector(dense[1], _FLOAT32, "dense_scores"))
    if bm25 is not None:
        bm25 = (_as_vector(bm25[0], _INT64, "bm25_ids"), _as_vector(bm25[1], _FLOAT32, "bm25_scores"))
    if retrieve_backend(backend) == "numpy":
        return retrieve_reference(postings, terms, m, depth, vectors=vectors, query=q, codes=codes,
                                  oversample=oversample, dense=dense, method=method, dense_weight=dense_weight,
                                  top_k=top_k, rrf_k=rrf_k, bm25=bm25)
    c = codes if codes is not None else (None, None, None)
    d = dense if dense is not None else (None, None)
    b = bm25 if bm25 is not None else (None, None)
    out = _native.retrieve(postings.indptr, postings.docs, postings.weights, int(postings.n_docs), terms, m,
                           operator.index(depth), vectors, q, c[0], c[1], c[2], operator.index(oversample), d[0],
                           d[1], method, float(dense_weight), operator.index(top_k), float(rrf_k), "", b[0], b[1],
                           None if codes is None else codes.bits, blocks=postings.blocks)
    return RetrieveResult((out[0], out[1]), (out[2], out[3]), FusionResult(out[4], out[5], out[6], out[7]), out[8])


# --------------------------------------------------------------------------------------------------------------------
# One request's ranking in one call: first stage, confidence rule, rerank
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchCoreResult:
    first: RetrieveResult  # times_ns: (bm25, dense, fusion) as retrieve's
    confident: bool  # the confidence rule was met, so nothing was reranked
    agreement: int  # shared top ids of the two lists (0 when the rule did not run)
    # The reranked fused top candidates in rank order (as RerankCore.rerank returns them); empty when none were.
    ids: np.ndarray
    scores: np.ndarray
    features: np.ndarray
    order: np.ndarray
    rerank_ns: int  # 0 where not measured (NumPy) or nothing was reranked


def search_core_backend(core: RerankCore, backend: str | None = None) -> str:
    """"cpp" when the one-call ranking runs natively for `core`, else "numpy" (the composed references)."""
    chosen = retrieve_backend(backend)
    if chosen == "cpp" and _HAS_SEARCH_CORE and core._native is not None:
        return "cpp"
    if chosen == "cpp" and (backend or requested_backend()) not in ("auto", None):
        raise RuntimeError("rag_service._native was built from sources older than search_core; rebuild it "
                           "(`pip install .`)")
    return "numpy"


def search_core(core: RerankCore, postings: Postings, term_ids: Any, depth: int, *, mask: Any = None,
                vectors: np.ndarray | None = None, query: Any = None, codes: SQ8Codes | None = None,
                oversample: int = 0, dense: tuple[np.ndarray, np.ndarray] | None = None, method: str = "weighted",
                dense_weight: float = 0.5, top_k: int = 10, rrf_k: float = 60.0, rerank_query: Any,
                query_terms: Any = None, query_counts: Any = None, query_idf: Any = None, idf_table: Any = None,
                columns: Any, weights: Any, bias: float, rerank_depth: int,
                confidence: tuple[int, int] | None = None, backend: str | None = None,
                bm25: tuple[np.ndarray, np.ndarray] | None = None) -> SearchCoreResult:
    """retrieve() (same arguments, `bm25` included), then the confidence rule `confidence` = (agree_top,
    agree_min), whatever rerank_depth: skip the rerank when the BM25 and dense lists' top agree_top ids share at least
    agree_min; then core.rerank of the fused top min(rerank_depth, fused count) with `rerank_query` (the query
    vector), the query's distinct known terms (ids, counts, idf: RerankStore.query_terms; or, given `idf_table`
    instead, derived from `term_ids` in the call: reference.distinct_query_terms) and the linear model (columns,
    weights, bias). One native call with the GIL released throughout; the NumPy backend composes retrieve_reference,
    agreement_reference and the reference rerank, which is the specification."""
    terms, m = _term_ids(term_ids), _mask(mask)
    q = None if query is None else _as_vector(query, _FLOAT32, "query")
    if dense is not None:
        dense = (_as_vector(dense[0], _INT64, "dense_ids"), _as_vector(dense[1], _FLOAT32, "dense_scores"))
    if bm25 is not None:
        bm25 = (_as_vector(bm25[0], _INT64, "bm25_ids"), _as_vector(bm25[1], _FLOAT32, "bm25_scores"))
    rq = _as_vector(rerank_query, _FLOAT32, "rerank_query")
    derive = query_terms is None
    if derive == (idf_table is None):
        raise ValueError("search_core takes query_terms (with query_counts and query_idf) or idf_table: one of them")
    if not derive:
        qterms, qcounts, qidf = _query_terms(query_terms, query_counts, query_idf)
    cols, w = _as_vector(columns, _INT64, "columns"), _as_vector(weights, _FLOAT32, "weights")
    rdepth = operator.index(rerank_depth)
    agree_top, agree_min = (operator.index(confidence[0]), operator.index(confidence[1])) \
        if confidence is not None else (0, 0)
    if search_core_backend(core, backend) == "cpp":
        c = codes if codes is not None else (None, None, None)
        d = dense if dense is not None else (None, None)
        b = bm25 if bm25 is not None else (None, None)
        out = _native.search_core(core._native, postings.indptr, postings.docs, postings.weights,
                                  int(postings.n_docs), terms, m, operator.index(depth), vectors, q, c[0], c[1], c[2],
                                  operator.index(oversample), d[0], d[1], method, float(dense_weight),
                                  operator.index(top_k), float(rrf_k), rq, None if derive else qterms,
                                  None if derive else qcounts, None if derive else qidf, cols, w, float(bias), rdepth,
                                  confidence is not None, agree_top, agree_min, "", idf_table, b[0], b[1],
                                  None if codes is None else codes.bits, blocks=postings.blocks)
        return _search_core_result(out)
    if rdepth < 0:
        raise ValueError(f"rerank_depth must be >= 0, got {rdepth}")
    if confidence is not None and agree_top < 0:
        raise ValueError(f"agree_top must be >= 0, got {agree_top}")
    if derive:
        qterms, qcounts, qidf = distinct_query_terms(terms, idf_table)
    first = retrieve_reference(postings, terms, m, depth, vectors=vectors, query=q, codes=codes,
                               oversample=oversample, dense=dense, method=method, dense_weight=dense_weight,
                               top_k=top_k, rrf_k=rrf_k, bm25=bm25)
    empty = SearchCoreResult(first, False, 0, np.zeros(0, np.int64), np.zeros(0, np.float32),
                             np.zeros((0, len(RERANK_FEATURES)), np.float32), np.zeros(0, np.int64), 0)
    agree = 0
    if confidence is not None:
        agree = agreement_reference(first.bm25[0], first.dense[0], agree_top)
        if agree >= agree_min:
            return replace(empty, confident=True, agreement=agree)
    k = min(rdepth, len(first.fused.ids))
    if k == 0:
        return replace(empty, agreement=agree)
    ids, scores, features, order = core.rerank(rq, qterms, qcounts, qidf, first.fused.ids[:k],
                                               first.fused.scores[:k], first.bm25[0], first.dense[0], cols, w, bias,
                                               backend="numpy")
    return SearchCoreResult(first, False, agree, ids, scores, features, order, 0)


def _search_core_result(out: tuple) -> SearchCoreResult:
    """The extension's search_core tuple as a SearchCoreResult."""
    f = out[0]
    first = RetrieveResult((f[0], f[1]), (f[2], f[3]), FusionResult(f[4], f[5], f[6], f[7]), f[8][:3])
    return SearchCoreResult(first, bool(out[1]), int(out[2]), out[3], out[4], out[5], out[6], int(f[8][3]))


class SearchCall:
    """search_core over one loaded index, on C++: the rerank core, the postings, the scanned vectors and their sq8
    codes, the idf table and the rerank model are checked and converted once, here (the extension's PreparedSearch,
    which raises ValueError naming a bad one), so that a request passes and checks only its own arguments: the
    index's checks cost a request ~20 µs on caches that its encode has just flushed (bench/README.md, "Issue 15").
    Raises RuntimeError where search_core_backend(core) is not "cpp": search_core is the call that falls back to
    NumPy.

    `vectors` None: no scan, each call passes the dense list it found (`dense`). `idf_table` None: each call passes
    the query's distinct terms (`query_terms`: RerankStore.terms_of's triple)."""

    def __init__(self, core: RerankCore, postings: Postings, *, vectors: np.ndarray | None,
                 codes: SQ8Codes | None, oversample: int, idf_table: np.ndarray | None, columns: Any,
                 weights: Any, bias: float) -> None:
        if search_core_backend(core, "cpp") != "cpp":
            raise RuntimeError("SearchCall needs the extension's search_core")
        scan = vectors is not None
        c = (codes.codes, codes.scale, codes.base) if codes is not None and scan else (None, None, None)
        self._prepared = _native.PreparedSearch(
            core._native, postings.indptr, postings.docs, postings.weights, int(postings.n_docs), vectors,
            c[0], c[1], c[2], codes.bits if codes is not None and scan else None,
            operator.index(oversample) if scan else 0, _as_vector(columns, _INT64, "columns"),
            _as_vector(weights, _FLOAT32, "weights"), float(bias),
            None if idf_table is None else _as_float64(idf_table, "idf_table"), postings.blocks)

    def __call__(self, term_ids: np.ndarray, query: np.ndarray, depth: int, *, mask: np.ndarray | None = None,
                 dense: tuple[np.ndarray, np.ndarray] | None = None, method: str, dense_weight: float, top_k: int,
                 rrf_k: float, rerank_depth: int, confidence: tuple[int, int] | None,
                 query_terms: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 bm25: tuple[np.ndarray, np.ndarray] | None = None, helper: bool = False) -> SearchCoreResult:
        """search_core(core, postings, term_ids, depth, ...) with this index's arguments; `query` (float32, the
        index's dimension) is both the scan's query and the rerank's; `bm25` the BM25 list ranked beforehand
        (bm25_top's result for these terms, mask and depth). `helper`: part of the dense scan and of the rerank
        go to the core's worker thread, on the core a search alone in the server leaves idle (the same result either
        way). The arrays go to the extension as they are: it raises
        ValueError naming one that is not 1-D, C-contiguous and of its dtype (term_ids int64, query float32, mask
        bool)."""
        d = dense if dense is not None else (None, None)
        b = bm25 if bm25 is not None else (None, None)
        t = query_terms if query_terms is not None else (None, None, None)
        agree_top, agree_min = confidence if confidence is not None else (0, 0)
        return _search_core_result(self._prepared(
            term_ids, query, mask, depth, d[0], d[1], method, dense_weight, top_k, rrf_k, t[0], t[1], t[2],
            rerank_depth, confidence is not None, agree_top, agree_min, b[0], b[1], helper))


# Query analysis
# --------------------------------------------------------------------------------------------------------------------

def word_ids_memo() -> Any | None:
    """A new C++ memo of word -> BM25 term id for ASCII queries (the extension's WordIds: `lookup(text)` gives an
    ASCII text's term ids in one call, or None; `add(words, ids)` learns, `seed(words, ids)` holds for good,
    `clear()` forgets what was learned, `len()` counts it), or None without the extension
    (retrievers.lexical.BM25Index.query_term_ids then keeps to its Python memo, the reference)."""
    return _native.WordIds() if _HAS_WORD_IDS else None


# Replies
# --------------------------------------------------------------------------------------------------------------------

def join_contexts_backend() -> str:
    """"cpp" when a plain reply's contexts are joined natively, else "python" (api/reply.py's loop, the reference)."""
    return "cpp" if _HAS_JOIN else "python"


def join_contexts(blob: bytes, offsets: Any, chunks: list[int], scores: list[float], tokens: list[int],
                  context_tag: bytes, score_tag: bytes, tokens_tag: bytes) -> bytes:
    """A plain reply's contexts as wire bytes in one call (see the extension's docstring); needs the extension
    (join_contexts_backend() == "cpp"). Raises ValueError naming the argument for a chunk outside the offsets."""
    if not _HAS_JOIN:
        raise RuntimeError(f"join_contexts needs rag_service._native; {_BUILD_HINT}")
    return _native.join_contexts(blob, offsets, chunks, scores, tokens, context_tag, score_tag, tokens_tag)


# The query encoder's tokenizer
# --------------------------------------------------------------------------------------------------------------------

def wordpiece(tokenizer_json: str) -> tuple[Any | None, str]:
    """The extension's WordPiece for a Hugging Face tokenizer (its `to_str()`, truncation and padding as it will
    run), or None, with why, where it is not the BERT pipeline that class reproduces for ASCII text: BertNormalizer
    lower-casing and cleaning, BertPreTokenizer, WordPiece with "##" pieces, [CLS] $A [SEP], truncation from the
    right and no fixed-length padding. The caller checks its answers against the tokenizer before it uses them
    (encoder/encode.py)."""
    if not _HAS_WORDPIECE:
        return None, "the extension has no WordPiece"
    spec = json.loads(tokenizer_json)
    normalizer, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if normalizer.get("type") != "BertNormalizer" or not normalizer.get("lowercase") \
            or not normalizer.get("clean_text"):
        return None, f"normalizer {normalizer.get('type')!r} is not a lower-casing, cleaning BertNormalizer"
    if pre.get("type") != "BertPreTokenizer":
        return None, f"pre-tokenizer {pre.get('type')!r} is not BertPreTokenizer"
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix") != "##":
        return None, f"model {model.get('type')!r} is not a WordPiece with '##' pieces"
    vocab: dict[str, int] = model.get("vocab") or {}
    pieces = sorted(vocab, key=vocab.__getitem__)
    if [vocab[p] for p in pieces] != list(range(len(pieces))):
        return None, "the vocabulary's ids are not 0..n-1"
    special = _cls_sep(spec.get("post_processor") or {})
    if special is None or model.get("unk_token") not in vocab:
        return None, "the post-processor is not [CLS] $A [SEP], or the unknown token is not in the vocabulary"
    truncation, padding = spec.get("truncation"), spec.get("padding")
    if truncation is not None and (truncation.get("direction", "Right") != "Right" or truncation.get("stride", 0)):
        return None, "truncation is not from the right without stride"
    if padding is not None and padding.get("strategy") != "BatchLongest":
        return None, "padding is to a fixed length"
    max_tokens = max(int(truncation["max_length"]) - 2, 0) if truncation is not None else 1 << 62
    added = sorted({t["content"].lower() for t in spec.get("added_tokens") or () if t.get("content")})
    return _native.WordPiece(pieces, vocab[model["unk_token"]], special[0], special[1],
                             int(model.get("max_input_chars_per_word", 100)), max_tokens, added), ""


def _cls_sep(processor: dict) -> tuple[int, int] | None:
    """The ids of the two tokens a single-sequence post-processor puts around the text ([CLS] $A [SEP]), or None
    for one that does anything else."""
    if processor.get("type") == "BertProcessing":
        return int(processor["cls"][1]), int(processor["sep"][1])
    if processor.get("type") != "TemplateProcessing":
        return None
    single = processor.get("single") or []
    if len(single) != 3 or "Sequence" not in single[1] or single[1]["Sequence"].get("id") != "A":
        return None
    ids = []
    for item in (single[0], single[2]):
        name = (item.get("SpecialToken") or {}).get("id")
        token_ids = ((processor.get("special_tokens") or {}).get(name) or {}).get("ids")
        if not isinstance(token_ids, list) or len(token_ids) != 1:
            return None
        ids.append(int(token_ids[0]))
    return ids[0], ids[1]
