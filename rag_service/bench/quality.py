"""Retrieval quality per method with ir-measures, on document-level qrels, and paired significance tests.

Methods are rows: `bm25`, `dense` and `fused` are the first stage (Pipeline.retrieve, candidates kept whole);
`pipeline` rows run the whole request path (Pipeline.search) with given SearchParams, so every later stage (rerank,
context filter, ...) is measured as the server runs it: `--method norerank=pipeline:rerank=off`.

The service ranks chunks; a document's rank is that of its best chunk, as a reader of the contexts would see it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import ir_measures
import numpy as np

from rag_service.core.params import SearchParams
from rag_service.search.pipeline import Candidates, Pipeline

MEASURES = (ir_measures.nDCG @ 10, ir_measures.R @ 100, ir_measures.RR @ 10)
METHODS = ("bm25", "dense", "fused")
FIRST_STAGE = frozenset(METHODS)
# Contexts a pipeline row asks for: chunks, so that after grouping by document about 100 documents remain for R@100.
PIPELINE_TOP_K = 200


@dataclass(frozen=True)
class Method:
    """A row of the report. kind: one of the first-stage rankings, or "pipeline" (Pipeline.search with overrides)."""

    name: str
    kind: str
    overrides: dict[str, Any] = field(default_factory=dict)  # SearchParams field -> value


def _convert(name: str, raw: str) -> object:
    """A SearchParams value from text, typed like the field's default (budget_ms, default None, is a float)."""
    default = getattr(SearchParams(query=""), name)
    if isinstance(default, bool):
        value = raw.strip().lower()
        if value in ("1", "true", "on", "yes"):
            return True
        if value in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"{name}: expected on/off, got {raw!r}")
    try:
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float) or default is None:
            return float(raw)
    except ValueError as error:
        raise ValueError(f"{name}: expected a number, got {raw!r}") from error
    return raw


def parse_method(spec: str) -> Method:
    """`bm25`, `dense`, `fused`, `pipeline`, or `NAME=pipeline:field=value,...` with SearchParams fields
    (rerank=off, rerank_depth=50, max_context_tokens=512, mmr_lambda=0.7, depth=200, fusion=rrf, ...)."""
    spec = spec.strip()
    name, _, definition = spec.partition("=") if "=" in spec.split(":", 1)[0] else (spec, "", spec)
    kind, _, settings = definition.partition(":")
    name, kind = name.strip(), kind.strip()
    if kind in FIRST_STAGE and not settings:
        return Method(name=name, kind=kind)
    if kind != "pipeline":
        raise ValueError(f"method {spec!r}: expected bm25, dense, fused or NAME=pipeline:field=value,...")
    allowed = {f.name for f in fields(SearchParams)} - {"query", "filters"}
    overrides: dict[str, object] = {}
    for item in filter(None, (x.strip() for x in settings.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise ValueError(f"method {spec!r}: {item!r} is not field=value with a field among {sorted(allowed)}")
        try:
            overrides[key] = _convert(key, raw.strip())
        except ValueError as error:
            raise ValueError(f"method {spec!r}: {error}") from error
    return Method(name=name, kind="pipeline", overrides=overrides)


def doc_run(doc_of_chunk: Iterable[str], limit: int = 100) -> dict[str, float]:
    """Chunk ranking -> document ranking (first occurrence wins); scores strictly decrease so ties cannot reorder."""
    run: dict[str, float] = {}
    for doc in doc_of_chunk:
        if doc not in run:
            run[doc] = float(limit - len(run))
            if len(run) == limit:
                break
    return run


def collect_candidates(pipeline: Pipeline, queries: Mapping[str, str], params: SearchParams,
                       batch_size: int = 64) -> dict[str, Candidates]:
    """Encodes all queries in batches, then runs the pipeline's first stage for each at params.depth."""
    qids = list(queries)
    out = {}
    for start in range(0, len(qids), batch_size):
        batch = qids[start:start + batch_size]
        vectors = pipeline.encoder.encode_queries([queries[q] for q in batch])
        for qid, vector in zip(batch, vectors):
            out[qid] = pipeline.retrieve(replace(params, query=queries[qid]), query_vector=vector)
    return out


def chunk_doc_ids(pipeline: Pipeline) -> list[str]:
    """Document id of every chunk, looked up once per evaluation instead of once per candidate."""
    store = pipeline.index.store
    return [store.doc_id(store.chunk_doc(i)) for i in range(pipeline.index.n_chunks)]


def method_runs(doc_ids: list[str], candidates: Mapping[str, Candidates], params: SearchParams,
                methods: Iterable[str] = METHODS, limit: int = 100) -> dict[str, dict[str, dict[str, float]]]:
    """Document runs per method from collected candidates, truncated to params.depth per retriever."""
    from rag_service.search import fusion

    runs: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    for qid, cand in candidates.items():
        bm25 = (cand.bm25[0][: params.depth], cand.bm25[1][: params.depth])
        dense = (cand.dense[0][: params.depth], cand.dense[1][: params.depth])
        ranked = {"bm25": bm25[0], "dense": dense[0]}
        if "fused" in runs:
            ranked["fused"] = fusion.fuse(bm25, dense, method=params.fusion, dense_weight=params.dense_weight,
                                          top_k=2 * params.depth, rrf_k=params.rrf_k).ids
        for method in runs:
            runs[method][qid] = doc_run((doc_ids[c] for c in ranked[method].tolist()), limit)
    return runs


def evaluate(runs: Mapping[str, Mapping[str, Mapping[str, float]]], qrels: Mapping[str, Mapping[str, int]],
             measures=MEASURES) -> dict[str, dict[str, float]]:
    """Mean of each measure over every judged query; a query a method returned nothing for scores 0, not absent
    (trec_eval would otherwise skip it and flatter the method)."""
    table = {}
    for method, run in runs.items():
        complete = {q: (dict(run.get(q) or {}) or {"__no_result__": 0.0}) for q in qrels}
        agg = ir_measures.calc_aggregate(measures, qrels, complete)
        table[method] = {str(m): float(v) for m, v in agg.items()}
    return table


def pipeline_runs(pipeline: Pipeline, queries: Mapping[str, str], vectors: Mapping[str, np.ndarray],
                  params: SearchParams, methods: Sequence[Method], limit: int = 100) -> dict[str, dict]:
    """Document runs of whole-pipeline rows: Pipeline.search as the server runs it, with each method's overrides."""
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        base = replace(params, **{"top_k": PIPELINE_TOP_K, **method.overrides})
        run = {}
        for qid, text in queries.items():
            result = pipeline.search(replace(base, query=text), query_vector=vectors[qid])
            run[qid] = doc_run((c.doc_id for c in result.contexts), limit)
        runs[method.name] = run
    return runs


def per_query(runs: Mapping[str, Mapping[str, Mapping[str, float]]], qrels: Mapping[str, Mapping[str, int]],
              measures=MEASURES) -> dict[str, dict[str, dict[str, float]]]:
    """method -> measure -> query -> value, every judged query present (0 where the method returned nothing)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, run in runs.items():
        complete = {q: (dict(run.get(q) or {}) or {"__no_result__": 0.0}) for q in qrels}
        values: dict[str, dict[str, float]] = {str(m): dict.fromkeys(qrels, 0.0) for m in measures}
        for metric in ir_measures.iter_calc(measures, qrels, complete):
            values[str(metric.measure)][metric.query_id] = float(metric.value)
        out[method] = values
    return out


def paired_tests(values: Mapping[str, Mapping[str, Mapping[str, float]]], a: str, b: str) -> dict[str, dict]:
    """Per measure: mean of a - b over the same queries, paired t-test and Wilcoxon signed-rank p-values (scipy)."""
    from scipy import stats

    out = {}
    for measure in values[a]:
        qids = sorted(values[a][measure])
        x = [values[a][measure][q] for q in qids]
        y = [values[b][measure][q] for q in qids]
        diffs = [i - j for i, j in zip(x, y)]
        if not any(diffs):  # identical rankings: no evidence either way, and scipy would divide by zero
            t_p = w_p = 1.0
        else:
            t_p = float(stats.ttest_rel(x, y).pvalue)
            w_p = float(stats.wilcoxon(x, y, zero_method="wilcox").pvalue) if sum(d != 0 for d in diffs) else 1.0
        out[measure] = {"a": a, "b": b, "mean_a": sum(x) / len(x), "mean_b": sum(y) / len(y),
                        "mean_diff": sum(diffs) / len(diffs), "queries": len(qids), "wins": sum(d > 0 for d in diffs),
                        "losses": sum(d < 0 for d in diffs), "ttest_p": t_p, "wilcoxon_p": w_p}
    return out


def quality_report(pipeline: Pipeline, queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                   params: SearchParams, methods: Sequence[Method] | None = None,
                   significance: Sequence[tuple[str, str]] = (), keep_per_query: bool = False) -> dict:
    methods = list(methods) if methods else [Method(m, m) for m in METHODS]
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"methods: duplicate names in {names}")
    for a, b in significance:
        for name in (a, b):
            if name not in names:
                raise ValueError(f"significance: {name!r} is not a method of this run ({', '.join(names)})")
    judged_queries = {q: queries[q] for q in qrels if q in queries}
    if not judged_queries:
        raise ValueError("no query in the queries file has judgments in the qrels file")
    judged_qrels = {q: qrels[q] for q in judged_queries}
    started = time.perf_counter()
    first = [m for m in methods if m.kind in FIRST_STAGE]
    runs = {}
    if first:
        candidates = collect_candidates(pipeline, judged_queries, params)
        by_kind = method_runs(chunk_doc_ids(pipeline), candidates, params, {m.kind for m in first})
        runs.update({m.name: by_kind[m.kind] for m in first})
    full = [m for m in methods if m.kind == "pipeline"]
    if full:
        vectors = dict(zip(judged_queries, pipeline.encoder.encode_queries(list(judged_queries.values()))))
        runs.update(pipeline_runs(pipeline, judged_queries, vectors, params, full))
    runs = {name: runs[name] for name in names}
    table = evaluate(runs, judged_qrels)
    report = {
        "index": pipeline.index.name, "index_version": pipeline.version, "queries": len(judged_queries),
        "params": {"depth": params.depth, "fusion": params.fusion, "dense_weight": params.dense_weight,
                   "rrf_k": params.rrf_k},
        "methods": {m.name: {"kind": m.kind, **({"overrides": m.overrides} if m.overrides else {})} for m in methods},
        "encoder": getattr(pipeline.encoder, "name", type(pipeline.encoder).__name__),
        "seconds": round(time.perf_counter() - started, 2), "results": table,
    }
    if significance or keep_per_query:
        values = per_query(runs, judged_qrels)
        if significance:
            report["significance"] = [paired_tests(values, a, b) for a, b in significance]
        if keep_per_query:
            report["per_query"] = values
    return report


def format_table(report: dict) -> str:
    measures = [str(m) for m in MEASURES]
    width = max([8, *(len(m) for m in report["results"])])
    lines = [f"{'method':<{width}} " + " ".join(f"{m:>9}" for m in measures)]
    for method, row in report["results"].items():
        lines.append(f"{method:<{width}} " + " ".join(f"{row[m]:>9.4f}" for m in measures))
    for test in report.get("significance", []):
        for measure, t in test.items():
            lines.append(f"{t['a']} vs {t['b']} {measure}: {t['mean_a']:.4f} vs {t['mean_b']:.4f} "
                         f"(diff {t['mean_diff']:+.4f}, {t['wins']} wins / {t['losses']} losses of {t['queries']}), "
                         f"paired t-test p={t['ttest_p']:.3g}, Wilcoxon p={t['wilcoxon_p']:.3g}")
    return "\n".join(lines)
