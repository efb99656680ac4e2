"""`rag-index build`: documents in, a published index version out.

Stages, each timed into the manifest: read -> chunk -> store -> BM25 -> encode -> dense -> publish. Everything is
written into a private temp directory under the index root and published atomically at the end (see publish.py), so
a failure anywhere leaves the previously published index exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from rag_service.core.errors import BuildError
from rag_service.core.timing import StageTimer
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import Encoder, OnnxEncoder, _EncoderBase
from rag_service.index import manifest as manifest_mod
from rag_service.index import metadata as metadata_mod
from rag_service.index import publish as publish_mod
from rag_service.index import source as source_mod
from rag_service.index import tokens as tokens_mod
from rag_service.index import windows as windows_mod
from rag_service.index.chunking import Chunk, Chunker, Document, TokenizerLike, dense_text, lexical_text
from rag_service.index.store import write_store
from rag_service.retrievers import dense as dense_mod
from rag_service.retrievers import lexical
from rag_service.retrievers.analysis import Analyzer

log = logging.getLogger(__name__)

# Encoders of the chunk vectors (BuildConfig.document_encoder); auto picks one for the hardware at run time.
DOCUMENT_ENCODERS = ("auto", "torch", "torch-bf16", "onnx-fp32", "onnx-int8")


def auto_document_encoder(device: str, onnx: bool = True) -> str:
    """torch on a CUDA device; torch in bf16 on a CPU with AMX (~3x a float32 encode at cosine >= 0.9999 to it,
    bench/README.md "Issue 5"); else the int8 ONNX export (1.5x ONNX fp32 with VNNI, the full pipeline's nDCG@10 as
    good, bench/README.md "Build at the limit"), or torch without an ONNX export."""
    from rag_service.encoder.encode import cpu_has_amx_bf16

    if device.startswith("cuda"):
        return "torch"
    if cpu_has_amx_bf16():
        return "torch-bf16"
    return "onnx-int8" if onnx else "torch"


TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class BuildConfig:
    chunk_tokens: int = 256
    chunk_overlap: int = 64
    k1: float = 0.9
    b: float = 0.4
    idf: str = "lucene"
    dense_index: str = "auto"
    hnsw_threshold: int = dense_mod.DEFAULT_HNSW_THRESHOLD
    # Graph degree and construction beam of an HNSW index; lower ef_construction builds faster at some recall cost
    # (the 1M-passage scale run, bench/README.md "Issue 3").
    hnsw_m: int = dense_mod.HNSW_M
    hnsw_ef_construction: int = dense_mod.HNSW_EF_CONSTRUCTION
    batch_size: int = 64
    name: str | None = None  # default: the output directory's name
    keep: int = 3
    stemmer: str | None = "english"
    stopwords: str | None = "english"
    # Issue 5 (fast path): the ONNX query encoders exported into the index, the encoder of the chunk vectors
    # (auto_document_encoder: torch on a CUDA device, torch-bf16 on a CPU with AMX, else ONNX int8), and quantized
    # codes for the dense first stage.
    export_onnx: bool = True
    document_encoder: str = "auto"
    dense_codes: str = "auto"  # auto: dense.DEFAULT_CODES of the dense index's kind
    # Sentence windows per chunk for the reranker (index/windows.py); 0 builds none (rerank is then off).
    window_sentences: int = windows_mod.DEFAULT_WINDOW_SENTENCES
    # How window vectors are made (windows.POOLINGS): "chunk" pools them from the chunk pass's token vectors,
    # "encode" embeds every window's text in a second pass (bench/README.md "Build at the limit").
    window_pooling: str = windows_mod.DEFAULT_POOLING
    # Metadata field -> type (keyword, keyword_list, integer, float, date, boolean) for the fields whose type is not
    # to be inferred from their JSON values (index/metadata.py); a file of this shape is `--metadata-schema`.
    metadata_schema: dict[str, str] | None = None
    # A keyword metadata field holding each document's tenant: requests then search one tenant's passages
    # (api/tenancy.py); every document must have a value.
    tenant_key: str | None = None

    def validate(self) -> None:
        """Raises BuildError naming the first bad setting."""
        problems = []
        if self.chunk_tokens < 1:
            problems.append(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if not 0 <= self.chunk_overlap < max(self.chunk_tokens, 1):
            problems.append(
                f"chunk_overlap must be >= 0 and < chunk_tokens ({self.chunk_tokens}), got {self.chunk_overlap}"
            )
        if not (math.isfinite(self.k1) and self.k1 >= 0):
            problems.append(f"k1 must be a finite number >= 0, got {self.k1}")
        if not (math.isfinite(self.b) and 0 <= self.b <= 1):
            problems.append(f"b must be between 0 and 1, got {self.b}")
        if self.idf not in lexical.IDF_KINDS:
            problems.append(f"idf must be one of {', '.join(lexical.IDF_KINDS)}, got {self.idf!r}")
        if self.dense_index not in dense_mod.DENSE_KINDS:
            problems.append(f"dense_index must be one of {', '.join(dense_mod.DENSE_KINDS)}, got {self.dense_index!r}")
        if self.hnsw_threshold < 1:
            problems.append(f"hnsw_threshold must be >= 1, got {self.hnsw_threshold}")
        if self.hnsw_m < 2:
            problems.append(f"hnsw_m must be >= 2, got {self.hnsw_m}")
        if self.hnsw_ef_construction < 1:
            problems.append(f"hnsw_ef_construction must be >= 1, got {self.hnsw_ef_construction}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.document_encoder not in DOCUMENT_ENCODERS:
            problems.append(f"document_encoder must be one of {', '.join(DOCUMENT_ENCODERS)}, "
                            f"got {self.document_encoder!r}")
        if self.document_encoder.startswith("onnx") and not self.export_onnx:
            problems.append(f"document_encoder {self.document_encoder} needs export_onnx")
        if self.window_pooling not in windows_mod.POOLINGS:
            problems.append(f"window_pooling must be one of {', '.join(windows_mod.POOLINGS)}, "
                            f"got {self.window_pooling!r}")
        if self.dense_codes != "auto" and self.dense_codes not in dense_mod.CODE_KINDS:
            problems.append(f"dense_codes must be auto or one of {', '.join(dense_mod.CODE_KINDS)}, got "
                            f"{self.dense_codes!r}")
        if self.keep < 1:
            problems.append(f"keep must be >= 1, got {self.keep}")
        if self.window_sentences < 0:
            problems.append(f"window_sentences must be >= 0, got {self.window_sentences}")
        if self.name is not None and not self.name.strip():
            problems.append("name must not be empty")
        if self.tenant_key is not None and not self.tenant_key.strip():
            problems.append("tenant_key must not be empty")
        if self.tenant_key is not None and self.metadata_schema is not None:
            problem = metadata_mod.tenant_key_problem(self.tenant_key, {**{self.tenant_key: "keyword"},
                                                                       **self.metadata_schema})
            if problem is not None:
                problems.append(problem)
        if self.metadata_schema is not None:
            try:
                metadata_mod.check_schema(self.metadata_schema)
            except BuildError as e:
                problems.append(str(e))
        try:
            Analyzer(stemmer=self.stemmer, stopwords=self.stopwords)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise BuildError("invalid build config: " + "; ".join(problems))


# Input ------------------------------------------------------------------------------------------------------------


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def read_beir_jsonl(path: Path, progress: bool = False) -> list[Document]:
    """A BEIR corpus.jsonl: one object per line with `_id`, `text`, optional `title` and `metadata` (an object).
    Errors name the line; blank lines are skipped."""
    docs: list[Document] = []
    first_line: dict[str, int] = {}
    total = _count_lines(path) if progress else None
    with open(path, "rb") as f, tqdm(total=total, desc="reading", unit="doc", disable=not progress,
                                     dynamic_ncols=True) as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(1)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BuildError(f"{where}: not UTF-8: {e}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BuildError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise BuildError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            doc_id = obj.get("_id")
            if isinstance(doc_id, int) and not isinstance(doc_id, bool):
                doc_id = str(doc_id)
            if not isinstance(doc_id, str) or not doc_id:
                raise BuildError(f"{where}: missing or empty '_id' (a string)")
            text = obj.get("text")
            if not isinstance(text, str):
                raise BuildError(f"{where}: document {doc_id!r}: missing 'text' (a string)")
            title = obj.get("title") or ""
            if not isinstance(title, str):
                raise BuildError(f"{where}: document {doc_id!r}: 'title' must be a string")
            metadata = obj.get("metadata") or {}
            if not isinstance(metadata, dict):
                raise BuildError(f"{where}: document {doc_id!r}: 'metadata' must be a JSON object")
            if doc_id in first_line:
                raise BuildError(f"{where}: duplicate _id {doc_id!r} (first on line {first_line[doc_id]})")
            first_line[doc_id] = lineno
            docs.append(Document(id=doc_id, title=title, text=text, metadata=metadata))
    return docs


_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def markdown_title(text: str) -> str | None:
    """Text of the first ATX heading ("# Title") outside fenced code blocks."""
    in_fence = False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _HEADING.match(line)):
            return m.group(1).strip()
    return None


def _text_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # .git, editor swap files, ...
            continue
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            yield path


def read_text_folder(root: Path, progress: bool = False) -> list[Document]:
    """Every .txt/.md file under `root`: id = relative path, title = first Markdown heading (.md) or the file stem."""
    docs = []
    for path in tqdm(list(_text_files(root)), desc="reading", unit="doc", disable=not progress, dynamic_ncols=True):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise BuildError(f"{path}: not UTF-8: {e}") from None
        except OSError as e:
            raise BuildError(f"{path}: cannot read: {e}") from None
        title = (markdown_title(text) if path.suffix.lower() == ".md" else None) or path.stem
        docs.append(Document(id=rel, title=title, text=text, metadata={"path": rel}))
    return docs


def read_corpus(input_path: Path | str, progress: bool = False) -> tuple[list[Document], str]:
    """Documents and the input kind ("beir-jsonl" or "folder")."""
    path = Path(input_path)
    if path.is_dir():
        docs, kind = read_text_folder(path, progress), "folder"
    elif path.is_file():
        docs, kind = read_beir_jsonl(path, progress), "beir-jsonl"
    else:
        raise BuildError(f"{path}: no such file or directory")
    if not docs:
        what = "no .txt/.md files" if kind == "folder" else "no documents"
        raise BuildError(f"{path}: {what}")
    return docs, kind


# Build ------------------------------------------------------------------------------------------------------------


class BuildEncoder(TokenizerLike, windows_mod.DocumentEncoder, Protocol):
    """What a build needs of its encoder: the chunker's tokenizer, the document embedding, and the name the manifest
    records. Encoder and OnnxEncoder are such; so is a wrapper that hands the rest to one (index/update.py)."""

    name: str


def build_index(
    input_path: Path | str,
    output_root: Path | str,
    config: BuildConfig = BuildConfig(),
    encoder: BuildEncoder | None = None,
    progress: bool = True,
    *,
    documents: list[Document] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    wrap_encoder: Callable[[Any], Any] | None = None,
    chunk_documents: Callable[[Chunker, list[Document]], Iterable[list[Chunk]]] | None = None,
) -> Path:
    """Builds an index of `input_path` and publishes it under `output_root`; returns the new version directory.

    Raises BuildError for bad input or config; the previously published version is left untouched on any failure.
    """
    config.validate()
    started = time.perf_counter()
    root = Path(output_root).absolute()
    if root.exists() and not root.is_dir():
        raise BuildError(f"{root}: exists and is not a directory")
    name = config.name or root.name
    timer = StageTimer()

    if encoder is None:
        with timer.stage("load_model"):
            encoder = Encoder()

    try:
        root.mkdir(parents=True, exist_ok=True)
        publish_mod.remove_stale_tmp(root)
        tmp = publish_mod.make_tmp_dir(root)
    except OSError as e:
        raise BuildError(f"{root}: cannot prepare the index root: {e}") from e
    try:
        encoder_export: dict[str, Any] | None = None
        if config.export_onnx:
            with timer.stage("export_onnx"):
                exported = onnx_export.cached_export(getattr(encoder, "model_path", None))
                onnx_export.copy_export(exported, tmp)
                with open(tmp / onnx_export.CONFIG_FILE, encoding="utf-8") as f:
                    encoder_export = json.load(f)
            document_encoder = config.document_encoder
            if document_encoder == "auto":
                document_encoder = auto_document_encoder(getattr(encoder, "device", "cpu"))
            if document_encoder == "torch-bf16" and type(encoder) is Encoder:
                encoder = encoder.as_bf16()
            elif document_encoder.startswith("onnx") and type(encoder) is Encoder:
                # Same weights and tokenizer (fp32: cosine >= 0.9999 to torch, bench/README.md "Issue 5"); every
                # later stage (chunking, vectors, windows) uses it. Only a plain torch Encoder is swapped: a wrapper
                # (rag-index add's cache of known vectors) knows which texts need the model at all, so it is kept.
                encoder = OnnxEncoder(tmp, document_encoder, threads=os.cpu_count() or 1)
            else:
                document_encoder = getattr(encoder, "backend", document_encoder)
        else:
            document_encoder = config.document_encoder
            if document_encoder == "auto":
                document_encoder = auto_document_encoder(getattr(encoder, "device", "cpu"), onnx=False)
            if document_encoder == "torch-bf16" and type(encoder) is Encoder:
                encoder = encoder.as_bf16()
            document_encoder = getattr(encoder, "backend", "torch")
        # An update's encoder that reuses stored vectors (index/update.py), or one that embeds the planned batches
        # on a Ray cluster (index/ray_build.py).
        if wrap_encoder is not None:
            encoder = wrap_encoder(encoder)

        with timer.stage("read"):
            # `documents` (an incremental update, index/update.py) replaces reading `input_path`.
            docs, input_kind = (list(documents), "update") if documents is not None \
                else read_corpus(input_path, progress)
            # Before chunking: a value that does not fit its declared type should fail the build at once.
            metadata_schema = metadata_mod.resolve_schema(docs, config.metadata_schema)
            if config.tenant_key is not None:
                metadata_mod.check_tenant_key(config.tenant_key, docs, metadata_schema)

        with timer.stage("chunk"):
            chunker = Chunker(encoder, config.chunk_tokens, config.chunk_overlap)
            chunks: list[Chunk] = []
            # A Ray build runs the same chunker on the cluster (index/ray_build.py); either way: per document, in order.
            per_document = chunker.chunk_documents(docs) if chunk_documents is None else chunk_documents(chunker, docs)
            for doc_chunks in tqdm(per_document, total=len(docs), desc="chunking", unit="doc",
                                   disable=not progress, dynamic_ncols=True):
                chunks.extend(doc_chunks)

        with timer.stage("store"):
            write_store(tmp, docs, chunks, metadata_schema)
            source_mod.write_documents(tmp, docs)

        with timer.stage("tokens"):
            # Every reply reports its contexts' token counts: counted here once, not per request.
            tokens_mod.write_tokens(tmp, tokens_mod.count_texts([c.text for c in chunks], encoder))

        with timer.stage("bm25"):
            analyzer = Analyzer(stemmer=config.stemmer, stopwords=config.stopwords)
            token_lists = (
                analyzer.tokens(lexical_text(docs[c.doc].title, c.text))
                for c in tqdm(chunks, desc="bm25", unit="chunk", disable=not progress, dynamic_ncols=True)
            )
            params = lexical.BM25Params(k1=config.k1, b=config.b, idf=config.idf)
            postings = lexical.build_postings(token_lists, params)
            postings.write(tmp, analyzer)

        # Window vectors pooled from the chunk pass need the model's token vectors of every chunk: an encoder that
        # reuses stored chunk vectors (rag-index add, index/update.py) embeds each window's text instead, and the
        # manifest records which was done.
        pooling_encoder = encoder if isinstance(encoder, _EncoderBase) else None
        plan = pooled = found = None
        if config.window_sentences > 0 and config.window_pooling == "chunk" and pooling_encoder is not None:
            with timer.stage("windows"):
                plan = windows_mod.plan_windows([docs[c.doc].title for c in chunks], [c.text for c in chunks],
                                                analyzer, {term: i for i, term in enumerate(postings.vocab)},
                                                config.window_sentences)
        with timer.stage("encode"):
            texts = [dense_text(docs[c.doc].title, c.text) for c in chunks]
            if plan is not None and pooling_encoder is not None:
                vectors, pooled, found = pooling_encoder.encode_documents_pooled(
                    texts, plan.dense_spans, batch_size=config.batch_size, progress=progress)
            else:
                vectors = encoder.encode_documents(texts, batch_size=config.batch_size, progress=progress)
        encode_rate = len(chunks) / max(timer.seconds("encode"), 1e-9)

        with timer.stage("dense"):
            kind = dense_mod.choose_kind(config.dense_index, len(chunks), config.hnsw_threshold)
            hnsw = {"hnsw_m": config.hnsw_m, "ef_construction": config.hnsw_ef_construction}
            index = dense_mod.build_dense_index(vectors, kind, progress=progress, **hnsw)
            dense_mod.write_dense(tmp, index, vectors, kind, **hnsw)
            codes = dense_mod.DEFAULT_CODES[kind] if config.dense_codes == "auto" else config.dense_codes
            if codes != "none":
                dense_mod.write_codes(tmp, vectors, codes)
            del index

        window_params = None
        if plan is not None:
            with timer.stage("windows"):
                data = windows_mod.pooled_windows(plan, pooled, found, encoder,  # type: ignore[arg-type]
                                                  window_sentences=config.window_sentences,
                                                  batch_size=config.batch_size)
                del plan, pooled, found
                data.write(tmp)
            # Planning ran before the encode, under the same stage name.
            window_params = {**data.params, "bytes": data.nbytes(), "seconds": round(timer.seconds("windows"), 3)}
        elif config.window_sentences:
            with timer.stage("windows"):
                window_params = build_window_files(tmp, docs, chunks, analyzer, postings.vocab, encoder, config,
                                                   progress)

        with timer.stage("checksums"):
            publish_mod.fsync_tree(tmp)
            files = manifest_mod.file_entries(tmp)

        created = manifest_mod.utc_now()
        manifest: dict[str, Any] = {
            "format_version": manifest_mod.FORMAT_VERSION,
            "name": name,
            "version": manifest_mod.make_version(created, files),
            "created_at": manifest_mod.iso_utc(created),
            "build_seconds": round(time.perf_counter() - started, 3),
            "timings": {**{k: round(us / 1e6, 3) for k, us in timer.us.items()},
                        "encode_chunks_per_second": round(encode_rate, 1)},
            "source": {"input": str(Path(input_path).absolute()), "kind": input_kind},
            "model": {"name": encoder.name, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length},
            "analyzer": analyzer.settings(),
            "params": {
                "chunk_tokens": config.chunk_tokens,
                "chunk_overlap": config.chunk_overlap,
                "effective_chunk_tokens": chunker.effective_chunk_tokens,
                "dense_text": "title. text",
                "bm25_text": "title text",
                "k1": config.k1,
                "b": config.b,
                "idf": config.idf,
                "dense_index": kind,
                "dense_index_requested": config.dense_index,
                "hnsw_threshold": config.hnsw_threshold,
                "hnsw_m": config.hnsw_m,
                "hnsw_ef_construction": config.hnsw_ef_construction,
                "hnsw_ef_search_min": dense_mod.HNSW_EF_SEARCH_MIN,
                "batch_size": config.batch_size,
                "document_encoder": document_encoder,
                "document_encoder_requested": config.document_encoder,
                "dense_codes": codes,
                "dense_codes_requested": config.dense_codes,
                "window_pooling": window_params.get("pooling") if window_params is not None else None,
            },
            "counts": {
                "documents": len(docs),
                "chunks": len(chunks),
                "vocabulary": len(postings.vocab),
                "postings": int(len(postings.docs)),
            },
            "bm25": {"avgdl": postings.avgdl},
            **({"encoder_export": {"files": list(onnx_export.FILES), **encoder_export}} if encoder_export else {}),
            **({"windows": window_params} if window_params is not None else {}),
            "metadata_fields": sorted(metadata_schema),
            "metadata_schema": metadata_schema,
            "tenant_key": config.tenant_key,
            # What an incremental update rebuilds with (index/update.py), whatever settings later builds add.
            "build_config": dataclasses.asdict(config),
            **(extra_manifest or {}),
            "files": files,
        }
        published = publish_mod.publish(root, tmp, manifest, keep=config.keep)
    except BuildError:
        raise
    except (OSError, ValueError) as e:
        raise BuildError(f"build of {input_path} failed: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s: %d documents, %d chunks in %.1fs", published, len(docs), len(chunks),
             time.perf_counter() - started)
    return published


def build_window_files(directory: Path, docs: list[Document], chunks: list[Chunk], analyzer: Analyzer,
                       vocab: list[str], encoder: BuildEncoder, config: BuildConfig,
                       progress: bool) -> dict[str, Any]:
    """The reranker's step: sentence windows of every chunk, embedded, and the chunks' token streams as BM25 term ids
    (index/windows.py). Returns what the manifest records under "windows"."""
    started = time.perf_counter()
    data = windows_mod.build_windows(
        [docs[c.doc].title for c in chunks], [c.text for c in chunks], analyzer,
        {term: i for i, term in enumerate(vocab)}, encoder, window_sentences=config.window_sentences,
        batch_size=config.batch_size, progress=progress)
    data.write(directory)
    seconds = time.perf_counter() - started
    log.info("windows: %d (%d distinct) for %d chunks, %d tokens, %.1f MB in %.1fs", data.n_windows,
             data.params["unique_windows"], len(chunks), data.params["tokens"], data.nbytes() / 1e6, seconds)
    return {**data.params, "bytes": data.nbytes(), "seconds": round(seconds, 3)}
