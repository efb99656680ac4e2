# Types of the compiled extension (native/bindings.cpp), for the type checker; keep in step with the bindings.
# Array arguments are checked at run time (dtype, rank, C order) and raise ValueError naming the argument; the
# docstrings in bindings.cpp and the *_reference functions in rag_service.kernels.reference give the semantics.

from collections.abc import Sequence
from typing import Any

import numpy as np

__version__: str
HAS_CUDA: bool
BUILD_INFO: str

def cuda_device_count() -> tuple[int, str]: ...
def fuse(
    bm25_ids: np.ndarray,
    bm25_scores: np.ndarray,
    dense_ids: np.ndarray,
    dense_scores: np.ndarray,
    method: str,
    dense_weight: float,
    top_k: int,
    rrf_k: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...
def join_contexts(
    blob: bytes,
    offsets: Any,
    chunks: list[int],
    scores: list[float],
    tokens: list[int],
    context_tag: bytes,
    score_tag: bytes,
    tokens_tag: bytes,
) -> bytes: ...
def simd_level() -> str: ...
def sign_bits_pay() -> bool: ...
def simd_levels() -> list[str]: ...
def window_maxsim(
    query: np.ndarray,
    offsets: np.ndarray,
    vectors: np.ndarray,
    scales: np.ndarray | None,
    candidates: np.ndarray,
    temperature: float = 0.05,
    cuda: bool = False,
    simd: str = "",
) -> np.ndarray: ...
def proximity(
    query_terms: np.ndarray, token_offsets: np.ndarray, tokens: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]: ...
def linear_scores(features: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray: ...
def similarity_matrix(vectors: np.ndarray, cuda: bool = False, simd: str = "") -> np.ndarray: ...
def mmr_select(
    relevance: np.ndarray,
    sim: np.ndarray,
    mmr_lambda: float,
    k: int,
    dedup_threshold: float,
    cuda: bool = False,
    simd: str = "",
) -> np.ndarray: ...

RERANK_FEATURES: tuple[str, ...]
RERANK_LOCAL_FEATURES: tuple[str, ...]

def lexical_features(
    tokens: np.ndarray,
    token_offsets: np.ndarray,
    title_lengths: np.ndarray,
    window_offsets: np.ndarray,
    window_spans: np.ndarray,
    candidates: np.ndarray,
    query_terms: np.ndarray,
    query_counts: np.ndarray,
    query_idf: np.ndarray,
    k1: float,
    b: float,
    avgdl: float,
    avg_title: float,
    avg_window: float,
) -> np.ndarray: ...
def finish_features(
    local_features: np.ndarray,
    vectors: np.ndarray,
    query: np.ndarray,
    candidates: np.ndarray,
    fused_scores: np.ndarray,
    bm25_ranked: np.ndarray,
    dense_ranked: np.ndarray,
    simd: str = "",
) -> np.ndarray: ...
def rank_features(
    features: np.ndarray, columns: np.ndarray, weights: np.ndarray, bias: float
) -> tuple[np.ndarray, np.ndarray]: ...

class RerankCore:
    def __init__(
        self,
        window_offsets: np.ndarray,
        window_vectors: np.ndarray,
        window_scales: np.ndarray | None,
        window_spans: np.ndarray,
        tokens: np.ndarray,
        token_offsets: np.ndarray,
        title_lengths: np.ndarray,
        dense_vectors: np.ndarray,
        k1: float,
        b: float,
        avgdl: float,
        avg_title: float,
        avg_window: float,
        temperature: float = 0.05,
        simd: str = "",
    ) -> None: ...
    def local_features(
        self,
        query: np.ndarray,
        query_terms: np.ndarray,
        query_counts: np.ndarray,
        query_idf: np.ndarray,
        candidates: np.ndarray,
    ) -> np.ndarray: ...
    def place_helper(self, cpus: list[int]) -> None: ...
    def rouse_helper(self) -> None: ...
    @property
    def helper_jobs(self) -> int: ...
    def rerank(
        self,
        query: np.ndarray,
        query_terms: np.ndarray,
        query_counts: np.ndarray,
        query_idf: np.ndarray,
        candidates: np.ndarray,
        fused_scores: np.ndarray,
        bm25_ranked: np.ndarray,
        dense_ranked: np.ndarray,
        columns: np.ndarray,
        weights: np.ndarray,
        bias: float,
        helper: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

class BlockBounds:
    def __init__(
        self,
        indptr: np.ndarray,
        docs: np.ndarray,
        weights: np.ndarray,
        n_docs: int,
        shift: int = 6,
        min_postings: int = -1,
    ) -> None: ...
    @property
    def shift(self) -> int: ...
    @property
    def n_blocks(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def nbytes(self) -> int: ...

def bm25_top(
    indptr: np.ndarray,
    docs: np.ndarray,
    weights: np.ndarray,
    n_docs: int,
    term_ids: np.ndarray,
    mask: np.ndarray | None,
    depth: int,
    blocks: BlockBounds | None = None,
) -> tuple[np.ndarray, np.ndarray]: ...
def dense_top(
    vectors: np.ndarray,
    query: np.ndarray,
    mask: np.ndarray | None,
    depth: int,
    codes: np.ndarray | None = None,
    code_scale: np.ndarray | None = None,
    code_base: np.ndarray | None = None,
    oversample: int = 0,
    simd: str = "",
    code_bits: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]: ...
def dense_above(
    vectors: np.ndarray,
    codes: np.ndarray,
    code_scale: np.ndarray,
    code_slack: np.ndarray,
    code_norm: np.ndarray,
    query: np.ndarray,
    mask: np.ndarray | None,
    min_score: float,
    depth: int,
    simd: str = "",
) -> tuple[np.ndarray, np.ndarray]: ...
def row_quantize(
    vectors: np.ndarray,
    codes: np.ndarray,
    scale: np.ndarray,
    slack: np.ndarray,
    norm: np.ndarray,
) -> None: ...
def retrieve(
    indptr: np.ndarray,
    docs: np.ndarray,
    weights: np.ndarray,
    n_docs: int,
    term_ids: np.ndarray,
    mask: np.ndarray | None,
    depth: int,
    vectors: np.ndarray | None,
    query: np.ndarray | None,
    codes: np.ndarray | None,
    code_scale: np.ndarray | None,
    code_base: np.ndarray | None,
    oversample: int,
    dense_ids: np.ndarray | None,
    dense_scores: np.ndarray | None,
    method: str,
    dense_weight: float,
    top_k: int,
    rrf_k: float,
    simd: str = "",
    bm25_ids: np.ndarray | None = None,
    bm25_scores: np.ndarray | None = None,
    code_bits: np.ndarray | None = None,
    blocks: BlockBounds | None = None,
) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
    tuple[int, int, int],
]: ...
# search_core's result: retrieve's tuple (times: bm25, dense, fusion, rerank ns), confident, agreement, ids, scores,
# features, order.
SearchCoreTuple = tuple[
    tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
          tuple[int, int, int, int]],
    bool, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
]

def search_core(
    core: RerankCore,
    indptr: np.ndarray,
    docs: np.ndarray,
    weights: np.ndarray,
    n_docs: int,
    term_ids: np.ndarray,
    mask: np.ndarray | None,
    depth: int,
    vectors: np.ndarray | None,
    query: np.ndarray | None,
    codes: np.ndarray | None,
    code_scale: np.ndarray | None,
    code_base: np.ndarray | None,
    oversample: int,
    dense_ids: np.ndarray | None,
    dense_scores: np.ndarray | None,
    method: str,
    dense_weight: float,
    top_k: int,
    rrf_k: float,
    rerank_query: np.ndarray,
    query_terms: np.ndarray | None,
    query_counts: np.ndarray | None,
    query_idf: np.ndarray | None,
    columns: np.ndarray,
    model_weights: np.ndarray,
    bias: float,
    rerank_depth: int,
    confidence: bool,
    agree_top: int,
    agree_min: int,
    simd: str = "",
    idf_table: np.ndarray | None = None,
    bm25_ids: np.ndarray | None = None,
    bm25_scores: np.ndarray | None = None,
    code_bits: np.ndarray | None = None,
    helper: bool = False,
    blocks: BlockBounds | None = None,
) -> SearchCoreTuple: ...

class PreparedSearch:
    """search_core's per-index arguments, checked once; calling it runs search_core with a request's own."""

    def __init__(
        self, core: RerankCore, indptr: np.ndarray, docs: np.ndarray, weights: np.ndarray, n_docs: int,
        vectors: np.ndarray | None, codes: np.ndarray | None, code_scale: np.ndarray | None,
        code_base: np.ndarray | None, code_bits: np.ndarray | None, oversample: int, columns: np.ndarray,
        model_weights: np.ndarray, bias: float, idf_table: np.ndarray | None, blocks: BlockBounds | None,
    ) -> None: ...
    def __call__(
        self, term_ids: np.ndarray, query: np.ndarray, mask: np.ndarray | None, depth: int,
        dense_ids: np.ndarray | None, dense_scores: np.ndarray | None, method: str, dense_weight: float, top_k: int,
        rrf_k: float, query_terms: np.ndarray | None, query_counts: np.ndarray | None, query_idf: np.ndarray | None,
        rerank_depth: int, confidence: bool, agree_top: int, agree_min: int, bm25_ids: np.ndarray | None,
        bm25_scores: np.ndarray | None, helper: bool,
    ) -> SearchCoreTuple: ...

class WordPiece:
    """A BERT WordPiece tokenizer for ASCII text: the query encoder's token ids in one call."""

    def __init__(self, vocab: Sequence[str], unk_id: int, cls_id: int, sep_id: int, max_chars: int, max_tokens: int,
                 added: Sequence[str]) -> None: ...
    def encode(self, text: str) -> np.ndarray | None: ...
    def __len__(self) -> int: ...

class WordIds:
    """word -> BM25 term id for the words of ASCII queries: the index corpus's (seeded) and queries' (learned)."""

    def __init__(self) -> None: ...
    def lookup(self, text: str) -> np.ndarray | None: ...
    def add(self, words: Sequence[str], ids: Sequence[int]) -> None: ...
    def seed(self, words: Sequence[str], ids: Sequence[int]) -> None: ...
    def clear(self) -> None: ...
    @property
    def seeded(self) -> int: ...
    def __len__(self) -> int: ...
