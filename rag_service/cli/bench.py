"""`rag-bench`: retrieval quality, latency under open-loop load, and rag-service beside its peers.

    rag-bench quality --dataset scifact=/tmp/idx/scifact:../shared/data/scifact --significance fused,bm25
    rag-bench latency --index /tmp/idx/scifact --queries ../shared/data/scifact/queries.jsonl --qps 5,10,20
    rag-bench compare --index /tmp/idx/scifact --data ../shared/data/scifact
    rag-bench batch --index /tmp/idx/scifact --data ../shared/data/scifact --sizes 1,8,32,128
    rag-bench scale --sizes 10000,100000

Heavy imports (torch, the peers) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from rag_service.encoder.encode import QueryEncoder

_PATH = click.Path(exists=True, path_type=Path)
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Measure rag-service."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {path}")


def _publish(report: dict, table: str, json_out: Path | None, plot_dir: Path | None, plot: str) -> None:
    """Prints the table, writes the JSON and, when asked, the figures (`plot` names a function of bench.plots;
    matplotlib is imported only then)."""
    click.echo(table)
    _write_json(json_out, report)
    if plot_dir is not None:
        from rag_service.bench import plots

        for path in getattr(plots, plot)(report, plot_dir):
            click.echo(f"wrote {path}")


_Report = TypeVar("_Report")


def _with_progress(desc: str, unit: str, run: Callable[[Callable[[int, int], None]], _Report]) -> _Report:
    """Runs `run(progress)` under a tqdm bar driven by its (done, total) callbacks; a ValueError (bad input found
    while running) becomes a clean CLI error."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, leave=False, mininterval=1.0)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        return run(update)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    finally:
        bar.close()


def _split_pair(value: str, option: str) -> tuple[str, str]:
    a, sep, b = value.partition(",")
    if not sep or not a.strip() or not b.strip():
        raise click.BadParameter(f"expected two method names as A,B, got {value!r}", param_hint=option)
    return a.strip(), b.strip()


def _rates(value: str) -> list[float]:
    try:
        rates = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint="--qps") from None
    if not rates or any(r <= 0 for r in rates):
        raise click.BadParameter(f"rates must be > 0, got {value!r}", param_hint="--qps")
    return rates


def _dataset(spec: str, split: str) -> tuple[str, Path, Path, Path]:
    """NAME=INDEX:BEIR_DIR -> name, index, queries.jsonl, qrels/<split>.tsv."""
    name, eq, rest = spec.partition("=")
    index_text, colon, beir_text = rest.partition(":")
    if not eq or not colon or not name.strip():
        raise click.BadParameter(f"expected NAME=INDEX:BEIR_DIR, got {spec!r}", param_hint="--dataset")
    index, beir = Path(index_text), Path(beir_text)
    queries, qrels = beir / "queries.jsonl", beir / "qrels" / f"{split}.tsv"
    for path in (index, queries, qrels):
        if not path.exists():
            raise click.BadParameter(f"{spec!r}: {path} does not exist", param_hint="--dataset")
    return name.strip(), index, queries, qrels


def _encoder_kinds() -> tuple[str, ...]:
    """Query encoders the quality command can measure: torch (sentence-transformers) and the fast path's ONNX
    exports (rag_service.encoder.onnx_export.ENCODER_KINDS)."""
    from rag_service.encoder import onnx_export

    return tuple(onnx_export.ENCODER_KINDS)


def _make_encoder(kind: str, index_dir: Path, onnx_dir: Path | None) -> QueryEncoder:
    """No silent fallback: a quality row labelled onnx-int8 must have been encoded by it."""
    from rag_service.encoder import encode, onnx_export

    if kind not in _encoder_kinds():
        raise click.BadParameter(f"unknown encoder {kind!r}; available: {', '.join(_encoder_kinds())}",
                                 param_hint="--encoder")
    if kind == "torch":
        return encode.load_encoder("torch")
    directory = onnx_dir or index_dir
    if not onnx_export.has_export(directory):
        raise click.ClickException(f"{directory} holds no ONNX encoder export for --encoder {kind}: rebuild the "
                                   "index with rag-index build, or pass --onnx-dir with an export")
    return encode.load_encoder(kind, directory)


@main.command()
@click.option("--index", "index_specs", multiple=True, metavar="[NAME=]INDEX",
              help="An index (with --queries and --qrels). Repeat it to compare indexes on the same queries (e.g. "
                   "stock=indexes/a --index tuned=indexes/b): rows are then NAME:METHOD, and --significance may pair "
                   "rows of different indexes (stock:pipeline,tuned:pipeline).")
@click.option("--queries", type=_FILE, help="BEIR queries.jsonl or one query per line.")
@click.option("--qrels", type=_FILE, help="BEIR qrels TSV (query-id, corpus-id, score).")
@click.option("--dataset", "datasets", multiple=True, metavar="NAME=INDEX:BEIR_DIR",
              help="A data set (repeatable): its index and its BEIR folder (queries.jsonl, qrels/<split>.tsv).")
@click.option("--split", default="test", help="qrels split for --dataset.")
@click.option("--method", "methods", multiple=True, metavar="SPEC",
              help="A row (repeatable): bm25, dense, fused (first stage), pipeline (the whole request path with the "
                   "server defaults) or NAME=pipeline:field=value,... with SearchParams fields, e.g. "
                   "norerank=pipeline:rerank=off  [default: bm25, dense, fused]")
@click.option("--significance", "pairs", multiple=True, metavar="A,B",
              help="Paired t-test and Wilcoxon between two methods on per-query values (repeatable).")
@click.option("--encoder", "encoder_kind", default="torch",
              help="Query encoder: torch, onnx-int8, onnx-int8-fused or onnx-fp32 (the ONNX export inside each index, "
                   "or --onnx-dir).")
@click.option("--onnx-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A directory holding an ONNX encoder export, for --encoder onnx-*.")
@click.option("--depth", type=int, help="Candidates per retriever [default: the server default].")
@click.option("--fusion", type=click.Choice(["rrf", "weighted"]), help="[default: the server default]")
@click.option("--dense-weight", type=float, help="[default: the server default]")
@click.option("--per-query", is_flag=True, help="Keep per-query values in the JSON report.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here.")
def quality(index_specs, queries, qrels, datasets, split, methods, pairs, encoder_kind, onnx_dir, depth, fusion,
            dense_weight, per_query, json_out) -> None:
    """nDCG@10, recall@100 and MRR@10 per method on judged queries, on one or several data sets or indexes.

    Each index is searched as rag-serve would search it: with the search defaults and rerank model its manifest
    carries (an index built with a model from rag-index tune), else the shipped ones."""
    indexes = [_index_spec(spec) for spec in index_specs]
    if indexes and not datasets:
        if queries is None or qrels is None:
            raise click.UsageError("--index needs --queries and --qrels")
        if len({name for name, _ in indexes}) != len(indexes):
            raise click.BadParameter("index names must differ (give NAME=INDEX)", param_hint="--index")
        sets = [(name, path, queries, qrels) for name, path in indexes]
    elif datasets and not indexes and queries is None and qrels is None:
        sets = [_dataset(spec, split) for spec in datasets]
        if len({s[0] for s in sets}) != len(sets):
            raise click.BadParameter("data set names must differ", param_hint="--dataset")
    else:
        raise click.UsageError("give either --index with --queries and --qrels, or one or more --dataset")
    significance = [_split_pair(p, "--significance") for p in pairs]
    compare = len(indexes) > 1

    # After the arguments are checked: these import torch.
    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.bench.quality import Method, format_table, paired_tests, parse_method, quality_report
    from rag_service.core.config import SearchDefaults, index_defaults
    from rag_service.core.params import SearchParams
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline

    try:
        rows = [parse_method(m) for m in methods] or None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--method") from error

    defaults = SearchDefaults()
    overrides: dict[str, object] = {"cache": "bypass"}
    if depth:
        overrides["depth"] = depth
    if fusion:
        overrides["fusion"] = fusion
    if dense_weight is not None:
        overrides["dense_weight"] = dense_weight
    reports = {}
    encoders: dict[Path, QueryEncoder] = {}
    for name, index, query_file, qrels_file in sets:
        loaded = load_index(index)
        params = SearchParams.from_defaults("", index_defaults(defaults, loaded.manifest.get("tuned")), **overrides)
        source = Path(onnx_dir or loaded.path) if encoder_kind != "torch" else Path("torch")
        if source not in encoders:
            encoders[source] = _make_encoder(encoder_kind, Path(loaded.path), onnx_dir)
        if encoders[source].name != loaded.model["name"]:
            raise click.ClickException(f"{name}: the index was built with model {loaded.model['name']!r}, the query "
                                       f"encoder is {encoders[source].name!r}; use --encoder onnx-fp32 or onnx-int8 "
                                       "(each index's own export)")
        pipeline = Pipeline(loaded, encoders[source])
        try:
            report = quality_report(pipeline, load_queries(query_file), load_qrels(qrels_file), params,
                                    methods=rows or [Method(m, m) for m in ("bm25", "dense", "fused")],
                                    significance=[] if compare else significance,
                                    keep_per_query=per_query or compare)
        except ValueError as error:
            raise click.ClickException(f"{name}: {error}") from error
        report["encoder_kind"] = encoder_kind
        report["encoder"] = repr(pipeline.encoder)
        click.echo(f"index {report['index']} ({report['index_version']}), {report['queries']} judged queries, "
                   f"depth {params.depth}, fusion {params.fusion}, dense_weight {params.dense_weight}")
        click.echo(format_table(report) + "\n")
        reports[name] = report
    if compare:
        merged = _compare_indexes(reports, significance, paired_tests)
        click.echo(format_table(merged))
        if not per_query:
            for report in reports.values():
                report.pop("per_query", None)
            merged.pop("per_query", None)
        _write_json(json_out, {"tool": "rag-bench quality", "indexes": reports, "comparison": merged})
    elif datasets:
        _write_json(json_out, {"tool": "rag-bench quality", "split": split, "datasets": reports})
    else:
        _write_json(json_out, next(iter(reports.values())))


def _index_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not name or not path or not Path(path).exists():
        raise click.BadParameter(f"expected [NAME=]INDEX with an existing INDEX, got {spec!r}", param_hint="--index")
    return name, Path(path)


def _compare_indexes(reports: dict[str, dict], significance: list[tuple[str, str]], paired_tests) -> dict:
    """One table over several indexes' reports on the same queries: rows NAME:METHOD, and paired tests between any
    two of them."""
    qsets = {name: r["queries"] for name, r in reports.items()}
    if len(set(qsets.values())) != 1:
        raise click.ClickException(f"the indexes were scored on different query counts {qsets}")
    results = {f"{name}:{m}": row for name, r in reports.items() for m, row in r["results"].items()}
    values = {f"{name}:{m}": v for name, r in reports.items() for m, v in r["per_query"].items()}
    tests = []
    for a, b in significance:
        for row in (a, b):
            if row not in values:
                raise click.BadParameter(f"{row!r} is not a row of this run ({', '.join(values)})",
                                         param_hint="--significance")
        tests.append(paired_tests(values, a, b))
    return {"results": results, "significance": tests, "per_query": values}


def _load_query_texts(path: Path, limit: int | None, seed: int) -> list[str]:
    from rag_service.bench.data import load_queries

    texts = list(load_queries(path).values())
    if not texts:
        raise click.BadParameter(f"{path}: no queries", param_hint="--queries")
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit else texts


@main.command()
@click.option("--target", help="A running server (host:port).")
@click.option("--index", "index_path", type=_PATH, help="Or an index: served by a rag-serve child on a free port.")
@click.option("--queries", required=True, type=_FILE, help="BEIR queries.jsonl or one query per line.")
@click.option("--qps", "qps", default="50,100,200", help="Offered rates, requests/s, comma-separated.")
@click.option("--duration", type=float, default=20.0, help="Measured seconds per rate.")
@click.option("--warmup", type=float, default=3.0, help="Seconds sent before measuring, per rate and call kind.")
@click.option("--processes", type=int, default=0, help="Client processes; 0: one per 400 requests/s.")
@click.option("--arrival", type=click.Choice(["constant", "poisson"]), default="constant")
@click.option("--seed", type=int, default=0, help="Query order and Poisson arrivals.")
@click.option("--limit", type=int, help="Use only this many queries (after the seeded shuffle).")
@click.option("--top-k", type=int, default=10)
@click.option("--depth", type=int, help="[default: the server default]")
@click.option("--rerank", type=click.Choice(["server", "on", "off"]), default="server")
@click.option("--cache", type=click.Choice(["bypass", "default", "exact_only", "strict"]), default="bypass",
              help="The requests' cache mode: bypass makes every request do the full work.")
@click.option("--stages/--no-stages", default=True,
              help="Ask for stage_time_us (the server's stage timings, request field profile).")
@click.option("--debug/--no-debug", default=False,
              help="Ask for debug replies: stage timings, and per-context scores and explanations the server builds.")
@click.option("--timeout", type=float, default=10.0, help="Per-request deadline, seconds.")
@click.option("--budget-ms", type=click.IntRange(min=1), default=None,
              help="Latency budget per request for the adaptive pipeline (budget_ms); unset: the deadline's.")
@click.option("--max-lag-ms", type=float, default=5.0, help="Send-lag p99 above this: generator fell behind.")
@click.option("--floor/--no-floor", default=True, help="Also measure the empty call (health Check).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plots", "plot_dir", type=click.Path(file_okay=False, path_type=Path), help="PNG figures here.")
def latency(target, index_path, queries, qps, duration, warmup, processes, arrival, seed, limit, top_k, depth, rerank,
            cache, stages, debug, timeout, budget_ms, max_lag_ms, floor, json_out, plot_dir) -> None:
    """Open-loop latency at fixed arrival rates, beside the empty-call floor."""
    import contextlib

    from rag_service.bench.latency import LatencyConfig, RequestOptions, format_table, run_latency
    from rag_service.bench.serve import ServerProcess

    if (target is None) == (index_path is None):
        raise click.UsageError("give exactly one of --target and --index")
    options = RequestOptions(top_k=top_k, depth=depth, profile=stages, debug=debug, cache=cache,
                             rerank=None if rerank == "server" else rerank == "on", timeout_s=timeout,
                             budget_ms=budget_ms)
    texts = _load_query_texts(queries, limit, seed)
    with contextlib.ExitStack() as stack:
        if index_path is not None:
            click.echo(f"starting rag-serve on {index_path} ...")
            target = stack.enter_context(ServerProcess(index_path)).target
        config = LatencyConfig(target=target, queries=texts, rates=_rates(qps), duration_s=duration,
                               warmup_s=warmup, processes=processes, arrival=arrival, seed=seed,
                               max_lag_ms=max_lag_ms, floor=floor, options=options)
        report = _with_progress("requests", "req", lambda update: run_latency(config, progress=update))
    report["target"] = target if index_path is None else f"rag-serve --index {index_path}"
    click.echo(f"{report['target']}: {len(texts)} queries, {report['processes']} client processes, "
               f"{duration:g} s per rate after {warmup:g} s warm-up, {arrival} arrivals, cache {cache}")
    _publish(report, format_table(report), json_out, plot_dir, "latency_plots")


def _ints(value: str, option: str, least: int = 1) -> list[int]:
    try:
        values = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None
    if not values or any(v < least for v in values):
        raise click.BadParameter(f"values must be >= {least}, got {value!r}", param_hint=option)
    return values


@main.command()
@click.option("--target", help="A running server (host:port).")
@click.option("--index", "index_path", type=_PATH, help="Or an index: served by a rag-serve child on a free port.")
@click.option("--data", "beir", required=True, type=_PATH, help="BEIR folder (queries.jsonl, qrels/).")
@click.option("--split", default="test", help="qrels split: its judged queries are the queries sent.")
@click.option("--sizes", default="1,8,32,128", help="SearchBatch sizes, comma-separated.")
@click.option("--clients", default="1", help="Concurrent callers, comma-separated: each mode runs at each count.")
@click.option("--rounds", type=int, default=3, help="Rounds over every mode, in a rotated order each round.")
@click.option("--limit", type=int, help="Use only this many queries (after the seeded shuffle).")
@click.option("--seed", type=int, default=0, help="Query order.")
@click.option("--top-k", type=int, default=10)
@click.option("--cache", type=click.Choice(["bypass", "default", "exact_only", "strict"]), default="bypass",
              help="The requests' cache mode: bypass makes every query do the full work in every round.")
@click.option("--workers", type=int, help="Pipeline threads of the rag-serve child (--index); default: its own.")
@click.option("--timeout", type=float, default=300.0, help="Per-call deadline, seconds.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
def batch(target, index_path, beir, split, sizes, clients, rounds, limit, seed, top_k, cache, workers, timeout,
          json_out) -> None:
    """Queries per second and per-query latency of SearchBatch calls of several sizes against the same queries
    sent one by one (Search), closed loop, in interleaved rounds."""
    import contextlib

    from rag_service.bench.batch import BatchBenchConfig, format_table, run_batch_bench
    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.bench.serve import ServerProcess

    if (target is None) == (index_path is None):
        raise click.UsageError("give exactly one of --target and --index")
    qrels_path = beir / "qrels" / f"{split}.tsv"
    if not qrels_path.exists():
        raise click.BadParameter(f"{qrels_path} does not exist", param_hint="--split")
    judged = load_qrels(qrels_path)
    texts = [text for qid, text in load_queries(beir / "queries.jsonl").items() if qid in judged]
    if not texts:
        raise click.BadParameter(f"no query of {beir}/queries.jsonl is judged in {qrels_path}", param_hint="--data")
    random.Random(seed).shuffle(texts)
    texts = texts[:limit] if limit else texts
    with contextlib.ExitStack() as stack:
        pid = None
        if index_path is not None:
            click.echo(f"starting rag-serve on {index_path} ...")
            server = stack.enter_context(ServerProcess(index_path, workers=workers))
            target, pid = server.target, server.pid
        config = BatchBenchConfig(target=target, queries=texts, sizes=_ints(sizes, "--sizes"),
                                  clients=_ints(clients, "--clients"), rounds=rounds, top_k=top_k, cache=cache,
                                  timeout_s=timeout, server_pid=pid)
        report = _with_progress("modes", "mode", lambda update: run_batch_bench(config, progress=update))
    report["target"] = target if index_path is None else f"rag-serve --index {index_path}"
    click.echo(f"{report['target']}: {len(texts)} {split} queries of {beir}, {rounds} rounds, top_k {top_k}, "
               f"cache {cache}")
    _publish(report, format_table(report), json_out, None, "")


@main.command()
@click.option("--data", "beir", required=True, type=_PATH, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/).")
@click.option("--split", default="test", help="qrels split: its judged queries are the queries timed.")
@click.option("--index", "index_path", type=_PATH, help="rag-service index of the same corpus (served by a child).")
@click.option("--target", help="Or a running rag-service (host:port) serving the same corpus.")
@click.option("--systems", default="rag-service,ensemble,bm25s,lancedb,lancedb (vector given),same-parts,pgvector,"
              "pgvector (all words)",
              help="Comma-separated subset of the systems.")
@click.option("--limit", type=int, help="Time only this many queries (after the seeded shuffle).")
@click.option("--seed", type=int, default=0)
@click.option("--warmup", type=int, default=20, help="Queries per system before timing.")
@click.option("--k", type=int, default=10, help="Documents per query (nDCG@10).")
@click.option("--rag-top-k", type=int, default=20,
              help="Chunks asked of rag-service; its first k distinct documents are its ranking.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/bench"),
              help="Document embeddings and peer indexes are kept here between runs.")
@click.option("--threads", type=int, default=1,
              help="torch threads in this process and OMP_NUM_THREADS of the served rag-service; 0: defaults.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plots", "plot_dir", type=click.Path(file_okay=False, path_type=Path))
def compare(beir, split, index_path, target, systems, limit, seed, warmup, k, rag_top_k, cache_dir, threads, json_out,
            plot_dir) -> None:
    """rag-service (gRPC) beside a LangChain-style ensemble, bm25s + faiss, LanceDB hybrid, the same parts in process
    and Postgres + pgvector, interleaved."""
    from rag_service.bench.compare import CompareConfig, format_table, run_compare
    from rag_service.bench.data import load_qrels, load_queries

    queries = load_queries(beir / "queries.jsonl")
    qrels_file = beir / "qrels" / f"{split}.tsv"
    qrels = load_qrels(qrels_file) if qrels_file.exists() else None
    qids = [q for q in queries if qrels is None or q in qrels]
    random.Random(seed).shuffle(qids)
    qids = qids[:limit] if limit else qids
    config = CompareConfig(corpus=beir, queries={q: queries[q] for q in qids}, qrels=qrels, index=index_path,
                           target=target, systems=[s.strip() for s in systems.split(",") if s.strip()], k=k,
                           rag_top_k=rag_top_k, warmup=warmup, cache_dir=cache_dir, name=beir.name,
                           threads=threads or None)
    report = _with_progress("queries x systems", "q", lambda update: run_compare(config, progress=update))
    _publish(report, format_table(report), json_out, plot_dir, "compare_plots")


@main.command()
@click.option("--sizes", default="10000,100000,1000000", help="Passages per synthetic corpus, comma-separated.")
@click.option("--systems", default="rag-service,ensemble,bm25s,lancedb,lancedb (vector given)")
@click.option("--queries", "n_queries", type=int, default=200, help="Known-item queries per corpus.")
@click.option("--seed", type=int, default=0)
@click.option("--warmup", type=int, default=10)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/bench"),
              help="Corpora, indexes and peer indexes are kept here and reused.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plots", "plot_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--hnsw-ef-construction", type=click.IntRange(min=1), default=None,
              help="HNSW construction beam of rag-service's index (default: the build's, 200); lower builds faster. "
                   "The index is cached per setting, and recall@10/100 against exact search is reported.")
@click.option("--did-not-fit", "did_not_fit", multiple=True, metavar="SYSTEM=REASON",
              help="Leave SYSTEM out of these sizes and report REASON (a measured one) in its place; repeatable.")
@click.option("--include", "include", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An earlier `rag-bench scale --json` result: its runs of other sizes join this call's table, JSON "
                   "and plot (to add a size to an earlier run without repeating it).")
def scale(sizes, systems, n_queries, seed, warmup, cache_dir, json_out, plot_dir, hnsw_ef_construction,
          did_not_fit, include) -> None:
    """The comparison on synthetic corpora of growing size (hashed document vectors: latency only)."""
    from rag_service.bench.scale import format_table, run_scale

    counts = _ints(sizes, "--sizes", least=10)  # passages
    names = [s.strip() for s in systems.split(",") if s.strip()]
    excluded = {}
    for item in did_not_fit:
        system, sep, reason = item.partition("=")
        if not sep or system.strip() not in names or not reason.strip():
            raise click.BadParameter(f"expected SYSTEM=REASON with SYSTEM one of {', '.join(names)}, got {item!r}",
                                     param_hint="--did-not-fit")
        excluded[system.strip()] = reason.strip()
    earlier = []
    if include is not None:
        try:
            earlier = json.loads(include.read_text())["runs"]
            earlier = [run for run in earlier if int(run["passages"]) not in counts]
        except (ValueError, KeyError, TypeError) as error:
            raise click.BadParameter(f"{include}: not a rag-bench scale result ({error})",
                                     param_hint="--include") from None
    report = _with_progress("queries x systems", "q", lambda update: run_scale(
        counts, cache_dir, systems=names, queries=n_queries, seed=seed, warmup=warmup, progress=update,
        log=click.echo, hnsw_ef_construction=hnsw_ef_construction, excluded=excluded))
    if earlier:
        report["runs"] = sorted(earlier + report["runs"], key=lambda run: run["passages"])
        report["included_from"] = str(include)
    _publish(report, format_table(report), json_out, plot_dir, "scale_plots")


if __name__ == "__main__":
    main()
