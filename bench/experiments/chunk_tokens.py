"""Token counts per chunk at request time (the old lazy count) against build-time data, in one process (not run by
the tests).

    python bench/experiments/chunk_tokens.py --index /tmp/rerank/cranfield \
        --queries ../shared/data/cranfield/queries.jsonl [--limit 225]

Every reply reports each context's `tokens`. Pipeline A reproduces the request-time count (an array of -1, each chunk
tokenized on its first use); pipeline B reads the counts of the index (chunk_tokens.npy, or for an index built
before it, counted once when the pipeline is built, which is timed here as the load-time fallback). Both are fresh
and see each query once, interleaved (the order alternates per query), so this is the first pass a server sees after
a start or reload. Query vectors are encoded up front with the index's int8 ONNX encoder (the encoder is not what is
measured); numba and caches are warmed on a third pipeline first. Prints p50/p99 in microseconds of the `contexts`
stage and of the sum of all stages, the build-time cost of counting every chunk (the tokenizer's batch call, as
`rag-index build` does, against one call per chunk) and the load-time fallback.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_queries
from rag_service.core.config import SearchDefaults
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import SearchEncoder, load_index_encoder
from rag_service.index import tokens as tokens_mod
from rag_service.index.load import Index, load_index
from rag_service.search.pipeline import Pipeline


class LazyPipeline(Pipeline):
    """The request-time count this measures against: -1 = not counted yet, counted on the chunk's first use."""

    def __init__(self, index: Index, encoder: SearchEncoder) -> None:
        index.chunk_tokens = np.full(index.n_chunks, -1, np.int32)  # token_counts then hands this array over
        super().__init__(index, encoder)

    def chunk_tokens(self, chunk: int) -> int:
        count = int(self._chunk_tokens[chunk])
        if count < 0:
            count = self.encoder.count_tokens(self.index.store.chunk_text(chunk))
            self._chunk_tokens[chunk] = count
        return count


def pct(values: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=225)
    args = parser.parse_args()

    def fresh() -> Index:
        return load_index(args.index, verify_checksums=False)

    warm_index = fresh()
    encoder = load_index_encoder("onnx-int8", warm_index.path, threads=1)
    texts = list(load_queries(args.queries).values())[: args.limit]
    vectors = encoder.encode_queries(texts)
    d = SearchDefaults()
    base = SearchParams(query="", top_k=d.top_k, depth=d.depth, fusion=d.fusion, dense_weight=d.dense_weight,
                        rrf_k=d.rrf_k, rerank=d.rerank, rerank_depth=d.rerank_depth, mmr_lambda=d.mmr_lambda,
                        dedup_threshold=d.dedup_threshold, max_context_tokens=d.max_context_tokens)

    # Build-time cost: every chunk's count, batched as the build counts, and one call per chunk.
    store, n = warm_index.store, warm_index.n_chunks
    chunk_texts = [store.chunk_text(i) for i in range(n)]
    t0 = time.perf_counter()
    batched = tokens_mod.count_texts(chunk_texts, encoder)
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [encoder.count_tokens(t) for t in chunk_texts]
    single_s = time.perf_counter() - t0
    if batched.tolist() != single:
        raise SystemExit("batch and per-text counts differ")

    # numba, the reranker's stores and the CPU caches warm up on a pipeline of their own.
    warm = Pipeline(warm_index, encoder)
    for text, vector in zip(texts[:20], vectors[:20]):
        warm.search(replace(base, query=text), query_vector=vector)

    stored = tokens_mod.TOKENS_FILE in warm_index.manifest["files"]
    lazy = LazyPipeline(fresh(), encoder)
    index_b = fresh()
    t0 = time.perf_counter()
    built = Pipeline(index_b, encoder)  # counts here, once, when the index has no chunk_tokens.npy
    fallback_s = time.perf_counter() - t0
    pipelines = {"A lazy": lazy, "B array": built}
    stages: dict[str, dict[str, list[int]]] = {name: {"contexts": [], "total": []} for name in pipelines}
    replies: dict[str, list[list[int]]] = {name: [] for name in pipelines}
    for i, (text, vector) in enumerate(zip(texts, vectors)):
        order = list(pipelines) if i % 2 == 0 else list(reversed(pipelines))
        for name in order:
            result = pipelines[name].search(replace(base, query=text), query_vector=vector)
            stages[name]["contexts"].append(result.stage_us["contexts"])
            stages[name]["total"].append(sum(result.stage_us.values()))
            replies[name].append([c.tokens for c in result.contexts])
    if replies["A lazy"] != replies["B array"]:
        raise SystemExit("the two pipelines report different tokens")

    print(f"# {args.index}: {n} chunks, {len(texts)} queries, first pass, interleaved; index "
          f"{'stores' if stored else 'lacks'} {tokens_mod.TOKENS_FILE}")
    print(f"build-time count of all chunks: batch {batch_s * 1e3:.1f} ms, one call per chunk {single_s * 1e3:.1f} ms")
    print(f"pipeline B construction (load-time count when the file is missing): {fallback_s * 1e3:.1f} ms")
    print(f"{'pipeline':<10}{'contexts p50':>14}{'p99':>9}{'total p50':>11}{'p99':>9}   (us; total = sum of stages,"
          " encode excluded)")
    for name, by_stage in stages.items():
        c, t = by_stage["contexts"], by_stage["total"]
        print(f"{name:<10}{pct(c, 50):>14.0f}{pct(c, 99):>9.0f}{pct(t, 50):>11.0f}{pct(t, 99):>9.0f}")


if __name__ == "__main__":
    main()
