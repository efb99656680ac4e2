"""Facade over the native kernels in rag_service._native, with the NumPy references as fallback.

Import this module, never rag_service._native directly. Like faiss's loader, it tries the compiled extension and,
when that fails, logs why and serves every kernel from rag_service.reference instead (same results, slower).

Backend choice, made per call (or per explicit fusion_backend() resolve), never frozen at import:
  RAG_SERVICE_BACKEND=auto   (default) C++ when the extension imports, else NumPy
                      cpp    C++; RuntimeError if the extension is missing
                      cuda   the CUDA kernel where one exists, C++ for the others; RuntimeError if the extension was
                             built without CUDA or no device answers
                      numpy  the NumPy references
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np

from rag_service.reference import FusionResult, fuse_reference

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "HAS_CUDA",
    "HAS_NATIVE",
    "NATIVE_IMPORT_ERROR",
    "FusionResult",
    "backend_info",
    "cuda_device_status",
    "fuse",
    "fusion_backend",
    "requested_backend",
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
    _native = None
    NATIVE_IMPORT_ERROR: str | None = f"{type(_error).__name__}: {_error}"
    logger.warning("rag_service._native is not available (%s); using the NumPy reference kernels, which are slower. "
                   "To get the native kernels, %s.", NATIVE_IMPORT_ERROR, _BUILD_HINT)
else:
    NATIVE_IMPORT_ERROR = None
    logger.debug("loaded %s", _native.BUILD_INFO)

HAS_NATIVE: bool = _native is not None
HAS_CUDA: bool = bool(_native.HAS_CUDA) if _native is not None else False  # the extension was built with CUDA


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


@functools.lru_cache(maxsize=None)
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

    Semantics: rag_service.reference.fuse_reference. Inputs are converted to int64 ids / float32 scores, 1-D and
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
