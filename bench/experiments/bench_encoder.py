"""Issue 5: the query encoders (torch, ONNX fp32, ONNX int8) and document encoding for builds, measured together.

    python bench/experiments/bench_encoder.py --index /tmp/idx/scifact --data ../shared/data/scifact \
        --json /tmp/fastpath/encoder.json

1. Per-query encode latency (one query per call, like the server) for each encoder at 1 and 2 threads, interleaved
   round by round so machine noise hits every encoder alike; p50 / p99 and the speed-up over sentence-transformers.
2. SciFact test nDCG@10 (dense alone and fused) with each query encoder against the index's documents, which were
   encoded in fp32 by torch; and the cosine of each encoder's query vectors to torch's.
3. Document encoding throughput on the first --docs chunks of the index: SentenceTransformer.encode at its defaults
   (the baseline) against --doc-candidates (length-sorted encode_documents: torch fp32 or bf16, ONNX fp32 or int8),
   slice by slice in rotating order, with the min and mean cosine to the baseline's vectors and the ratios both in
   wall time and per CPU-second of the process (the steadier one on a shared machine).
4. With --doc-quality: every chunk of the index re-encoded by torch-bf16 (cached with --doc-cache), and SciFact
   nDCG@10 with those vectors in place of the index's, the query side unchanged.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import quality_report
from rag_service.core.params import SearchParams
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import Encoder, OnnxEncoder, _EncoderBase, default_model_path
from rag_service.index.chunking import dense_text
from rag_service.index.load import load_index
from rag_service.search.pipeline import Pipeline

KINDS = ("torch", "onnx-fp32", "onnx-int8")


def make(kind: str, export: Path, threads: int):
    if kind in ("torch", "torch-bf16"):
        torch.set_num_threads(threads)
        return Encoder(device="cpu", precision="bf16" if kind == "torch-bf16" else "fp32")
    return OnnxEncoder(export, kind, threads=threads)


def latency(encoders: dict[str, object], queries: list[str], rounds: int,
            block: int = 1) -> dict[str, dict[str, float]]:
    """Per-query encode times. `block` 1: the encoders take turns query by query, so load that comes and goes hits
    them alike, but each call finds the caches holding the other encoders' weights. `block` N: each encoder encodes
    N queries in a row before the next takes over (order reversed every other block), as in a server that runs one
    encoder: its weights stay in cache."""
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for enc in encoders.values():  # warm-up
        for q in queries[:10]:
            enc.encode_queries([q])

    def timed(name: str, enc, q: str) -> None:
        if name.startswith("torch"):
            torch.set_num_threads(int(name.rsplit("x", 1)[1]))
        started = time.perf_counter()
        enc.encode_queries([q])
        times[name].append(time.perf_counter() - started)

    for _ in range(rounds):
        if block <= 1:
            for q in queries:
                for name, enc in encoders.items():
                    timed(name, enc, q)
            continue
        for n, start in enumerate(range(0, len(queries), block)):
            order = list(encoders.items()) if n % 2 == 0 else list(encoders.items())[::-1]
            for name, enc in order:
                for q in queries[start:start + block]:
                    timed(name, enc, q)
    out = {}
    for name, t in times.items():
        ms = np.asarray(t) * 1e3
        out[name] = {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return out


def doc_candidates(names: list[str], export: Path, threads: int) -> list[tuple[str, object, int]]:
    """(label, encoder, batch size) for each name: KIND or KIND:BATCH, KIND one of torch, torch-bf16 (one batch per
    core), torch-bf16-team (each batch over all cores), onnx-fp32, onnx-int8."""
    out = []
    for name in names:
        kind, _, batch = name.partition(":")
        batch_size = int(batch or 64)
        if kind in ("torch", "torch-bf16", "torch-bf16-team"):
            enc = Encoder(device="cpu", precision="fp32" if kind == "torch" else "bf16")
            if kind == "torch-bf16-team":
                # bf16, but each batch spread over all cores (the base class's loop) instead of one batch per core.
                enc._embed_batches = functools.partial(_EncoderBase._embed_batches, enc)
        else:
            enc = OnnxEncoder(export, kind, threads=threads)
        out.append((f"{kind} sorted b{batch_size}", enc, batch_size))
    return out


def documents(index, n_docs: int, rounds: int, names: list[str], export: Path, threads: int) -> dict[str, object]:
    """Chunks/s of each candidate against SentenceTransformer.encode at its defaults, on the same chunks.

    The chunks are cut into `rounds` slices; every slice is encoded by the baseline and each candidate in turn (the
    order rotates by round), so load that comes and goes hits all of them alike. Reported: total chunks/s, the
    median and range of the per-slice speed-up over the baseline, and min / mean cosine to the baseline's vectors.
    """
    from rag_service.encoder.encode import cpu_has_amx_bf16

    store = index.store
    n = min(n_docs, index.n_chunks)
    texts = [dense_text(store.doc_title(store.chunk_doc(i)), store.chunk_text(i)) for i in range(n)]
    torch.set_num_threads(threads)
    from sentence_transformers import SentenceTransformer

    # The baseline is the library at its defaults, on the model the service loads.
    baseline = SentenceTransformer(default_model_path(), device="cpu")
    baseline.eval()
    candidates = doc_candidates(names, export, threads)
    for _, enc, _ in candidates:  # warm-up (first-call allocations, oneDNN kernel generation)
        enc.encode_documents(texts[:8], batch_size=8)
    dim = baseline.encode(texts[:8]).shape[1]
    labels = ["SentenceTransformer.encode defaults"] + [label for label, _, _ in candidates]
    seconds = {label: [] for label in labels}
    # CPU time of the process as well: on a shared machine wall time also measures the neighbours' load.
    cpu_seconds = {label: [] for label in labels}
    vectors = {label: np.empty((n, dim), dtype=np.float32) for label in labels}
    bounds = np.linspace(0, n, rounds + 1).astype(int)
    runners = [(labels[0], lambda part: baseline.encode(part, convert_to_numpy=True, normalize_embeddings=True))] + [
        (label, lambda part, enc=enc, b=b: enc.encode_documents(part, batch_size=b)) for label, enc, b in candidates]
    for r in range(rounds):
        lo, hi = bounds[r], bounds[r + 1]
        order = runners[r % len(runners):] + runners[: r % len(runners)]
        for label, run in order:
            started, cpu = time.perf_counter(), time.process_time()
            vectors[label][lo:hi] = run(texts[lo:hi])
            seconds[label].append(time.perf_counter() - started)
            cpu_seconds[label].append(time.process_time() - cpu)
        print(f"  slice {r + 1}/{rounds} ({hi - lo} chunks, load {os.getloadavg()[0]:.1f}): " + ", ".join(
            f"{label.split(' sorted')[0]} {(hi - lo) / seconds[label][-1]:.1f}/s" for label in labels), flush=True)
    ref = vectors[labels[0]]
    base = np.asarray(seconds[labels[0]])
    docs: dict[str, object] = {"chunks": n, "rounds": rounds, "threads": threads,
                               "cpu_has_amx_bf16": cpu_has_amx_bf16(), "load_average_end": os.getloadavg()}
    base_cpu = sum(cpu_seconds[labels[0]])
    for label in labels:
        t = np.asarray(seconds[label])
        cpu = sum(cpu_seconds[label])
        cos = (vectors[label] * ref).sum(1)
        ratios = base / t
        docs[label] = {"docs_per_s": n / t.sum(), "ratio_total": base.sum() / t.sum(),
                       "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()),
                       "ratio_max": float(ratios.max()), "docs_per_cpu_s": n / cpu, "cpu_ratio": base_cpu / cpu,
                       "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
        print(f"  {label:<36} {n / t.sum():7.1f}/s  x{base.sum() / t.sum():.2f} (per slice median "
              f"x{np.median(ratios):.2f}, {ratios.min():.2f}-{ratios.max():.2f})  per CPU-second x{base_cpu / cpu:.2f}"
              f"  cosine min {cos.min():.5f} mean {cos.mean():.5f}", flush=True)
    return docs


def document_quality(index, judged: dict[str, str], qrels, export: Path, cache: Path | None) -> dict[str, object]:
    """SciFact nDCG@10 (dense, fused) with the chunk vectors from torch-bf16 against the index's own (fp32), the
    query side unchanged (the server's default ONNX int8 encoder, and torch fp32)."""
    from rag_service.retrievers import dense as dense_mod

    store = index.store
    if cache is not None and cache.is_file():
        bf16 = np.load(cache)
    else:
        texts = [dense_text(store.doc_title(store.chunk_doc(i)), store.chunk_text(i)) for i in range(index.n_chunks)]
        enc = Encoder(device="cpu", precision="bf16")
        bf16 = enc.encode_documents(texts, batch_size=64, progress=True)
        print(f"  encoded {len(texts)} chunks with torch-bf16 at {enc.last_docs_per_second:.1f}/s", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, bf16)
    fp32 = np.asarray(index.dense.vectors)
    cos = (bf16 * fp32).sum(1)
    out: dict[str, object] = {"chunks": int(len(bf16)), "cos_min": float(cos.min()), "cos_mean": float(cos.mean())}
    print(f"  torch-bf16 chunk vectors vs the index's: cosine min {cos.min():.5f} mean {cos.mean():.5f}", flush=True)
    original = index.dense
    flat = dense_mod.build_dense_index(bf16, "flat")
    swapped = dense_mod.DenseIndex(flat, bf16, {"kind": "flat", "dim": int(bf16.shape[1]), "count": int(len(bf16))})
    params = SearchParams(query="", depth=100, fusion="weighted", dense_weight=0.5)
    for query_kind in ("onnx-int8", "torch"):
        enc = make(query_kind, export, 2)
        for docs_kind, dense in (("fp32 (index)", original), ("torch-bf16", swapped)):
            rep = quality_report(Pipeline(replace(index, dense=dense), enc), judged, qrels, params)
            row = {m: rep["results"][m]["nDCG@10"] for m in ("dense", "fused")}
            out[f"queries {query_kind}, documents {docs_kind}"] = row
            print(f"  queries {query_kind:<9} documents {docs_kind:<12} nDCG@10 dense {row['dense']:.4f} "
                  f"fused {row['fused']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder (queries.jsonl, qrels/test.tsv)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--latency-block", type=int, default=1,
                        help="queries each encoder encodes in a row (1: take turns query by query)")
    parser.add_argument("--docs", type=int, default=2000, help="chunks for the document-encoding measurement")
    parser.add_argument("--doc-rounds", type=int, default=5, help="slices the chunks are cut into (interleaving)")
    parser.add_argument("--doc-candidates", nargs="+", default=["onnx-fp32", "torch-bf16", "torch-bf16-team",
                                                                "torch-bf16:32", "torch-bf16:128"],
                        help="document encoders against the baseline: KIND[:BATCH], KIND one of torch, torch-bf16, "
                             "torch-bf16-team, onnx-fp32, onnx-int8")
    parser.add_argument("--latency-extra", nargs="*", default=[], choices=["torch-bf16"],
                        help="more query encoders for the latency table")
    parser.add_argument("--doc-quality", action="store_true",
                        help="also: nDCG@10 with every chunk re-encoded by torch-bf16 (slow: the whole index)")
    parser.add_argument("--doc-cache", type=Path, help="the torch-bf16 chunk vectors (.npy), reused when present")
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
        encoders = {f"{kind} x{threads}": make(kind, export, threads) for kind in KINDS + tuple(args.latency_extra)
                    for threads in (1, 2)}
        lat = latency(encoders, list(judged.values())[: args.latency_queries], args.rounds, args.latency_block)
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
        report["documents"] = documents(index, args.docs, args.doc_rounds, args.doc_candidates, export,
                                        report["torch_threads_default"])

    if args.doc_quality:
        report["document_quality"] = document_quality(index, judged, qrels, export, args.doc_cache)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
