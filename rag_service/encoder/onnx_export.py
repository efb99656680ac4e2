"""Export of the sentence-transformers query/document encoder to ONNX: fp32, and int8 by dynamic quantization.

`torch.onnx.export` (the TorchScript exporter) is used rather than optimum, which would downgrade transformers. The
exported graph is the whole sentence embedding (transformer, mean pooling over the attention mask, L2 normalisation),
so ONNX Runtime returns exactly what SentenceTransformer.encode does and no pooling code is duplicated at serve time.

Files written into a directory (flat, so the index manifest lists and checksums each one):
    encoder.onnx            fp32 graph
    encoder-int8.onnx       int8 weights (per-channel scales), activations quantized at run time
    encoder_tokenizer.json  the HF fast tokenizer, with the model's truncation length in encoder.json
    encoder.json            model name, dim, max_seq_length, opset, quantization settings

Derived from encoder.onnx when a query encoder loads (derived_model), cached outside the index, never per request:
    encoder-int8-fused.onnx  ONNX Runtime's transformer fusions (Attention, SkipLayerNormalization, BiasGelu), then
                             the int8 recipe below: the server's default query encoder (bench/README.md, "Issue 15",
                             "Query encoder: onnxruntime, optimised graph, OpenVINO")

int8 recipe (bench/README.md, "Issue 5"): only the weight MatMuls are quantized, per output channel, except those of
the first transformer layer. Per-tensor scales lose too much (SciFact queries: mean cosine to fp32 0.959) because a few
output channels of MiniLM's weights are far larger than the rest; per-channel scales bring it to 0.993, which still
cost 0.64 nDCG@10 point for dense retrieval on SciFact test. A per-layer scan (each layer's MatMuls kept in fp32 in
turn) found layer 0 the most sensitive: it sees the raw embeddings, whose outlier dimensions the int8 activation
scale (one per tensor, computed at run time) handles worst. Keeping its 6 MatMuls (of 36) in fp32 gives cosine 0.995
and dense nDCG@10 within 0.3 point of fp32. The embedding table (a Gather) stays fp32 too: quantizing it saves memory,
not time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

FP32_FILE = "encoder.onnx"
INT8_FILE = "encoder-int8.onnx"
TOKENIZER_FILE = "encoder_tokenizer.json"
CONFIG_FILE = "encoder.json"
FILES = (FP32_FILE, INT8_FILE, TOKENIZER_FILE, CONFIG_FILE)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
OPSET = 17

# Derived from FP32_FILE when an encoder loads (derived_model), cached outside the index: not one of FILES, so
# indexes built before it, and their checksums, stay as they are.
FUSED_INT8_FILE = "encoder-int8-fused.onnx"

# Query encoder kinds; "torch" is sentence-transformers itself (the reference).
ENCODER_KINDS = ("onnx-int8-fused", "onnx-int8", "onnx-fp32", "torch")
ONNX_FILE_FOR = {"onnx-fp32": FP32_FILE, "onnx-int8": INT8_FILE, "onnx-int8-fused": FUSED_INT8_FILE}
DERIVED_KINDS = frozenset({"onnx-int8-fused"})


@dataclass(frozen=True)
class ExportInfo:
    directory: Path
    files: tuple[Path, ...]
    config: dict[str, Any]
    seconds: float


def _wrapped(model: SentenceTransformer) -> torch.nn.Module:
    import torch

    transformer = model[0].auto_model
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"the model's first module has no transformer to export (auto_model is {type(transformer)})")

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEmbedding(transformer).eval()


def _check_mean_pooling(model_path: Path) -> None:
    pooling = model_path / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text(encoding="utf-8"))
        # sentence-transformers < 6 writes one flag per mode, 6 and later one "pooling_mode" name.
        if not (cfg.get("pooling_mode_mean_tokens", False) or cfg.get("pooling_mode") == "mean"):
            raise ValueError(f"{pooling}: only mean pooling models can be exported, got {cfg}")


# Node-name fragments of the MatMuls left in fp32 (see the module docstring).
DEFAULT_KEEP_FP32 = ("encoder/layer.0/",)


def quantize_int8(fp32_path: Path, int8_path: Path, keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32) -> dict[str, Any]:
    """Dynamic int8 quantization of the weight MatMuls (per-channel); MatMuls whose node name contains one of
    `keep_fp32` stay in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = []
    if keep_fp32:
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        excluded = [n.name for n in graph.node if n.op_type == "MatMul" and any(k in n.name for k in keep_fp32)]
    # The quantizer logs a hint about pre-processing (shape inference for static quantization) at WARNING; it does
    # not apply to dynamic quantization.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded)
    finally:
        root.setLevel(level)
    return {"method": "dynamic", "weight_type": "int8", "per_channel": True, "op_types": ["MatMul"],
            "kept_fp32": excluded}


def export_encoder(directory: Path | str, model_path: str | None = None, name: str | None = None,
                   keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32) -> ExportInfo:
    """Writes FILES into `directory` (which must exist) for the sentence-transformers model at `model_path`."""
    import torch
    from sentence_transformers import SentenceTransformer

    from rag_service.encoder.encode import DEFAULT_MODEL_NAME, default_model_path, model_shape

    started = time.perf_counter()
    directory = Path(directory)
    path = Path(model_path if model_path is not None else default_model_path())
    _check_mean_pooling(path)
    # Eager attention traces to plain MatMul/Softmax, which every ONNX Runtime build fuses and quantizes; the SDPA
    # path traces a data-dependent branch (a TracerWarning) that would be frozen into the graph.
    model = SentenceTransformer(str(path), device="cpu", model_kwargs={"attn_implementation": "eager"})
    module = _wrapped(model)
    tokenizer = model.tokenizer
    # A padded pair, so the traced graph keeps the attention-mask path.
    sample = tokenizer(["a short query", "a somewhat longer sentence to pad against"], padding=True,
                       return_tensors="pt")
    args = tuple(sample[k] if k in sample else torch.zeros_like(sample["input_ids"]) for k in INPUT_NAMES)
    dynamic = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES} | {OUTPUT_NAME: {0: "batch"}}
    fp32 = directory / FP32_FILE
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about shape arithmetic that the dynamic axes make generic.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(fp32), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    quantization = quantize_int8(fp32, directory / INT8_FILE, keep_fp32)
    tokenizer.backend_tokenizer.save(str(directory / TOKENIZER_FILE))
    is_default = model_path is None or path.resolve() == Path(default_model_path()).resolve()
    model_name = name or (DEFAULT_MODEL_NAME if is_default else path.resolve().name)
    dim, max_seq_length = model_shape(model, model_name)
    config = {
        "model": model_name,
        "dim": dim,
        "max_seq_length": max_seq_length,
        "num_special_tokens": int(tokenizer.num_special_tokens_to_add(pair=False)),
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "pooling": "mean",
        "normalized": True,
        "opset": OPSET,
        "int8": quantization,
        "exporter": f"torch.onnx.export (torch {torch.__version__})",
    }
    with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    seconds = time.perf_counter() - started
    log.info("exported %s to ONNX (fp32 + int8) in %.1fs", config["model"], seconds)
    return ExportInfo(directory=directory, files=tuple(directory / n for n in FILES), config=config, seconds=seconds)


# Bump when the export recipe changes, so cached exports made by the old recipe are not reused.
RECIPE = 2


def default_cache_dir() -> Path:
    env = os.environ.get("RAG_ONNX_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rag-service" / "onnx"


def _cache_key(model_path: Path) -> str:
    import hashlib

    import onnxruntime
    import torch

    versions = f"{RECIPE}\0{torch.__version__}\0{onnxruntime.__version__}"
    digest = hashlib.sha256(f"{versions}\0{model_path.resolve()}".encode())
    for path in sorted(p for p in model_path.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_export(model_path: str | None = None, cache_dir: Path | str | None = None) -> Path:
    """The directory of an export of `model_path`, made once per model, recipe and library versions.

    An export takes seconds (loading the model twice, tracing, quantizing); index builds and tests reuse it.
    A fresh export is written beside the cache entry and renamed into place, so readers never see half of one.
    """
    from rag_service.encoder.encode import default_model_path

    path = Path(model_path if model_path is not None else default_model_path())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / _cache_key(path)
    if has_export(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        export_encoder(work, str(path))
        try:
            os.rename(work, target)
        except OSError:
            if not has_export(target):  # not a concurrent export that won the race
                raise
    finally:
        if work.exists():
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return target


def copy_export(source: Path | str, destination: Path | str) -> list[Path]:
    """Puts the export's FILES into `destination`: hard links where the file system allows (the files are never
    modified in place), copies otherwise."""
    import shutil

    out = []
    for name in FILES:
        src, dst = Path(source) / name, Path(destination) / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


def has_export(directory: Path | str) -> bool:
    return all(os.path.isfile(Path(directory) / n) for n in FILES)


def attention_shape(fp32_path: Path) -> tuple[int, int]:
    """(num_heads, hidden_size) of an exported BERT-style graph, which the optimizer's attention fusion needs and
    cannot detect in torch.onnx.export's dynamic-shape graphs: hidden_size is the width of layer 0's query
    projection, and the head size the last dimension its output is reshaped to ((batch, sequence, -1, head_size))."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    weights = {init.name: init for init in graph.initializer}
    hidden = head = 0
    for node in graph.node:
        if node.op_type == "MatMul" and "layer.0/attention/self/query/" in node.name:
            weight = weights.get(node.input[1])
            if weight is not None and len(weight.dims) == 2:
                hidden = int(weight.dims[1])
        if node.op_type == "Reshape" and "layer.0/attention/self/" in node.name and not head:
            concat = producer.get(node.input[1])
            last = producer.get(concat.input[-1]) if concat is not None and concat.op_type == "Concat" else None
            if last is not None and last.op_type == "Constant":
                value = numpy_helper.to_array(last.attribute[0].t).reshape(-1)
                head = int(value[0]) if value.size == 1 and value[0] > 0 else 0
    if not hidden or not head or hidden % head:
        raise ValueError(f"{fp32_path}: cannot read the attention shape (hidden size {hidden}, head size {head})")
    return hidden // head, hidden


def fuse_and_quantize(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    """The fp32 export through ONNX Runtime's transformer optimizer (model_type bert: one Attention node per layer,
    SkipLayerNormalization, BiasGelu, EmbedLayerNormalization), then dynamic int8 per channel of the MatMuls and the
    fused Attention projections, with the export's recipe: layer 0 stays fp32 (see the module docstring). The fusion
    renames each layer's attention projections into one node named Attention_N, so layer 0's is the first in graph
    order; its other MatMuls keep their layer.0 names."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    num_heads, hidden_size = attention_shape(fp32_path)
    # opt_level 0: only the fusions, which are portable; ONNX Runtime's own passes run when the session loads, for
    # the CPU it runs on.
    optimized = optimize_model(str(fp32_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0)
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    if not fused.get("Attention"):
        raise ValueError(f"{fp32_path}: the transformer optimizer fused no attention ({fused}); use onnx-int8")
    graph = optimized.model.graph
    excluded = [n.name for n in graph.node if n.op_type == "MatMul" and any(k in n.name for k in DEFAULT_KEEP_FP32)]
    excluded += [n.name for n in graph.node if n.op_type == "Attention"][:1]
    with tempfile.TemporaryDirectory(prefix="fuse-", dir=out_path.parent) as tmp:
        fused_path = Path(tmp) / "fused.onnx"
        optimized.save_model_to_file(str(fused_path))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            # The fused operators are in the com.microsoft domain, where shape inference gives no types: their
            # outputs are float, which DefaultTensorType tells the quantizer.
            quantize_dynamic(str(fused_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Attention"], nodes_to_exclude=excluded,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.setLevel(level)
    return {"fused": fused, "num_heads": num_heads, "hidden_size": hidden_size, "method": "dynamic",
            "weight_type": "int8", "per_channel": True,
            "op_types": ["MatMul", "Attention"], "kept_fp32": excluded}


# Bump when fuse_and_quantize changes, so models derived by the old recipe are not reused.
DERIVED_RECIPE = 1


def derived_model(directory: Path | str, kind: str, cache_dir: Path | str | None = None) -> Path:
    """The model file of a derived kind for the export in `directory`: that file where the export holds it, else
    made from its FP32_FILE once and cached under `cache_dir` (default: default_cache_dir()/derived), keyed by the fp32
    file's contents, the recipe and ONNX Runtime's version. Called when an encoder loads, never per request; an
    index folder is never written to. A fresh file is written beside its cache entry and renamed into place, so
    concurrent loads never read half of one."""
    import hashlib

    import onnxruntime

    if kind not in DERIVED_KINDS:
        raise ValueError(f"kind must be one of {', '.join(sorted(DERIVED_KINDS))}, got {kind!r}")
    directory = Path(directory)
    name = ONNX_FILE_FOR[kind]
    if (directory / name).is_file():
        return directory / name
    digest = hashlib.sha256(f"{DERIVED_RECIPE}\0{onnxruntime.__version__}\0{kind}\0".encode())
    with open(directory / FP32_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "derived"
    target = root / digest.hexdigest()[:16] / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fd, work = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
    os.close(fd)
    try:
        info = fuse_and_quantize(directory / FP32_FILE, Path(work))
        os.replace(work, target)
    finally:
        if os.path.exists(work):
            os.unlink(work)
    log.info("derived %s from %s in %.1fs (fused %s); cached at %s", kind, directory / FP32_FILE,
             time.perf_counter() - started, info["fused"], target)
    return target
