"""Issue 5: the quantized dense first stage (int8 scalar / binary codes + exact rescoring) against the float index.

    python bench/experiments/quantized_dense.py --index /tmp/idx/scifact --data ../shared/data/scifact \
        --json /tmp/fastpath/quantized.json

For each code kind and oversampling factor: bytes of the searched codes (vs float32), recall@100 of the rescored
top 100 against the float index's exact top 100 (all SciFact queries, train + test), SciFact test nDCG@10 (dense
alone and fused) and the dense stage's per-query p50 / p99 (one thread, like the server).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import quality_report
from rag_service.core.params import SearchParams
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import OnnxEncoder
from rag_service.index.load import load_index
from rag_service.retrievers import dense as dense_mod
from rag_service.search.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    index = load_index(args.index, verify_checksums=False)
    flat = index.dense
    vectors = np.asarray(flat.vectors)
    encoder = OnnxEncoder(onnx_export.cached_export(), "onnx-fp32", threads=2)
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / "test.tsv")
    judged = {q: queries[q] for q in qrels if q in queries}
    qvec = encoder.encode_queries(list(queries.values()))
    truth = [set(flat.search(v, args.depth)[0].tolist()) for v in qvec]
    float_bytes = vectors.nbytes

    def measure(name: str, dense: dense_mod.DenseIndex) -> dict:
        times, recall = [], []
        for v, t in zip(qvec, truth):
            started = time.perf_counter()
            ids, _ = dense.search(v, args.depth)
            times.append(time.perf_counter() - started)
            recall.append(len(t & set(ids.tolist())) / len(t))
        ms = np.asarray(times) * 1e3
        rep = quality_report(Pipeline(replace(index, dense=dense), encoder), judged, qrels,
                             SearchParams(query="", depth=args.depth))
        row = {"searched_bytes": dense.searched_bytes, "memory_ratio": float_bytes / dense.searched_bytes,
               "recall@100_vs_float": float(np.mean(recall)), "min_recall": float(np.min(recall)),
               "ndcg10_dense": rep["results"]["dense"]["nDCG@10"], "ndcg10_fused": rep["results"]["fused"]["nDCG@10"],
               "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
        print(f"{name:<18} {row['searched_bytes'] / 2**20:7.2f} MiB (x{row['memory_ratio']:.1f} less)  "
              f"recall@100 {row['recall@100_vs_float']:.4f} (min {row['min_recall']:.2f})  nDCG@10 dense "
              f"{row['ndcg10_dense']:.4f} fused {row['ndcg10_fused']:.4f}  p50 {row['p50_ms']:.2f} ms "
              f"p99 {row['p99_ms']:.2f} ms", flush=True)
        return row

    report = {"chunks": len(vectors), "queries": len(qvec), "float": measure("float flat", flat)}
    # The coded copies take the same faiss index as the loaded one (read again from its file, mapped if flat).
    flags = faiss.IO_FLAG_MMAP if flat.kind == "flat" else 0
    float_index = faiss.read_index(str(flat.path / dense_mod.INDEX_FILE), flags)
    for kind, factors in (("sq8", (1, 2, 4)), ("binary", (4, 10, 20))):
        codes = dense_mod.build_codes(vectors, kind)
        params = {"kind": kind, "count": int(codes.ntotal), "code_bytes": int(codes.code_size) * int(codes.ntotal)}
        for factor in factors:
            dense = dense_mod.DenseIndex(float_index, flat.vectors, flat.params, codes=codes,
                                         codes_params=params, oversample=factor, use_gpu=False)
            report[f"{kind} x{factor}"] = measure(f"{kind} oversample {factor}", dense)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
