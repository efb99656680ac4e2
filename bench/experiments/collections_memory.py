"""Many collections in one server, on SciFact subsets: resident memory by collection count, and an alias swapped under
load.

1. Memory. `--collections` (100) disjoint subsets of `--docs` SciFact documents each are built as collections of one
   index root (one model), plus one collection holding all their documents together. A real `rag-serve --index-root`
   serves 1, 10 and 100 of the small ones (roots of symlinks to the same builds) and then the one big one; after
   every collection has answered a query, the server's VmRSS, RssAnon and RssFile (/proc/PID/status) are read. The
   query encoder's own resident size is measured in this process (RSS before and after loading it), the figure every
   collection would add if each loaded its own encoder.
2. Alias swap under load. A server with two collections and the alias `live`; `--clients` threads search `live` for
   `--seconds` (SciFact test queries, cache bypassed so every request runs the pipeline), in rounds that alternate a
   steady phase with a phase that moves the alias between the two collections every `--swap-every` seconds. Counted:
   requests, failed requests (any status but OK), p50/p99 of each phase, and how many replies each collection gave.

    python bench/experiments/collections_memory.py --data ../shared/data/scifact --work /tmp/coll/mem \
        --json /tmp/coll/collections.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import psutil

from rag_service.api.collections import update_aliases
from rag_service.bench.serve import ServerProcess
from rag_service.client import RetrieverClient, RetrieverError

ADMIN = "collections-bench-admin"


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def build(data: Path, work: Path, n: int, docs: int, seed: int) -> tuple[list[Path], Path]:
    """`n` collections of `docs` distinct documents each under work/built, and one of all of them."""
    from rag_service.encoder.encode import Encoder
    from rag_service.index.build import BuildConfig, build_index
    from rag_service.index.load import resolve_version_dir

    lines = (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(seed).shuffle(lines)
    if n * docs > len(lines):
        raise SystemExit(f"--collections x --docs = {n * docs} is more than the {len(lines)} documents")
    built = work / "built"
    encoder = None
    folders = []
    for i in range(n + 1):
        name = f"c{i:03d}" if i < n else "all"
        folder = built / name
        folders.append(folder)
        if (folder / "CURRENT").exists():
            continue
        chosen = lines[i * docs:(i + 1) * docs] if i < n else lines[:n * docs]
        corpus = work / "corpora" / f"{name}.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("\n".join(chosen) + "\n", encoding="utf-8")
        encoder = encoder or Encoder()
        started = time.perf_counter()
        # The torch encoder already loaded: an ONNX document encoder would be loaded anew for every build.
        version = build_index(corpus, folder, BuildConfig(document_encoder="torch"), encoder=encoder,
                              progress=False)
        _share_export(version, resolve_version_dir(folders[0]))
        print(f"built {name} ({len(chosen)} documents) in {time.perf_counter() - started:.1f} s", flush=True)
    return folders[:n], folders[n]


def _share_export(version: Path, first: Path) -> None:
    """Every index carries the same ~150 MB ONNX export (one model): hard links to the first one's keep 101 indexes
    at a few MB each on disk. Same bytes, same checksums; the server reads each file as before."""
    from rag_service.encoder.onnx_export import FILES

    if version == first:
        return
    for name in FILES:
        mine, theirs = version / name, first / name
        if mine.exists() and theirs.exists() and mine.read_bytes() == theirs.read_bytes():
            tmp = mine.with_name(f".{name}.link")
            os.link(theirs, tmp)
            os.replace(tmp, mine)


def root_of(work: Path, name: str, folders: list[Path]) -> Path:
    """An index root holding `folders` as symlinks (the same builds served by servers of different sizes)."""
    root = work / "roots" / name
    root.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        link = root / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return root


def served_memory(root: Path, query: str) -> dict:
    with ServerProcess(None, args=["--index-root", str(root)]) as server, \
            RetrieverClient(server.target, timeout=600) as client:
        client.wait_until_serving(timeout=600)
        collections, _ = client.list_collections()
        for c in collections:  # every collection answers once: its first-query pages are in
            client.search(query, collection=c.name, top_k=10)
        status = _status(server.pid)
        return {"collections": len(collections), "serving": sum(c.status == "SERVING" for c in collections),
                "models": sorted({c.embedding_model for c in collections}),
                "documents": sum(c.document_count for c in collections),
                "chunks": sum(c.chunk_count for c in collections),
                "start_seconds": round(server.start_seconds, 1), **status}


def encoder_rss(index: Path) -> int:
    """Resident bytes one query encoder adds (the server's default backend, loaded from an index's export)."""
    from rag_service.core.config import ServerConfig
    from rag_service.encoder.encode import load_index_encoder
    from rag_service.index.load import resolve_version_dir

    config = ServerConfig()
    before = psutil.Process().memory_info().rss
    encoder = load_index_encoder(config.encoder.backend, resolve_version_dir(index), threads=1)
    encoder.encode_queries(["warm the encoder once"])
    return psutil.Process().memory_info().rss - before


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def swap_under_load(work: Path, a: Path, b: Path, queries: list[str], clients: int, seconds: float,
                    swap_every: float, rounds: int) -> dict:
    root = root_of(work, "swap", [a, b])
    update_aliases(root, lambda aliases: aliases.__setitem__("live", a.name))
    env = {"RAG_AUTH__ADMIN_TOKEN": ADMIN, "RAG_MAX_QUEUED": str(4 * clients)}
    phases: dict[str, dict] = {p: {"latencies": [], "failed": [], "by_collection": {}, "swaps": 0}
                               for p in ("steady", "swapping")}
    with ServerProcess(None, args=["--index-root", str(root)], extra_env=env) as server, \
            RetrieverClient(server.target, admin_token=ADMIN, timeout=600) as admin:
        admin.wait_until_serving(timeout=600)
        lock = threading.Lock()

        def load(n: int, phase: str, stop: threading.Event) -> None:
            record = phases[phase]
            with RetrieverClient(server.target, timeout=60) as client:
                i = n
                while not stop.is_set():
                    query = queries[i % len(queries)]
                    i += clients
                    started = time.perf_counter()
                    try:
                        reply = client.search(query, collection="live", cache="bypass")
                    except RetrieverError as error:
                        with lock:
                            record["failed"].append(f"{error.code.name}: {error.details}")
                        continue
                    elapsed = time.perf_counter() - started
                    with lock:
                        record["latencies"].append(elapsed)
                        record["by_collection"][reply.collection] = record["by_collection"].get(reply.collection,
                                                                                                0) + 1

        for _ in range(rounds):
            for phase in ("steady", "swapping"):
                stop = threading.Event()
                threads = [threading.Thread(target=load, args=(n, phase, stop)) for n in range(clients)]
                for t in threads:
                    t.start()
                ends = time.monotonic() + seconds
                target = b.name
                while time.monotonic() < ends:
                    time.sleep(swap_every)
                    if phase == "swapping":
                        admin.set_alias("live", target)
                        phases[phase]["swaps"] += 1
                        target = a.name if target == b.name else b.name
                stop.set()
                for t in threads:
                    t.join()
        admin.set_alias("live", a.name)
    out = {}
    for phase, record in phases.items():
        lat = record["latencies"]
        out[phase] = {"requests": len(lat) + len(record["failed"]), "failed": len(record["failed"]),
                      "failures": record["failed"][:5], "swaps": record["swaps"],
                      "p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
                      "p99_ms": round(1000 * percentile(lat, 0.99), 2) if lat else None,
                      "by_collection": record["by_collection"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/coll/mem"))
    parser.add_argument("--collections", type=int, default=100)
    parser.add_argument("--docs", type=int, default=20, help="documents per small collection")
    parser.add_argument("--counts", default="1,10,100", help="collection counts to serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--swap-every", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    small, big = build(args.data, args.work, args.collections, args.docs, args.seed)
    queries = [json.loads(line)["text"] for line in (args.data / "queries.jsonl").read_text().splitlines()]
    results: dict = {"docs_per_collection": args.docs, "memory": {}}
    for count in (int(c) for c in args.counts.split(",")):
        results["memory"][f"{count} small"] = served_memory(root_of(args.work, f"n{count}", small[:count]),
                                                            queries[0])
        print(count, results["memory"][f"{count} small"], flush=True)
    results["memory"]["1 holding all"] = served_memory(root_of(args.work, "all", [big]), queries[0])
    print("all", results["memory"]["1 holding all"], flush=True)
    results["encoder_rss_bytes"] = encoder_rss(small[0])
    print("encoder rss", results["encoder_rss_bytes"], flush=True)
    results["alias_swap"] = swap_under_load(args.work, small[0], small[1], queries, args.clients, args.seconds,
                                            args.swap_every, args.rounds)
    print(json.dumps(results["alias_swap"], indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
