"""The systems people use instead of rag-service, built the way their users build them, for `rag-bench compare`.

Each peer indexes whole documents ("title text", as BEIR evaluations do) with the same model (all-MiniLM-L6-v2) and
answers a query with its top document ids. Document embeddings are computed once per corpus and cached on disk
(`embed_corpus`), because encoding is the same work for every peer and would otherwise dominate a run on this machine.

    ensemble  the LangChain EnsembleRetriever recipe: rank_bm25.BM25Okapi over lower-cased whitespace tokens, a faiss
              IndexFlatIP over sentence-transformers embeddings, reciprocal rank fusion (k = 60). Written plainly on
              purpose: it is the baseline as people run it, not as it could be.
    bm25s     bm25s (stemmed, stop words removed) + the same faiss flat index + RRF (k = 60).
    lancedb   LanceDB embedded: its native full-text index plus brute-force vector search in one hybrid query, fused
              by its default RRFReranker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("RAG_BENCH_CACHE", "/tmp/bench"))
RRF_K = 60


@dataclass(frozen=True)
class Corpus:
    ids: list[str]
    texts: list[str]  # "title text", what every peer indexes

    def __len__(self) -> int:
        return len(self.ids)


def read_beir_corpus(path: Path, limit: int | None = None) -> Corpus:
    """corpus.jsonl (or a BEIR folder holding one) -> ids and "title text" strings."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    ids, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ids.append(str(record["_id"]))
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{n}: not a BEIR corpus record ({error})") from error
            texts.append(f"{record.get('title') or ''} {record.get('text') or ''}".strip())
            if limit is not None and len(ids) >= limit:
                break
    return Corpus(ids=ids, texts=texts)


def sentence_transformer(model_path: str | None = None):
    """The model every peer uses, loaded the way their users load it (no rag-service code in between)."""
    from sentence_transformers import SentenceTransformer

    from rag_service.encoder.encode import default_model_path

    return SentenceTransformer(model_path or default_model_path(), device="cpu")


def default_model_name() -> str:
    from rag_service.encoder.encode import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


def corpus_key(model_name: str, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(model_name.encode())
    for text in texts:
        digest.update(b"\x00")
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:24]


def embed_corpus(model, texts: Sequence[str], model_name: str, cache_dir: Path | None = DEFAULT_CACHE,
                 batch_size: int = 64, progress: bool = False) -> tuple[np.ndarray, float, bool]:
    """(n, dim) float32 L2-normalised document vectors, the seconds it took, and whether they came from the cache.

    The cache is keyed by the model name and every text, so a changed corpus never reuses stale vectors."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "embeddings" / f"{corpus_key(model_name, texts)}.npy"
        if path.exists():
            vectors = np.load(path)
            if vectors.shape[0] == len(texts):
                return vectors, 0.0, True
    started = time.perf_counter()
    vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=progress).astype(np.float32, copy=False)
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)
    return vectors, seconds, False


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K, limit: int = 10) -> list[str]:
    """Reciprocal rank fusion as LangChain's EnsembleRetriever does it (equal weights, k = 60)."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, 1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores, key=scores.__getitem__, reverse=True)[:limit]


class Peer:
    """A system under comparison. `search` takes the query text; `search_vector`, where supported, the query text and
    its precomputed vector (the system's fairest case: no encode in the timed path)."""

    name: str
    build_seconds: float = 0.0
    disk_bytes: int = 0

    def search(self, query: str, k: int) -> list[str]:
        raise NotImplementedError

    def search_vector(self, query: str, vector: np.ndarray, k: int) -> list[str]:
        raise NotImplementedError


class EnsemblePeer(Peer):
    """rank_bm25 + faiss flat + sentence-transformers + RRF, written plainly the way LangChain users write it."""

    name = "ensemble"

    def __init__(self, corpus: Corpus, vectors: np.ndarray, model, workdir: Path, candidates: int = 100) -> None:
        import faiss
        from rank_bm25 import BM25Okapi

        started = time.perf_counter()
        self.ids = corpus.ids
        self.model = model
        self.candidates = candidates
        self.bm25 = BM25Okapi([text.lower().split() for text in corpus.texts])
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.build_seconds = time.perf_counter() - started
        # What its users persist: the pickled retriever and the faiss file.
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "bm25.pkl", "wb") as f:
            pickle.dump(self.bm25, f)
        faiss.write_index(self.index, str(workdir / "dense.faiss"))
        self.disk_bytes = dir_size(workdir)

    def search(self, query: str, k: int) -> list[str]:
        scores = self.bm25.get_scores(query.lower().split())
        top = np.argsort(scores)[::-1][: self.candidates]
        lexical = [self.ids[i] for i in top]
        vector = self.model.encode([query], normalize_embeddings=True)
        _, found = self.index.search(np.asarray(vector, dtype=np.float32), self.candidates)
        dense = [self.ids[i] for i in found[0] if i >= 0]
        return rrf([lexical, dense], limit=k)


class Bm25sPeer(Peer):
    """bm25s (Snowball stemming, English stop words) + faiss flat + sentence-transformers + RRF."""

    name = "bm25s"

    def __init__(self, corpus: Corpus, vectors: np.ndarray, model, workdir: Path, candidates: int = 100) -> None:
        import bm25s
        import faiss
        import Stemmer

        started = time.perf_counter()
        self.ids = corpus.ids
        self.model = model
        self.candidates = min(candidates, len(corpus))
        self.stemmer = Stemmer.Stemmer("english")
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(corpus.texts, stopwords="en", stemmer=self.stemmer, show_progress=False),
                             show_progress=False)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.build_seconds = time.perf_counter() - started
        workdir.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(workdir / "bm25s"))
        faiss.write_index(self.index, str(workdir / "dense.faiss"))
        self.disk_bytes = dir_size(workdir)

    def _lexical(self, query: str) -> list[str]:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", stemmer=self.stemmer, show_progress=False)
        if not tokens.vocab:  # every word was a stop word: bm25s has nothing to score
            return []
        found, scores = self.retriever.retrieve(tokens, k=self.candidates, show_progress=False, n_threads=1)
        return [self.ids[i] for i, s in zip(found[0].tolist(), scores[0].tolist()) if s > 0]

    def search(self, query: str, k: int) -> list[str]:
        vector = self.model.encode([query], normalize_embeddings=True)
        return self.search_vector(query, vector[0], k)

    def search_vector(self, query: str, vector: np.ndarray, k: int) -> list[str]:
        lexical = self._lexical(query)
        _, found = self.index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), self.candidates)
        dense = [self.ids[i] for i in found[0] if i >= 0]
        return rrf([lexical, dense], limit=k)


class LanceDbPeer(Peer):
    """LanceDB embedded hybrid search: native FTS index + vector search, default RRFReranker."""

    name = "lancedb"

    def __init__(self, corpus: Corpus, vectors: np.ndarray, model, workdir: Path) -> None:
        import lancedb
        import pyarrow as pa
        from lancedb.index import FTS

        if workdir.exists():
            shutil.rmtree(workdir)
        started = time.perf_counter()
        self.model = model
        db = lancedb.connect(str(workdir))
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel())
        table = pa.table({"id": corpus.ids, "text": corpus.texts,
                          "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        self.table = db.create_table("docs", data=table, mode="overwrite")
        self.table.create_index("text", config=FTS())
        self.build_seconds = time.perf_counter() - started
        self.disk_bytes = dir_size(workdir)

    def search(self, query: str, k: int) -> list[str]:
        vector = self.model.encode([query], normalize_embeddings=True)
        return self.search_vector(query, vector[0], k)

    def search_vector(self, query: str, vector: np.ndarray, k: int) -> list[str]:
        # All columns of k rows come back: select(["id"]) would make lance warn on every query, for no measurable gain.
        found = (self.table.search(query_type="hybrid").vector(np.asarray(vector, dtype=np.float32)).text(query)
                 .limit(k).to_arrow())
        return found.column("id").to_pylist()

