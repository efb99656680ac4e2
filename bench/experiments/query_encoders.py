"""Issue 15: the query encoder's backends, one query per call as the server encodes it, measured together.

    python bench/experiments/query_encoders.py --index /tmp/lead/scifact_full --data ../shared/data/scifact \
        --json /tmp/qenc/query_encoders.json

Candidates, each at 1 and 2 intra-op threads, built from the index's own ONNX export (encoder.onnx, fp32):
  ort-int8        onnxruntime, the index's encoder-int8.onnx (the server's default before this experiment)
  ort-fp32        onnxruntime, encoder.onnx (the reference the others must stay close to)
  ort-int8-oldfeeds  ort-int8 with the query path's inputs made as before (batch call, three arrays copied)
  ort-opt-fp32    onnxruntime.transformers.optimizer (model_type bert: fused attention, layer norm, GELU)
  ort-opt-int8    the same graph quantized dynamically (int8 MatMuls per channel, layer 0 kept in fp32)
  ort-opt-int8-attn  the same, the fused Attention nodes' projections quantized too (QAttention): what the server's
                  onnx-int8-fused backend runs (rag_service.encoder.onnx_export.fuse_and_quantize)
  ov-fp32         OpenVINO on encoder.onnx, inference precision f32
  ov-bf16         OpenVINO on encoder.onnx, inference precision bf16 (the CPU plugin's default where the CPU has it)
  ov-int8         OpenVINO on an NNCF post-training int8 model (calibrated on SciFact train queries), if nncf imports

1. Latency of one query's encode (tokenizer + inference) over the SciFact test queries, wall and CPU time: the
   candidates take turns block by block in one process (latency()); p50 / p99 and the ratio to ort-int8.
2. SciFact test nDCG@10 of the dense retriever alone, fused, and the whole pipeline (Pipeline.search at its
   defaults) with each candidate's query vectors, each query encoded alone as the server does (OneByOne), against the
   index's chunk vectors; and the cosine of its query vectors to ort-fp32's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import Method, quality_report
from rag_service.core.params import SearchParams
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import OnnxEncoder
from rag_service.index.load import load_index
from rag_service.search.pipeline import Pipeline

KINDS = ("ort-int8", "ort-fp32", "ort-opt-fp32", "ort-opt-int8", "ort-opt-int8-attn", "ov-fp32", "ov-bf16", "ov-int8")


def ort_session(path: Path, threads: int):
    """A session set up like OnnxEncoder's (one intra-op pool of `threads`, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OpenVinoSession:
    """OpenVINO behind InferenceSession.run's signature, so OnnxEncoder's tokenizer and feeds serve every candidate."""

    def __init__(self, model, threads: int, precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": precision}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [i.get_any_name() for i in self.compiled.inputs]

    def run(self, _outputs, feeds):
        result = self.request.infer({k: feeds[k] for k in self.inputs})
        return [np.array(next(iter(result.values())))]


def quantize_optimized(fp32: Path, int8: Path, attention: bool) -> list[str]:
    """Dynamic int8 (per channel) of the fused graph, with the export's recipe: layer 0 stays fp32. The fusion renames
    the attention projections into one Attention node per layer (named Attention_N, not by layer), so layer 0's is
    the first in graph order; its other MatMuls keep their layer.0 names."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32)).graph
    attention_nodes = [n.name for n in graph.node if n.op_type == "Attention"]
    excluded = [n.name for n in graph.node if n.op_type == "MatMul" and "encoder/layer.0/" in n.name]
    excluded += attention_nodes[:1]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"] + (["Attention"] if attention else []),
                         nodes_to_exclude=excluded,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    return excluded


def ort_optimized(index_dir: Path, work: Path, quantize: str) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    fp32 = work / "encoder-opt.onnx"
    if not fp32.is_file():
        model = optimize_model(str(index_dir / onnx_export.FP32_FILE), model_type="bert", num_heads=12,
                               hidden_size=384, opt_level=0)
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        print(f"  ort optimizer fused: {fused}", flush=True)
        model.save_model_to_file(str(fp32))
    if not quantize:
        return fp32
    int8 = work / f"encoder-opt-{quantize}.onnx"
    if not int8.is_file() and quantize == "int8-attn":
        # The server's onnx-int8-fused recipe itself.
        info = onnx_export.fuse_and_quantize(index_dir / onnx_export.FP32_FILE, int8)
        print(f"  {int8.name}: fused {info['fused']}, kept in fp32 {info['kept_fp32']}", flush=True)
    elif not int8.is_file():
        kept = quantize_optimized(fp32, int8, attention=False)
        print(f"  {int8.name}: kept in fp32 {kept}", flush=True)
    return int8


def ov_int8(index_dir: Path, work: Path, calibration: list[str]):
    import nncf
    import openvino as ov

    path = work / "encoder-ov-int8.xml"
    if path.is_file():
        return ov.Core().read_model(str(path))
    tok = OnnxEncoder(index_dir, "onnx-fp32", threads=1)._tokenizer
    samples = []
    for text in calibration:
        e = tok.encode(text)
        ids = np.asarray([e.ids], dtype=np.int64)
        samples.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    model = ov.Core().read_model(str(index_dir / onnx_export.FP32_FILE))
    quantized = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples))
    ov.save_model(quantized, str(path))
    return quantized


class OldFeeds(OnnxEncoder):
    """The query path as it was: the batch call and three arrays copied from the encoding's lists, even for one."""

    def _feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch(texts)
        feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        return {k: feeds[k] for k in self._inputs}


def make(kind: str, index_dir: Path, work: Path, threads: int, calibration: list[str]) -> OnnxEncoder:
    if kind == "ort-int8":
        return OnnxEncoder(index_dir, "onnx-int8", threads=threads)
    if kind == "ort-int8-oldfeeds":
        return OldFeeds(index_dir, "onnx-int8", threads=threads)
    if kind == "ort-fp32":
        return OnnxEncoder(index_dir, "onnx-fp32", threads=threads)
    enc = OnnxEncoder(index_dir, "onnx-fp32", threads=threads)
    enc.backend = kind
    if kind in ("ort-opt-fp32", "ort-opt-int8", "ort-opt-int8-attn"):
        enc._session = ort_session(ort_optimized(index_dir, work, kind[len("ort-opt-"):].replace("fp32", "")), threads)
    elif kind in ("ov-fp32", "ov-bf16"):
        enc._session = OpenVinoSession(str(index_dir / onnx_export.FP32_FILE), threads, kind[3:].replace("fp", "f"))
    elif kind == "ov-int8":
        enc._session = OpenVinoSession(ov_int8(index_dir, work, calibration), threads, "f32")
    else:
        raise ValueError(f"unknown candidate {kind!r}; one of {', '.join(KINDS)}")
    return enc


def cpu_summary() -> dict[str, object]:
    model = platform.processor()
    flags: set[str] = set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cpus": os.cpu_count(), "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "amx": sorted(f for f in flags if f.startswith("amx"))}


def latency(encoders: dict[str, object], queries: list[str], rounds: int, block: int) -> dict[str, dict[str, float]]:
    """Wall and CPU time of each call. Each candidate encodes `block` queries in a row (its weights stay in cache, as
    in a server that runs one encoder), then the next takes over, the order rotating block by block so load that
    comes and goes hits them alike. CPU time (the process's, so both threads of a 2-thread call) is the steadier
    figure on a shared machine: a preempted call's wall time measures the neighbours."""
    wall: dict[str, list[float]] = {name: [] for name in encoders}
    cpu: dict[str, list[float]] = {name: [] for name in encoders}
    # Warm-up over every query: OpenVINO compiles kernels per new input shape (sequence length) and ONNX Runtime
    # allocates per shape, as a server does in its first minutes; the timed pass then sees the steady state.
    for enc in encoders.values():
        for q in queries:
            enc.encode_queries(q)
    names = list(encoders)
    n = 0
    for _ in range(rounds):
        for start in range(0, len(queries), block):
            k = n % len(names)
            n += 1
            for name in names[k:] + names[:k]:
                enc = encoders[name]
                for q in queries[start:start + block]:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    enc.encode_queries(q)
                    wall[name].append(time.perf_counter() - started)
                    cpu[name].append(time.process_time() - cpu_started)
    out = {}
    for name in names:
        ms, cpu_ms = np.asarray(wall[name]) * 1e3, np.asarray(cpu[name]) * 1e3
        out[name] = {"n": int(len(ms)), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99))}
    return out


class OneByOne:
    """Encodes a list query by query, as the server does. Dynamic int8 scales each activation tensor as a whole, so
    a query's vector depends on the batch it is encoded in (cosine ~0.99 to itself alone): quality_report's batches
    of 64 would measure vectors the server never makes."""

    def __init__(self, encoder: OnnxEncoder) -> None:
        self.encoder = encoder
        self.name, self.dim = encoder.name, encoder.dim

    def encode_queries(self, texts, idle: bool = False):
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate([self.encoder.encode_queries(t) for t in texts])

    def count_tokens(self, text: str) -> int:
        return self.encoder.count_tokens(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder (queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--block", type=int, default=10, help="queries each candidate encodes in a row")
    parser.add_argument("--candidates", nargs="+", default=list(KINDS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--skip", nargs="*", default=[], choices=["latency", "quality"])
    parser.add_argument("--work", type=Path, help="where the derived models go (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    index = load_index(args.index, verify_checksums=False)
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / f"{args.split}.tsv")
    judged = {q: queries[q] for q in qrels if q in queries}
    report: dict[str, object] = {"cpu": cpu_summary(), "index": str(index.path), "queries": len(judged)}
    print(json.dumps(report["cpu"]), flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="qenc-"))
    work.mkdir(parents=True, exist_ok=True)
    train = load_qrels(args.data / "qrels" / "train.tsv") if (args.data / "qrels" / "train.tsv").is_file() else {}
    calibration = [queries[q] for q in list(train)[:300] if q in queries]

    made: dict[str, float] = {}
    encoders = {}
    for kind in args.candidates:
        for threads in args.threads:
            started = time.perf_counter()
            enc = make(kind, index.path, work, threads, calibration)
            made[f"{kind} x{threads}"] = time.perf_counter() - started
            encoders[f"{kind} x{threads}"] = enc
    report["load_seconds"] = made

    if "latency" not in args.skip:
        lat = latency(encoders, list(judged.values())[: args.latency_queries], args.rounds, args.block)
        for name, row in lat.items():
            base = lat[f"ort-int8 x{name.rsplit('x', 1)[1]}"] if "ort-int8" in args.candidates else row
            for key in ("p50_ms", "p99_ms", "cpu_p50_ms", "cpu_p99_ms"):
                row[key.replace("_ms", "_ratio")] = row[key] / base[key]
            print(f"{name:<22} wall p50 {row['p50_ms']:6.3f} p99 {row['p99_ms']:6.3f} ms (x{row['p50_ratio']:.2f} / "
                  f"x{row['p99_ratio']:.2f})  cpu p50 {row['cpu_p50_ms']:6.3f} p99 {row['cpu_p99_ms']:6.3f} ms "
                  f"(x{row['cpu_p50_ratio']:.2f} / x{row['cpu_p99_ratio']:.2f}) of ort-int8", flush=True)
        report["latency"] = lat
        report["load_average_end"] = os.getloadavg()

    if "quality" not in args.skip:
        texts = list(judged.values())
        reference = None
        quality = {}
        params = SearchParams(query="", depth=100, fusion="weighted", dense_weight=0.5)
        methods = [Method("dense", "dense"), Method("fused", "fused"), Method("pipeline", "pipeline")]
        for kind in args.candidates:
            enc = OneByOne(encoders[f"{kind} x{max(args.threads)}"])
            vectors = enc.encode_queries(texts)
            if reference is None or kind == "ort-fp32":
                reference = vectors
            rep = quality_report(Pipeline(index, enc), judged, qrels, params, methods)
            row = {m.name: rep["results"][m.name]["nDCG@10"] for m in methods}
            quality[kind] = row | {"vectors": vectors}
            print(f"{kind:<14} nDCG@10 dense {row['dense']:.4f} fused {row['fused']:.4f} "
                  f"pipeline {row['pipeline']:.4f}", flush=True)
        ref = quality["ort-fp32"]["vectors"] if "ort-fp32" in quality else reference
        for kind, row in quality.items():
            cos = (row.pop("vectors") * ref).sum(1)
            row |= {"cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
            print(f"{kind:<14} cosine to ort-fp32 min {row['cos_min']:.5f} mean {row['cos_mean']:.5f}", flush=True)
        report["quality"] = quality

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
