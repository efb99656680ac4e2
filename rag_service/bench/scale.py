"""The peer comparison on synthetic corpora of growing size: how p50 and p99 grow with the number of passages.

Per size: generate the corpus (rag_service.bench.synthetic), build a rag-service index of it with hashed document
vectors (cached under the cache directory, reused by later runs), then `run_compare` with the same hashed vectors for
the peers. Queries are encoded by the real model in every system's timed path, as in production.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from rag_service.bench import synthetic
from rag_service.bench.compare import CompareConfig, run_compare
from rag_service.bench.data import load_qrels, load_queries

EMBEDDING_NOTE = ("synthetic corpus: document vectors from hash_embed (signed feature hashing, 384 dims), not the "
                  "model; queries encoded by all-MiniLM-L6-v2 in every timed path; quality not meaningful")


def build_synthetic_index(folder: Path, root: Path, encoder, *, hnsw_ef_construction: int | None = None) -> Path:
    from rag_service.index.build import BuildConfig, build_index

    if (root / "CURRENT").exists():
        return root
    # document_encoder "torch": the build then encodes with the encoder it is given (the hashing wrapper, for chunk
    # vectors and the reranker's sentence windows alike) instead of switching to the ONNX export.
    config = BuildConfig(name=root.name, document_encoder="torch")
    if hnsw_ef_construction is not None:
        config = dataclasses.replace(config, hnsw_ef_construction=hnsw_ef_construction)
    build_index(folder / "corpus.jsonl", root, config,
                encoder=synthetic.HashingDocumentEncoder(encoder), progress=True)
    return root


def index_root(cache_dir: Path, size: int, seed: int, hnsw_ef_construction: int | None = None) -> Path:
    """Where `run_scale` keeps the index of a size: a non-default HNSW setting is part of the name, so indexes built
    with different graphs are never mistaken for one another."""
    suffix = "" if hnsw_ef_construction is None else f"-efc{hnsw_ef_construction}"
    return Path(cache_dir) / "synthetic" / f"idx-n{size}-s{seed}{suffix}"


def dense_recall(index_dir: Path, queries: np.ndarray, ks: Sequence[int] = (10, 100), *,
                 block: int = 262_144) -> dict | None:
    """Recall@k of the index's dense search (HNSW at the server's efSearch = max(k, HNSW_EF_SEARCH_MIN)) against exact
    search over its own vectors, for `queries` (n, dim); None for a flat index (exact by construction)."""
    import faiss

    from rag_service.retrievers import dense as dense_mod

    index_dir = Path(index_dir).resolve()
    params = json.loads((index_dir / dense_mod.PARAMS_FILE).read_text())
    if params["kind"] != "hnsw":
        return None
    vectors = np.load(index_dir / dense_mod.VECTORS_FILE, mmap_mode="r")
    index = faiss.read_index(str(index_dir / dense_mod.INDEX_FILE))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    depth = max(ks)
    scores = np.zeros((len(queries), 0), dtype=np.float32)
    exact = np.zeros((len(queries), 0), dtype=np.int64)
    # Exact top-k per block of the memory-mapped vectors, merged, so the float matrix is never resident at once.
    for start in range(0, len(vectors), block):
        rows = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
        d, i = faiss.knn(queries, rows, min(depth, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
        scores, exact = np.concatenate([scores, d], axis=1), np.concatenate([exact, i + start], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        scores, exact = np.take_along_axis(scores, keep, axis=1), np.take_along_axis(exact, keep, axis=1)
    out = {"hnsw_m": params.get("hnsw_m"), "ef_construction": params.get("ef_construction"), "queries": len(queries)}
    for k in ks:
        found = index.search(queries, k, params=faiss.SearchParametersHNSW(
            efSearch=max(k, dense_mod.HNSW_EF_SEARCH_MIN)))[1]
        out[f"recall@{k}"] = round(float(np.mean([len(set(found[i]) & set(exact[i, :k])) / k
                                                  for i in range(len(queries))])), 4)
        out[f"ef_search@{k}"] = max(k, dense_mod.HNSW_EF_SEARCH_MIN)
    return out


def run_scale(sizes: Sequence[int], cache_dir: Path, *, systems: Sequence[str], queries: int = 200, seed: int = 0,
              warmup: int = 10, progress: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] = print, encoder=None, hnsw_ef_construction: int | None = None,
              excluded: Mapping[str, str] | None = None) -> dict:
    """`hnsw_ef_construction` overrides the build's HNSW construction beam; `excluded` maps a system to the measured
    reason it was left out (reported in each run's "did_not_fit", never silently dropped)."""
    from rag_service.encoder.encode import Encoder

    encoder = encoder or Encoder()
    excluded = dict(excluded or {})
    runs = []
    started = time.time()
    for size in sizes:
        folder = synthetic.generate(cache_dir / "synthetic" / f"n{size}-s{seed}", size, queries=queries, seed=seed)
        t0 = time.perf_counter()
        index = build_synthetic_index(folder, index_root(cache_dir, size, seed, hnsw_ef_construction), encoder,
                                      hnsw_ef_construction=hnsw_ef_construction)
        log(f"{size} passages: corpus and index ready in {time.perf_counter() - t0:.0f} s (cached when 0)")
        # A corpus generated earlier with more queries is reused with the first `queries` of them.
        qs = dict(list(load_queries(folder / "queries.jsonl").items())[:queries])
        report = run_compare(CompareConfig(
            corpus=folder, queries=qs, qrels=load_qrels(folder / "qrels" / "test.tsv"), index=index,
            systems=[s for s in systems if s not in excluded], warmup=warmup, cache_dir=cache_dir,
            name=f"synthetic-{size}", doc_embedder=synthetic.hash_embed, embedding_note=EMBEDDING_NOTE),
            progress=progress)
        report["passages"] = size
        report["did_not_fit"] = {s: excluded[s] for s in systems if s in excluded}
        texts = list(qs.values())
        # HNSW against exact over the same vectors: for the model-encoded queries the server searches with, and for
        # hashed queries (in the documents' own vector space, where a graph search is tested fairly).
        recall = {"model_queries": dense_recall(index / "CURRENT", encoder.encode_queries(texts))
                  if hasattr(encoder, "encode_queries") else None,
                  "hashed_queries": dense_recall(index / "CURRENT", synthetic.hash_embed(texts, encoder.dim))}
        report["dense_recall"] = recall if recall["hashed_queries"] is not None else None
        runs.append(report)
    return {"tool": "rag-bench scale", "seconds": round(time.time() - started, 1), "embeddings": EMBEDDING_NOTE,
            "runs": runs}


def format_table(report: dict) -> str:
    runs = report["runs"]
    names = list(dict.fromkeys(name for run in runs for name in (*run["systems"], *run.get("did_not_fit", {}))))
    lines = [f"{'passages':>9} " + " ".join(f"{n[:22]:>22}" for n in names), "p50 / p99 ms (known-item recall@k)"]
    notes = []
    for run in runs:
        cells = []
        for name in names:
            row = run["systems"].get(name)
            if row is None:
                reason = run.get("did_not_fit", {}).get(name)
                cells.append("did not fit" if reason else "-")
                if reason:
                    notes.append(f"{run['passages']}: {name} did not fit: {reason}")
                continue
            recall = row.get(f"recall@{run['k']}")
            cells.append(f"{row['latency_ms']['p50']:>6.1f} / {row['latency_ms']['p99']:>6.1f} "
                         f"({'-' if recall is None else f'{recall:.2f}'})")
        lines.append(f"{run['passages']:>9} " + " ".join(f"{c:>22}" for c in cells))
        for kind, recall in (run.get("dense_recall") or {}).items():
            if recall:
                notes.append(f"{run['passages']}: rag-service HNSW (M {recall['hnsw_m']}, efConstruction "
                             f"{recall['ef_construction']}) against exact, {kind.replace('_', ' ')}: recall@10 "
                             f"{recall['recall@10']:.3f}, recall@100 {recall['recall@100']:.3f}")
    lines.extend(notes)
    lines.append(report["embeddings"])
    return "\n".join(lines)
