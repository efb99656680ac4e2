"""Fits the reranker's linear combination on a TRAIN split by coordinate ascent on nDCG@10; reports test and ablation.

    python tools/fit_reranker.py --index /tmp/lead/scifact_win --queries ../shared/data/scifact/queries.jsonl \
        --train ../shared/data/scifact/qrels/train.tsv --test ../shared/data/scifact/qrels/test.tsv \
        [--also NAME=INDEX:QUERIES:QRELS] [--ablation] [--save /tmp/rerank_model.json]

A maintainer tool (tools/README.md): it writes a model only where --save says; the shipped one is the package file
rag_service/search/rerank_model.json, replaced and committed together with the figures in bench/README.md.

Candidates are the pipeline's own (rag_service.search.pipeline.Pipeline.retrieve with the default fusion settings, fused
top --rerank-depth) and the features are rag_service.search.rerank.compute_features, the code the server runs, so the
figures are those of the service. Features per query are cached under --cache (delete it after changing a feature).
The test split and the --also collections are only ever evaluated, never fitted on.
nDCG@10 is computed on documents (a document ranks as its best chunk), with ir-measures for the reported figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import chunk_doc_ids, doc_run, evaluate
from rag_service.core.config import SearchDefaults
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.search import rerank as rerank_mod
from rag_service.search.fit import QuerySet, coordinate_ascent, ndcg
from rag_service.search.pipeline import Pipeline

FEATURES = rerank_mod.FEATURES


def collect(index_path: Path, queries_path: Path, qrels_paths: list[Path], depth: int, rerank_depth: int,
            cache: Path, encoder: Encoder | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{qid: (feature rows, chunk ids)} for every judged query, from the cache when the inputs are unchanged."""
    index = load_index(index_path, verify_checksums=False)
    key = hashlib.sha1(json.dumps([index.version, str(queries_path), [str(p) for p in qrels_paths], depth,
                                   rerank_depth, FEATURES, Path(rerank_mod.__file__).stat().st_mtime]).encode())
    path = cache / f"{index.name}-{key.hexdigest()[:12]}.npz"
    encoder = encoder or Encoder()
    pipeline = Pipeline(index, encoder)
    doc_ids = chunk_doc_ids(pipeline)
    if path.exists():
        data = np.load(path, allow_pickle=False)
        qids = [str(q) for q in data["qids"]]
        offs = data["offsets"]
        return {q: (data["X"][offs[i]:offs[i + 1]], data["ids"][offs[i]:offs[i + 1]]) for i, q in enumerate(qids)}, \
            doc_ids
    judged = set()
    for p in qrels_paths:
        judged |= set(load_qrels(p))
    queries = {q: t for q, t in load_queries(queries_path).items() if q in judged}
    defaults = SearchDefaults()
    params = SearchParams(query="", depth=depth, top_k=rerank_depth, fusion=defaults.fusion,
                          dense_weight=defaults.dense_weight, rrf_k=defaults.rrf_k)
    store = rerank_mod.RerankStore.create(index.windows, index.bm25, index.dense.vectors)
    out = {}
    started = time.perf_counter()
    qids = list(queries)
    for begin in range(0, len(qids), 64):
        batch = qids[begin:begin + 64]
        vectors = encoder.encode_queries([queries[q] for q in batch])
        for qid, vector in zip(batch, vectors):
            cand = pipeline.retrieve(replace(params, query=queries[qid]), query_vector=vector)
            ids = cand.fused.ids
            x = rerank_mod.compute_features(store, queries[qid], vector, ids, cand.fused.scores, cand.bm25[0],
                                            cand.dense[0])
            out[qid] = (x, ids)
    print(f"{index.name}: features of {len(out)} queries in {time.perf_counter() - started:.1f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    offs = np.cumsum([0] + [len(out[q][1]) for q in qids])
    np.savez(path, qids=np.asarray(qids), offsets=offs, X=np.concatenate([out[q][0] for q in qids]),
             ids=np.concatenate([out[q][1] for q in qids]))
    return out, doc_ids


def query_set(data, doc_ids, qrels) -> QuerySet:
    qids = [q for q in qrels if q in data]
    return QuerySet(qids, [data[q][0] for q in qids], [data[q][1] for q in qids], doc_ids, qrels)


def official(qs: QuerySet, doc_ids: list[str], qrels, columns, weights) -> float:
    """nDCG@10 by ir-measures over every judged query (the figure bench/README.md reports)."""
    scores = qs.scores(columns, weights)
    run = {}
    for i, qid in enumerate(qs.qids):
        n = int(qs.valid[i].sum())
        order = np.argsort(-scores[i, :n], kind="stable")
        run[qid] = doc_run(doc_ids[c] for c in qs.chunk_ids[i][order].tolist())
    return evaluate({"m": run}, qrels)["m"]["nDCG@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--also", action="append", default=[],
                        help="name=index:queries:qrels, evaluated with the fitted weights (never fitted on)")
    parser.add_argument("--train-queries", type=Path,
                        help="JSON list of train query ids to fit on (default: every judged train query)")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--rerank-depth", type=int, default=100)
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--gbdt", action="store_true", help="also fit and report a gradient-boosted tree combiner")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rerank/features"))
    parser.add_argument("--save", type=Path,
                        help="write the fitted model (the features with a non-zero weight) to this file; nothing is "
                             "written without it (the shipped model is rag_service/search/rerank_model.json)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", type=Path,
                        help="sentence-transformers folder the index was built with (default: the packaged model)")
    args = parser.parse_args()

    encoder = Encoder(str(args.model) if args.model else None)
    train_q, test_q = load_qrels(args.train), load_qrels(args.test)
    if args.train_queries:
        keep = set(json.loads(args.train_queries.read_text()))
        train_q = {q: r for q, r in train_q.items() if q in keep}
    data, doc_ids = collect(args.index, args.queries, [args.train, args.test], args.depth, args.rerank_depth,
                            args.cache, encoder)
    train, test = query_set(data, doc_ids, train_q), query_set(data, doc_ids, test_q)
    others = {}
    for spec in args.also:
        name, rest = spec.split("=", 1)
        index, queries, qrels_path = rest.split(":")
        qrels = load_qrels(Path(qrels_path))
        odata, odocs = collect(Path(index), Path(queries), [Path(qrels_path)], args.depth, args.rerank_depth,
                               args.cache, encoder)
        others[name] = (query_set(odata, odocs, qrels), odocs, qrels)

    names = [n for n in args.features.split(",") if n]

    def figures(cols: list[str], w: np.ndarray) -> dict[str, float]:
        c = [FEATURES.index(n) for n in cols]
        row = {"train": ndcg(train, c, w), "test": official(test, doc_ids, test_q, c, w)}
        for name, (qs, odocs, qrels) in others.items():
            row[name] = official(qs, odocs, qrels, c, w)
        return row

    base = figures(["fused"], np.ones(1))
    print(f"fusion alone (same candidates): {json.dumps({k: round(v, 4) for k, v in base.items()})}")
    for n in names:
        if n != "fused":
            print(f"  {n:<12} alone: " + json.dumps({k: round(v, 4) for k, v in figures([n], np.ones(1)).items()}))

    started = time.perf_counter()
    w, _ = coordinate_ascent(train, names)
    full = figures(names, w)
    print(f"fitted in {time.perf_counter() - started:.1f} s: {json.dumps({k: round(v, 4) for k, v in full.items()})}")
    print("weights: " + ", ".join(f"{n} {x:+.4f}" for n, x in zip(names, w)))
    rows = [{"model": "fusion alone", **base}, {"model": "all features", **full,
                                                "weights": dict(zip(names, map(float, w)))}]
    if args.ablation:
        for n in names:
            rest = [x for x in names if x != n]
            wa, _ = coordinate_ascent(train, rest)
            row = figures(rest, wa)
            rows.append({"model": f"without {n}", **row})
            print(f"  without {n:<12} " + json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    if args.gbdt:
        # A non-linear combiner for comparison: gradient-boosted trees on each feature and its gap to the query's
        # best candidate, trained pointwise (is the chunk's document relevant?) on train.
        from sklearn.ensemble import HistGradientBoostingClassifier

        c = [FEATURES.index(n) for n in names]

        def design(qs: QuerySet) -> np.ndarray:
            x = qs.X[:, :, c].astype(np.float64)
            top = np.where(qs.valid[:, :, None], x, -np.inf).max(axis=1, keepdims=True)
            return np.concatenate([x, x - top], axis=2)

        xtr = design(train)
        clf = HistGradientBoostingClassifier(max_depth=4, max_iter=300, learning_rate=0.05, random_state=0)
        clf.fit(xtr[train.valid], (train.gains[train.valid] > 0).astype(int))
        gb_rows = {}
        for label, qs, odocs, qrels in [("train", train, doc_ids, train_q), ("test", test, doc_ids, test_q)] + [
                (name, qs, odocs, qrels) for name, (qs, odocs, qrels) in others.items()]:
            xd = design(qs)
            proba = np.zeros(qs.valid.shape)
            proba[qs.valid] = clf.predict_proba(xd[qs.valid])[:, 1]
            saved = qs.X
            qs.X = proba[:, :, None].astype(np.float32).repeat(len(FEATURES), axis=2)
            gb_rows[label] = official(qs, odocs, qrels, [0], np.ones(1))
            qs.X = saved
        rows.append({"model": "gbdt (sklearn HistGradientBoosting, pointwise)", **gb_rows})
        print("gbdt: " + json.dumps({k: round(v, 4) for k, v in gb_rows.items()}))
    if args.save:
        keep = [n for n, x in zip(names, w) if abs(x) > 1e-6]
        wk = np.asarray([x for x in w if abs(x) > 1e-6], np.float32)
        model = rerank_mod.RerankModel(
            features=tuple(keep), weights=wk, bias=0.0,
            info={"fitted_on": f"{args.index.name} {args.train.name}", "method": "coordinate ascent on nDCG@10",
                  "depth": args.depth, "rerank_depth": args.rerank_depth,
                  "window_sentences": load_index(args.index, verify_checksums=False).windows.params[
                      "window_sentences"],
                  "figures": {k: round(v, 4) for k, v in full.items()},
                  "fusion_figures": {k: round(v, 4) for k, v in base.items()}})
        model.save(args.save)
        print(f"saved {args.save} (sha256 {model.sha256[:16]}...)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
