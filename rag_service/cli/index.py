"""rag-index: build, inspect and verify indexes.

    rag-index build --input corpus.jsonl --output indexes/scifact
    rag-index info indexes/scifact
    rag-index verify indexes/scifact
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from rag_service.errors import RagError


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
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def build(input_path: Path, output: Path, name: str | None, chunk_tokens: int, chunk_overlap: int, k1: float,
          b: float, idf: str, dense_index: str, hnsw_threshold: int | None, batch_size: int, model: Path | None,
          device: str | None, keep: int, no_progress: bool) -> None:
    """Build an index and publish it atomically."""
    from rag_service.index.build import BuildConfig, build_index

    extra: dict[str, Any] = {} if hnsw_threshold is None else {"hnsw_threshold": hnsw_threshold}
    config = BuildConfig(chunk_tokens=chunk_tokens, chunk_overlap=chunk_overlap, k1=k1, b=b, idf=idf,
                         dense_index=dense_index, batch_size=batch_size, name=name, keep=keep, **extra)
    try:
        config.validate()  # before the model loads: a typo should fail in milliseconds
        from rag_service.encode import Encoder

        encoder = Encoder(str(model) if model is not None else None, device=device)
        version_dir = build_index(input_path, output, config, encoder=encoder, progress=not no_progress)
    except (RagError, FileNotFoundError) as e:
        raise _fail(e) from None
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    _print_summary(version_dir, manifest)


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
    click.echo(f"metadata   {', '.join(manifest.get('metadata_fields', [])) or '(none)'}")
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


def main(argv: list[str] | None = None) -> None:
    # Models come from installed packages only; must be set before sentence-transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="rag-index")


if __name__ == "__main__":
    main()
