"""BM25 over chunks with precomputed impacts.

Layout on disk (CSC-style, one posting list per term, chunk ids ascending within a list):
    bm25_indptr.npy       int64 (vocab + 1)   postings of term t are [indptr[t], indptr[t + 1])
    bm25_docs.npy         int32 (postings)    chunk ids
    bm25_weights.npy      float32 (postings)  impact = idf(t) * tf-saturation(t, chunk): a query only adds them up
    bm25_doc_lengths.npy  int32 (chunks)      analysed tokens per chunk
    bm25_vocab.json       {term: term id}
    bm25_params.json      k1, b, idf kind, avgdl, counts, analyzer settings
    bm25_words.json       {word: term id, -1 for a stop word}: the corpus's ASCII words as the analyser split them
                          (optional), so that a query made of them gets its term ids in one look-up each

Because impacts are precomputed, a query's score for a chunk is the sum, over query tokens (duplicates counted, as
rank-bm25 does), of that term's impact in the chunk; k1 and b cannot change without a rebuild.
"""

from __future__ import annotations

import functools
import json
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from rag_service.core.errors import IndexFormatError, InvalidArgument
from rag_service.kernels.native import Postings, block_bounds, word_ids_memo
from rag_service.retrievers.analysis import Analyzer

IDF_KINDS = ("lucene", "okapi")
# Words whose term id a BM25Index remembers (query_term_ids) before it forgets them all.
WORD_IDS_LIMIT = 1_000_000
# An index of at least this many chunks gets bounds per block of chunks at load (kernels.native.block_bounds), which
# let the native BM25 top read a few percent of a common query's postings. Below it a query's sums fit the core's
# caches and the whole postings pass takes tens of µs (SciFact's 10,435 chunks: ~50 µs).
BLOCK_BOUNDS_MIN_CHUNKS = 1 << 17

INDPTR_FILE = "bm25_indptr.npy"
DOCS_FILE = "bm25_docs.npy"
WEIGHTS_FILE = "bm25_weights.npy"
DOC_LENGTHS_FILE = "bm25_doc_lengths.npy"
VOCAB_FILE = "bm25_vocab.json"
PARAMS_FILE = "bm25_params.json"
FILES = (INDPTR_FILE, DOCS_FILE, WEIGHTS_FILE, DOC_LENGTHS_FILE, VOCAB_FILE, PARAMS_FILE)
# Only in a shard (rag_service/shard/split.py): int64 document frequency per term over the WHOLE corpus. A shard keeps
# the corpus vocabulary, its own postings with the corpus' impacts, and params "corpus_chunks"/"avgdl" of the corpus,
# so every statistic that reads df or N (idf of the reranker's features, the cache's term weights) means the same as
# in one index of the whole corpus.
DF_FILE = "bm25_df.npy"
# Optional (an index built before it has none): the corpus's ASCII words and their term ids (module docstring).
WORDS_FILE = "bm25_words.json"


@dataclass(frozen=True)
class BM25Params:
    k1: float = 0.9  # Anserini's defaults, tuned on MS MARCO; Lucene's own are 1.2 / 0.75
    b: float = 0.4
    idf: str = "lucene"
    epsilon: float = 0.25  # only for idf="okapi": rank-bm25's floor for negative idf, as a fraction of mean idf

    def validate(self) -> None:
        if not (math.isfinite(self.k1) and self.k1 >= 0):
            raise ValueError(f"k1 must be a finite number >= 0, got {self.k1}")
        if not (math.isfinite(self.b) and 0 <= self.b <= 1):
            raise ValueError(f"b must be in [0, 1], got {self.b}")
        if self.idf not in IDF_KINDS:
            raise ValueError(f"idf must be one of {', '.join(IDF_KINDS)}, got {self.idf!r}")


def idf_values(df: np.ndarray, n_docs: int, kind: str = "lucene", epsilon: float = 0.25) -> np.ndarray:
    """float64 idf per term from document frequencies.

    lucene: ln(1 + (N - df + 0.5) / (df + 0.5)), always > 0.
    okapi:  ln(N - df + 0.5) - ln(df + 0.5), with negative values (terms in more than half the documents) replaced by
            epsilon * mean idf over the vocabulary, exactly as rank-bm25's BM25Okapi does.
    """
    df = np.asarray(df, dtype=np.float64)
    if kind == "lucene":
        return np.log1p((n_docs - df + 0.5) / (df + 0.5))
    if kind == "okapi":
        idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
        if len(idf):
            floor = epsilon * (idf.sum() / len(idf))
            idf = np.where(idf < 0, floor, idf)
        return idf
    raise ValueError(f"idf must be one of {', '.join(IDF_KINDS)}, got {kind!r}")


@dataclass
class BM25Postings:
    """An in-memory BM25 index as built; `write` stores it in the layout above."""

    vocab: list[str]  # term id -> term, sorted
    indptr: np.ndarray
    docs: np.ndarray
    weights: np.ndarray
    doc_lengths: np.ndarray
    avgdl: float
    params: BM25Params

    @property
    def n_docs(self) -> int:
        return len(self.doc_lengths)

    def write(self, directory: Path, analyzer: Analyzer) -> list[Path]:
        directory = Path(directory)
        np.save(directory / INDPTR_FILE, self.indptr)
        np.save(directory / DOCS_FILE, self.docs)
        np.save(directory / WEIGHTS_FILE, self.weights)
        np.save(directory / DOC_LENGTHS_FILE, self.doc_lengths)
        term_id = {term: i for i, term in enumerate(self.vocab)}
        with open(directory / VOCAB_FILE, "w", encoding="utf-8") as f:
            json.dump(term_id, f, ensure_ascii=False, separators=(",", ":"))
        # What the analyser learned of the corpus's words while it made the postings: the stems a query's words
        # would otherwise need at request time (query_term_ids).
        words = {word: -1 if stem is None else term_id.get(stem, -1)
                 for word, stem in analyzer.seen_words().items() if word.isascii()}
        with open(directory / WORDS_FILE, "w", encoding="utf-8") as f:
            json.dump(words, f, separators=(",", ":"))
        with open(directory / PARAMS_FILE, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "k1": self.params.k1,
                    "b": self.params.b,
                    "idf": self.params.idf,
                    "epsilon": self.params.epsilon,
                    "avgdl": self.avgdl,
                    "n_docs": self.n_docs,
                    "vocabulary": len(self.vocab),
                    "postings": int(len(self.docs)),
                    "analyzer": analyzer.settings(),
                },
                f,
                indent=2,
            )
        return [directory / name for name in (*FILES, WORDS_FILE)]


def _read_words(path: Path, vocabulary: int) -> dict[str, int]:
    """WORDS_FILE's map, checked: str -> int in [-1, vocabulary)."""
    try:
        with open(path, encoding="utf-8") as f:
            words = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise IndexFormatError(f"{path}: cannot read: {e}") from e
    if not isinstance(words, dict):
        raise IndexFormatError(f"{path}: expected an object of word -> term id, got {type(words).__name__}")
    for word, i in words.items():
        if type(i) is not int or not -1 <= i < vocabulary:
            raise IndexFormatError(f"{path}: word {word!r} has term id {i!r}, not an int in [-1, {vocabulary})")
    return words


def build_postings(token_lists: Iterable[Sequence[str]], params: BM25Params = BM25Params()) -> BM25Postings:
    """Builds impacts for chunks given their analysed tokens, in chunk id order."""
    params.validate()
    term_ids: dict[str, int] = {}  # first-seen ids; remapped to sorted order at the end so builds are deterministic
    post_terms = array("q")
    post_docs = array("q")
    post_tfs = array("q")
    lengths = array("q")
    for doc, tokens in enumerate(token_lists):
        lengths.append(len(tokens))
        for term, tf in Counter(tokens).items():
            tid = term_ids.setdefault(term, len(term_ids))
            post_terms.append(tid)
            post_docs.append(doc)
            post_tfs.append(tf)

    n_docs = len(lengths)
    vocab = sorted(term_ids)
    remap = np.empty(len(term_ids), dtype=np.int64)
    for new_id, term in enumerate(vocab):
        remap[term_ids[term]] = new_id
    terms = remap[np.frombuffer(post_terms, dtype=np.int64)] if len(post_terms) else np.zeros(0, np.int64)
    docs = np.frombuffer(post_docs, dtype=np.int64) if len(post_docs) else np.zeros(0, np.int64)
    tfs = np.frombuffer(post_tfs, dtype=np.int64).astype(np.float64) if len(post_tfs) else np.zeros(0)
    doc_lengths = np.frombuffer(lengths, dtype=np.int64) if n_docs else np.zeros(0, np.int64)

    # Postings were appended in chunk order, so a stable sort by term keeps chunk ids ascending in each list.
    order = np.argsort(terms, kind="stable")
    terms, docs, tfs = terms[order], docs[order], tfs[order]
    df = np.bincount(terms, minlength=len(vocab))
    indptr = np.zeros(len(vocab) + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])

    avgdl = float(doc_lengths.mean()) if n_docs else 0.0
    idf = idf_values(df, n_docs, params.idf, params.epsilon)
    # avgdl is 0 only when no chunk has a token, and then there are no postings to weigh.
    norm = params.k1 * (1.0 - params.b + params.b * doc_lengths[docs] / (avgdl or 1.0))
    weights = idf[terms] * tfs * (params.k1 + 1.0) / (tfs + norm)

    return BM25Postings(
        vocab=vocab,
        indptr=indptr,
        docs=docs.astype(np.int32),
        weights=weights.astype(np.float32),
        doc_lengths=doc_lengths.astype(np.int32),
        avgdl=avgdl,
        params=params,
    )


# Kernels ----------------------------------------------------------------------------------------------------------
# nogil so server threads score queries in parallel; every buffer is allocated per call, so calls share nothing.


@njit(cache=True, nogil=True)
def _accumulate(indptr, docs, weights, term_ids, n_docs):
    acc = np.zeros(n_docs, dtype=np.float32)
    for k in range(term_ids.shape[0]):
        t = term_ids[k]
        for p in range(indptr[t], indptr[t + 1]):
            acc[docs[p]] += weights[p]
    return acc


@njit(cache=True, nogil=True, inline="always")
def _worse(s1, i1, s2, i2):
    # Result order is score desc, then id asc: (s1, i1) ranks below (s2, i2).
    return s1 < s2 or (s1 == s2 and i1 > i2)


@njit(cache=True, nogil=True, inline="always")
def _sift_down(hs, hi, size, pos):
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and _worse(hs[right], hi[right], hs[left], hi[left]):
            child = right
        if _worse(hs[child], hi[child], hs[pos], hi[pos]):
            hs[pos], hs[child] = hs[child], hs[pos]
            hi[pos], hi[child] = hi[child], hi[pos]
            pos = child
        else:
            return


@njit(cache=True, nogil=True, inline="always")
def _sift_up(hs, hi, pos):
    while pos > 0:
        parent = (pos - 1) // 2
        if not _worse(hs[pos], hi[pos], hs[parent], hi[parent]):
            return
        hs[pos], hs[parent] = hs[parent], hs[pos]
        hi[pos], hi[parent] = hi[parent], hi[pos]
        pos = parent


@njit(cache=True, nogil=True)
def _top_n(indptr, docs, weights, term_ids, n_docs, mask, use_mask, depth):
    acc = _accumulate(indptr, docs, weights, term_ids, n_docs)
    # Min-heap on rank: the root is the worst hit kept, so a candidate only has to beat the root.
    hs = np.empty(depth, dtype=np.float32)
    hi = np.empty(depth, dtype=np.int64)
    size = 0
    # Visit only chunks some query term touches (not all n_docs); zeroing acc marks a chunk as seen, so repeated
    # query terms do not offer it twice.
    for k in range(term_ids.shape[0]):
        t = term_ids[k]
        for p in range(indptr[t], indptr[t + 1]):
            d = docs[p]
            s = acc[d]
            if s <= 0:
                continue
            acc[d] = 0
            if use_mask and not mask[d]:
                continue
            if size < depth:
                hs[size] = s
                hi[size] = d
                _sift_up(hs, hi, size)
                size += 1
            elif _worse(hs[0], hi[0], s, d):
                hs[0] = s
                hi[0] = d
                _sift_down(hs, hi, size, 0)
    out_s = np.empty(size, dtype=np.float32)
    out_i = np.empty(size, dtype=np.int64)
    # Popping the root repeatedly yields worst first; fill from the back for best first.
    for pos in range(size - 1, -1, -1):
        out_s[pos] = hs[0]
        out_i[pos] = hi[0]
        hs[0] = hs[pos]
        hi[0] = hi[pos]
        _sift_down(hs, hi, pos, 0)
    return out_i, out_s


_NO_MASK = np.zeros(0, dtype=np.bool_)


class BM25Index:
    """A loaded, read-only BM25 index. Safe to search from several threads at once."""

    def __init__(
        self,
        indptr: np.ndarray,
        docs: np.ndarray,
        weights: np.ndarray,
        doc_lengths: np.ndarray,
        vocab: dict[str, int],
        params: dict[str, Any],
        analyzer: Analyzer,
        df: np.ndarray | None = None,
    ) -> None:
        # numba types np.memmap poorly; plain ndarray views of the same mapped buffer cost nothing.
        self.indptr = np.asarray(indptr)
        self.docs = np.asarray(docs)
        self.weights = np.asarray(weights)
        self.doc_lengths = np.asarray(doc_lengths)
        self.vocab = vocab
        self.params = params
        self.analyzer = analyzer
        self.n_chunks = int(len(self.doc_lengths))
        self.k1 = float(params["k1"])
        self.b = float(params["b"])
        self.idf_kind = str(params["idf"])
        self.avgdl = float(params["avgdl"])
        # The corpus this index's statistics describe: itself, or for a shard the whole corpus (DF_FILE).
        self.corpus_chunks = int(params.get("corpus_chunks", self.n_chunks))
        self._df = None if df is None else np.asarray(df)
        # word -> the id of its analysed term, -1 for a stop word or a term the index lacks (query_term_ids). Plain
        # dict reads and writes from any thread: two threads that fill in one word write the same id.
        self._word_ids: dict[str, int] = {}
        # The same for ASCII words, in C++ (None without the extension): an ASCII query whose words are all held is
        # answered in one call.
        self._native_word_ids = word_ids_memo()

    @functools.cached_property
    def postings(self) -> Postings:
        """The impact postings as the native first stage (rag_service.kernels.native.retrieve) reads them, with
        their bounds per block on an index of at least BLOCK_BOUNDS_MIN_CHUNKS chunks (made here, once: ~0.2 s and
        ~45 MB at 1M chunks)."""
        postings = Postings(np.ascontiguousarray(self.indptr), np.ascontiguousarray(self.docs),
                            np.ascontiguousarray(self.weights), self.n_chunks)
        if self.n_chunks < BLOCK_BOUNDS_MIN_CHUNKS:
            return postings
        try:
            return postings._replace(blocks=block_bounds(postings))
        except ValueError as e:  # a list out of chunk order: a damaged index
            raise IndexFormatError(f"BM25 postings: {e}") from e

    @property
    def df(self) -> np.ndarray:
        """int64 document frequency per term id over the corpus (a shard's are global, see DF_FILE)."""
        if self._df is None:
            self._df = np.diff(self.indptr)
        return self._df

    @classmethod
    def load(cls, directory: Path | str, analyzer: Analyzer | None = None, warmup: bool = True) -> BM25Index:
        directory = Path(directory)
        try:
            with open(directory / PARAMS_FILE, encoding="utf-8") as f:
                params = json.load(f)
            with open(directory / VOCAB_FILE, encoding="utf-8") as f:
                vocab = json.load(f)
            arrays = [
                np.load(directory / name, mmap_mode="r")
                for name in (INDPTR_FILE, DOCS_FILE, WEIGHTS_FILE, DOC_LENGTHS_FILE)
            ]
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise IndexFormatError(f"{directory}: cannot read BM25 index: {e}") from e
        indptr, docs, weights, doc_lengths = arrays
        expected = {INDPTR_FILE: (indptr, np.int64), DOCS_FILE: (docs, np.int32), WEIGHTS_FILE: (weights, np.float32),
                    DOC_LENGTHS_FILE: (doc_lengths, np.int32)}
        for name, (arr, dtype) in expected.items():
            if arr.dtype != dtype or arr.ndim != 1:
                raise IndexFormatError(
                    f"{directory / name}: expected 1-d {np.dtype(dtype)}, got {arr.ndim}-d {arr.dtype}"
                )
        if len(indptr) != len(vocab) + 1 or len(docs) != len(weights) or (len(indptr) and indptr[-1] != len(docs)):
            raise IndexFormatError(f"{directory}: BM25 arrays disagree in length (vocab {len(vocab)}, "
                                   f"indptr {len(indptr)}, docs {len(docs)}, weights {len(weights)})")
        df = None
        if (directory / DF_FILE).is_file():
            try:
                df = np.load(directory / DF_FILE, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFormatError(f"{directory / DF_FILE}: cannot read: {e}") from e
            if df.dtype != np.int64 or df.shape != (len(vocab),):
                raise IndexFormatError(f"{directory / DF_FILE}: expected int64 ({len(vocab)},), got {df.dtype} "
                                       f"{df.shape}")
        if analyzer is None:
            analyzer = Analyzer.from_settings(params["analyzer"])
        index = cls(indptr, docs, weights, doc_lengths, vocab, params, analyzer, df=df)
        # The corpus's words stand for what this analyser would make of them only if it is the build's.
        if (directory / WORDS_FILE).is_file() and analyzer.settings() == params["analyzer"]:
            index.seed_words(_read_words(directory / WORDS_FILE, len(vocab)))
        if warmup:
            # Compiles (or loads from numba's cache) both kernel variants before the first real query.
            index.search_tokens([], 1)
            index.search_tokens([], 1, mask=np.ones(index.n_chunks, dtype=np.bool_))
        return index

    def seed_words(self, words: dict[str, int]) -> None:
        """Holds `words` (word -> term id, -1 for a stop word or a term the index lacks) in the C++ memo for good:
        an ASCII query made of them gets its term ids without the analyser the first time it is asked. Without
        the extension the Python memo learns them only from queries, as before."""
        if self._native_word_ids is not None:
            self._native_word_ids.seed(list(words), list(words.values()))

    def query_term_ids(self, text: str) -> np.ndarray:
        """term_ids(analyzer.tokens(text)), with one look-up per word of a word seen before: its term id, where the
        analyser's stem and then the vocabulary are two look-ups, each a miss on the caches an encode has just
        flushed. SciFact queries, p50: 38 -> 29 µs with their words seen before, 57 -> 66 µs the first time
        (bench/README.md, "Issue 15"); a server's queries mostly repeat words it has seen. An ASCII query whose words
        are all held (the corpus's, seeded at load, or learned from queries) is answered by the C++ memo in one
        call (bench/README.md, "Issue 15", "A query's term ids from the corpus's words")."""
        held = self._native_word_ids
        if held is not None:
            ids = held.lookup(text)
            if ids is not None:
                return ids
        words = self.analyzer.words(text)
        try:
            return np.array([i for i in map(self._word_ids.__getitem__, words) if i >= 0], dtype=np.int64)
        except KeyError:
            return self._remember_ids(words)

    def _remember_ids(self, words: list[str]) -> np.ndarray:
        """query_term_ids for words not all seen before: their ids are worked out and remembered."""
        vocab = self.vocab
        ids = [-1 if term is None else vocab.get(term, -1) for term in self.analyzer.stems(words)]
        memo, held = self._word_ids, self._native_word_ids
        if len(memo) > WORD_IDS_LIMIT:  # a long-running server sees unbounded query vocabularies
            memo.clear()
            if held is not None:
                held.clear()
        memo.update(zip(words, ids))
        if held is not None:
            held.add(words, ids)
        return np.array([i for i in ids if i >= 0], dtype=np.int64)

    def term_ids(self, tokens: Iterable[str]) -> np.ndarray:
        """Ids of the known tokens, duplicates kept; unknown tokens contribute nothing, so they are dropped."""
        # One look-up per token (map over dict.get) rather than a membership test and an index in a generator.
        return np.array([i for i in map(self.vocab.get, tokens) if i is not None], dtype=np.int64)

    def _check_mask(self, mask: np.ndarray | None) -> np.ndarray | None:
        if mask is None:
            return None
        mask = np.ascontiguousarray(mask, dtype=np.bool_)
        if mask.shape != (self.n_chunks,):
            raise ValueError(f"mask must have shape ({self.n_chunks},), got {mask.shape}")
        return mask

    def search_tokens(
        self, tokens: Sequence[str], depth: int, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top `depth` chunks with score > 0 as (ids int64, scores float32), score desc then id asc. `mask` (bool,
        one per chunk) restricts results to allowed chunks before the top-N cut, so filtered results are exact."""
        if depth < 1:
            raise InvalidArgument("depth", f"must be >= 1, got {depth}")
        mask = self._check_mask(mask)
        tids = self.term_ids(tokens)
        depth = min(depth, max(self.n_chunks, 1))
        if mask is None:
            return _top_n(self.indptr, self.docs, self.weights, tids, self.n_chunks, _NO_MASK, False, depth)
        return _top_n(self.indptr, self.docs, self.weights, tids, self.n_chunks, mask, True, depth)

    @functools.cached_property
    def _idf(self) -> tuple[np.ndarray, float]:
        # Computed once per loaded index, on first use (the semantic cache's guard is its only reader).
        idf = idf_values(self.df, self.corpus_chunks, self.idf_kind)  # a shard's df and N are the corpus's
        return idf, float(idf.max()) if len(idf) else 1.0

    def query_terms(self, query: str) -> dict[str, float]:
        """The query's index terms (this index's analyzer) with their idf; a term the index lacks weighs the most
        (it is rarer than any term it has)."""
        return self.idf_of(self.analyzer.tokens(query))

    def idf_of(self, tokens: Iterable[str]) -> dict[str, float]:
        """query_terms of analysed tokens."""
        return self.idf_and_ids(list(tokens))[0]

    def idf_and_ids(self, tokens: Sequence[str]) -> tuple[dict[str, float], np.ndarray]:
        """(idf_of(tokens), the known tokens' ids sorted, repeats kept) with one vocabulary look-up per token: the
        semantic cache's guard asks for both on every look-up that finds a near entry, on caches an encode has just
        flushed, where each look-up in a vocabulary of 10^4-10^6 terms is a miss."""
        idf, top = self._idf
        ids = list(map(self.vocab.get, tokens))
        weights = {t: (idf.item(i) if i is not None else top) for t, i in zip(tokens, ids)}
        return weights, np.array(sorted(i for i in ids if i is not None), dtype=np.int64)

    def search(self, query: str, depth: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.search_tokens(self.analyzer.tokens(query), depth, mask)

    def score_all(self, tokens: Sequence[str]) -> np.ndarray:
        """float32 score of every chunk (0 where no query term occurs), e.g. to rescore a candidate set."""
        return _accumulate(self.indptr, self.docs, self.weights, self.term_ids(tokens), self.n_chunks)

    def __repr__(self) -> str:
        return (f"BM25Index(chunks={self.n_chunks}, vocabulary={len(self.vocab)}, postings={len(self.docs)}, "
                f"k1={self.k1}, b={self.b}, idf={self.idf_kind!r})")
