"""Build throughput on a local Ray cluster (rag-index build --ray) against the single-process build (issue 8).

Builds the same corpus single-process, then with 1 and 2 Ray workers (a private local cluster per worker count),
reports documents/s and chunks/s of the whole build and the seconds of its chunk, encode and windows stages, and
checks that every build wrote the same files (manifest checksums) as the single-process one.

    nice -n 10 python bench/experiments/ray_build.py --corpus ../shared/data/scifact/corpus.jsonl --docs 500 \\
        --out /tmp/ray_helper/bench --json /tmp/ray_helper/ray_build_500.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rag_service.encoder.encode import Encoder
from rag_service.index.build import BuildConfig, build_index
from rag_service.index.ray_build import RayBuild, RayOptions, build_index_on_ray


def _subset(corpus: Path, docs: int | None, out: Path) -> Path:
    if docs is None:
        return corpus
    target = out / f"corpus-{docs}.jsonl"
    with open(corpus, encoding="utf-8") as src, open(target, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src):
            if n >= docs:
                break
            dst.write(line)
    return target


def _row(mode: str, version_dir: Path, wall: float, reference: dict | None, startup: float = 0.0) -> dict:
    manifest = json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
    counts, timings = manifest["counts"], manifest["timings"]
    same = None if reference is None else manifest["files"] == reference["files"]
    return {"mode": mode, "documents": counts["documents"], "chunks": counts["chunks"],
            "windows": manifest.get("windows", {}).get("windows"), "build_s": round(wall, 2),
            "cluster_start_s": round(startup, 2), "docs_per_s": round(counts["documents"] / wall, 2),
            "chunks_per_s": round(counts["chunks"] / wall, 2),
            **{f"{stage}_s": timings.get(stage) for stage in ("chunk", "encode", "windows")},
            "document_encoder": manifest["params"]["document_encoder"], "same_files_as_single": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/data/scifact/corpus.jsonl"))
    parser.add_argument("--docs", type=int, default=None, help="first N documents only (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="builds per mode; the median is reported")
    parser.add_argument("--document-encoder", default="onnx-fp32")
    parser.add_argument("--out", type=Path, default=Path("/tmp/ray_build_bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = _subset(args.corpus, args.docs, args.out)
    config = BuildConfig(document_encoder=args.document_encoder, keep=1)
    encoder = Encoder()

    def median_row(rows: list[dict]) -> dict:
        best = sorted(rows, key=lambda r: r["build_s"])[len(rows) // 2]
        return {**best, "build_s_all": [r["build_s"] for r in rows],
                "same_files_as_single": all(r["same_files_as_single"] in (True, None) for r in rows)}

    rows, reference = [], None
    single = []
    for _ in range(args.repeats):
        shutil.rmtree(args.out / "single", ignore_errors=True)
        started = time.perf_counter()
        version_dir = build_index(corpus, args.out / "single", config, encoder=encoder, progress=False)
        wall = time.perf_counter() - started
        reference = reference or json.loads((version_dir / "manifest.json").read_text(encoding="utf-8"))
        single.append(_row("single process", version_dir, wall, reference))
    rows.append(median_row(single))
    for workers in args.workers:
        started = time.perf_counter()
        with RayBuild(RayOptions(workers=workers)):  # the cluster starts once per worker count, timed apart
            startup = time.perf_counter() - started
            runs = []
            for _ in range(args.repeats):
                target = args.out / f"ray-{workers}"
                shutil.rmtree(target, ignore_errors=True)
                started = time.perf_counter()
                version_dir = build_index_on_ray(corpus, target, config, encoder=encoder, progress=False,
                                                 options=RayOptions(workers=workers))
                runs.append(_row(f"Ray, {workers} worker(s)", version_dir, time.perf_counter() - started, reference,
                                 startup))
        rows.append(median_row(runs))

    base = rows[0]["build_s"]
    print(f"{'mode':<20} {'docs':>6} {'chunks':>7} {'build s':>8} {'docs/s':>7} {'chunks/s':>8} {'chunk s':>8} "
          f"{'encode s':>8} {'windows s':>9} {'vs single':>9}  same files")
    for r in rows:
        print(f"{r['mode']:<20} {r['documents']:>6} {r['chunks']:>7} {r['build_s']:>8.1f} {r['docs_per_s']:>7.2f} "
              f"{r['chunks_per_s']:>8.2f} {r['chunk_s']:>8.1f} {r['encode_s']:>8.1f} {r['windows_s'] or 0:>9.1f} "
              f"{base / r['build_s']:>8.2f}x  {r['same_files_as_single']}")
    print("cluster start (not in build s): " + ", ".join(f"{r['mode']} {r['cluster_start_s']:.1f}s"
                                                         for r in rows[1:]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"corpus": str(args.corpus), "docs": args.docs, "repeats": args.repeats,
                                         "median_of": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
