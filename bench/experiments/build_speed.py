"""Build time against quality for the document-side options of `rag-index build` (not run by the tests).

    python bench/experiments/build_speed.py --input /tmp/build_wt/sf1k/corpus.jsonl --data /tmp/build_wt/sf1k \
        --out /tmp/build_wt/ab --variant today=onnx-fp32:encode --variant int8=onnx-int8:encode \
        --variant pooled=onnx-fp32:chunk --variant int8-pooled=onnx-int8:chunk --json /tmp/build_wt/ab.json

Each --variant NAME=DOCUMENT_ENCODER:WINDOW_POOLING[:WINDOW_SENTENCES[:BATCH_SIZE]] is one full `build_index` (the
code `rag-index build` runs) into OUT/NAME with that BuildConfig, everything else at its defaults; the builds share
one loaded torch Encoder, as one `rag-index build` process has, and run one after another (the machine is shared:
compare the stage seconds of variants built in the same run). After each build the index is loaded and scored on the
judged queries of DATA (queries.jsonl, qrels/test.tsv) with the index's int8 ONNX query encoder, the server's
defaults and methods fused (first stage) and pipeline (the whole request path, reranker included): nDCG@10 per
variant. Prints one table row per variant: the build's process CPU seconds, the manifest's stage seconds (encode
includes the pooling of window vectors when WINDOW_POOLING is chunk; windows is the planning plus, for encode, the
second pass), the total build seconds and nDCG@10. --quality-only skips the build and scores the indexes already in OUT.

The SciFact subset used for quick comparisons (1,000 documents: every document judged for a test query, the rest
drawn with seed 15) is made by --make-subset SCIFACT_DIR, written to the directory given by --data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.bench.data import load_qrels, load_queries
from rag_service.bench.quality import Method, quality_report
from rag_service.core.config import SearchDefaults
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder, load_index_encoder
from rag_service.index.build import BuildConfig, build_index
from rag_service.index.load import load_index
from rag_service.search.pipeline import Pipeline

STAGES = ("chunk", "tokens", "bm25", "encode", "windows", "dense")


def make_subset(source: Path, target: Path, size: int, seed: int = 15) -> None:
    with open(source / "corpus.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    qrels = load_qrels(source / "qrels" / "test.tsv")
    judged = {d for q in qrels.values() for d in q}
    rest = [d["_id"] for d in docs if d["_id"] not in judged]
    keep = judged | set(random.Random(seed).sample(rest, max(0, size - len(judged))))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    with open(target / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            if d["_id"] in keep:
                f.write(json.dumps(d) + "\n")
    with open(target / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, rel in qrels.items():
            for d, s in rel.items():
                f.write(f"{q}\t{d}\t{s}\n")
    (target / "queries.jsonl").write_bytes((source / "queries.jsonl").read_bytes())
    print(f"{target}: {len(keep)} documents, {len(qrels)} judged queries")


def parse_variant(spec: str) -> tuple[str, BuildConfig]:
    name, _, rest = spec.partition("=")
    parts = rest.split(":")
    if not name or len(parts) < 2:
        raise SystemExit(f"--variant {spec!r}: expected NAME=DOCUMENT_ENCODER:WINDOW_POOLING[:SENTENCES[:BATCH]]")
    config = BuildConfig(document_encoder=parts[0], window_pooling=parts[1],
                         window_sentences=int(parts[2]) if len(parts) > 2 else BuildConfig.window_sentences,
                         batch_size=int(parts[3]) if len(parts) > 3 else BuildConfig.batch_size, keep=1)
    config.validate()
    return name, config


def score(index_dir: Path, data: Path) -> dict[str, float]:
    loaded = load_index(index_dir)
    encoder = load_index_encoder("onnx-int8", loaded.path, threads=os.cpu_count() or 1)
    params = SearchParams.from_defaults("", SearchDefaults(), cache="bypass")
    report = quality_report(Pipeline(loaded, encoder), load_queries(data / "queries.jsonl"),
                            load_qrels(data / "qrels" / "test.tsv"), params,
                            methods=[Method("fused", "fused"), Method("pipeline", "pipeline")])
    return {m: round(float(row["nDCG@10"]), 4) for m, row in report["results"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, help="corpus.jsonl to build")
    ap.add_argument("--data", type=Path, required=True, help="queries.jsonl and qrels/test.tsv")
    ap.add_argument("--out", type=Path, help="root of the variants' indexes")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--make-subset", type=Path, metavar="SCIFACT_DIR")
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.make_subset:
        make_subset(args.make_subset, args.data, args.size)
        return
    if not args.out or not args.variant:
        raise SystemExit("--out and at least one --variant are needed")
    variants = [parse_variant(v) for v in args.variant]
    encoder = None if args.quality_only else Encoder(device="cpu")
    rows = []
    for name, config in variants:
        root = args.out / name
        cpu = None
        if not args.quality_only:
            started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            build_index(args.input, root, config, encoder=encoder, progress=False)
            after = resource.getrusage(resource.RUSAGE_SELF)
            # CPU seconds of every thread of the build: steadier than wall time on a shared machine.
            cpu = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
            print(f"{name}: built in {time.perf_counter() - started:.1f}s, {cpu} CPU s", flush=True)
        manifest = json.loads((root / "CURRENT" / "manifest.json").read_text())
        timings = manifest["timings"]
        row = {"variant": name, "document_encoder": manifest["params"]["document_encoder"],
               "window_pooling": manifest["params"].get("window_pooling"),
               "window_sentences": config.window_sentences, "batch_size": config.batch_size,
               "window_rows": manifest.get("windows", {}).get("windows"),
               **{s: timings.get(s, 0.0) for s in STAGES}, "total": manifest["build_seconds"], "cpu_seconds": cpu,
               "ndcg10": score(root, args.data), "load_average": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | encoder | windows | " + " | ".join(STAGES) + " | total s | fused | pipeline |")
    print("| --- " * (len(STAGES) + 6) + "|")
    for r in rows:
        print(f"| {r['variant']} | {r['document_encoder']} | {r['window_pooling']} ({r['window_rows']}) | "
              + " | ".join(f"{r[s]:.1f}" for s in STAGES)
              + f" | {r['total']:.1f} | {r['ndcg10']['fused']:.4f} | {r['ndcg10']['pipeline']:.4f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
