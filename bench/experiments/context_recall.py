"""Context recall at a token budget: naive top-k truncation against the context filter (dedup + MMR + budget fill).

    python bench/experiments/context_recall.py --index /tmp/rerank/scifact \
        --queries ../shared/data/scifact/queries.jsonl --qrels ../shared/data/scifact/qrels/train.tsv \
        --grid                                  # choose the filter settings (train)
    python bench/experiments/context_recall.py --index /tmp/rerank/scifact \
        --queries ../shared/data/scifact/queries.jsonl --qrels ../shared/data/scifact/qrels/test.tsv
                                                # report with the defaults (test)

Per query the pipeline's own candidates are used: fused, reranked with the shipped model (as the server does by
default), then packed into budgets of 256/512/1024/2048 tokens (the model's tokenizer, on the context text):
  naive   the ranked passages in order, stopping at the first that does not fit (top-k truncation)
  filter  rag_service.search.context_filter.select: MMR with lambda, cosine dedup, shingle dedup, skip what does not fit
Context recall = share of the query's relevant documents with a chunk inside the packed context; redundancy = mean
pairwise cosine of the packed passages (chunk vectors). Means over queries.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_qrels, load_queries
from rag_service.core.config import SearchDefaults
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.search import context_filter
from rag_service.search import rerank as rerank_mod
from rag_service.search.pipeline import Pipeline

BUDGETS = (256, 512, 1024, 2048)
TOP_K = 1000  # the budget, not top_k, bounds the context here


def naive(n_tokens: list[int], budget: int) -> list[int]:
    out, total = [], 0
    for i, n in enumerate(n_tokens):
        if total + n > budget:
            break
        out.append(i)
        total += n
    return out


def redundancy(vectors: np.ndarray) -> float:
    if len(vectors) < 2:
        return 0.0
    sim = vectors @ vectors.T
    m = len(vectors)
    return float((sim.sum() - np.trace(sim)) / (m * (m - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--qrels", type=Path, required=True)
    parser.add_argument("--rerank-depth", type=int, default=SearchDefaults().rerank_depth)
    parser.add_argument("--grid", action="store_true", help="try every lambda x dedup x shingle setting")
    parser.add_argument("--lambdas", default="1.0,0.9,0.8,0.7,0.5")
    parser.add_argument("--dedups", default="1.0,0.95,0.9,0.85")
    parser.add_argument("--shingles", default="1.0,0.5,0.3")
    parser.add_argument("--no-rerank", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    defaults = SearchDefaults()
    encoder = Encoder()
    index = load_index(args.index, verify_checksums=False)
    pipeline = Pipeline(index, encoder)
    qrels = load_qrels(args.qrels)
    queries = {q: t for q, t in load_queries(args.queries).items() if q in qrels}
    store = index.store
    doc_of = np.asarray([store.chunk_doc(i) for i in range(index.n_chunks)])
    doc_id = [store.doc_id(d) for d in range(index.n_docs)]
    token_cache: dict[int, int] = {}
    count_tokens = functools.lru_cache(maxsize=None)(encoder.count_tokens)

    if args.grid:
        settings = list(itertools.product(*(map(float, s.split(",")) for s in (args.lambdas, args.dedups,
                                                                              args.shingles))))
    else:
        settings = [(defaults.mmr_lambda, defaults.dedup_threshold, context_filter.SHINGLE_THRESHOLD)]
    params = SearchParams(query="", depth=defaults.depth, top_k=args.rerank_depth, fusion=defaults.fusion,
                          dense_weight=defaults.dense_weight, rrf_k=defaults.rrf_k)
    sums = {("naive", b): [0.0, 0.0, 0.0, 0.0] for b in BUDGETS}
    for s in settings:
        for b in BUDGETS:
            sums[(s, b)] = [0.0, 0.0, 0.0, 0.0]  # recall, redundancy, tokens, passages
    started = time.perf_counter()
    qids = list(queries)
    for begin in range(0, len(qids), 64):
        batch = qids[begin:begin + 64]
        for qid, vector in zip(batch, encoder.encode_queries([queries[q] for q in batch])):
            cand = pipeline.retrieve(replace(params, query=queries[qid]), query_vector=vector)
            ids, rel = cand.fused.ids, cand.fused.scores
            if not args.no_rerank and pipeline.rerank_store is not None:
                r = rerank_mod.rerank(pipeline.rerank_store, pipeline.rerank_model, queries[qid], vector, ids,
                                      cand.fused.scores, cand.bm25[0], cand.dense[0])
                ids, rel = r.ids, r.scores
            vectors = np.asarray(index.dense.vectors[ids])
            n_tokens = []
            for c in ids.tolist():
                if c not in token_cache:
                    token_cache[c] = encoder.count_tokens(store.chunk_text(c))
                n_tokens.append(token_cache[c])
            relevant = {d for d, g in qrels[qid].items() if g > 0}

            def score(picked: list[int]) -> tuple[float, float, float, float]:
                docs = {doc_id[doc_of[ids[i]]] for i in picked}
                return (len(docs & relevant) / max(len(relevant), 1), redundancy(vectors[picked]),
                        float(sum(n_tokens[i] for i in picked)), float(len(picked)))

            for b in BUDGETS:
                for j, v in enumerate(score(naive(n_tokens, b))):
                    sums[("naive", b)][j] += v
                for s in settings:
                    fp = context_filter.FilterParams(top_k=TOP_K, mmr_lambda=s[0], dedup_threshold=s[1],
                                                     shingle_threshold=s[2], max_context_tokens=b)
                    sel = context_filter.select(rel, vectors, lambda i: store.chunk_text(int(ids[i])),
                                                count_tokens, fp)
                    for j, v in enumerate(score(sel.positions)):
                        sums[(s, b)][j] += v
    n = len(qids)
    print(f"{args.index.name} {args.qrels.name}: {n} queries in {time.perf_counter() - started:.1f} s")
    rows = []
    for key, vals in sums.items():
        method, b = key
        rows.append({"method": "naive" if method == "naive" else
                     {"mmr_lambda": method[0], "dedup_threshold": method[1], "shingle_threshold": method[2]},
                     "budget": b, "recall": vals[0] / n, "redundancy": vals[1] / n, "tokens": vals[2] / n,
                     "passages": vals[3] / n})
    for b in BUDGETS:
        base = next(r for r in rows if r["budget"] == b and r["method"] == "naive")
        print(f"budget {b}: naive recall {base['recall']:.4f} redundancy {base['redundancy']:.3f} "
              f"tokens {base['tokens']:.0f} passages {base['passages']:.2f}")
        best = sorted((r for r in rows if r["budget"] == b and r["method"] != "naive"),
                      key=lambda r: r["recall"], reverse=True)
        for r in best[:6]:
            print(f"   {json.dumps(r['method'])}: recall {r['recall']:.4f} redundancy {r['redundancy']:.3f} "
                  f"tokens {r['tokens']:.0f} passages {r['passages']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
