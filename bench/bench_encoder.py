"""Issue 5: the query encoders (torch, ONNX fp32, ONNX int8) and document encoding for builds, measured together.

    python bench/bench_encoder.py --index /tmp/idx/scifact --data ../shared/data/scifact \
        --json /tmp/fastpath/encoder.json

1. Per-query encode latency (one query per call, like the server) for each encoder at 1 and 2 threads, interleaved
   round by round so machine noise hits every encoder alike; p50 / p99 and the speed-up over sentence-transformers.
2. SciFact test nDCG@10 (dense alone and fused) with each query encoder against the index's documents, which were
   encoded in fp32 by torch; and the cosine of each encoder's query vectors to torch's.
3. Document encoding throughput on the first --docs chunks of the index: SentenceTransformer.encode at its defaults
   (the baseline), then Encoder.encode_documents (torch, length-sorted) and OnnxEncoder fp32 / int8, with the min and
   mean cosine to the baseline's vectors.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from rag_service import onnx_export
from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import quality_report
from rag_service.encode import Encoder, OnnxEncoder
from rag_service.index.chunking import dense_text
from rag_service.index.load import load_index
from rag_service.pipeline import Pipeline, SearchParams

KINDS = ("torch", "onnx-fp32", "onnx-int8")


def make(kind: str, export: Path, threads: int):
    if kind == "torch":
        torch.set_num_threads(threads)
        return Encoder(device="cpu")
    return OnnxEncoder(export, kind, threads=threads)


def latency(encoders: dict[str, object], queries: list[str], rounds: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for name, enc in encoders.items():  # warm-up
        for q in queries[:10]:
            enc.encode_queries([q])
    for _ in range(rounds):
        for q in queries:
            for name, enc in encoders.items():
                if name.startswith("torch"):
                    torch.set_num_threads(int(name.rsplit("x", 1)[1]))
                started = time.perf_counter()
                enc.encode_queries([q])
                times[name].append(time.perf_counter() - started)
    out = {}
    for name, t in times.items():
        ms = np.asarray(t) * 1e3
        out[name] = {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder (queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--docs", type=int, default=2000, help="chunks for the document-encoding measurement")
    parser.add_argument("--skip", nargs="*", default=[], choices=["latency", "quality", "documents"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    export = onnx_export.cached_export()
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / f"{args.split}.tsv")
    judged = {q: queries[q] for q in qrels if q in queries}
    report: dict[str, object] = {"export": str(export), "torch_threads_default": torch.get_num_threads()}

    if "latency" not in args.skip:
        encoders = {f"{kind} x{threads}": make(kind, export, threads) for kind in KINDS for threads in (1, 2)}
        lat = latency(encoders, list(judged.values())[: args.latency_queries], args.rounds)
        for name, row in lat.items():
            base = lat[f"torch x{name.rsplit('x', 1)[1]}"]["p50_ms"]
            row["speedup_vs_torch_p50"] = base / row["p50_ms"]
            print(f"{name:<16} p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                  f"x{row['speedup_vs_torch_p50']:.1f} vs torch (same threads)", flush=True)
        report["latency"] = lat
        torch.set_num_threads(report["torch_threads_default"])

    index = load_index(args.index, verify_checksums=False)
    if "quality" not in args.skip:
        reference = None
        quality = {}
        for kind in KINDS:
            enc = make(kind, export, 2)
            vectors = enc.encode_queries(list(judged.values()))
            if reference is None:
                reference = vectors
            cos = (vectors * reference).sum(1)
            params = SearchParams(query="", depth=100, fusion="weighted", dense_weight=0.5)
            rep = quality_report(Pipeline(index, enc), judged, qrels, params)
            row = {m: rep["results"][m]["nDCG@10"] for m in ("dense", "fused")}
            row |= {"recall@100_dense": rep["results"]["dense"]["R@100"], "cos_min": float(cos.min()),
                    "cos_mean": float(cos.mean())}
            quality[kind] = row
            print(f"{kind:<10} nDCG@10 dense {row['dense']:.4f} fused {row['fused']:.4f}  "
                  f"cosine to torch min {row['cos_min']:.4f} mean {row['cos_mean']:.4f}", flush=True)
        report["quality"] = quality

    if "documents" not in args.skip:
        store = index.store
        n = min(args.docs, index.n_chunks)
        texts = [dense_text(store.doc_title(store.chunk_doc(i)), store.chunk_text(i)) for i in range(n)]
        torch.set_num_threads(report["torch_threads_default"])
        ref_enc = Encoder(device="cpu")
        started = time.perf_counter()
        # The baseline the issue names: a plain encode call at its defaults (batch 32, its own length sort).
        ref = ref_enc._model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
        base_rate = n / (time.perf_counter() - started)
        docs = {"chunks": n, "sentence_transformers_default": {"docs_per_s": base_rate}}
        print(f"documents: {n} chunks; SentenceTransformer.encode defaults {base_rate:.1f}/s", flush=True)
        candidates = [("torch sorted b64", ref_enc)] + [
            (f"{kind} sorted b64", OnnxEncoder(export, kind, threads=torch.get_num_threads()))
            for kind in ("onnx-fp32", "onnx-int8")]
        for name, enc in candidates:
            started = time.perf_counter()
            vectors = enc.encode_documents(texts, batch_size=64)
            rate = n / (time.perf_counter() - started)
            cos = (vectors * ref).sum(1)
            docs[name] = {"docs_per_s": rate, "ratio": rate / base_rate, "cos_min": float(cos.min()),
                          "cos_mean": float(cos.mean())}
            print(f"  {name:<20} {rate:7.1f}/s  x{rate / base_rate:.2f}  cosine min {cos.min():.5f} "
                  f"mean {cos.mean():.5f}", flush=True)
        report["documents"] = docs

    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
