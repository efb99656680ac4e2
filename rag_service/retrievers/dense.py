"""Dense retrieval over L2-normalised chunk vectors with faiss (inner product = cosine).

Files:
    dense.faiss         the faiss index (faiss.write_index)
    vectors.npy         float32 (chunks, dim), the exact vectors, memory-mapped: rescoring and exact filtered search
    dense_params.json   kind, dim, count and HNSW parameters
    dense_codes.faiss   optional (build option dense_codes): int8 scalar (sq8) or 1-bit (binary) codes of the same
                        vectors; on a flat index the unfiltered first stage scans the codes for `oversample` times
                        the asked depth and rescores those candidates exactly with vectors.npy. On an HNSW index the
                        graph answers unfiltered searches and sq8 codes serve the exact scans of a filter's allowed
                        rows instead (a quarter of the bytes, so twice the rows in the same time at 1M chunks)
    dense_codes.json    kind, bytes, oversample
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rag_service.core.errors import IndexFormatError, InvalidArgument
from rag_service.kernels import native
from rag_service.kernels.native import SQ8Codes, sign_bits, sq8_quantize
from rag_service.kernels.reference import BITS_MIN_KEEP, BITS_MIN_RATIO

log = logging.getLogger(__name__)

INDEX_FILE = "dense.faiss"
VECTORS_FILE = "vectors.npy"
PARAMS_FILE = "dense_params.json"
FILES = (INDEX_FILE, VECTORS_FILE, PARAMS_FILE)
CODES_FILE = "dense_codes.faiss"
CODES_PARAMS_FILE = "dense_codes.json"
CODE_KINDS = ("none", "sq8", "binary")
# What a build writes unless told: an HNSW index keeps sq8 codes for its filtered scans (a quarter of its float
# vectors' memory for scans twice as fast at 1M chunks, bench/README.md "Filtered dense stage at 1M passages"); a flat
# index's float scan is already cheap at the sizes it is chosen for, so it gets none.
DEFAULT_CODES = {"flat": "none", "hnsw": "sq8"}
# Candidates taken from the codes per result asked, before exact rescoring. SciFact (10k chunks, MiniLM), depth 100:
# the smallest factors reaching recall@100 >= 0.99 against the float index (bench/experiments/quantized_dense.py,
# bench/README.md).
DEFAULT_OVERSAMPLE = {"sq8": 2, "binary": 20}

DENSE_KINDS = ("auto", "flat", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH_MIN = 128

# Exact (flat) search below this many chunks, HNSW above. Measured on the 2-core build machine, one query, one OpenMP
# thread, dim 384, k=100, p50: 5k chunks 0.4 ms, 10k 0.8 ms, 50k 3.9 ms, 100k 14 ms, 200k 24 ms (memory-bound: a
# second thread does not help). 50k keeps exact search at a few ms per query; beyond that HNSW is the better trade:
# on SciFact's 10k MiniLM vectors, efSearch 128 gives recall@10 0.999 against exact at 0.3 ms (on 50k synthetic,
# noisier vectors: 0.83 at 0.7 ms, so exact stays the default wherever it is affordable).
DEFAULT_HNSW_THRESHOLD = 50_000

# The native first stage (rag_service.kernels.native.retrieve) scans a flat index's sq8 codes (4x fewer bytes than
# the float rows) for this many candidates per result asked and rescores them exactly with the float rows. SciFact
# (10k chunks, MiniLM), depth 100: the smallest factor with recall@100 >= 0.999 against the exact float scan
# (bench/experiments/native_retrieve.py, bench/README.md "One native call: first stage").
NATIVE_SQ8_OVERSAMPLE = 2

# With a filter, HNSW walks the graph skipping disallowed nodes, which loses recall when few are allowed (the walk
# runs out of allowed neighbours). So an HNSW index scans the allowed chunks' vectors exactly (native SIMD, cost in
# proportion to the allowed rows) when they are few in number, or a small share of the corpus and not too many, and
# otherwise walks the graph with a beam widened below FILTER_EF_SHARE allowed. Measured at depth 100 (bench/README.md
# "Filtered search: recall and latency by selectivity" and "Filtered dense stage at 1M passages"): on 100k vectors the
# walk at the unfiltered beam (128) keeps recall@10 1.0 from 20% allowed, 0.98 at 10%, 0.87 at 5%, 0.48 at 1%; widened
# to 1024 it reaches 0.99 only from 5%, while the exact scan costs ~0.3 ms per 1,000 allowed rows. On 1M vectors the
# allowed rows lie scattered over 1.5 GB and the scan costs ~0.4-0.75 ms per 1,000 (7.6 ms for 10,000, 19 ms for
# 50,000 against an unfiltered p99 of 7 ms), so a share alone would let it run far past 2x the unfiltered p99; above
# EXACT_FILTER_MAX rows the widened walk (~3 ms at 1M) takes over, with the recall of the graph's unfiltered walk.
EXACT_FILTER_LIMIT = 5_000
EXACT_FILTER_FRACTION = 0.05
EXACT_FILTER_MAX: int | None = 10_000
# With sq8 codes (an HNSW index built with dense_codes sq8) the scan reads a quarter of the bytes and rescores
# NATIVE_SQ8_OVERSAMPLE candidates per result: at 1M it costs about what the float scan of half as many rows does
# (20,000 rows: p50 2.4-3.1 ms, recall@10 1.0, where the widened walk keeps 0.93; bench/README.md "sq8 codes beside
# the graph").
EXACT_FILTER_MAX_SQ8: int | None = 20_000
# The check that decides whether a flat index's scan reads its rows' sign bits first (DenseIndex._sign_bits).
BITS_CHECK_ROWS = 64
BITS_CHECK_DEPTH = 100
BITS_MIN_AGREEMENT = 0.99
FILTER_EF_SHARE = 0.2
FILTER_EF_MAX = 1024


def filtered_plan(allowed: int, n: int, k: int, sq8: bool = False) -> int:
    """How an HNSW index of `n` chunks answers `k` results when `allowed` (>= 1) of them pass a filter: 0 for the
    exact scan of the allowed rows, else the efSearch of a filtered graph walk. `sq8`: the scan reads sq8 codes."""
    fraction = allowed / n
    if allowed <= EXACT_FILTER_LIMIT:
        return 0
    cap = EXACT_FILTER_MAX_SQ8 if sq8 else EXACT_FILTER_MAX
    if fraction <= EXACT_FILTER_FRACTION and (cap is None or allowed <= cap):
        return 0
    return filtered_ef(k, fraction)


def filtered_ef(k: int, fraction: float) -> int:
    """efSearch of a filtered HNSW walk for `k` results when `fraction` of the chunks are allowed: the unfiltered
    beam from FILTER_EF_SHARE up, widened by FILTER_EF_SHARE / fraction below it, at most FILTER_EF_MAX."""
    base = max(k, HNSW_EF_SEARCH_MIN)
    return max(base, min(FILTER_EF_MAX, int(base * FILTER_EF_SHARE / max(fraction, 1e-9))))


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """OpenMP's thread count is per calling thread (libgomp keeps it in the thread's ICV), so set and restore."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def choose_kind(kind: str, n: int, hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD) -> str:
    if kind not in DENSE_KINDS:
        raise ValueError(f"dense index must be one of {', '.join(DENSE_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "hnsw" if n >= hnsw_threshold else "flat"
    return kind


def build_dense_index(vectors: np.ndarray, kind: str, progress: bool = False, *, hnsw_m: int = HNSW_M,
                      ef_construction: int = HNSW_EF_CONSTRUCTION) -> faiss.Index:
    """A faiss index over `vectors` (already normalised), built on the CPU with every core.

    `hnsw_m` and `ef_construction` trade graph quality for build time (the defaults suit corpora up to a few hundred
    thousand chunks on two cores; bench/README.md "Issue 3" measures cheaper settings for 1M).

    A GPU would not help here: a flat "build" is a memory copy, and faiss builds HNSW graphs on the CPU only. The GPU
    is used at build time for encoding, which dominates.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    with omp_threads(os.cpu_count() or 1):
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
            index.add(vectors)
            return index
        if kind != "hnsw":
            raise ValueError(f"kind must be flat or hnsw, got {kind!r}")
        if hnsw_m < 2 or ef_construction < 1:
            raise ValueError(f"hnsw_m must be >= 2 and ef_construction >= 1, got {hnsw_m} and {ef_construction}")
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = HNSW_EF_SEARCH_MIN
        step = 16_384
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(vectors), desc="hnsw", unit="vec", unit_scale=True, dynamic_ncols=True)
        try:
            for start in range(0, len(vectors), step):
                index.add(vectors[start : start + step])
                if bar is not None:
                    bar.update(min(step, len(vectors) - start))
        finally:
            if bar is not None:
                bar.close()
        return index


def write_dense(directory: Path, index: faiss.Index, vectors: np.ndarray, kind: str, *, hnsw_m: int = HNSW_M,
                ef_construction: int = HNSW_EF_CONSTRUCTION) -> list[Path]:
    directory = Path(directory)
    faiss.write_index(index, str(directory / INDEX_FILE))
    np.save(directory / VECTORS_FILE, np.ascontiguousarray(vectors, dtype=np.float32))
    params: dict[str, Any] = {"kind": kind, "dim": int(vectors.shape[1]), "count": int(len(vectors)),
                              "metric": "inner_product", "normalized": True}
    if kind == "hnsw":
        params.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search_min=HNSW_EF_SEARCH_MIN)
    with open(directory / PARAMS_FILE, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return [directory / name for name in FILES]


def build_codes(vectors: np.ndarray, kind: str) -> faiss.Index | faiss.IndexBinary:
    """sq8: one byte per dimension with per-dimension ranges trained on the vectors (4x smaller than float32);
    binary: the sign of each dimension (32x smaller), searched by Hamming distance."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    with omp_threads(os.cpu_count() or 1):
        if kind == "sq8":
            index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.add(vectors)
            return index
        if kind == "binary":
            if dim % 8:
                raise ValueError(f"binary codes need a dimension divisible by 8, got {dim}")
            index = faiss.IndexBinaryFlat(dim)
            index.add(binary_codes(vectors))
            return index
    raise ValueError(f"dense codes must be one of sq8, binary, got {kind!r}")


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(vectors) > 0, axis=-1)


def write_codes(directory: Path, vectors: np.ndarray, kind: str, oversample: int | None = None) -> list[Path]:
    directory = Path(directory)
    index = build_codes(vectors, kind)
    if kind == "binary":
        faiss.write_index_binary(index, str(directory / CODES_FILE))
    else:
        faiss.write_index(index, str(directory / CODES_FILE))
    code_bytes = int(index.code_size) * int(index.ntotal)
    params = {"kind": kind, "count": int(index.ntotal), "code_bytes": code_bytes,
              "float_bytes": int(vectors.shape[0]) * int(vectors.shape[1]) * 4,
              "oversample": int(oversample or DEFAULT_OVERSAMPLE[kind])}
    with open(directory / CODES_PARAMS_FILE, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return [directory / CODES_FILE, directory / CODES_PARAMS_FILE]


def _sorted_hits(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ids >= 0  # faiss pads with -1 when fewer than k results exist
    ids = ids[keep].astype(np.int64, copy=False)
    scores = scores[keep].astype(np.float32, copy=False)
    # Same order as BM25: score desc, then id asc, so equal scores rank the same on every run and device.
    order = np.lexsort((ids, -scores))
    return ids[order], scores[order]


class DenseIndex:
    """A loaded dense index. search() is safe to call from several threads at once."""

    def __init__(
        self,
        index: faiss.Index,
        vectors: np.ndarray,
        params: dict[str, Any],
        search_threads: int = 1,
        use_gpu: bool | None = None,
        path: Path | None = None,
        codes: faiss.Index | faiss.IndexBinary | None = None,
        codes_params: dict[str, Any] | None = None,
        oversample: int | None = None,
    ) -> None:
        self.path = path
        self.codes = codes
        self.codes_params = codes_params or {}
        self.codes_kind = str(self.codes_params.get("kind", "none")) if codes is not None else "none"
        if oversample is not None and oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {oversample}")
        self.oversample = int(oversample or self.codes_params.get("oversample", 1))
        self.kind = str(params["kind"])
        self.dim = int(params["dim"])
        self.n = int(params["count"])
        self.params = params
        self.vectors = vectors
        self.search_threads = max(1, int(search_threads))
        self._cpu_index = index
        self._gpu_index = None
        self._gpu_resources = None
        # StandardGpuResources is not thread-safe: GPU searches take turns.
        self._gpu_lock = threading.Lock()
        if use_gpu is None:
            use_gpu = gpu_available()
        if use_gpu and self.kind == "flat" and gpu_available():
            self._gpu_resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        # An HNSW index's sq8 codes serve its filtered scans on the host (below), never a GPU search.
        if use_gpu and self.codes is not None and not (self.kind == "hnsw" and self.codes_kind == "sq8") \
                and gpu_available():
            self._gpu_resources = self._gpu_resources or faiss.StandardGpuResources()
            try:
                # faiss-gpu holds flat scalar-quantized and binary indexes; the rescoring reads the candidates'
                # float rows and costs microseconds, so it stays on the host.
                if self.codes_kind == "binary":
                    self.codes = faiss.GpuIndexBinaryFlat(self._gpu_resources, self.codes)
                else:
                    self.codes = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.codes)
            except (RuntimeError, AttributeError) as e:
                log.warning("dense codes stay on the CPU: faiss-gpu cannot hold %s codes (%s)", self.codes_kind, e)
        self.device = "gpu" if self._gpu_index is not None else "cpu"
        # Candidates per result taken from the sq8 codes by the native scan; 0 scans the float rows instead. The
        # codes' integer dot product beats the float rows at every SIMD level, scalar included (SciFact, depth 100:
        # 0.68 against 1.13 ms scalar, 0.19 against 0.44 ms with AVX-512; bench/experiments/dense_scan.py); without the
        # extension the NumPy reference would scan them in int64, so the float rows stay.
        self.native_oversample = NATIVE_SQ8_OVERSAMPLE if native.simd_level() != "none" else 0
        # A flat index on the CPU is scanned by the native first stage; its sq8 codes are made here, once per load
        # (taken from dense_codes.faiss when that holds sq8 codes), never per request. An HNSW index's own sq8 codes
        # serve its filtered scans: there the graph answers unfiltered searches, so faiss's copy of the codes goes.
        hnsw_sq8 = self.kind == "hnsw" and self.codes_kind == "sq8"
        self.sq8: SQ8Codes | None = None
        if (self.native_scan or hnsw_sq8) and self.native_oversample:
            self.sq8 = self._sq8_codes()
        # A flat scan of a large index first reads the rows' sign bits (an eighth of the codes' bytes) and then only
        # the codes of the rows they keep: the scan of SciFact's 10,435 codes read 4 MB, which no core's cache
        # holds after the query's encode (bench/README.md, "The dense scan's sign bits"). Made here, once per load,
        # on a CPU whose bits kernel is cheap (AVX-512 VNNI; elsewhere it costs what the codes' scan saves), and
        # kept only where they pass the check of _sign_bits.
        self.bits_agreement: float | None = None
        if self.native_scan and self.sq8 is not None and self.n >= BITS_MIN_RATIO * BITS_MIN_KEEP \
                and native.sign_bits_pay():
            self.sq8 = self._sign_bits(self.sq8)
        if hnsw_sq8:
            self.codes = None
        log.info("dense index: %s, %d vectors of dim %d, searching on %s", self.kind, self.n, self.dim, self.device)

    @classmethod
    def load(
        cls, directory: Path | str, search_threads: int = 1, use_gpu: bool | None = None,
        use_codes: bool = True, oversample: int | None = None,
    ) -> DenseIndex:
        """`search_threads` is faiss's OpenMP thread count per query: 1 at serve time, so a query does not start
        threads that compete with the server's own pool."""
        directory = Path(directory)
        try:
            with open(directory / PARAMS_FILE, encoding="utf-8") as f:
                params = json.load(f)
            vectors = np.asarray(np.load(directory / VECTORS_FILE, mmap_mode="r"))
            # A flat index is just its vectors: map them instead of reading them into memory.
            flags = faiss.IO_FLAG_MMAP if params["kind"] == "flat" else 0
            index = faiss.read_index(str(directory / INDEX_FILE), flags)
            codes, codes_params = None, None
            if use_codes and (directory / CODES_PARAMS_FILE).is_file():
                with open(directory / CODES_PARAMS_FILE, encoding="utf-8") as f:
                    codes_params = json.load(f)
                reader = faiss.read_index_binary if codes_params["kind"] == "binary" else faiss.read_index
                codes = reader(str(directory / CODES_FILE))
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # faiss reports read errors as RuntimeError
            raise IndexFormatError(f"{directory}: cannot read dense index: {e}") from e
        if codes is not None and codes.ntotal != len(vectors):
            raise IndexFormatError(f"{directory}: {CODES_FILE} holds {codes.ntotal} codes, {VECTORS_FILE} "
                                   f"{len(vectors)} vectors")
        if vectors.dtype != np.float32 or vectors.ndim != 2:
            raise IndexFormatError(
                f"{directory / VECTORS_FILE}: expected 2-d float32, got {vectors.ndim}-d {vectors.dtype}"
            )
        if index.ntotal != len(vectors) or index.d != vectors.shape[1] or params["count"] != len(vectors):
            raise IndexFormatError(
                f"{directory}: {INDEX_FILE} holds {index.ntotal} vectors of dim {index.d}, "
                f"{VECTORS_FILE} {vectors.shape[0]} of dim {vectors.shape[1]}, {PARAMS_FILE} says {params['count']}"
            )
        return cls(index, vectors, params, search_threads=search_threads, use_gpu=use_gpu, path=directory,
                   codes=codes, codes_params=codes_params, oversample=oversample)

    def __repr__(self) -> str:
        return (f"DenseIndex(kind={self.kind!r}, n={self.n}, dim={self.dim}, codes={self.codes_kind!r}, "
                f"device={self.device!r})")

    @property
    def native_scan(self) -> bool:
        """Whether the native first stage scans this index itself (flat, on the CPU); else its hits come from
        search() (HNSW, or a flat index on a GPU)."""
        return self.kind == "flat" and self._gpu_index is None

    def _sq8_codes(self) -> SQ8Codes:
        """The index's own sq8 codes (faiss QT_8bit: row = vmin + (code + 0.5) / 255 * vdiff per dimension) in the
        native layout, or codes quantized from the float rows when it has none."""
        codes = self.codes
        if self.codes_kind == "sq8" and isinstance(codes, faiss.IndexScalarQuantizer) \
                and codes.sq.qtype == faiss.ScalarQuantizer.QT_8bit:
            trained = faiss.vector_to_array(codes.sq.trained)
            if trained.size == 2 * self.dim and codes.code_size == self.dim:
                raw = faiss.vector_to_array(codes.codes).reshape(self.n, self.dim)
                vmin, vdiff = trained[: self.dim], trained[self.dim :]
                scale = (vdiff / np.float32(255)).astype(np.float32)
                base = (vmin + np.float32(128.5) * scale).astype(np.float32)
                # code - 128 as int8 is the code with its top bit flipped: no wider copy of 1M x 384 bytes.
                np.bitwise_xor(raw, np.uint8(0x80), out=raw)
                return SQ8Codes(raw.view(np.int8), scale, base)
        return sq8_quantize(self.vectors)

    def _sign_bits(self, codes: SQ8Codes) -> SQ8Codes:
        """`codes` with the rows' sign bits where the scan that reads them agrees with the plain scan of the codes,
        else `codes` as they are. A row's signs stand for its direction only where the vectors spread over many
        dimensions (natural text's embeddings: on SciFact the bits' scan returns 99.9% of the plain scan's top 100);
        where a few dimensions carry the ranking (vectors bunched around their mean) they keep a third of it. So
        BITS_CHECK_ROWS of the index's own rows (drawn with a fixed seed) are searched both ways at depth
        BITS_CHECK_DEPTH, and the bits stay if the two tops share at least BITS_MIN_AGREEMENT of their rows."""
        with_bits = codes._replace(bits=sign_bits(self.vectors))
        rows = np.random.default_rng(0).choice(self.n, size=min(BITS_CHECK_ROWS, self.n), replace=False)
        shared = 0
        for row in np.sort(rows):
            query = np.asarray(self.vectors[row], np.float32)
            plain, _ = native.dense_top(self.vectors, query, BITS_CHECK_DEPTH, codes=codes,
                                        oversample=self.native_oversample)
            coarse, _ = native.dense_top(self.vectors, query, BITS_CHECK_DEPTH, codes=with_bits,
                                         oversample=self.native_oversample)
            shared += int(np.intersect1d(plain, coarse).size)
        self.bits_agreement = shared / (len(rows) * min(BITS_CHECK_DEPTH, self.n))
        kept = self.bits_agreement >= BITS_MIN_AGREEMENT
        log.info("dense scan: sign bits %s (their scan keeps %.4f of the plain scan's top %d for %d of the rows)",
                 "read first" if kept else "not used", self.bits_agreement, BITS_CHECK_DEPTH, len(rows))
        return with_bits if kept else codes

    @property
    def searched_bytes(self) -> int:
        """Bytes the unfiltered first stage scans: the codes when present, else the float vectors."""
        if self.codes is not None:
            return int(self.codes_params.get("code_bytes", 0))
        return self.n * self.dim * 4

    def query_row(self, query: np.ndarray) -> np.ndarray:
        """`query` as one float32 row (dim,); InvalidArgument when its dimension is not the index's."""
        return self._query(query)[0]

    def _query(self, query: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise InvalidArgument("query", f"vector has dimension {q.shape[1]}, index has {self.dim}")
        return q

    def search(
        self, query: np.ndarray, depth: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top `depth` chunks by inner product as (ids int64, scores float32), score desc then id asc.

        `query` is one normalised vector (dim,) or (1, dim). With `mask` (bool per chunk) only allowed chunks are
        searched: exact for a flat index; for HNSW as filtered_plan says (an exact scan of the allowed rows or a
        filtered graph walk).
        """
        if depth < 1:
            raise InvalidArgument("depth", f"must be >= 1, got {depth}")
        q = self._query(query)
        k = min(depth, self.n)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        # libgomp keeps the thread count per calling thread, so it is set on the thread that searches.
        faiss.omp_set_num_threads(self.search_threads)
        if mask is None:
            return self._search_all(q, k)
        mask = np.ascontiguousarray(mask, dtype=np.bool_)
        if mask.shape != (self.n,):
            raise ValueError(f"mask must have shape ({self.n},), got {mask.shape}")
        # A count, not np.flatnonzero: at 1M chunks the index list of a wide filter costs 1-1.5 ms, more than the
        # walk it chooses.
        allowed = int(np.count_nonzero(mask))
        if allowed == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ef = filtered_plan(allowed, self.n, k, sq8=self.sq8 is not None) if self.kind == "hnsw" else 0
        if self.kind == "hnsw" and ef == 0:
            return self._exact_subset(q, mask, k)
        # Bitmap: bit i of byte i >> 3 (little bit order) says whether id i may be returned. `packed` must outlive
        # the search: the selector holds only a pointer to it.
        packed = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(packed))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self._cpu_index.search(q, k, params=params)
        return _sorted_hits(ids[0], scores[0])

    def _search_all(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.codes is not None:
            return self._search_codes(self.codes, q, k)
        if self._gpu_index is not None:
            with self._gpu_lock:
                scores, ids = self._gpu_index.search(q, k)
        elif self.kind == "hnsw":
            # Per-call parameters, not index.hnsw.efSearch: the index object is shared by all threads.
            params = faiss.SearchParametersHNSW(efSearch=max(k, HNSW_EF_SEARCH_MIN))
            scores, ids = self._cpu_index.search(q, k, params=params)
        else:
            scores, ids = self._cpu_index.search(q, k)
        return _sorted_hits(ids[0], scores[0])

    def _search_codes(self, codes: faiss.Index | faiss.IndexBinary, q: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates from the codes, then exact inner products from the float vectors: the reply's scores and order
        are those of the float index over the candidates, so only recall (not scores) depends on the codes."""
        wide = min(self.n, k * self.oversample)
        if self.codes_kind == "binary":
            _, ids = codes.search(binary_codes(q), wide)
        else:
            _, ids = codes.search(q, wide)
        ids = ids[0]
        ids = np.sort(ids[ids >= 0])  # ascending ids read the memory-mapped rows in file order
        hits, scores = _sorted_hits(ids, self.vectors[ids] @ q[0])
        return hits[:k], scores[:k]

    def _exact_subset(self, q: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if native.retrieve_backend() == "cpp":
            # One single-threaded SIMD pass over the allowed rows, GIL released. NumPy's gather and matmul cost a copy
            # of the rows and start BLAS threads, which on a busy machine took 18 ms for 2,000 rows against 0.6 ms
            # for 1,000 (bench/README.md "Filtered search: recall and latency by selectivity"). With sq8 codes the
            # pass reads the codes and rescores the best candidates from the float rows.
            if self.sq8 is not None:
                return native.dense_top(self.vectors, q[0], k, mask=mask, codes=self.sq8,
                                        oversample=self.native_oversample)
            return native.dense_top(self.vectors, q[0], k, mask=mask)
        # A full sort rather than argpartition, so ties at the cut are broken by id like everywhere else.
        allowed = np.flatnonzero(mask)
        ids, scores = _sorted_hits(allowed, self.vectors[allowed] @ q[0])
        return ids[:k], scores[:k]

    def rescore(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact inner products of `query` with the vectors of chunks `ids` (float32), e.g. for BM25-only hits."""
        q = self._query(query)
        ids = np.asarray(ids, dtype=np.int64)
        return (self.vectors[ids] @ q[0]).astype(np.float32, copy=False)
