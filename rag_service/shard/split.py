"""Splitting a built index into N shards whose corpus statistics are the whole corpus' (`rag-index build --shards`).

A document goes to shard blake2b(doc id) mod N, whole: a document never spans shards, and the assignment does not
depend on the order documents arrive in. Every shard is a normal, versioned, loadable index of its documents, except
that everything a score reads from the corpus is global:

- BM25: the corpus vocabulary, the corpus' impacts (idf from global document frequencies, length normalisation by the
  global average) sliced to the shard's chunks, the global df per term (lexical.DF_FILE) and N ("corpus_chunks").
  A shard's BM25 score of a chunk is therefore the single index's, bit for bit.
- Reranker: the chunks' token streams keep global term ids; the average title and window lengths are the corpus'
  (windows.json "corpus"), so its per-candidate features equal the single index's too (rerank.local_features).
- Dense: the shard's rows of the same vectors. With a flat (exact) index the shard's scores are the single index's;
  an HNSW shard index is a different graph, so its approximate candidates may differ (see README "Shards").

Slicing a built index (rather than building each shard from its documents) is what makes this exact: nothing is
recomputed from a partial view of the corpus. `shard_chunks.npy` maps a shard's chunk ids to the single index's, so
the router breaks score ties by global chunk id exactly as one index does.

Beside the shards, OUT/router holds the shard-set description (router.json) and the ONNX query encoder of the index,
hard-linked: the router encodes each query once, with the encoder the shards were built for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.core.errors import BuildError, IndexFormatError
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import OnnxEncoder
from rag_service.index import manifest as manifest_mod
from rag_service.index import publish as publish_mod
from rag_service.index import source as source_mod
from rag_service.index import tokens as tokens_mod
from rag_service.index import windows as windows_mod
from rag_service.index.chunking import Document
from rag_service.index.load import Index, load_index, resolve_version_dir
from rag_service.index.store import write_store
from rag_service.retrievers import dense as dense_mod
from rag_service.retrievers import lexical
from rag_service.search.rerank import corpus_averages

log = logging.getLogger(__name__)

CHUNKS_FILE = "shard_chunks.npy"  # int64 per shard chunk: its chunk id in the unsharded index
ROUTER_DIR = "router"
ROUTER_FILE = "router.json"
ROUTER_FORMAT = 1
ASSIGNMENT = "blake2b-64(doc id) mod count"


def shard_of(doc_id: str, count: int) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big") % count


def shard_dir_name(i: int) -> str:
    return f"shard-{i}"


def stats_digest(df: np.ndarray, corpus_chunks: int, avgdl: float, bm25_params: dict[str, Any],
                 averages: tuple[float, float] | None, vocab_file: Path) -> str:
    """sha256 over every corpus statistic a shard's scores read: shards agreeing on it score as one index."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(df, dtype=np.int64).tobytes())
    digest.update(json.dumps({"corpus_chunks": corpus_chunks, "avgdl": avgdl,
                              "k1": bm25_params["k1"], "b": bm25_params["b"], "idf": bm25_params["idf"],
                              "epsilon": bm25_params.get("epsilon"), "averages": averages},
                             sort_keys=True).encode())
    digest.update(manifest_mod.sha256_file(vocab_file).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardSet:
    root: Path
    router: Path
    shards: list[Path]  # published version directories, shard i at position i
    set_id: str
    stats_sha256: str


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def split_index(source: Path | str, out: Path | str, count: int, *, keep: int = 3) -> ShardSet:
    """Splits the index at `source` (root or version directory) into `count` shards published under
    OUT/shard-<i>/, and writes OUT/router/. Raises BuildError (bad count, a shard left empty) or IndexFormatError."""
    if count < 1:
        raise BuildError(f"shards must be >= 1, got {count}")
    started = time.perf_counter()
    src = resolve_version_dir(source)
    index = load_index(src, verify_checksums=True)
    manifest = index.manifest
    if "shard" in manifest:
        raise BuildError(f"{src} is itself a shard ({manifest['shard']['index']} of {manifest['shard']['count']}); "
                         "split the unsharded index")
    store, bm25, windows = index.store, index.bm25, index.windows
    out = Path(out).absolute()
    n_docs, n_chunks = store.n_docs, store.n_chunks
    doc_shard = np.fromiter((shard_of(store.doc_id(d), count) for d in range(n_docs)), dtype=np.int64, count=n_docs)
    chunk_docs = np.asarray(store.chunk_docs, dtype=np.int64)
    chunk_shard = doc_shard[chunk_docs]
    empty = [i for i in range(count) if not np.any(chunk_shard == i)]
    if empty:
        raise BuildError(f"{count} shards for {n_docs} documents leave shard(s) {empty} without a chunk; use fewer "
                         "shards")

    global_df = np.asarray(bm25.df, dtype=np.int64)
    averages = corpus_averages(windows) if windows is not None else None
    vocab_file = src / lexical.VOCAB_FILE
    stats = stats_digest(global_df, n_chunks, bm25.avgdl, bm25.params, averages, vocab_file)
    set_id = hashlib.sha256(f"{manifest['version']}\0{count}\0{ASSIGNMENT}".encode()).hexdigest()[:16]
    dense_kind = index.dense.kind
    if dense_kind != "flat":
        log.warning("dense index of %s is %s: each shard builds its own graph, so approximate dense candidates (and "
                    "results) may differ from the unsharded index; exact (flat) dense search is equivalent", src,
                    dense_kind)
    codes_params = None
    if dense_mod.CODES_PARAMS_FILE in manifest["files"]:
        codes_params = json.loads((src / dense_mod.CODES_PARAMS_FILE).read_text(encoding="utf-8"))
    source_lines: dict[str, str] | None = None
    if source_mod.SOURCE_FILE in manifest["files"]:
        source_lines = {}
        with open(src / source_mod.SOURCE_FILE, encoding="utf-8") as f:
            for line in f:
                source_lines[json.loads(line)["_id"]] = line

    chunk_tokens = _source_tokens(index, src)

    # Term of every posting, so a shard's postings are a mask over the global arrays (order within a term kept).
    posting_terms = np.repeat(np.arange(len(global_df), dtype=np.int64), np.diff(np.asarray(bm25.indptr)))
    posting_docs = np.asarray(bm25.docs, dtype=np.int64)
    vectors = index.dense.vectors
    out.mkdir(parents=True, exist_ok=True)
    published: list[Path] = []
    shard_info: list[dict[str, Any]] = []
    for i in range(count):
        t0 = time.perf_counter()
        root = out / shard_dir_name(i)
        root.mkdir(parents=True, exist_ok=True)
        publish_mod.remove_stale_tmp(root)
        tmp = publish_mod.make_tmp_dir(root)
        try:
            chunks_g = np.flatnonzero(chunk_shard == i).astype(np.int64)
            docs_g = np.flatnonzero(doc_shard == i).astype(np.int64)
            local_doc = np.full(n_docs, -1, np.int64)
            local_doc[docs_g] = np.arange(len(docs_g))
            local_chunk = np.full(n_chunks, -1, np.int64)
            local_chunk[chunks_g] = np.arange(len(chunks_g))

            docs = [Document(id=store.doc_id(int(d)), title=store.doc_title(int(d)), text="",
                             metadata=store.doc_metadata_raw(int(d))) for d in docs_g]
            chunks = [replace(store.chunk(c), doc=int(local_doc[chunk_docs[c]])) for c in chunks_g.tolist()]
            write_store(tmp, docs, chunks, store.metadata_schema)
            if source_lines is not None:
                with open(tmp / source_mod.SOURCE_FILE, "w", encoding="utf-8") as f:
                    f.writelines(source_lines[d.id] for d in docs)
            np.save(tmp / CHUNKS_FILE, chunks_g)
            if chunk_tokens is not None:
                tokens_mod.write_tokens(tmp, np.asarray(chunk_tokens)[chunks_g])

            keep_post = local_chunk[posting_docs] >= 0
            indptr = np.zeros(len(global_df) + 1, np.int64)
            np.cumsum(np.bincount(posting_terms[keep_post], minlength=len(global_df)), out=indptr[1:])
            np.save(tmp / lexical.INDPTR_FILE, indptr)
            np.save(tmp / lexical.DOCS_FILE, local_chunk[posting_docs[keep_post]].astype(np.int32))
            np.save(tmp / lexical.WEIGHTS_FILE, np.ascontiguousarray(np.asarray(bm25.weights)[keep_post]))
            np.save(tmp / lexical.DOC_LENGTHS_FILE, np.ascontiguousarray(np.asarray(bm25.doc_lengths)[chunks_g]))
            np.save(tmp / lexical.DF_FILE, global_df)
            _link_or_copy(vocab_file, tmp / lexical.VOCAB_FILE)
            if (src / lexical.WORDS_FILE).is_file():  # the corpus's word -> term id, as the vocabulary: the same
                _link_or_copy(src / lexical.WORDS_FILE, tmp / lexical.WORDS_FILE)
            bm25_params = {**bm25.params, "n_docs": int(len(chunks_g)), "postings": int(keep_post.sum()),
                           "corpus_chunks": int(n_chunks)}
            (tmp / lexical.PARAMS_FILE).write_text(json.dumps(bm25_params, indent=2), encoding="utf-8")

            shard_vectors = np.ascontiguousarray(np.asarray(vectors)[chunks_g], dtype=np.float32)
            dense_index = dense_mod.build_dense_index(shard_vectors, dense_kind)
            dense_mod.write_dense(tmp, dense_index, shard_vectors, dense_kind)
            del dense_index
            if codes_params is not None:
                dense_mod.write_codes(tmp, shard_vectors, codes_params["kind"], codes_params.get("oversample"))

            window_params = None
            if windows is not None:
                window_params = _write_windows(tmp, windows, chunks_g, averages)
            if "encoder_export" in manifest and onnx_export.has_export(src):
                for name in onnx_export.FILES:
                    _link_or_copy(src / name, tmp / name)

            publish_mod.fsync_tree(tmp)
            files = manifest_mod.file_entries(tmp)
            created = manifest_mod.utc_now()
            shard = {"index": i, "count": count, "set_id": set_id, "stats_sha256": stats, "assignment": ASSIGNMENT,
                     "source_version": manifest["version"], "source_name": manifest["name"],
                     "corpus": {"documents": n_docs, "chunks": n_chunks},
                     "metadata_fields": list(manifest.get("metadata_fields", [])),
                     "metadata_schema": store.metadata_schema, "chunk_ids": CHUNKS_FILE}
            shard_manifest = {
                **{k: v for k, v in manifest.items() if k not in ("files", "windows")},
                "name": f"{manifest['name']}-{shard_dir_name(i)}",
                "version": manifest_mod.make_version(created, files),
                "created_at": manifest_mod.iso_utc(created),
                "build_seconds": round(time.perf_counter() - t0, 3),
                "timings": {"split": round(time.perf_counter() - t0, 3)},
                "counts": {"documents": len(docs), "chunks": len(chunks), "vocabulary": len(global_df),
                           "postings": int(keep_post.sum())},
                **({"windows": window_params} if window_params is not None else {}),
                "shard": shard,
                "files": files,
            }
            published.append(publish_mod.publish(root, tmp, shard_manifest, keep=keep))
        except (OSError, ValueError) as e:
            raise BuildError(f"split of {src} into {out}: shard {i} failed: {e}") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        shard_info.append({"index": i, "path": str(root), "documents": len(docs), "chunks": len(chunks)})
        log.info("shard %d/%d: %d documents, %d chunks -> %s", i, count, len(docs), len(chunks), published[-1])

    distinct = {name: store.distinct_values(name) for name in store.metadata_schema}
    router = write_router(out, manifest, src, set_id=set_id, count=count, stats=stats, shards=shard_info,
                          distinct=distinct)
    log.info("split %s into %d shards under %s in %.1fs", src, count, out, time.perf_counter() - started)
    return ShardSet(root=out, router=router, shards=published, set_id=set_id, stats_sha256=stats)


def _source_tokens(index: Index, src: Path) -> np.ndarray | None:
    """The source's model tokens per chunk: stored, or (an index built before they were) counted with the
    tokenizer of its ONNX export; None without either, and each shard then counts its own at load."""
    if index.chunk_tokens is not None:
        return index.chunk_tokens
    if "encoder_export" in index.manifest and onnx_export.has_export(src):
        return index.token_counts(OnnxEncoder(src, "onnx-int8"))
    log.warning("%s has neither %s nor an ONNX export to count them with: each shard counts its chunks' tokens at "
                "load", src, tokens_mod.TOKENS_FILE)
    return None


def _write_windows(directory: Path, windows: windows_mod.WindowData, chunks_g: np.ndarray,
                   averages: tuple[float, float] | None) -> dict[str, Any]:
    w_off = np.asarray(windows.window_offsets)
    t_off = np.asarray(windows.token_offsets)
    w_rows = np.concatenate([np.arange(w_off[c], w_off[c + 1]) for c in chunks_g.tolist()]) \
        if len(chunks_g) else np.zeros(0, np.int64)
    t_rows = np.concatenate([np.arange(t_off[c], t_off[c + 1]) for c in chunks_g.tolist()]) \
        if len(chunks_g) else np.zeros(0, np.int64)
    new_w = np.zeros(len(chunks_g) + 1, np.int64)
    np.cumsum(w_off[chunks_g + 1] - w_off[chunks_g], out=new_w[1:])
    new_t = np.zeros(len(chunks_g) + 1, np.int64)
    np.cumsum(t_off[chunks_g + 1] - t_off[chunks_g], out=new_t[1:])
    avg_title, avg_window = averages if averages is not None else (1.0, 1.0)
    params = {**windows.params, "windows": int(len(w_rows)), "tokens": int(len(t_rows)),
              "corpus": {"avg_title": avg_title, "avg_window": avg_window}}
    data = windows_mod.WindowData(
        window_offsets=new_w,
        vectors=np.asarray(windows.vectors)[w_rows],
        scales=np.asarray(windows.scales)[w_rows],
        window_spans=np.asarray(windows.window_spans)[w_rows],  # relative to the chunk's own token stream
        token_offsets=new_t,
        tokens=np.asarray(windows.tokens)[t_rows],
        title_lengths=np.asarray(windows.title_lengths)[chunks_g],
        params=params)
    data.write(directory)
    return {**params, "bytes": data.nbytes()}


def _schema_of(manifest: dict[str, Any]) -> dict[str, str]:
    """The index's metadata types; an index built before typed metadata has keyword fields only."""
    return dict(manifest.get("metadata_schema") or dict.fromkeys(manifest.get("metadata_fields", []), "keyword"))


def write_router(out: Path, manifest: dict[str, Any], src: Path, *, set_id: str, count: int, stats: str,
                 shards: list[dict[str, Any]], distinct: dict[str, int] | None = None) -> Path:
    """OUT/router: router.json and the index's ONNX query encoder (hard links), replaced whole."""
    router = out / ROUTER_DIR
    tmp = out / f".{ROUTER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    exported = "encoder_export" in manifest and onnx_export.has_export(src)
    if exported:
        for name in onnx_export.FILES:
            _link_or_copy(src / name, tmp / name)
    body = {"format": ROUTER_FORMAT, "created_at": manifest_mod.iso_utc(manifest_mod.utc_now()), "set_id": set_id,
            "count": count, "stats_sha256": stats, "assignment": ASSIGNMENT, "source_version": manifest["version"],
            "name": manifest["name"],
            "model": manifest["model"], "corpus": {"documents": manifest["counts"]["documents"],
                                                   "chunks": manifest["counts"]["chunks"]},
            "metadata_fields": list(manifest.get("metadata_fields", [])),
            "metadata_schema": _schema_of(manifest), "metadata_distinct": distinct or {},
            "tenant_key": manifest.get("tenant_key"),
            "encoder_export": bool(exported), "shards": shards}
    (tmp / ROUTER_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    old = out / f".{ROUTER_DIR}.old-{os.getpid()}"
    if router.exists():
        os.rename(router, old)
    os.rename(tmp, router)
    shutil.rmtree(old, ignore_errors=True)
    return router


def read_router(directory: Path | str) -> dict[str, Any]:
    path = Path(directory) / ROUTER_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing; give --index the router directory a sharded build wrote "
                               f"(OUT/{ROUTER_DIR})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path}: unreadable: {e}") from e
    if not isinstance(body, dict) or body.get("format") != ROUTER_FORMAT:
        raise IndexFormatError(f"{path}: not a format-{ROUTER_FORMAT} router description")
    for key in ("set_id", "count", "stats_sha256", "model"):
        if key not in body:
            raise IndexFormatError(f"{path}: no {key!r} entry")
    return body
