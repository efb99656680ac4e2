"""Loading a published index version for serving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.core import filter as flt
from rag_service.core.errors import IndexFormatError
from rag_service.index import tokens as tokens_mod
from rag_service.index.manifest import MANIFEST_FILE, check_files, read_manifest
from rag_service.index.metadata import tenant_key_problem
from rag_service.index.publish import CURRENT
from rag_service.index.reply_bytes import ContextBytes
from rag_service.index.store import DocStore
from rag_service.index.windows import PARAMS_FILE as WINDOWS_PARAMS_FILE
from rag_service.index.windows import WindowData
from rag_service.kernels import native
from rag_service.retrievers.analysis import Analyzer
from rag_service.retrievers.dense import DenseIndex
from rag_service.retrievers.lexical import BM25Index

log = logging.getLogger(__name__)


def resolve_version_dir(path: Path | str) -> Path:
    """The version directory `path` means: itself when it holds manifest.json, else what its CURRENT points to."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        return path.resolve()
    link = path / CURRENT
    if link.is_symlink() or link.exists():
        target = link.resolve()
        if not (target / MANIFEST_FILE).is_file():
            raise IndexFormatError(f"{link}: points to {target}, which holds no {MANIFEST_FILE}")
        return target
    if not path.exists():
        raise IndexFormatError(f"{path}: no such index (path does not exist)")
    raise IndexFormatError(f"{path}: not an index: no {MANIFEST_FILE} and no {CURRENT} link")


@dataclass
class Index:
    """One loaded index version: everything a query needs, read-only and shareable between threads."""

    path: Path
    manifest: dict[str, Any]
    store: DocStore
    bm25: BM25Index
    dense: DenseIndex
    analyzer: Analyzer
    load_seconds: float = field(default=0.0)
    windows: WindowData | None = None  # sentence windows and token streams for the reranker; None in older indexes
    # Model tokens per chunk (index/tokens.py), memory-mapped; None in an index built before they were stored, until
    # token_counts counts them.
    chunk_tokens: np.ndarray | None = None
    _context_bytes: ContextBytes | None = field(default=None, repr=False, compare=False)
    _tokens_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def tenant_key(self) -> str | None:
        """The keyword metadata field holding each passage's tenant (rag-index build --tenant-key); None: none."""
        key = self.manifest.get("tenant_key")
        return str(key) if key else None

    @property
    def n_docs(self) -> int:
        return self.store.n_docs

    @property
    def n_chunks(self) -> int:
        return self.store.n_chunks

    @property
    def metadata_fields(self) -> list[str]:
        return self.store.metadata_fields

    @property
    def model(self) -> dict[str, Any]:
        """{name, dim, max_seq_length} of the encoder the index was built with; queries must use the same."""
        return dict(self.manifest["model"])

    def token_counts(self, counter: tokens_mod.TokenCounter) -> np.ndarray:
        """Model tokens of every chunk: the stored array, or (an older index without it) counted once here with
        `counter`, which must count with the index's model tokenizer (a searcher's query encoder does: its model is
        checked to be the index's), and kept for every later caller."""
        if self.chunk_tokens is None:
            with self._tokens_lock:
                if self.chunk_tokens is None:
                    self.chunk_tokens = tokens_mod.count_at_load(self.path, self.store, self.n_chunks, counter)
        return self.chunk_tokens

    def context_bytes(self) -> ContextBytes:
        """Every chunk's static reply fields, serialized (index/reply_bytes.py): prepared on the first call (a server
        makes it while it loads, before it reports SERVING) and kept."""
        if self._context_bytes is None:
            with self._tokens_lock:
                if self._context_bytes is None:
                    self._context_bytes = ContextBytes.for_store(self.store)
        return self._context_bytes

    def filter_mask(self, filters: Mapping[str, str] | None, tree: flt.Node | None = None) -> np.ndarray | None:
        return self.store.filter_mask(filters, tree)

    # What the semantic cache's guard asks (search/searcher.py, LexicalGuard): this index's own view of a query.
    def guard_terms(self, query: str) -> tuple[dict[str, float], np.ndarray]:
        bm25 = self.bm25
        return bm25.idf_and_ids(bm25.analyzer.tokens(query))

    def lexical_candidates(self, lexical_input: np.ndarray, filters: Mapping[str, str], depth: int,
                           tree: flt.Node | None = None) -> np.ndarray:
        # The native BM25 top-depth (the numba scorer's C++ twin): a semantic look-up that needs it pays for it on
        # top of its encode.
        ids, _ = native.bm25_top(self.bm25.postings, lexical_input, depth, mask=self.filter_mask(filters, tree))
        return np.sort(ids)


def load_index(path: Path | str, *, verify_checksums: bool = True, search_threads: int = 1) -> Index:
    """Loads the index at `path` (an index root or a version directory).

    Always checks the format version and that every file in the manifest is present with its recorded size;
    `verify_checksums` also recomputes every sha256 (reads every byte once). Raises IndexFormatError.
    """
    started = time.perf_counter()
    directory = resolve_version_dir(path)
    manifest = read_manifest(directory)
    check_files(directory, manifest, checksums=verify_checksums)
    analyzer = Analyzer.from_settings(manifest["analyzer"])
    store = DocStore.load(directory)
    bm25 = BM25Index.load(directory, analyzer=analyzer)
    dense = DenseIndex.load(directory, search_threads=search_threads)
    counts = manifest["counts"]
    for what, actual in (("chunks", store.n_chunks), ("documents", store.n_docs)):
        if counts.get(what) != actual:
            raise IndexFormatError(f"{directory}: manifest counts {counts.get(what)} {what}, files hold {actual}")
    if bm25.n_chunks != store.n_chunks or dense.n != store.n_chunks:
        raise IndexFormatError(f"{directory}: chunk counts differ: store {store.n_chunks}, bm25 {bm25.n_chunks}, "
                               f"dense {dense.n}")
    if dense.dim != manifest["model"]["dim"]:
        raise IndexFormatError(f"{directory}: dense dim {dense.dim}, manifest model dim {manifest['model']['dim']}")
    tenant_key = manifest.get("tenant_key")
    if tenant_key:
        problem = tenant_key_problem(str(tenant_key), store.metadata_schema)
        if problem is not None:
            raise IndexFormatError(f"{directory}/manifest.json: {problem}")
    windows = None
    if WINDOWS_PARAMS_FILE in manifest["files"]:
        windows = WindowData.load(directory, n_chunks=store.n_chunks, dim=int(manifest["model"]["dim"]))
    else:
        log.warning("index %s has no sentence windows (built before the reranker): rerank is off for it; rebuild it "
                    "with rag-index build to enable it", directory)
    chunk_tokens = None
    if tokens_mod.TOKENS_FILE in manifest["files"]:
        chunk_tokens = tokens_mod.load_tokens(directory, store.n_chunks)
    elapsed = time.perf_counter() - started
    log.info("loaded index %s version %s (%d docs, %d chunks) from %s in %.3fs%s", manifest["name"],
             manifest["version"], store.n_docs, store.n_chunks, directory, elapsed,
             " with checksums" if verify_checksums else "")
    return Index(path=directory, manifest=manifest, store=store, bm25=bm25, dense=dense, analyzer=analyzer,
                 load_seconds=elapsed, windows=windows, chunk_tokens=chunk_tokens)
