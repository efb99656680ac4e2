"""rag-index: build, inspect and verify indexes.

    rag-index build --input corpus.jsonl --output indexes/scifact
    rag-index info indexes/scifact
    rag-index verify indexes/scifact
    rag-index build --input corpus.jsonl --output indexes/scifact-3 --shards 3
    rag-index shard indexes/scifact indexes/scifact-3 --shards 3
    rag-index add indexes/scifact --input new_docs.jsonl
    rag-index delete indexes/scifact --id doc-17 --id doc-18
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from rag_service.core.errors import RagError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _fail(e: Exception) -> click.ClickException:
    # One line, no traceback: these errors already name the file or setting at fault.
    return click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log each stage.")
def cli(verbose: bool) -> None:
    """Build, inspect and verify rag-service indexes."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if verbose:  # only ours: faiss and sentence-transformers are chatty at INFO
        logging.getLogger("rag_service").setLevel(logging.INFO)


@cli.command()
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="BEIR corpus.jsonl, or a folder of .txt/.md files.")
@click.option("--output", "output", required=True, type=click.Path(path_type=Path),
              help="Index root: versions go to OUTPUT/v-<version>, OUTPUT/CURRENT points to the newest.")
@click.option("--name", default=None, help="Index name (default: the output folder's name).")
@click.option("--chunk-tokens", type=int, default=256, show_default=True, help="Model tokens per chunk.")
@click.option("--chunk-overlap", type=int, default=64, show_default=True, help="Tokens shared by neighbouring chunks.")
@click.option("--k1", type=float, default=0.9, show_default=True, help="BM25 term-frequency saturation.")
@click.option("--b", "b", type=float, default=0.4, show_default=True, help="BM25 length normalisation.")
@click.option("--idf", type=click.Choice(["lucene", "okapi"]), default="lucene", show_default=True)
@click.option("--dense-index", type=click.Choice(["auto", "flat", "hnsw"]), default="auto", show_default=True,
              help="auto: exact search below --hnsw-threshold chunks, HNSW above.")
@click.option("--hnsw-threshold", type=int, default=None, help="Chunk count from which auto picks HNSW.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Encoder batch size.")
@click.option("--model", "model", type=click.Path(path_type=Path), default=None,
              help="sentence-transformers model folder (default: the packaged all-MiniLM-L6-v2).")
@click.option("--device", default=None, help="Encoder device (default: cuda if available, else cpu).")
@click.option("--keep", type=int, default=3, show_default=True, help="Versions to keep (CURRENT is always kept).")
@click.option("--window-sentences", type=int, default=2, show_default=True,
              help="Sentences per reranker window (0: no windows, rerank off for this index).")
@click.option("--document-encoder", type=click.Choice(["auto", "torch", "torch-bf16", "onnx-fp32", "onnx-int8"]),
              default="auto", show_default=True,
              help="Encoder of the chunk vectors (auto: torch on CUDA, torch-bf16 on a CPU with AMX, else ONNX int8).")
@click.option("--window-pooling", type=click.Choice(["chunk", "encode"]), default="chunk", show_default=True,
              help="Reranker window vectors: pooled from the chunk pass's token vectors (chunk), or each window's "
                   "text encoded in a second pass (encode, slower).")
@click.option("--dense-codes", type=click.Choice(["auto", "none", "sq8", "binary"]), default="auto",
              show_default=True,
              help="Quantized codes of the chunk vectors, candidates rescored exactly with the float vectors: a flat "
                   "index scans them instead of the floats; an HNSW index scans its sq8 codes for filtered searches. "
                   "auto: sq8 for an HNSW index, none for a flat one.")
@click.option("--metadata-schema", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON object of metadata field -> type (keyword, keyword_list, integer, float, date, boolean); "
                   "fields it does not name get the type their values fit.")
@click.option("--tenant-key", default=None, metavar="FIELD",
              help="A keyword metadata field holding each document's tenant: every request then names its tenant "
                   "(or uses a token scoped to one) and searches that tenant's passages only.")
@click.option("--no-onnx", is_flag=True, help="Do not export the ONNX query encoders into the index.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Split into N shards with the whole corpus' statistics: OUTPUT/shard-<i> (each a normal index) and "
                   "OUTPUT/router (for rag-serve --shards).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Chunk and encode on a Ray cluster (Ray Data): a local one without ADDRESS, else auto, HOST:PORT or "
                   "ray://HOST:PORT. Same index, byte for byte. Needs pip install 'rag-service[ray]'.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None,
              help="Ray encoder actors / chunking tasks at once (default: the cluster's CPUs, or GPUs).")
@click.option("--ray-cpus-per-worker", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--ray-gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPUs per Ray encoder actor (with --document-encoder torch).")
def build(input_path: Path, output: Path, name: str | None, chunk_tokens: int, chunk_overlap: int, k1: float,
          b: float, idf: str, dense_index: str, hnsw_threshold: int | None, batch_size: int, model: Path | None,
          device: str | None, keep: int, window_sentences: int, document_encoder: str, window_pooling: str,
          dense_codes: str, metadata_schema: Path | None, tenant_key: str | None,
          no_onnx: bool, no_progress: bool, shards: int | None, ray_address: str | None, ray_workers: int | None,
          ray_cpus_per_worker: int, ray_gpus_per_worker: float) -> None:
    """Build an index and publish it atomically."""
    import functools

    from rag_service.index.build import BuildConfig, build_index
    from rag_service.index.metadata import read_schema_file

    extra: dict[str, Any] = {} if hnsw_threshold is None else {"hnsw_threshold": hnsw_threshold}
    if metadata_schema is not None:
        try:
            extra["metadata_schema"] = read_schema_file(metadata_schema)
        except RagError as e:
            raise _fail(e) from None
    config = BuildConfig(chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, k1=k1, b=b, idf=idf,
                         dense_index=dense_index, batch_size=batch_size, name=name, keep=keep,
                         window_sentences=window_sentences, document_encoder=document_encoder,
                         window_pooling=window_pooling, dense_codes=dense_codes, export_onnx=not no_onnx,
                         tenant_key=tenant_key, **extra)
    try:
        config.validate()  # before the model loads: a typo should fail in milliseconds
        if ray_address is not None:
            from rag_service.index.ray_build import RayOptions, build_index_on_ray, import_ray

            ray_options = RayOptions(address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus_per_worker,
                                     gpus_per_worker=ray_gpus_per_worker)
            ray_options.validate()
            import_ray()
            # Every build below (whole, or before sharding) runs its chunking and encoding on the cluster.
            build_index = functools.partial(build_index_on_ray, options=ray_options)
        from rag_service.encoder.encode import Encoder

        encoder = Encoder(str(model) if model is not None else None, device=device)
        # A model folder made by `rag-index tune` carries the fusion and rerank settings refit with it; the manifest
        # takes them, so the server uses them for requests that leave them unset.
        tuning = _model_tuning(model) if model is not None else None
        if tuning is not None:
            build_index = functools.partial(build_index, extra_manifest={"tuned": tuning})
        if shards is not None:
            # The whole index first, then sliced (shard/split.py): every statistic stays the corpus'.
            import shutil

            whole = output / f".unsharded-{os.getpid()}"
            try:
                built = build_index(input_path, whole, dataclasses.replace(config, keep=1, name=config.name or
                                                                           output.name),
                                    encoder=encoder, progress=not no_progress)
                _split(built, output, shards, keep)
            finally:
                shutil.rmtree(whole, ignore_errors=True)
            return
        version_dir = build_index(input_path, output, config, encoder=encoder, progress=not no_progress)
    except (RagError, FileNotFoundError, ValueError) as e:
        raise _fail(e) from None
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    _print_summary(version_dir, manifest)


def _model_tuning(model: Path) -> dict[str, Any] | None:
    """The refit settings of a tuned model folder, checked (the rerank model against its checksum) before a build
    copies them into a manifest."""
    from rag_service.index.tune import read_tuning
    from rag_service.search.rerank import ModelError, RerankModel

    tuning = read_tuning(model)
    if tuning is not None:
        try:
            RerankModel.from_json(json.dumps(tuning.get("rerank_model")), f"{model}/rag_tuning.json rerank_model")
        except ModelError as e:
            raise ValueError(str(e)) from None
    return tuning


def _split(source: Path, output: Path, shards: int, keep: int) -> None:
    from rag_service.shard.split import split_index

    result = split_index(source, output, shards, keep=keep)
    for i, version_dir in enumerate(result.shards):
        manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
        click.echo(f"shard {i}    {version_dir}  ({manifest['counts']['documents']} documents, "
                   f"{manifest['counts']['chunks']} chunks)")
    click.echo(f"router     {result.router}  (shard set {result.set_id}, statistics {result.stats_sha256[:16]})")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--shards", type=click.IntRange(min=1), required=True, help="Number of shards.")
@click.option("--keep", type=int, default=3, show_default=True, help="Versions to keep per shard.")
def shard(source: Path, output: Path, shards: int, keep: int) -> None:
    """Split a built index into N shards (as build --shards does, without rebuilding): OUTPUT/shard-<i>,
    OUTPUT/router."""
    try:
        _split(source, output, shards, keep)
    except RagError as e:
        raise _fail(e) from None


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _print_summary(version_dir: Path, manifest: dict[str, Any]) -> None:
    counts = manifest["counts"]
    params = manifest["params"]
    model = manifest["model"]
    click.echo(f"index      {manifest['name']}  version {manifest['version']}")
    click.echo(f"path       {version_dir}")
    click.echo(f"created    {manifest['created_at']}  (build {manifest.get('build_seconds', 0):.1f}s)")
    click.echo(f"documents  {counts['documents']}  chunks {counts['chunks']}  vocabulary {counts['vocabulary']}  "
               f"postings {counts['postings']}")
    click.echo(f"model      {model['name']} (dim {model['dim']}, max_seq_length {model['max_seq_length']})")
    click.echo(f"chunks     {params['chunk_tokens']} tokens (effective {params.get('effective_chunk_tokens')}), "
               f"overlap {params['chunk_overlap']}")
    click.echo(f"bm25       k1 {params['k1']}  b {params['b']}  idf {params['idf']}  "
               f"analyzer {manifest['analyzer']}")
    click.echo(f"dense      {params['dense_index']}")
    schema = manifest.get("metadata_schema") or dict.fromkeys(manifest.get("metadata_fields", []), "keyword")
    click.echo(f"metadata   {', '.join(f'{name} ({kind})' for name, kind in schema.items()) or '(none)'}")
    if manifest.get("tenant_key"):
        click.echo(f"tenant key {manifest['tenant_key']}  (requests search one tenant's passages)")
    click.echo(f"size       {_human_bytes(_dir_bytes(version_dir))} in {len(manifest['files']) + 1} files")
    tuned = manifest.get("tuned")
    if tuned:
        search = tuned.get("search", {})
        click.echo(f"tuned      fusion {search.get('fusion')} depth {search.get('depth')} dense_weight "
                   f"{search.get('dense_weight')}, rerank model {tuned.get('rerank_model', {}).get('sha256', '')[:16]} "
                   "(from the model folder's rag_tuning.json)")
    timings = manifest.get("timings")
    if timings:
        click.echo("timings    " + "  ".join(f"{k} {v}" for k, v in timings.items()))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
def info(directory: Path) -> None:
    """Print the manifest summary of an index (root or version directory)."""
    from rag_service.index.load import resolve_version_dir
    from rag_service.index.manifest import read_manifest
    from rag_service.index.publish import current_version_dir, version_dirs

    try:
        version_dir = resolve_version_dir(directory)
        manifest = read_manifest(version_dir)
    except RagError as e:
        raise _fail(e) from None
    _print_summary(version_dir, manifest)
    if (directory / "CURRENT").is_symlink():
        current = current_version_dir(directory)
        names = sorted(p.name for p in version_dirs(directory))
        click.echo("versions   " + "  ".join(f"{n}{' (CURRENT)' if current and current.name == n else ''}"
                                            for n in names))


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
def verify(directory: Path) -> None:
    """Check every file of an index against its manifest checksums; exit 1 on the first problem."""
    from rag_service.index.load import resolve_version_dir
    from rag_service.index.manifest import verify as verify_dir

    started = time.perf_counter()
    try:
        version_dir = resolve_version_dir(directory)
        manifest = verify_dir(version_dir)
    except RagError as e:
        raise _fail(e) from None
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    click.echo(f"OK {version_dir}: {len(manifest['files'])} files, {_human_bytes(total)} verified in "
               f"{time.perf_counter() - started:.2f}s")


@cli.command()
@click.argument("root", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.argument("name")
@click.argument("target", required=False)
@click.option("--delete", is_flag=True, help="Remove alias NAME instead.")
def alias(root: Path, name: str, target: str | None, delete: bool) -> None:
    """Point alias NAME at collection TARGET (a folder of index root ROOT), or remove it with --delete.

    Persisted in ROOT/aliases.json, which `rag-serve --index-root ROOT` reads at start and on SIGHUP; a running
    server's SetAlias admin RPC changes it at once. Requests that name the alias follow it."""
    from rag_service.api.collections import check_name, is_index_dir, read_aliases, update_aliases

    try:
        check_name(name, "NAME")
        if delete and target is not None:
            raise click.UsageError("give TARGET to set the alias, or --delete to remove it, not both")
        if (root / name).exists():
            raise click.ClickException(f"{root / name} exists: an alias needs a name no collection has")
        aliases = read_aliases(root)
        if delete:
            if name not in aliases:
                raise click.ClickException(f"{root}: no alias named {name!r}")
            update_aliases(root, lambda a: a.pop(name, None))
            click.echo(f"alias {name} removed (it named {aliases[name]})")
            return
        if target is None:
            raise click.UsageError("give TARGET to set the alias, or --delete to remove it")
        check_name(target, "TARGET")
        if target in aliases:
            raise click.ClickException(f"{target!r} is an alias (of {aliases[target]!r}); name the collection")
        if not is_index_dir(root / target):
            raise click.ClickException(f"{root / target} is not an index (no CURRENT, no manifest.json)")
        update_aliases(root, lambda a: a.__setitem__(name, target))
    except RagError as e:
        raise _fail(e) from None
    previous = aliases.get(name)
    click.echo(f"alias {name} -> {target}" + (f" (was {previous})" if previous else ""))


def _update(directory: Path, model: Path | None, device: str | None, keep: int | None, no_progress: bool,
            **change) -> None:
    from rag_service.encoder.encode import Encoder
    from rag_service.index.update import update_index

    try:
        encoder = Encoder(str(model) if model is not None else None, device=device)
        result = update_index(directory, encoder=encoder, keep=keep, progress=not no_progress, **change)
    except (RagError, FileNotFoundError) as e:
        raise _fail(e) from None
    click.echo(f"published  {result.version_dir}  (from {result.base_version})")
    click.echo(f"documents  {result.documents}: {result.added} added, {result.replaced} replaced, "
               f"{result.deleted} deleted")
    click.echo(f"encoded    {result.encoded} new texts, reused {result.reused} embeddings")
    click.echo("serving    send SIGHUP to rag-serve, or call ReloadIndex, to serve it")


_update_options = [
    click.option("--model", "model", type=click.Path(path_type=Path), default=None,
                 help="sentence-transformers model folder (must be the index's model; default: the packaged one)."),
    click.option("--device", default=None, help="Encoder device (default: cuda if available, else cpu)."),
    click.option("--keep", type=int, default=None, help="Versions to keep (default: as the index was built)."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def _with_update_options(command):
    for option in reversed(_update_options):
        command = option(command)
    return command


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="BEIR corpus.jsonl, or a folder of .txt/.md files: documents to add (an existing id is replaced).")
@_with_update_options
def add(directory: Path, input_path: Path, model: Path | None, device: str | None, keep: int | None,
        no_progress: bool) -> None:
    """Add (or replace) documents and publish a new version; only new text is encoded."""
    from rag_service.index.build import read_corpus

    try:
        docs, _ = read_corpus(input_path)
    except RagError as e:
        raise _fail(e) from None
    _update(directory, model, device, keep, no_progress, add=docs)


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--id", "ids", multiple=True, help="Document id to delete (repeatable).")
@click.option("--ids-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File with one document id per line.")
@_with_update_options
def delete(directory: Path, ids: tuple[str, ...], ids_file: Path | None, model: Path | None, device: str | None,
           keep: int | None, no_progress: bool) -> None:
    """Delete documents by id and publish a new version."""
    wanted = list(ids)
    if ids_file is not None:
        try:
            wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise click.ClickException(f"{ids_file}: cannot read: {e.strerror or e}") from None
    if not wanted:
        raise click.UsageError("give --id ID (repeatable) or --ids-file FILE")
    _update(directory, model, device, keep, no_progress, delete=list(dict.fromkeys(wanted)))


def _beir_qrels(directory: Path) -> Path:
    """The qrels a --check data set is scored on: qrels/test.tsv, else its only qrels file."""
    qrels_dir = directory / "qrels"
    if (qrels_dir / "test.tsv").is_file():
        return qrels_dir / "test.tsv"
    found = sorted(qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if len(found) != 1:
        raise click.ClickException(f"{directory}: --check needs qrels/test.tsv or exactly one qrels/*.tsv "
                                   f"(found {len(found)})")
    return found[0]


def _tune_index(corpus: Path, root: Path, model: str | None, progress: bool, reuse: bool = True) -> Path:
    """An index of `corpus` built with `model` under `root` with the build's defaults; with `reuse`, the one already
    there (a resumed run's)."""
    from rag_service.encoder.encode import Encoder
    from rag_service.index.build import BuildConfig, build_index
    from rag_service.index.load import resolve_version_dir

    if reuse:
        try:
            return resolve_version_dir(root)
        except RagError:
            pass
    return build_index(corpus, root, BuildConfig(keep=1), encoder=Encoder(model, device="cpu"), progress=progress)


def _pipeline(index_dir: Path, model: str | None, tuning: dict[str, Any] | None = None) -> Any:
    from rag_service.encoder.encode import Encoder
    from rag_service.index.load import load_index
    from rag_service.search.pipeline import Pipeline
    from rag_service.search.rerank import RerankModel

    rerank = RerankModel.from_json(json.dumps(tuning["rerank_model"]), "tuned rerank model") if tuning else None
    return Pipeline(load_index(index_dir, verify_checksums=False), Encoder(model, device="cpu"), rerank_model=rerank)


def _tuned_params(tuning: dict[str, Any] | None) -> Any:
    from rag_service.core.params import SearchParams

    if not tuning:
        return SearchParams(query="")
    search = tuning["search"]
    return SearchParams(query="", fusion=search["fusion"], dense_weight=float(search["dense_weight"]),
                        depth=int(search["depth"]))


@cli.command()
@click.option("--queries", "queries_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="BEIR queries.jsonl.")
@click.option("--qrels", "qrels_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="BEIR qrels TSV of the queries to learn from (e.g. qrels/train.tsv; never the test split).")
@click.option("--corpus", required=True, type=click.Path(path_type=Path),
              help="BEIR corpus.jsonl (or a folder of .txt/.md files), as given to rag-index build.")
@click.option("--output", required=True, type=click.Path(path_type=Path),
              help="Model folder to write: the tuned sentence-transformers model, its ONNX exports (onnx/) and the "
                   f"refit search settings ({'rag_tuning.json'}).")
@click.option("--base-model", type=click.Path(path_type=Path), default=None,
              help="sentence-transformers model folder to start from (default: the packaged all-MiniLM-L6-v2).")
@click.option("--index", "stock_index", type=click.Path(path_type=Path), default=None,
              help="An index of the same corpus built with the base model, to mine from (default: build one).")
@click.option("--held-out", type=click.FloatRange(0.0, 0.9), default=0.15, show_default=True,
              help="Share of the judged queries held out (seeded) for early stopping, the refit and the report.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-4, show_default=True)
@click.option("--negatives", type=click.IntRange(min=0), default=1, show_default=True,
              help="Mined hard negatives per (query, positive) pair.")
@click.option("--mine-depth", type=click.IntRange(min=1), default=30, show_default=True,
              help="Top ranks of BM25 and of the base model that hard negatives are drawn from.")
@click.option("--loss", type=click.Choice(["mnrl", "cached-mnrl"]), default="mnrl", show_default=True,
              help="MultipleNegativesRankingLoss, or its cached variant (larger batches in bounded memory).")
@click.option("--max-seq-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Tokens per training text (the served model keeps its own length).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads (default: torch's).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Optimizer steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--no-refit", is_flag=True, help="Keep the shipped fusion and rerank settings.")
@click.option("--check", "checks", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="Another BEIR data set (corpus.jsonl, queries.jsonl, qrels/): print base vs tuned nDCG@10 there, "
                   "a domain shift check (repeatable).")
@click.option("--index-output", type=click.Path(path_type=Path), default=None,
              help="Also publish the index of --corpus built with the tuned model (the one the refit ran on) here, "
                   "with the refit settings in its manifest: what rag-index build --model OUTPUT would write, "
                   "without encoding the corpus again.")
@click.option("--keep-work", is_flag=True, help="Keep the work folder (checkpoints, temporary indexes).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def tune(queries_path: Path, qrels_path: Path, corpus: Path, output: Path, base_model: Path | None,
         stock_index: Path | None, held_out: float, epochs: int, batch_size: int, learning_rate: float,
         negatives: int, mine_depth: int, loss: str, max_seq_length: int, seed: int, threads: int | None,
         checkpoint_every: int, resume: bool, no_refit: bool, checks: tuple[Path, ...], index_output: Path | None,
         keep_work: bool, no_progress: bool) -> None:
    """Fine-tune the encoder on judged queries and refit fusion and rerank settings on a held-out share of them.

    The work folder (checkpoints, the temporary indexes) is OUTPUT's sibling .OUTPUT-NAME.work; it is removed when
    the run ends well, unless --keep-work."""
    import shutil

    from rag_service.bench.data import load_qrels, load_queries
    from rag_service.encoder import onnx_export
    from rag_service.encoder.encode import Encoder, default_model_path
    from rag_service.index import tune as tune_mod
    from rag_service.search.fit import evaluate, refit
    from rag_service.search.rerank import RerankModel

    config = tune_mod.TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                  negatives=negatives, mine_depth=mine_depth, loss=loss,
                                  max_seq_length=max_seq_length, seed=seed, threads=threads,
                                  checkpoint_every=checkpoint_every)
    progress = not no_progress
    started = time.perf_counter()
    try:
        config.validate()
        queries = load_queries(queries_path)
        qrels = load_qrels(qrels_path)
        for check in checks:
            for needed in (check / "corpus.jsonl", check / "queries.jsonl"):
                if not needed.is_file():
                    raise click.ClickException(f"--check {check}: no {needed.name}")
            _beir_qrels(check)
        judged = [q for q, rel in qrels.items() if q in queries and any(g > 0 for g in rel.values())]
        if len(judged) < 2:
            raise click.ClickException(f"--qrels {qrels_path}: {len(judged)} judged queries found in --queries; "
                                       "tuning needs at least 2")
        base = str(base_model) if base_model is not None else default_model_path()
        if output.resolve() == Path(base).resolve():
            raise click.ClickException("--output must differ from the base model folder")
        work = output.parent / f".{output.name}.work"
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        if output.exists() and any(output.iterdir()) and not resume:
            raise click.ClickException(f"--output {output}: exists and is not empty (remove it, or --resume)")
        output.mkdir(parents=True, exist_ok=True)
        train_q, held_q = tune_mod.split_queries(judged, held_out, seed)
        click.echo(f"queries    {len(judged)} judged: {len(train_q)} train, {len(held_q)} held out (seed {seed})")

        stock_dir = _tune_index(corpus, work / "base-index", base, progress) if stock_index is None \
            else stock_index
        from rag_service.index.load import load_index

        stock = load_index(stock_dir, verify_checksums=False)
        base_encoder = Encoder(base, device="cpu")
        if stock.model["name"] != base_encoder.name:
            raise click.ClickException(f"--index {stock_dir}: built with {stock.model['name']!r}, the base model is "
                                       f"{base_encoder.name!r}")
        mined = time.perf_counter()
        examples = tune_mod.mine(stock, base_encoder.encode_queries, queries, qrels, train_q, negatives, mine_depth,
                                 seed)
        held_examples = tune_mod.mine(stock, base_encoder.encode_queries, queries, qrels, held_q, negatives,
                                      mine_depth, seed)
        click.echo(f"mined      {len(examples)} train and {len(held_examples)} held-out examples "
                   f"({negatives} hard negatives each) in {time.perf_counter() - mined:.1f}s")
        result = tune_mod.train(base, examples, held_examples, output, work, config, resume=resume,
                                progress=progress)
        history = "  ".join(f"{h['epoch']}: {h['held_out_loss']:.4f}" for h in result.history)
        click.echo(f"trained    {result.steps} steps in {result.seconds:.1f}s; held-out loss by epoch {history}; "
                   f"kept epoch {result.best_epoch}")
        exported = onnx_export.export_encoder(_fresh(output / "onnx"), str(output))
        click.echo(f"exported   {exported.directory} (fp32 + int8) in {exported.seconds:.1f}s")

        # The work folder is emptied unless resuming, so what is there was built by this run; --index-output may
        # hold an older index (built with an earlier tune of the same name), reused only when resuming.
        tuned_dir = _tune_index(corpus, index_output or work / "tuned-index", str(output), progress,
                                reuse=index_output is None or resume)
        shipped = RerankModel.load()
        held_queries = {q: queries[q] for q in held_q}
        report: dict[str, Any] = {"queries": {"train": len(train_q), "held_out": len(held_q), "seed": seed},
                                  "train": {**dataclasses.asdict(config), "steps": result.steps,
                                            "seconds": round(result.seconds, 1), "history": result.history,
                                            "best_epoch": result.best_epoch}}
        tuning: dict[str, Any] | None = None
        if held_queries:
            tuned_pipeline = _pipeline(tuned_dir, str(output))
            if not no_refit:
                fitted = refit(tuned_pipeline, held_queries, qrels, shipped, seed=seed,
                               source=f"{len(held_q)} held-out queries of {qrels_path.name}")
                tuning = {**fitted.to_json(), "base_model": base_encoder.name}
                (output / tune_mod.TUNING_FILE).write_text(json.dumps(tuning, indent=2) + "\n", encoding="utf-8")
                click.echo(f"refit      fusion depth {tuning['search']['depth']} dense_weight "
                           f"{tuning['search']['dense_weight']}; rerank "
                           f"{'refit' if fitted.figures['rerank_kept'] else 'shipped (refit did not cross-validate)'}"
                           f"; figures on the held-out queries {json.dumps(fitted.figures)}")
            before = evaluate(_pipeline(stock_dir, base), held_queries, qrels, _tuned_params(None))
            after_shipped = evaluate(tuned_pipeline, held_queries, qrels, _tuned_params(None))
            after = evaluate(_pipeline(tuned_dir, str(output), tuning), held_queries, qrels, _tuned_params(tuning))
            report["held_out"] = {"base": before, "tuned_shipped_settings": after_shipped, "tuned": after}
            click.echo(f"held out   nDCG@10 over {len(held_q)} queries: dense {before['dense']:.4f} -> "
                       f"{after['dense']:.4f}; full pipeline {before['full']:.4f} -> {after_shipped['full']:.4f} "
                       f"(shipped settings) / {after['full']:.4f} (refit settings, fitted on these queries)")
        if index_output is not None and tuning is not None:
            published = tune_mod.publish_with_tuning(index_output, tuning)
            click.echo(f"index      {published} (built with the tuned model, refit settings in its manifest)")
        for check in checks:
            check_queries = load_queries(check / "queries.jsonl")
            check_qrels = load_qrels(_beir_qrels(check))
            b_dir = _tune_index(check / "corpus.jsonl", work / f"check-{check.name}-base", base, progress)
            t_dir = _tune_index(check / "corpus.jsonl", work / f"check-{check.name}-tuned", str(output), progress)
            b = evaluate(_pipeline(b_dir, base), check_queries, check_qrels, _tuned_params(None))
            t = evaluate(_pipeline(t_dir, str(output), tuning), check_queries, check_qrels, _tuned_params(tuning))
            report.setdefault("checks", {})[str(check)] = {"base": b, "tuned": t}
            click.echo(f"check      {check.name} ({int(b['queries'])} queries): dense {b['dense']:.4f} -> "
                       f"{t['dense']:.4f} ({100 * (t['dense'] - b['dense']):+.1f} points); full "
                       f"{b['full']:.4f} -> {t['full']:.4f} ({100 * (t['full'] - b['full']):+.1f} points)")
        report["seconds"] = round(time.perf_counter() - started, 1)
        (output / "tune_report.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n",
                                                 encoding="utf-8")
    except (RagError, FileNotFoundError, ValueError) as e:
        raise _fail(e) from None
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    click.echo(f"model      {output}  ({time.perf_counter() - started:.0f}s); build with: rag-index build --input "
               f"{corpus} --output indexes/NAME --model {output}")


def _json_safe(value: Any) -> Any:
    """NaN (no training loss before the first epoch, no held-out loss without held-out queries) as null: strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _fresh(directory: Path) -> Path:
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


def main(argv: list[str] | None = None) -> None:
    # Models come from installed packages only; must be set before sentence-transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="rag-index")


if __name__ == "__main__":
    main()
