"""`rag-bench`: retrieval quality (and, with later issues, latency under load and peer comparisons)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Measure rag-service."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@main.command()
@click.option("--index", "index_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--queries", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="BEIR queries.jsonl or one query per line.")
@click.option("--qrels", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="BEIR qrels TSV (query-id, corpus-id, score).")
@click.option("--depth", type=int, help="Candidates per retriever [default: the server default].")
@click.option("--fusion", type=click.Choice(["rrf", "weighted"]), help="[default: the server default]")
@click.option("--dense-weight", type=float, help="[default: the server default]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here.")
def quality(index_path, queries, qrels, depth, fusion, dense_weight, json_out) -> None:
    """nDCG@10, recall@100 and MRR@10 per method (BM25, dense, fused) on judged queries."""
    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.bench.quality import format_table, quality_report
    from rag_service.config import SearchDefaults
    from rag_service.encode import Encoder
    from rag_service.index.load import load_index
    from rag_service.pipeline import Pipeline, SearchParams

    defaults = SearchDefaults()
    params = SearchParams(query="", top_k=defaults.top_k, depth=depth or defaults.depth,
                          fusion=fusion or defaults.fusion,
                          dense_weight=defaults.dense_weight if dense_weight is None else dense_weight,
                          rrf_k=defaults.rrf_k)
    pipeline = Pipeline(load_index(index_path), Encoder())
    report = quality_report(pipeline, load_queries(queries), load_qrels(qrels), params)
    click.echo(f"index {report['index']} ({report['index_version']}), {report['queries']} judged queries, "
               f"depth {params.depth}, fusion {params.fusion}, dense_weight {params.dense_weight}")
    click.echo(format_table(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
