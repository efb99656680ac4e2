"""Cache stage: earlier answers served again, exactly or for a near-identical query, never across index versions.

    request -> exact lookup (collection, index version, normalised query, every result-changing parameter)  hit: reply
            -> searcher.search(params, cache=stage), which encodes and then calls the stage:
               semantic lookup (nearest cached query embeddings, then a fidelity guard)   hit: reply
               -> rest of the pipeline with the same vector -> stage.store

`CachedSearch` wraps a Searcher (search/searcher.py) and calls its `search` once per request; the semantic part is a
stage the searcher calls after its encode, so the encode and the route decision stay with the searcher.

A semantic hit must return what a fresh search would have returned (fidelity), so cosine alone does not decide: the
guard asks that the cached answer was not a near tie (its BM25 and dense lists agreed, `answer_agreement`), that the
two queries hold the same negation, direction, comparison and quantity words
(search/guard_words.py), that no index term BM25 weighs is in one query and not the other (`differing_idf`), that
they share their rare terms (IDF-weighted) and that the new query's BM25 top candidates overlap those stored with the
entry; terms and candidates come from the searcher's `guard` (the index's own analyzer and BM25). A searcher without a
guard (the shard router) gets exact and strict hits only. Thresholds come from bench/experiments/guard_families.py,
fitted per family of query variants (figures in bench/README.md). Strict mode, for callers that cache generated
answers on top of ours, only serves near-verbatim queries: the same content words, stemmed, in the same order.

The store is thread-safe (exact lookups run on the event loop, semantic lookups and inserts on pipeline threads);
single flight (identical concurrent requests do the work once) lives on the event loop in `CachedSearch.search`.

An entry can also hold what the server sends for it (`Entry.reply`: the encoded answer less the fields that differ
per call) and the wire bytes of the requests it answered exactly (`CacheStore.attach`). A repeat of those bytes, under
the same caller scope and index version, is then answered by `CachedSearch.replay` without the request being
validated or keyed again: the bytes decided both already, and the entry leaves the cache with everything it names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import sys
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from rag_service.core.config import CacheConfig
from rag_service.core.errors import DeadlineExceeded
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams, SearchResult, check_deadline
from rag_service.core.timing import StageTimer
from rag_service.kernels import native
from rag_service.retrievers.analysis import Analyzer
from rag_service.search.guard_words import polarity_words
from rag_service.search.searcher import LexicalGuard, PackedContexts, Searcher, StoredContext, pack_contexts

log = logging.getLogger(__name__)

MISS, EXACT, SEMANTIC, PREFETCHED = "miss", "exact", "semantic", "prefetched"
# Where an entry came from: a live search, Prefetch, or speculative retrieval on a StreamSearch draft.
LIVE, PREFETCH, SPECULATIVE = "live", "prefetch", "speculative"

_SPACE = re.compile(r"\s+")
# Parameters that do not change the result: the query is keyed normalised, and the cache mode only says how to look.
_NOT_KEYED = frozenset({"query", "cache"})
_KEYED_FIELDS = tuple(f.name for f in dataclasses.fields(SearchParams) if f.name not in _NOT_KEYED)

# Words whose presence or absence never changes what a question asks; everything else, negations and prepositions
# included ("not", "from", "to"), stays in the strict signature.
_STRICT_IGNORED = frozenset(["a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am", "do", "does",
                             "did", "please"])
_STRICT_ANALYZER = Analyzer(stemmer="english", stopwords=None)
_STRICT_IGNORED_STEMS = frozenset(_STRICT_ANALYZER.tokens(" ".join(sorted(_STRICT_IGNORED))))


def normalise(query: str) -> str:
    """Unicode NFKC, case folded, white space collapsed: the forms a user cannot tell apart."""
    if query.isascii():  # NFKC leaves ASCII as it is, and casefold() of ASCII is lower()
        return _SPACE.sub(" ", query.lower()).strip()
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", query).casefold())).strip()


def params_key(params: SearchParams) -> tuple:
    """Every SearchParams field that can change the result (new fields are keyed automatically)."""
    values = []
    for name in _KEYED_FIELDS:
        value = getattr(params, name)
        if isinstance(value, dict):
            value = tuple(sorted(value.items()))
        values.append(value)
    return tuple(values)


def strict_signature(query: str) -> tuple[str, ...]:
    """Content words in order after normalisation and stemming; equal signatures mean near-verbatim queries."""
    return tuple(t for t in _STRICT_ANALYZER.tokens(normalise(query)) if t not in _STRICT_IGNORED_STEMS)


def term_overlap(a: dict[str, float], b: dict[str, float]) -> float:
    """IDF-weighted Jaccard of two queries' index terms: a changed rare word ("increases" / "decreases", another
    outcome) weighs more than an added common one ("true" in "is it true that")."""
    union = sum(a.values()) + sum(w for t, w in b.items() if t not in a)
    if union == 0:
        return 1.0
    return sum(w for t, w in a.items() if t in b) / union


def differing_idf(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest idf of an index term one query has and the other lacks; 0.0 when both have the same terms. Two
    queries whose terms differ only in words nearly every chunk holds rank alike in BM25; one rare word more or less
    ("in mice", a typo, another drug) ranks other chunks, however little the embedding moves."""
    top = 0.0
    for t, w in a.items():
        if w > top and t not in b:
            top = w
    for t, w in b.items():
        if w > top and t not in a:
            top = w
    return top


def _candidates(guard: LexicalGuard, params: SearchParams, depth: int, bm25_input: np.ndarray) -> np.ndarray:
    return guard.lexical_candidates(bm25_input, params.filters, depth, params.filter)


def answer_agreement(result: SearchResult) -> float:
    """How far the answer's two retrievers agreed: the overlap@10 of its BM25 and dense lists (1.0 when only one ran).
    Where they disagree, the fused order is a near tie between two lists, and a query a few words away reorders it,
    so the guard serves semantic hits only from answers above guard_min_agreement."""
    signals = result.signals
    return 1.0 if signals is None or signals[2] is None else signals[2]


def lexical_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Share of BM25 candidates two queries have in common; two queries with no lexical match agree (1.0)."""
    size = max(len(a), len(b))
    if size == 0:
        return 1.0
    return len(np.intersect1d(a, b, assume_unique=True)) / size


@dataclass(frozen=True)
class Served:
    """A search result and how it was served: MISS, EXACT, SEMANTIC or PREFETCHED (+ cosine for semantic hits)."""

    result: SearchResult
    served_from: str = MISS
    similarity: float | None = None
    origin: str = LIVE  # who computed it: a leader's origin tells coalesced followers what to report
    finished_ns: int = 0  # perf_counter_ns when a pipeline thread finished it (0: answered on the event loop)
    # A miss's store into the cache, left for the caller to run once the answer is on its way (run(defer_store=True)).
    store: Callable[[], None] | None = None
    entry: Entry | None = None  # the cache entry a hit came from (its prepared reply: CacheStore.attach)


class GuardInputs:
    """The fidelity guard's view of one query: its index terms with their idf, its polarity words
    (search/guard_words.py), its BM25 input (`bm25_key`: the term ids with repeats, sorted, as bytes) and its BM25 top
    guard_depth chunk ids, sorted (`lexical`), worked out only when asked: a cached query with the same BM25 input
    has the same BM25 top chunks, so a hit on such a query needs no BM25 search."""

    __slots__ = ("terms", "polarity", "bm25_key", "_input", "_lexical", "_candidates")

    def __init__(self, terms: dict[str, float], polarity: tuple[str, ...], bm25_input: np.ndarray,
                 candidates: Callable[[np.ndarray], np.ndarray]) -> None:
        self.terms = terms
        self.polarity = polarity
        self.bm25_key = bm25_input.tobytes()
        self._input = bm25_input
        self._lexical: np.ndarray | None = None
        self._candidates = candidates

    @property
    def lexical(self) -> np.ndarray:
        if self._lexical is None:
            self._lexical = self._candidates(self._input)
        return self._lexical

    def candidates_of(self, bm25_key: bytes) -> np.ndarray:
        """The BM25 top chunks of another query's BM25 input (its `bm25_key`), ranked as this query's are: the
        same index, filters and depth, which any query of this one's cache group shares."""
        return self._candidates(np.frombuffer(bm25_key, np.int64))

    @property
    def known_lexical(self) -> np.ndarray | None:
        """`lexical` if it was worked out already, else None (without working it out)."""
        return self._lexical


_LIST_FIELDS = frozenset(f.name for f in dataclasses.fields(SearchResult) if f.default_factory is list)
# A packed SearchResult's values, in this order (PackedResult).
_RESULT_FIELDS = tuple(f.name for f in dataclasses.fields(SearchResult) if f.name not in ("contexts", "stage_us"))
_RESULT_STATE = {*_RESULT_FIELDS, "contexts", "stage_us"}
_ALL_FIELDS = tuple(f.name for f in dataclasses.fields(SearchResult))


class PackedResult(NamedTuple):
    """A SearchResult as a cache entry keeps it: the contexts packed (PackedContexts) and the other fields' values as
    one flat tuple (_RESULT_FIELDS' order, lists as tuples). An entry lives for minutes, and every tracked object it
    holds lengthens the collector's passes over the young objects and its full ones (api/heap.py): packed, an entry
    holds three of them, not ~60. A hit gets a new SearchResult from it (`result`)."""

    values: tuple
    contexts: PackedContexts

    def result(self, stage_us: dict[str, int]) -> SearchResult:
        """A new SearchResult equal to the packed one, its contexts unpacked when first read (_HitResult)."""
        result = object.__new__(_HitResult)
        state = result.__dict__
        state.update(zip(_RESULT_FIELDS, self.values))
        for name in _LIST_FIELDS:
            state[name] = list(state[name])
        state["stage_us"] = stage_us
        state["_packed"] = self.contexts
        return result


class _HitResult(SearchResult):
    """A hit's SearchResult whose contexts are unpacked from its entry when first read. A plain reply to a hit is
    the bytes kept with the entry (CachedSearch.keep_reply) and never reads them, where unpacking ten of them cost
    ~25 µs of every hit on the caches an encode leaves. Its fields are those of the SearchResult it stands for."""

    __hash__ = None  # type: ignore[assignment]  # as SearchResult's: mutable, compared by value

    def __eq__(self, other: object) -> bool:
        # SearchResult's own __eq__ compares objects of one class only; this one equals the SearchResult it stands for.
        if not isinstance(other, SearchResult):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _ALL_FIELDS)

    def __getattr__(self, name: str) -> Any:
        # Asked only for an attribute the object lacks: the contexts, until their first read.
        if name != "contexts":
            raise AttributeError(name)
        contexts = self.__dict__["_packed"].unpack()
        self.__dict__["contexts"] = contexts
        return contexts


def _pack(result: SearchResult) -> SearchResult | PackedResult:
    """What an entry keeps of `result`: packed when its contexts pack (unshaped and unread, as a plain search leaves
    them) and it holds nothing but its fields, else a copy of it."""
    state = result.__dict__
    if result.groups is None and not result.shaped and state.keys() == _RESULT_STATE:
        contexts = pack_contexts(result.contexts)
        if contexts is not None:
            return PackedResult(tuple(tuple(state[name]) if name in _LIST_FIELDS else state[name]
                                      for name in _RESULT_FIELDS), contexts)
    return _copy(result, {})


@dataclass(eq=False)
class Entry:
    key: tuple
    group: tuple  # ((collection, index version), params key): semantic hits only within a group
    result: SearchResult | PackedResult  # a hit gets its own SearchResult from it (CachedSearch._hit)
    vector: np.ndarray
    # BM25 top guard_depth chunk ids, sorted: the fidelity guard compares these. None until a guard first asks
    # (bm25_top): a miss stores its entry without a BM25 search, and most entries are never compared.
    lexical: np.ndarray | None
    terms: dict[str, float]  # the query's index terms and their idf: the guard's term overlap
    polarity: tuple[str, ...]  # guard_words.polarity_words of the query (empty when that check is off)
    signature: tuple[str, ...]
    nbytes: int
    inserted: float
    origin: str = LIVE
    agreement: float = 1.0  # the answer's BM25/dense overlap@10 (answer_agreement): the guard's near-tie check
    bm25_key: bytes = b""  # GuardInputs.bm25_key of the query: an equal key means equal BM25 top chunks
    used: bool = False
    slot: int = -1
    # What the server sends for this entry less the per-call fields, once a hit has encoded it (CacheStore.attach).
    reply: bytes | None = None
    # Wire requests (bytes, caller scope) this entry answered exactly: CacheStore.replay finds it by them. A tuple,
    # as everything an entry holds for minutes, where it can be: the collector stops tracking it (api/heap.py).
    requests: tuple[tuple[bytes, object], ...] = ()

    def bm25_top(self, query: GuardInputs) -> np.ndarray:
        """`lexical`, worked out (once) the first time a guard compares it, by the comparing `query`'s ranking:
        semantic hits are looked for within one cache group, so the index, filters and depth are this entry's."""
        lexical = self.lexical
        if lexical is None:  # two threads may both work it out: the same ids, the same assignment
            lexical = self.lexical = query.candidates_of(self.bm25_key)
        return lexical


def _sizeof_result(result: SearchResult) -> int:
    # An estimate of what the entry keeps alive: the strings dominate; object headers are counted roughly.
    n = 400 + 64 * len(result.stage_us)
    for c in result.contexts:
        n += 350
        if isinstance(c, StoredContext) and not c.resolved:
            continue  # holds no strings yet: its index's store keeps them (a joined reply never reads them)
        n += sum(sys.getsizeof(s) for s in (c.doc_id, c.chunk_id, c.title, c.text))
        n += sum(sys.getsizeof(k) + sys.getsizeof(v) + 40 for k, v in c.metadata.items())
        if c.features:
            n += 100 * len(c.features)
    return n


def entry_bytes(query: str, result: SearchResult, vector: np.ndarray, lexical_nbytes: int,
                signature: tuple[str, ...], terms: dict[str, float]) -> int:
    # The vector twice (the entry's and its row in the scan matrix) and the row's codes with their three floats.
    return (600 + sys.getsizeof(query) + _sizeof_result(result) + 2 * vector.nbytes + vector.size + 12 + lexical_nbytes
            + sum(sys.getsizeof(t) + 8 for t in signature) + sum(sys.getsizeof(t) + 100 for t in terms))


class CacheStore:
    """Entries bounded in bytes, evicted least recently used, expiring a fixed time after insertion (a hit does not
    extend it), for one index version per collection at a time; plus a matrix of their query embeddings per vector
    dimension (collections may use models of different sizes) for semantic lookups.

    An entry's key starts with its scope, (collection, index version): the byte budget is shared by every collection,
    while a reload or delete of one drops only that collection's entries."""

    def __init__(self, config: CacheConfig, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._lock = threading.Lock()
        self._reset()
        self.versions: dict[str, str] = {}  # collection -> the index version its entries are of

    def _reset(self) -> None:
        self._lru: OrderedDict[tuple, Entry] = OrderedDict()
        # TTL counts from insertion and is the same for every entry, so insertion order is expiry order.
        self._by_age: OrderedDict[tuple, Entry] = OrderedDict()
        self._signatures: dict[tuple, tuple] = {}
        self._groups: dict[tuple, int] = {}
        self._matrices: dict[int, _Matrix] = {}  # vector dimension -> the query embeddings of that size
        self._per_collection: dict[str, int] = {}  # entries held per collection
        self._requests: dict[tuple[bytes, object], Entry] = {}  # Entry.requests of every entry, to their entry
        self.bytes = 0
        self._publish()

    def _publish(self) -> None:
        self.metrics.cache_bytes.set(self.bytes)
        self.metrics.cache_entries.set(len(self._lru))

    def __len__(self) -> int:
        return len(self._lru)

    # -- version ------------------------------------------------------------------------------------------------------
    def use_version(self, collection: str, version: str) -> None:
        """Makes `version` the current one of `collection`; its entries of any other version are dropped (they could
        never be served again). Other collections' entries stay."""
        with self._lock:
            self._use_version((collection, version))

    def _use_version(self, scope: tuple[str, str]) -> None:
        collection, version = scope
        previous = self.versions.get(collection)
        if version == previous:
            return
        dropped = self._drop_collection(collection)
        if dropped:
            self.metrics.cache_evictions.labels("version").inc(dropped)
            log.info("collection %s: index version %s replaces %s: %d cache entries dropped", collection, version,
                     previous, dropped)
        self.versions[collection] = version

    def drop(self, collection: str) -> int:
        """Forgets `collection` (deleted): its entries go; returns how many."""
        with self._lock:
            dropped = self._drop_collection(collection)
            self.versions.pop(collection, None)
            if dropped:
                self.metrics.cache_evictions.labels("version").inc(dropped)
            return dropped

    def _drop_collection(self, collection: str) -> int:
        if not self._per_collection.get(collection):
            return 0
        gone = [entry for entry in self._lru.values() if entry.key[0][0] == collection]
        for entry in gone:
            self._remove(entry)
        self._publish()
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            self._reset()

    # -- removal ------------------------------------------------------------------------------------------------------
    def _remove(self, entry: Entry) -> None:
        del self._lru[entry.key]
        self._by_age.pop(entry.key, None)
        sig_key = (entry.group, entry.signature)
        if self._signatures.get(sig_key) == entry.key:
            del self._signatures[sig_key]
        if entry.slot >= 0:
            self._matrices[len(entry.vector)].release(entry.slot)
        for request in entry.requests:
            self._requests.pop(request, None)
        collection = entry.key[0][0]
        self._per_collection[collection] -= 1
        if not self._per_collection[collection]:
            del self._per_collection[collection]
        self.bytes -= entry.nbytes

    def _expire(self, now: float) -> None:
        ttl = self.config.ttl_seconds
        expired = 0
        while self._by_age:
            entry = next(iter(self._by_age.values()))
            if now - entry.inserted < ttl:
                break
            self._remove(entry)
            expired += 1
        if expired:
            self.metrics.cache_expired.inc(expired)
            self._publish()

    # -- lookups ------------------------------------------------------------------------------------------------------
    def get(self, key: tuple) -> Entry | None:
        """The live entry for `key` (an exact hit), marked recently used."""
        with self._lock:
            self._use_version(key[0])
            self._expire(self.clock())
            entry = self._lru.get(key)
            if entry is not None:
                self._lru.move_to_end(key)
            return entry

    def nearest(self, group: tuple, vector: np.ndarray, min_cosine: float, k: int) -> list[tuple[Entry, float]]:
        """Up to `k` entries of `group` whose query embeddings have cosine >= min_cosine with `vector`, best first."""
        with self._lock:
            self._expire(self.clock())
            gid = self._groups.get(group)
            matrix = self._matrices.get(len(vector))
            if gid is None or matrix is None:
                return []
            return matrix.nearest(gid, vector, min_cosine, k)

    def by_signature(self, group: tuple, signature: tuple[str, ...]) -> Entry | None:
        with self._lock:
            self._expire(self.clock())
            key = self._signatures.get((group, signature))
            return None if key is None else self._lru.get(key)

    def replay(self, request: tuple[bytes, object], scope: tuple[str, str]) -> Entry | None:
        """The live entry that answered the wire request `request` (bytes, caller scope) exactly, marked recently
        used, if it is of `scope` (collection, index version: where the request's collection name leads now)."""
        with self._lock:
            entry = self._requests.get(request)
            if entry is None or entry.key[0] != scope:
                return None
            self._expire(self.clock())
            if self._lru.get(entry.key) is not entry:  # expired just now
                return None
            self._lru.move_to_end(entry.key)
            return entry

    def attach(self, entry: Entry, reply: bytes, request: tuple[bytes, object] | None) -> None:
        """Keeps `reply` with `entry` (the server's encoding of its answer, less the per-call fields), and, when
        given, `request` (the wire bytes and caller scope of a request it answered exactly) for `replay`. Both count
        toward the byte budget. Nothing is kept for an entry no longer in the cache, nor past MAX_REQUESTS per entry
        (spellings of one query that normalise alike)."""
        with self._lock:
            if self._lru.get(entry.key) is not entry:
                return
            added = 0
            if entry.reply is None:
                entry.reply = reply
                added += sys.getsizeof(reply)
            if request is not None and request not in self._requests and len(entry.requests) < MAX_REQUESTS:
                self._requests[request] = entry
                entry.requests = (*entry.requests, request)
                added += sys.getsizeof(request[0]) + 120  # the key's tuple and two dict slots
            entry.nbytes += added
            self.bytes += added
            # The entry was just used: eviction starts with the least recently used others.
            while self._lru and self.bytes > self.config.max_bytes:
                self._remove(next(iter(self._lru.values())))
                self.metrics.cache_evictions.labels("lru").inc()
            self._publish()

    def touch(self, entry: Entry) -> bool:
        """Marks a semantic hit recently used; False when the entry left the cache meanwhile."""
        with self._lock:
            if self._lru.get(entry.key) is not entry:
                return False
            self._lru.move_to_end(entry.key)
            return True

    # -- insert -------------------------------------------------------------------------------------------------------
    def put(self, entry: Entry) -> bool:
        with self._lock:
            collection, version = entry.key[0]
            if self.versions.get(collection) != version:
                return False  # computed on an index that has since been replaced
            if entry.nbytes > self.config.max_bytes:
                return False
            self._expire(self.clock())
            old = self._lru.get(entry.key)
            if old is not None:
                self._remove(old)
            while self._lru and self.bytes + entry.nbytes > self.config.max_bytes:
                self._remove(next(iter(self._lru.values())))
                self.metrics.cache_evictions.labels("lru").inc()
            self._lru[entry.key] = entry
            self._by_age[entry.key] = entry
            self._signatures[(entry.group, entry.signature)] = entry.key
            gid = self._groups.setdefault(entry.group, len(self._groups))
            matrix = self._matrices.get(len(entry.vector))
            if matrix is None:
                dim = len(entry.vector)
                # Room for as many rows as the byte budget can hold (an entry counts its vector twice), up to
                # MATRIX_RESERVE_ROWS: zeroed memory the system maps only as rows are written, so the matrix never
                # copies itself to grow on a miss's store (49 ms at 32,768 rows).
                rows = min(self.config.max_bytes // (8 * dim) + 1, MATRIX_RESERVE_ROWS)
                matrix = self._matrices[dim] = _Matrix(dim, rows)
            entry.slot = matrix.add(entry, gid)
            self._per_collection[collection] = self._per_collection.get(collection, 0) + 1
            self.bytes += entry.nbytes
            self._publish()
            return True



# Wire spellings of one request kept per entry for replay ("What is DNA" and "what is dna" are one entry).
MAX_REQUESTS = 4


# The semantic look-up's prefilter (_Matrix): once a matrix holds PREFILTER_ROWS rows, each row is also kept as its
# projection on the PREFILTER_DIMS principal directions of those rows, and a look-up scans only the rows the
# projections cannot rule out.
PREFILTER_ROWS = 1024
PREFILTER_DIMS = 16
# Added to the bound, relative to |q|^2 + |r|^2: orders of magnitude above the float rounding of the kernel's score
# and of the projections (~1e-6), far below what it keeps out at the default floor (0.016 for unit vectors).
PREFILTER_SLACK = 1e-3
PREFILTER_GATHER = 256  # rows left at most that are gathered and scanned on their own

# The most rows a matrix reserves at once (at 384 dimensions, 201 MB of address space, mapped only as rows are
# written); a budget that holds more grows it by doubling past that.
MATRIX_RESERVE_ROWS = 1 << 17


def principal_directions(rows: np.ndarray, m: int) -> np.ndarray:
    """The top `m` principal directions of `rows` (centred), as orthonormal float64 rows (m x dim), by subspace
    iteration on the covariance, started from the first centred rows (deterministic, and in the rows' span): ~5 ms
    for 1,024 x 384, where a full SVD took 120 ms on the event loop. Orthonormal to float64 rounding whatever the
    iteration's convergence (QR, then a rotation)."""
    centred = rows.astype(np.float32) - rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    covariance = (centred.T @ centred).astype(np.float64)
    m = min(m, covariance.shape[0], len(centred))
    width = min(m + 8, covariance.shape[0], len(centred))
    basis = np.linalg.qr(centred[:width].T.astype(np.float64))[0]
    for _ in range(8):
        basis = np.linalg.qr(covariance @ basis)[0]
    _, rotation = np.linalg.eigh(basis.T @ covariance @ basis)  # ascending: the best directions last
    return np.ascontiguousarray((basis @ rotation[:, ::-1][:, :m]).T)


class _Matrix:
    """The query embeddings of one dimension, a row per entry, with each row's semantic group (-1: a free row)."""

    def __init__(self, dim: int, rows: int = 64) -> None:
        self.dim = dim
        rows = max(rows, 1)
        # Resolved once: the environment read behind a kernel's backend costs tens of µs on the caches an encode
        # has just flushed, and every miss and semantic hit scans.
        self.backend = native.retrieve_backend()
        self.vectors = np.zeros((rows, dim), dtype=np.float32)
        # Each row's int8 codes and error bounds (kernels.native.row_quantize, per row as it is added): the scan
        # reads a quarter of the bytes and scores exactly only the rows the bounds cannot rule out.
        self.codes = native.RowCodes(np.zeros((rows, dim), np.int8), *(np.zeros(rows, np.float32) for _ in range(3)))
        self.group = np.full(rows, -1, dtype=np.int64)
        self.entries: list[Entry | None] = []
        self.free: list[int] = []
        self.members: dict[int, int] = {}  # rows per group
        # The prefilter (nearest): an orthonormal basis (PREFILTER_DIMS x dim, float64), None until the matrix first
        # holds PREFILTER_ROWS rows; then per row (a column here: one product streams each coordinate's row, 2x
        # faster than rows of 17 floats) its projection p on the basis and, last, |p|^2 - (1 + slack) |r|^2, so that
        # one vector-matrix product gives every row's side of the bound.
        self.basis: np.ndarray | None = None
        self.projected = np.zeros((PREFILTER_DIMS + 1, rows), dtype=np.float32)
        # The rows in use as nearest() scans them: (count, vectors, codes), views made again only when the count
        # or the arrays change (~10 µs of slicing and a RowCodes per look-up otherwise).
        self._in_use: tuple[int, np.ndarray, native.RowCodes] | None = None

    def add(self, entry: Entry, gid: int) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            slot = len(self.entries)
            self.entries.append(None)
            if slot >= len(self.vectors):
                grown = np.zeros((2 * slot, self.dim), dtype=np.float32)
                groups = np.full(len(grown), -1, dtype=np.int64)
                grown[:slot], groups[:slot] = self.vectors[:slot], self.group[:slot]
                codes = native.RowCodes(np.zeros(grown.shape, np.int8), *(np.zeros(len(grown), np.float32)
                                                                           for _ in range(3)))
                for new, old in zip(codes, self.codes, strict=True):
                    new[:slot] = old[:slot]
                self.vectors, self.group, self.codes = grown, groups, codes
                self._in_use = None
                projected = np.zeros((PREFILTER_DIMS + 1, len(grown)), dtype=np.float32)
                projected[:, :slot] = self.projected[:, :slot]
                self.projected = projected
        self.vectors[slot] = entry.vector
        native.row_quantize(self.vectors[slot:slot + 1], out=self.codes, start=slot, backend=self.backend)
        self.group[slot] = gid
        self.entries[slot] = entry
        self.members[gid] = self.members.get(gid, 0) + 1
        if self.basis is not None:
            self._project(slot, slot + 1)
        elif self.dim > PREFILTER_DIMS and len(self.entries) - len(self.free) >= PREFILTER_ROWS:
            self._fit_basis()
        return slot

    def _fit_basis(self) -> None:
        """The principal directions of the rows in use (centred): the projections of two different queries keep
        as much of their distance as PREFILTER_DIMS directions can. Any orthonormal basis keeps the look-up exact;
        this one makes it prune the most. Fitted once, on the miss that stores the PREFILTER_ROWS-th row."""
        used = len(self.entries)
        self.basis = principal_directions(self.vectors[:used][self.group[:used] >= 0], PREFILTER_DIMS)
        self._project(0, used)

    def _project(self, start: int, stop: int) -> None:
        if self.basis is None:
            return
        rows = self.vectors[start:stop].astype(np.float64)
        projected = rows @ self.basis.T
        self.projected[:PREFILTER_DIMS, start:stop] = projected.T
        self.projected[PREFILTER_DIMS, start:stop] = (np.einsum("ij,ij->i", projected, projected)
                                                      - (1.0 + PREFILTER_SLACK) * np.einsum("ij,ij->i", rows, rows))

    def release(self, slot: int) -> None:
        gid = int(self.group[slot])
        left = self.members[gid] - 1
        if left:
            self.members[gid] = left
        else:
            del self.members[gid]
        self.group[slot] = -1
        self.entries[slot] = None
        self.free.append(slot)

    def nearest(self, gid: int, vector: np.ndarray, min_cosine: float, k: int) -> list[tuple[Entry, float]]:
        used = len(self.entries)
        if used == 0 or k < 1:
            return []
        # One native scan of the group's rows (best first, ties by row): every miss and every semantic hit asks,
        # right after an encode. It reads the int8 codes and scores exactly only the rows whose bounds can reach
        # min_cosine: the float rows' scan grew to ~2 ms at 31,000 entries (bench/README.md, "Issue 15").
        # When every row in use is this group's (one collection, one set of parameters, nothing freed: the usual
        # cache), no mask: the masked scan visits rows one by one where the unmasked one streams them, 1.45-1.7x
        # slower over 10,000-31,000 rows.
        mask = in_group = None if self.members.get(gid, 0) == used else self.group[:used] == gid
        if self.basis is not None:
            # q.r >= min_cosine needs |q - r|^2 = |q|^2 + |r|^2 - 2 q.r <= |q|^2 + |r|^2 - 2 min_cosine, and the
            # projection on an orthonormal basis never lengthens q - r: a row whose projection lies farther than
            # that cannot reach the floor. At the default floor (0.992) that leaves ~0.1 of 7,600 cached SciFact
            # and Cranfield queries on average, and no native scan at all when none is left (bench/README.md,
            # "The semantic cache's prefilter").
            # With p, s the projections of row r and query q: |p - s|^2 <= |r|^2 + |q|^2 - 2 min_cosine, slack added,
            # is (|p|^2 - (1 + slack) |r|^2) - 2 p.s <= (1 + slack) |q|^2 - 2 min_cosine - |s|^2.
            query = vector.astype(np.float64)
            to_query = self.basis @ query
            weights = np.append(-2.0 * to_query, 1.0).astype(np.float32)
            limit = (1.0 + PREFILTER_SLACK) * float(query @ query) - 2.0 * min_cosine - float(to_query @ to_query)
            near = weights @ self.projected[:, :used] <= limit
            if in_group is not None:
                near &= in_group
            rows = np.flatnonzero(near)
            if len(rows) == 0:
                return []
            if len(rows) <= PREFILTER_GATHER:
                # The kernel scores each row on its own and breaks ties by position, which the gathered rows keep
                # in order: the same hits as the masked scan over the whole matrix, without its per-call setup.
                codes = native.RowCodes(*(column[rows] for column in self.codes))
                at, sims = native.dense_above(self.vectors[rows], codes, vector, min_cosine, k, backend=self.backend)
                return self._found(rows[at], sims)
            if in_group is not None or 4 * len(rows) < used:  # else (a low floor) the unmasked scan streams faster
                mask = near
        in_use = self._in_use
        if in_use is None or in_use[0] != used:
            in_use = self._in_use = (used, self.vectors[:used], native.RowCodes(*(c[:used] for c in self.codes)))
        found, sims = native.dense_above(in_use[1], in_use[2], vector, min_cosine, k, mask=mask, backend=self.backend)
        return self._found(found, sims)

    def _found(self, rows: np.ndarray, sims: np.ndarray) -> list[tuple[Entry, float]]:
        # A row of this group always holds its entry (a freed row's group is -1).
        return [(entry, float(s)) for i, s in zip(rows.tolist(), sims.tolist(), strict=True)
                if (entry := self.entries[i]) is not None]


def _copy(result: SearchResult, stage_us: dict[str, int]) -> SearchResult:
    # The server annotates the result it gets (stage times): a hit gets its own object, the entry stays untouched.
    # A shallow copy of the fields, as dataclasses.replace makes (SearchResult has no init=False field and no
    # __post_init__), without the keyword round trip through __init__: 0.7 against 2.6 µs warm, on every hit.
    copy = object.__new__(type(result))
    copy.__dict__.update(result.__dict__)
    copy.contexts = list(result.contexts)
    copy.stage_us = stage_us
    return copy


def shared(served: Served, cache_us: int) -> Served:
    """The answer of a request identical to one computed for another caller (a coalesced Search, a repeat inside a
    batch): that answer as an exact hit (prefetched when Prefetch or a draft computed it)."""
    served_from = served.served_from
    if served_from == MISS:
        served_from = EXACT if served.origin == LIVE else PREFETCHED
    return Served(_copy(served.result, {"cache": cache_us}), served_from, served.similarity, served.origin)


class _LeaderGone(Exception):
    """The request doing the work for a single flight stopped (its deadline, its caller) before finishing."""


# Runs a zero-argument callable on a pipeline thread and returns its Served (the server supplies it).
Execute = Callable[[Callable[[], Served]], Awaitable[Served]]


class CachedSearch:
    """The cache around a Searcher: the server calls `search` (async, single flight); `run` is the same path,
    synchronous, for a pipeline thread or an in-process benchmark. Either calls the searcher's `search` once."""

    def __init__(self, config: CacheConfig, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = CacheStore(config, self.metrics, clock)
        self._flights: dict[tuple, asyncio.Future] = {}  # touched only on the event loop
        self._children: dict[tuple[str, str], Any] = {}  # (counter, label) -> that counter's child (_count)

    @property
    def clock(self) -> Callable[[], float]:
        return self.store.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.store.clock = clock

    def invalidate(self, collection: str, version: str) -> None:
        """The server swapped in index `version` for `collection`: its entries of another version go now."""
        self.store.use_version(collection, version)

    def drop(self, collection: str) -> None:
        """The server stopped serving `collection`: its entries go now."""
        self.store.drop(collection)

    def mode(self, params: SearchParams, searcher: Searcher) -> str:
        if not self.config.enabled:
            return "bypass"
        if params.cache == "default" and not (self.config.semantic and searcher.capabilities.semantic_guard):
            return "exact_only"
        if params.highlight and params.cache in ("default", "strict"):
            # Highlights mark this query's words: another query's answer, however close, would mark its own.
            return "exact_only"
        return params.cache

    @staticmethod
    def key(searcher: Searcher, params: SearchParams) -> tuple:
        return ((searcher.collection, searcher.version), normalise(params.query), params_key(params))

    def _count(self, counter: str, label: str) -> None:
        """Adds one to the child of the labelled counter `counter` (a Metrics attribute) for `label`. labels() takes
        a lock and builds a key (~10 µs on the caches an encode leaves): once per label, not per request."""
        child = self._children.get((counter, label))
        if child is None:
            child = self._children[(counter, label)] = getattr(self.metrics, counter).labels(label)
        child.inc()

    # -- hits ---------------------------------------------------------------------------------------------------------
    def _count_hit(self, entry: Entry, kind: str, similarity: float | None = None) -> str:
        """Counts a hit of `kind` on `entry`; returns what it was served from."""
        served_from = kind
        if kind == EXACT and entry.origin != LIVE:
            served_from = PREFETCHED
        if entry.origin == PREFETCH and not entry.used:
            self.metrics.prefetch_used.inc()
        entry.used = True
        self._count("cache_hits", served_from)
        if similarity is not None:
            self.metrics.cache_similarity.observe(similarity)
        return served_from

    def _hit(self, entry: Entry, kind: str, started_ns: int, similarity: float | None = None) -> Served:
        served_from = self._count_hit(entry, kind, similarity)
        kept, stage_us = entry.result, {"cache": (time.perf_counter_ns() - started_ns) // 1000}
        result = kept.result(stage_us) if isinstance(kept, PackedResult) else _copy(kept, stage_us)
        return Served(result, served_from, similarity, entry.origin, entry=entry)

    def replay(self, request: tuple[bytes, object], scope: tuple[str, str]) -> tuple[bytes, str] | None:
        """An exact hit found by the wire request alone (CacheStore.replay): the entry's prepared reply and what it
        is served from, or None (then the request takes the usual path). Cheap enough for the event loop."""
        if not self.config.enabled:
            return None
        entry = self.store.replay(request, scope)
        if entry is None or entry.reply is None:
            return None
        return entry.reply, self._count_hit(entry, EXACT)

    def lookup_exact(self, searcher: Searcher, params: SearchParams, key: tuple | None = None) -> Served | None:
        """Exact hit or None; cheap enough for the event loop."""
        started = time.perf_counter_ns()
        if self.mode(params, searcher) == "bypass":
            return None
        entry = self.store.get(key or self.key(searcher, params))
        return None if entry is None else self._hit(entry, EXACT, started)

    def keep_reply(self, entry: Entry, reply: bytes, request: tuple[bytes, object] | None = None) -> None:
        """Keeps the server's encoding of a hit's entry and, for an exact hit, the request's wire key, for later
        hits and replays (CacheStore.attach)."""
        self.store.attach(entry, reply, request)

    def guard_inputs(self, params: SearchParams, guard: LexicalGuard) -> GuardInputs:
        """What the fidelity guard compares of this request's query (none of it needs the query vector)."""
        config = self.config
        terms, bm25_input = guard.guard_terms(params.query)
        return GuardInputs(terms=terms,
                           polarity=polarity_words(params.query) if config.guard_polarity_words else (),
                           bm25_input=bm25_input,
                           candidates=functools.partial(_candidates, guard, params, config.guard_depth))

    def lookup_semantic(self, params: SearchParams, key: tuple, vector: np.ndarray, strict: bool,
                        guard: LexicalGuard | None, inputs: list[GuardInputs]) -> Served | None:
        """A semantic hit for `vector` or None. `inputs` holds the query's guard inputs if computed before, and
        receives them if computed here, so a miss stores them without working them out twice. Without a guard only
        strict hits are possible."""
        started = time.perf_counter_ns()
        group = (key[0], key[2])
        config = self.config
        if strict:
            entry = self.store.by_signature(group, strict_signature(params.query))
            if entry is None:
                return None
            similarity = float(entry.vector @ vector)
            if similarity < config.strict_min_cosine:
                self._count("cache_guard_rejections", "strict")
                return None
            if self.store.touch(entry):
                return self._hit(entry, SEMANTIC, started, similarity)
            return None
        if guard is None:
            return None
        candidates = self.store.nearest(group, vector, config.semantic_min_cosine, config.semantic_candidates)
        if not candidates:
            return None
        if not inputs:
            inputs.append(self.guard_inputs(params, guard))
        query = inputs[0]
        for entry, similarity in candidates:
            if (entry.agreement >= config.guard_min_agreement
                    and query.polarity == entry.polarity
                    and differing_idf(query.terms, entry.terms) < config.guard_max_differing_idf
                    and term_overlap(query.terms, entry.terms) >= config.guard_min_term_overlap
                    and (query.bm25_key == entry.bm25_key
                         or lexical_overlap(query.lexical, entry.bm25_top(query)) >= config.guard_min_overlap)
                    and self.store.touch(entry)):
                return self._hit(entry, SEMANTIC, started, similarity)
        self._count("cache_guard_rejections", "default")
        return None

    # -- the synchronous path -----------------------------------------------------------------------------------------
    def run(self, searcher: Searcher, params: SearchParams, deadline: float | None = None, *,
            query_vector: np.ndarray | None = None, origin: str = LIVE, key: tuple | None = None,
            arrival: float | None = None, defer_store: bool = False) -> Served:
        """Exact lookup, then the searcher's search with this request's cache stage. Runs on a pipeline thread
        (never the event loop); `query_vector` lets a caller that has encoded already (a batch) skip the encoder.
        `defer_store`: a miss's answer is not stored here but handed back as Served.store, to run later."""
        check_deadline(deadline, "queue")
        mode = self.mode(params, searcher)
        timer = StageTimer()
        if mode == "bypass":
            self._count("cache_misses", mode)
            return Served(searcher.search(params, query_vector=query_vector, deadline=deadline, timer=timer,
                                          arrival=arrival))
        with timer.stage("cache"):
            key = key or self.key(searcher, params)
            hit = self.lookup_exact(searcher, params, key)
        if hit is not None:
            return hit
        stage = _RequestStage(self, params, key, mode, origin, defer_store)
        result = searcher.search(params, query_vector=query_vector, deadline=deadline, timer=timer, arrival=arrival,
                                 cache=stage)
        if stage.hit is not None:
            stage.hit.result.stage_us.update(timer.us)
            return stage.hit
        self._count("cache_misses", mode)
        return Served(result, MISS, None, origin, store=stage.pending)

    def _store(self, params: SearchParams, key: tuple, vector: np.ndarray, result: SearchResult,
               guard: LexicalGuard | None, inputs: list[GuardInputs], origin: str) -> None:
        if result.index_version != key[0][1] or not result.complete:
            return
        query: GuardInputs | None = None
        if self.config.semantic and guard is not None:
            query = inputs[0] if inputs else self.guard_inputs(params, guard)
            bm25, terms, polarity, bm25_key = query.known_lexical, query.terms, query.polarity, query.bm25_key
        else:  # the guard's inputs serve semantic lookups only
            bm25, terms, polarity, bm25_key = np.zeros(0, np.int64), {}, (), b""
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        signature = strict_signature(params.query)
        kept = _pack(result)
        # Candidates not worked out yet are counted at their most: guard_depth int64 ids.
        lexical_nbytes = bm25.nbytes if bm25 is not None else 8 * self.config.guard_depth
        entry = Entry(key=key, group=(key[0], key[2]), result=kept, vector=vector, lexical=bm25, terms=terms,
                      polarity=polarity, signature=signature,
                      nbytes=entry_bytes(key[1], result, vector, lexical_nbytes, signature + polarity, terms)
                      + len(bm25_key),
                      inserted=self.store.clock(), origin=origin, agreement=answer_agreement(result),
                      bm25_key=bm25_key)
        self.store.put(entry)

    def probe(self, searcher: Searcher, params: SearchParams, query_vector: np.ndarray) -> Served | None:
        """The lookups of `run` without the search or the store (benchmarks measure hit decisions with it)."""
        mode = self.mode(params, searcher)
        if mode == "bypass":
            return None
        key = self.key(searcher, params)
        hit = self.lookup_exact(searcher, params, key)
        if hit is None and mode in ("default", "strict"):
            hit = self.lookup_semantic(params, key, query_vector, mode == "strict", searcher.guard, [])
        return hit

    # -- the server's path --------------------------------------------------------------------------------------------
    async def search(self, searcher: Searcher, params: SearchParams, *, deadline: float | None, execute: Execute,
                     origin: str = LIVE, arrival: float | None = None, store_after: bool = False) -> Served:
        """Exact hits are answered on the event loop; identical concurrent misses share one computation (single
        flight); the rest runs `self.run` on a pipeline thread through `execute`. `store_after`: a miss's answer is
        stored by the event loop's next callback rather than before the answer comes back (see _store_soon)."""
        if self.mode(params, searcher) == "bypass":
            return await execute(functools.partial(self.run, searcher, params, deadline, origin=origin,
                                                   arrival=arrival))
        key = self.key(searcher, params)
        while True:
            started = time.perf_counter_ns()
            hit = self.lookup_exact(searcher, params, key)
            if hit is not None:
                return hit
            flight = self._flights.get(key)
            if flight is None:
                break
            try:
                served = await asyncio.shield(flight)
            except _LeaderGone:
                continue  # the leader stopped; this request's own deadline may still allow the work
            self.metrics.cache_hits.labels("coalesced").inc()
            return shared(served, (time.perf_counter_ns() - started) // 1000)
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            served = await execute(functools.partial(self.run, searcher, params, deadline, origin=origin, key=key,
                                                     arrival=arrival, defer_store=store_after))
            if (store := served.store) is not None:
                served = self._store_soon(served, store)
        except BaseException as error:
            gone = isinstance(error, (DeadlineExceeded, asyncio.CancelledError))
            flight.set_exception(_LeaderGone() if gone else error)
            flight.exception()  # retrieved: no "never retrieved" warning when nobody was waiting
            raise
        else:
            flight.set_result(served)
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        return served

    def _store_soon(self, served: Served, store: Callable[[], None]) -> Served:
        """Schedules a miss's store as the event loop's next callback and returns the answer without it. The store
        (~0.2 ms of bookkeeping on SciFact: the entry's guard inputs, sizes and codes) then runs while the reply goes
        out, instead of before the pipeline thread hands the answer back. Nothing is lost in between: the single
        flight (held until this coroutine returns) serves an identical request that arrives meanwhile, and any
        request that arrives later is handled after this callback, so a caller that repeats its query after the
        reply gets the exact hit."""
        asyncio.get_running_loop().call_soon(self._run_store, store)
        return dataclasses.replace(served, store=None)

    def _run_store(self, store: Callable[[], None]) -> None:
        try:
            store()
        except Exception:  # the answer has gone out; a store that fails only costs a later hit
            log.exception("storing an answer in the cache failed")


class _RequestStage:
    """The cache's stage inside one search (search/searcher.py, CacheStage): a semantic lookup once the searcher
    has the query vector, and the store of a fresh answer. Remembers a hit so `CachedSearch.run` can report it."""

    def __init__(self, cache: CachedSearch, params: SearchParams, key: tuple, mode: str, origin: str,
                 defer: bool = False) -> None:
        self.cache, self.params, self.key, self.mode, self.origin = cache, params, key, mode, origin
        self.hit: Served | None = None
        self.defer = defer
        self.pending: Callable[[], None] | None = None  # the deferred store, when `defer`
        self._inputs: list[GuardInputs] = []  # the query's guard inputs, computed at most once

    def lookup(self, vector: np.ndarray, guard: LexicalGuard | None) -> SearchResult | None:
        if self.mode not in ("default", "strict"):
            return None
        self.hit = self.cache.lookup_semantic(self.params, self.key, vector, self.mode == "strict", guard,
                                              self._inputs)
        return None if self.hit is None else self.hit.result

    def store(self, vector: np.ndarray, result: SearchResult, guard: LexicalGuard | None) -> None:
        store = functools.partial(self.cache._store, self.params, self.key, vector, result, guard, self._inputs,
                                  self.origin)
        if self.defer:
            self.pending = store
        else:
            store()


__all__ = ["CachedSearch", "CacheStore", "Served", "shared", "normalise", "params_key", "strict_signature",
           "lexical_overlap", "differing_idf", "term_overlap", "answer_agreement",
           "MISS", "EXACT", "SEMANTIC", "PREFETCHED", "LIVE", "PREFETCH", "SPECULATIVE"]
