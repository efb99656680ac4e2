"""nDCG@10 of the reply as the pipeline builds it (Pipeline.search, top_k 30 chunks): fusion, rerank, rerank + MMR.

    python bench/experiments/filter_ndcg.py /tmp/rerank/scifact_partial ../shared/data/scifact/queries.jsonl \
        ../shared/data/scifact/qrels/test.tsv

Checks what the context filter's MMR/dedup settings do to the ranking itself (bench/README.md, issue 4).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import doc_run, evaluate
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.search.pipeline import Pipeline

SETTINGS = (("rerank, no filter", 1.0, 1.0, True), ("rerank + filter 0.8/0.9", 0.8, 0.9, True),
            ("fusion", 1.0, 1.0, False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", type=Path)
    parser.add_argument("queries", type=Path)
    parser.add_argument("qrels", type=Path)
    args = parser.parse_args()

    p = Pipeline(load_index(args.index, verify_checksums=False), Encoder())
    qrels = load_qrels(args.qrels)
    qs = {q: t for q, t in load_queries(args.queries).items() if q in qrels}
    vecs = dict(zip(qs, p.encoder.encode_queries(list(qs.values()))))
    runs = {}
    for name, lam, dd, rr in SETTINGS:
        run = {}
        for q, t in qs.items():
            r = p.search(SearchParams(query=t, top_k=30, depth=100, rerank_depth=100, mmr_lambda=lam,
                                      dedup_threshold=dd, rerank=rr), query_vector=vecs[q])
            run[q] = doc_run(c.doc_id for c in r.contexts)
        runs[name] = run
    for k, v in evaluate(runs, qrels).items():
        print(k, round(v["nDCG@10"], 4))


if __name__ == "__main__":
    main()
