"""The peer comparison on synthetic corpora of growing size: how p50 and p99 grow with the number of passages.

Per size: generate the corpus (rag_service.bench.synthetic), build a rag-service index of it with hashed document
vectors (cached under the cache directory, reused by later runs), then `run_compare` with the same hashed vectors for
the peers. Queries are encoded by the real model in every system's timed path, as in production.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rag_service.bench import synthetic
from rag_service.bench.compare import CompareConfig, run_compare
from rag_service.bench.data import load_qrels, load_queries

EMBEDDING_NOTE = ("synthetic corpus: document vectors from hash_embed (signed feature hashing, 384 dims), not the "
                  "model; queries encoded by all-MiniLM-L6-v2 in every timed path; quality not meaningful")


def build_synthetic_index(folder: Path, root: Path, encoder) -> Path:
    from rag_service.index.build import BuildConfig, build_index

    if (root / "CURRENT").exists():
        return root
    # document_encoder "torch": the build then encodes with the encoder it is given (the hashing wrapper, for chunk
    # vectors and the reranker's sentence windows alike) instead of switching to the ONNX export.
    build_index(folder / "corpus.jsonl", root, BuildConfig(name=root.name, document_encoder="torch"),
                encoder=synthetic.HashingDocumentEncoder(encoder), progress=True)
    return root


def run_scale(sizes: Sequence[int], cache_dir: Path, *, systems: Sequence[str], queries: int = 200, seed: int = 0,
              warmup: int = 10, progress: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] = print, encoder=None) -> dict:
    from rag_service.encode import Encoder

    encoder = encoder or Encoder()
    runs = []
    started = time.time()
    for size in sizes:
        folder = synthetic.generate(cache_dir / "synthetic" / f"n{size}-s{seed}", size, queries=queries, seed=seed)
        t0 = time.perf_counter()
        index = build_synthetic_index(folder, cache_dir / "synthetic" / f"idx-n{size}-s{seed}", encoder)
        log(f"{size} passages: corpus and index ready in {time.perf_counter() - t0:.0f} s (cached when 0)")
        qs = load_queries(folder / "queries.jsonl")
        report = run_compare(CompareConfig(
            corpus=folder, queries=qs, qrels=load_qrels(folder / "qrels" / "test.tsv"), index=index,
            systems=list(systems), warmup=warmup, cache_dir=cache_dir, name=f"synthetic-{size}",
            doc_embedder=synthetic.hash_embed, embedding_note=EMBEDDING_NOTE), progress=progress)
        report["passages"] = size
        runs.append(report)
    return {"tool": "rag-bench scale", "seconds": round(time.time() - started, 1), "embeddings": EMBEDDING_NOTE,
            "runs": runs}


def format_table(report: dict) -> str:
    runs = report["runs"]
    names = list(runs[0]["systems"]) if runs else []
    lines = [f"{'passages':>9} " + " ".join(f"{n[:22]:>22}" for n in names), "p50 / p99 ms (known-item recall@k)"]
    for run in runs:
        cells = []
        for name in names:
            row = run["systems"][name]
            recall = row.get(f"recall@{run['k']}")
            cells.append(f"{row['latency_ms']['p50']:>6.1f} / {row['latency_ms']['p99']:>6.1f} "
                         f"({'-' if recall is None else f'{recall:.2f}'})")
        lines.append(f"{run['passages']:>9} " + " ".join(f"{c:>22}" for c in cells))
    lines.append(report["embeddings"])
    return "\n".join(lines)
