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
@click.option("--dense-codes", type=click.Choice(["none", "sq8", "binary"]), default="none", show_default=True,
              help="Quantized codes for the dense first stage, rescored exactly with the float vectors.")
@click.option("--metadata-schema", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON object of metadata field -> type (keyword, keyword_list, integer, float, date, boolean); "
                   "fields it does not name get the type their values fit.")
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
          dense_codes: str, metadata_schema: Path | None,
          no_onnx: bool, no_progress: bool, shards: int | None, ray_address: str | None, ray_workers: int | None,
          ray_cpus_per_worker: int, ray_gpus_per_worker: float) -> None:
    """Build an index and publish it atomically."""
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
                         window_pooling=window_pooling, dense_codes=dense_codes, export_onnx=not no_onnx, **extra)
    try:
        config.validate()  # before the model loads: a typo should fail in milliseconds
        if ray_address is not None:
            import functools

            from rag_service.index.ray_build import RayOptions, build_index_on_ray, import_ray

            ray_options = RayOptions(address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus_per_worker,
                                     gpus_per_worker=ray_gpus_per_worker)
            ray_options.validate()
            import_ray()
            # Every build below (whole, or before sharding) runs its chunking and encoding on the cluster.
            build_index = functools.partial(build_index_on_ray, options=ray_options)
        from rag_service.encoder.encode import Encoder

        encoder = Encoder(str(model) if model is not None else None, device=device)
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
    except (RagError, FileNotFoundError) as e:
        raise _fail(e) from None
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    _print_summary(version_dir, manifest)


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
    click.echo(f"size       {_human_bytes(_dir_bytes(version_dir))} in {len(manifest['files']) + 1} files")
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


def main(argv: list[str] | None = None) -> None:
    # Models come from installed packages only; must be set before sentence-transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="rag-index")


if __name__ == "__main__":
    main()
