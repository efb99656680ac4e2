"""`rag-index build --ray [ADDRESS]`: the build's chunking and encoding on a Ray cluster, with Ray Data.

The build itself is index/build.py's, unchanged; this module hands it two things:
- `chunk_documents`: the same Chunker, run over blocks of documents by Ray Data tasks (map_batches);
- `wrap_encoder`: an encoder whose planned batches (encode.py, plan_batches) are embedded by a pool of Ray Data
  actors that each hold the driver's encoder (map_batches with an ActorPoolStrategy). It serves the chunk vectors and
  the sentence windows (index/windows.py) alike.
Reading, BM25 (global statistics), the windows' analysis, the dense index and publishing stay on the driver.

Why the index is the same, byte for byte, as a single-process build: a row's vector depends on the batch it was
padded with (ONNX Runtime and torch differ by ~1e-7 between batch compositions), not on the thread count (1, 2, 3
and 4 ONNX Runtime threads, 1 and 2 torch threads gave identical bytes on this machine). So the driver plans the
batches exactly as encode_documents does, each actor embeds whole batches with the same `_embed_batch`, and the
vectors are scattered back by row. The actors run the very encoder the driver built: the ONNX export is shipped
through the object store (no shared file system needed), the torch model is loaded from the same model folder.
Identity also assumes the same CPU kernels on every node: ONNX Runtime picks its GEMM kernels by instruction set, so a
cluster mixing AVX2 and AVX-512 nodes may differ in the last bits (as two single-process builds on those machines
would).

Ray stays out of the request path: nothing the server imports imports this module.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from rag_service.core.errors import BuildError
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import Encoder, OnnxEncoder, _EncoderBase, default_model_path
from rag_service.index.build import BuildConfig, build_index
from rag_service.index.chunking import Chunk, Chunker, Document

log = logging.getLogger(__name__)

LOCAL = "local"
INSTALL_HINT = "pip install 'rag-service[ray]' (or: pip install 'ray[data]')"
# A private local cluster shares the machine with the build itself; the object store only ever holds blocks in flight
# and the shipped encoder (~150 MB), and spills to disk beyond this.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
# Documents per chunking block, and encoder batches per embedding block: enough work per Ray task to hide its
# overhead (milliseconds), small enough that two workers finish within one block of each other.
DOCS_PER_BLOCK = 1024
BATCHES_PER_BLOCK = 8
_CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: `address` is "local" (a private cluster on this machine, stopped afterwards), "auto" (the
    cluster `ray start` runs on this machine), HOST:PORT of a head node's GCS, or ray://HOST:PORT (Ray Client)."""

    address: str = LOCAL
    workers: int | None = None  # encoder actors and chunking tasks at once; default: the cluster's CPUs (or GPUs)
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0

    def validate(self) -> None:
        problems = []
        if self.workers is not None and self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker < 1:
            problems.append(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            problems.append(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if problems:
            raise BuildError("invalid Ray options: " + "; ".join(problems))


def import_ray() -> Any:
    """The ray module, with Ray Data; BuildError saying how to install it otherwise."""
    try:
        import ray
        import ray.data  # the build needs Ray Data, not just Ray Core
    except ImportError as e:
        raise BuildError(f"--ray needs Ray Data, which is not installed ({e}): {INSTALL_HINT}") from None
    return ray


def check_address(address: str) -> None:
    """Fails in seconds, naming the address, where ray.init would retry for a minute."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BuildError(f"--ray: {address!r} is not a Ray address (HOST:PORT, ray://HOST:PORT or auto; no address "
                         "starts a local cluster)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BuildError(f"--ray: cannot reach a Ray cluster at {address}: {e.strerror or e}. Start one with "
                         "`ray start --head`, or give --ray without an address for a local cluster") from None


# Worker side ------------------------------------------------------------------------------------------------------


class _Tokens(_EncoderBase):
    """The driver's encoder as the chunker and the batch planner see it: the same tokenizer and limits, no model."""

    def __init__(self, tokenizer_json: str, name: str, dim: int, max_seq_length: int, num_special_tokens: int,
                 backend: str) -> None:
        self._counter = Tokenizer.from_str(tokenizer_json)
        self.name, self.dim, self.backend = name, dim, backend
        self.max_seq_length, self.num_special_tokens = max_seq_length, num_special_tokens

    @staticmethod
    def fields_of(encoder: _EncoderBase) -> dict[str, Any]:
        # _counter is the tokenizer every token count of the build goes through (no truncation, no padding).
        return {"tokenizer_json": encoder._counter.to_str(), "name": encoder.name, "dim": int(encoder.dim),
                "max_seq_length": int(encoder.max_seq_length),
                "num_special_tokens": int(encoder.num_special_tokens), "backend": encoder.backend}


@dataclass(frozen=True)
class _EncoderSpec:
    """What a worker needs to rebuild the driver's document encoder."""

    backend: str
    threads: int
    export: dict[str, Any] = field(default_factory=dict)  # ONNX: file name -> ObjectRef of its bytes
    export_key: str = ""
    model_path: str | None = None  # torch: None = the packaged model of each node
    device: str = "cpu"
    precision: str = "fp32"


def _export_dir(spec: _EncoderSpec) -> Path:
    """The shipped ONNX export as files on this node, written once per node and content (actors share it)."""
    import ray

    target = Path(tempfile.gettempdir()) / f"rag-service-ray-export-{spec.export_key}"
    if onnx_export.has_export(target):
        return target
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        for name, ref in spec.export.items():
            (work / name).write_bytes(ray.get(ref))
        os.rename(work, target)
    except OSError:
        if not onnx_export.has_export(target):  # not merely another actor of this node finishing first
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _load_encoder(spec: _EncoderSpec) -> _EncoderBase:
    if spec.export:
        return OnnxEncoder(_export_dir(spec), spec.backend, threads=spec.threads)
    import torch

    torch.set_num_threads(spec.threads)
    return Encoder(spec.model_path, device=spec.device, precision=spec.precision)


class _EmbedBatches:
    """Ray Data actor: holds one encoder and embeds whole planned batches (one input row each) with it."""

    def __init__(self, spec: _EncoderSpec) -> None:
        self.encoder = _load_encoder(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [np.asarray(r, dtype=np.int64) for r in batch["rows"]]
        if "spans" not in batch:
            vectors = [self.encoder._embed_batch([str(t) for t in texts]) for texts in batch["texts"]]
            return {"row": np.concatenate(rows), "vector": np.concatenate(vectors)}
        # Window vectors pooled from the same pass (encode_documents_pooled): per text, its spans' vectors as raw
        # float32 bytes, since texts have different numbers of windows and a column holds one value per text.
        chunk_vectors: list[np.ndarray] = []
        pooled: list[bytes] = []
        for texts, spans in zip(batch["texts"], batch["spans"]):
            v, per_text = self.encoder._embed_batch_pooled(
                [str(t) for t in texts], [np.frombuffer(s, dtype=np.int64).reshape(-1, 2) for s in spans])
            chunk_vectors.append(v)
            pooled.extend(p.astype(np.float32).tobytes() for p in per_text)
        return {"row": np.concatenate(rows), "vector": np.concatenate(chunk_vectors),
                "pooled": np.array(pooled, dtype=object)}


def _chunk_block(batch: dict[str, np.ndarray], tokens: dict[str, Any], chunk_tokens: int,
                 chunk_overlap: int) -> dict[str, np.ndarray]:
    """Ray Data task: the driver's Chunker over a block of documents; one output row per chunk."""
    chunker = Chunker(_Tokens(**tokens), chunk_tokens, chunk_overlap)
    docs = [Document(id="", title=str(title), text=str(text)) for title, text in zip(batch["title"], batch["text"])]
    chunks = [c for per_doc in chunker.chunk_documents(docs) for c in per_doc]
    doc_index = np.asarray(batch["doc"], dtype=np.int64)
    return {"doc": doc_index[np.fromiter((c.doc for c in chunks), np.int64, len(chunks))],
            "no": np.fromiter((c.no for c in chunks), np.int64, len(chunks)),
            "start": np.fromiter((c.start for c in chunks), np.int64, len(chunks)),
            "end": np.fromiter((c.end for c in chunks), np.int64, len(chunks)),
            "text": np.array([c.text for c in chunks], dtype=object)}


# Driver side ------------------------------------------------------------------------------------------------------


class RayEncoder(_Tokens):
    """The driver's encoder with encode_documents' batches embedded on the cluster; everything else (token counts,
    the batch plan, throughput logging) is encode.py's own code."""

    def __init__(self, local: _EncoderBase, session: RayBuild) -> None:
        super().__init__(**_Tokens.fields_of(local))
        self._local = local
        self._session = session
        self._spec = session.encoder_spec(local)

    def __repr__(self) -> str:
        return f"RayEncoder({self._local!r}, workers={self._session.workers})"

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return self._local._embed_batch(texts)

    def _embedded(self, items: list[dict]) -> Iterator[dict]:
        """The actors' answers for `items` (one batch each), in the order they finish."""
        ray = self._session.ray
        workers = min(self._session.workers, len(items))
        dataset = ray.data.from_items(items, override_num_blocks=_blocks(len(items), BATCHES_PER_BLOCK, workers))
        dataset = dataset.map_batches(
            _EmbedBatches, fn_constructor_kwargs={"spec": self._spec}, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=self._session.options.cpus_per_worker,
            num_gpus=self._session.options.gpus_per_worker or None)
        with self._session.errors("encoding"):
            yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def _embed_batches(self, texts: list[str], batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for out in self._embedded([{"rows": idx, "texts": [texts[i] for i in idx]} for idx in batches]):
            yield out["row"], out["vector"]

    def _embed_batches_pooled(self, texts: list[str], spans: list[np.ndarray],
                              batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
        items = [{"rows": idx, "texts": [texts[i] for i in idx],
                  "spans": [np.asarray(spans[i], dtype=np.int64).tobytes() for i in idx]} for idx in batches]
        for out in self._embedded(items):
            yield out["row"], out["vector"], [np.frombuffer(b, dtype=np.float32).reshape(-1, self.dim)
                                              for b in out["pooled"]]


def _blocks(n: int, per_block: int, workers: int) -> int:
    return max(1, min(n, max(math.ceil(n / per_block), 4 * workers)))


class RayBuild:
    """A connection to a Ray cluster for one build (a context manager). A private local cluster is started and
    stopped here; a process that already called ray.init keeps its cluster."""

    def __init__(self, options: RayOptions = RayOptions()) -> None:
        options.validate()
        self.options = options
        self.workers = 0
        self._owned = False
        self._export: tuple[str, dict[str, Any]] | None = None
        self.ray = import_ray()

    def __enter__(self) -> RayBuild:
        ray, options = self.ray, self.options
        if options.address not in (LOCAL, "auto"):
            check_address(options.address)
        if not ray.is_initialized():
            common = {"log_to_driver": False, "configure_logging": False}
            try:
                if options.address == LOCAL:
                    cpus = options.workers * options.cpus_per_worker if options.workers else os.cpu_count() or 1
                    ray.init(num_cpus=cpus, include_dashboard=False,
                             object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env=_local_runtime_env(), **common)
                else:  # the nodes must have this rag-service installed: workers import it
                    ray.init(address=options.address, **common)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise BuildError(f"--ray: cannot start or join a Ray cluster at {options.address}: {e}") from None
            self._owned = True
        else:
            log.info("joining the Ray cluster this process already connected to")
        self._data_context = ray.data.DataContext.get_current()
        self._progress_bars = self._data_context.enable_progress_bars
        self._data_context.enable_progress_bars = False  # the build's own bars count chunks and texts
        self.workers = self.options.workers or self._default_workers()
        log.info("Ray build on %s with %d worker(s)", options.address, self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        self._data_context.enable_progress_bars = self._progress_bars
        self._export = None  # the last reference: the object store drops the shipped encoder
        if self._owned:
            self.ray.shutdown()
            self._owned = False

    def _default_workers(self) -> int:
        resources = self.ray.cluster_resources()
        if self.options.gpus_per_worker:
            return max(1, int(resources.get("GPU", 0) // self.options.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.options.cpus_per_worker))

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the cluster (not part of the index's content)."""
        return {"address": self.options.address, "workers": self.workers, "ray_version": self.ray.__version__,
                **{k: v for k, v in asdict(self.options).items() if k.endswith("_per_worker")}}

    @contextmanager
    def errors(self, stage: str) -> Iterator[None]:
        """A failure on the cluster becomes a BuildError naming the stage (the published index stays as it was)."""
        try:
            yield
        except self.ray.exceptions.RayError as e:
            raise BuildError(f"Ray build: {stage} failed on the cluster: {e}") from e

    def encoder_spec(self, encoder: _EncoderBase) -> _EncoderSpec:
        threads = self.options.cpus_per_worker
        if isinstance(encoder, OnnxEncoder):
            if self.options.gpus_per_worker:
                raise BuildError("GPU workers encode with torch: add --document-encoder torch (the ONNX document "
                                 "encoder runs on CPU)")
            key, refs = self._ship_export(encoder.model_file.parent)
            return _EncoderSpec(backend=encoder.backend, threads=threads, export=refs, export_key=key)
        if isinstance(encoder, Encoder):
            if str(encoder.device).startswith("cuda") and not self.options.gpus_per_worker:
                raise BuildError("the document encoder runs on CUDA here: give GPU workers (--ray-gpus-per-worker 1) "
                                 "so the cluster encodes as this machine would")
            default = Path(encoder.model_path).resolve() == Path(default_model_path()).resolve()
            return _EncoderSpec(backend=encoder.backend, threads=threads,
                                model_path=None if default else encoder.model_path,
                                device="cuda" if self.options.gpus_per_worker else "cpu",
                                precision=getattr(encoder, "precision", "fp32"))
        raise BuildError(f"a Ray build cannot run encoder {encoder!r} on its workers")

    def _ship_export(self, directory: Path) -> tuple[str, dict[str, Any]]:
        if self._export is None:
            digest = hashlib.sha256()
            refs = {}
            for name in onnx_export.FILES:
                data = (directory / name).read_bytes()
                digest.update(name.encode() + b"\0" + data)
                refs[name] = self.ray.put(data)
            self._export = (digest.hexdigest()[:24], refs)
        return self._export

    def wrap_encoder(self, encoder: _EncoderBase) -> RayEncoder:
        return RayEncoder(encoder, self)

    def chunk_documents(self, chunker: Chunker, docs: list[Document]) -> Iterator[list[Chunk]]:
        """chunker.chunk_documents(docs), run by Ray Data tasks: per document, in order, the same chunks."""
        import pyarrow as pa

        # The workers rebuild the chunker's tokenizer from its JSON: an encoder's, which build_index gives it.
        tokenizer = chunker.tokenizer
        if not isinstance(tokenizer, _EncoderBase):
            raise TypeError(f"a Ray build chunks with an encoder's tokenizer, got {type(tokenizer).__name__}")

        ray = self.ray
        n = len(docs)
        if n == 0:
            return
        size = math.ceil(n / _blocks(n, DOCS_PER_BLOCK, self.workers))
        table = pa.table({"doc": np.arange(n, dtype=np.int64), "title": [d.title for d in docs],
                          "text": [d.text for d in docs]})
        dataset = ray.data.from_arrow([table.slice(start, size) for start in range(0, n, size)])
        dataset = dataset.map_batches(
            _chunk_block, fn_kwargs={"tokens": _Tokens.fields_of(tokenizer),
                                     "chunk_tokens": chunker.chunk_tokens, "chunk_overlap": chunker.chunk_overlap},
            batch_size=256, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=self.workers),
            num_cpus=self.options.cpus_per_worker)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("doc", "no", "start", "end", "text")}
        with self.errors("chunking"):
            for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for k in parts:
                    parts[k].append(out[k])
        doc, no, start, end = (np.concatenate(parts[k]) for k in ("doc", "no", "start", "end"))
        text = np.concatenate(parts["text"])
        order = np.lexsort((no, doc))
        bounds = np.searchsorted(doc[order], np.arange(n + 1))
        for i in range(n):
            yield [Chunk(doc=i, no=int(no[j]), start=int(start[j]), end=int(end[j]), text=str(text[j]))
                   for j in order[bounds[i] : bounds[i + 1]]]


def _local_runtime_env() -> dict[str, Any]:
    """Workers of a local cluster import the driver's own rag_service (a source checkout too), offline."""
    import rag_service

    package_root = str(Path(rag_service.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}}


def build_index_on_ray(input_path: Path | str, output_root: Path | str, config: BuildConfig = BuildConfig(),
                       encoder: _EncoderBase | None = None, progress: bool = True,
                       options: RayOptions = RayOptions(), extra_manifest: dict[str, Any] | None = None) -> Path:
    """build_index with chunking and encoding on a Ray cluster; the same index, byte for byte in its arrays."""
    config.validate()
    with RayBuild(options) as cluster:
        return build_index(input_path, output_root, config, encoder, progress, wrap_encoder=cluster.wrap_encoder,
                           chunk_documents=cluster.chunk_documents,
                           extra_manifest={**(extra_manifest or {}), "ray": cluster.describe()})
