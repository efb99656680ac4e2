"""rag-service beside its peers on the same corpus, queries, model and machine, in one run, interleaved.

rag-service runs as a real server (a `rag-serve` child process on port 0, or `--target`) and is asked over gRPC with
the cache bypassed, so every request does the full work. The peers (rag_service.bench.peers) run in this process.
Queries go round-robin across the systems, and the order rotates from one query to the next, so drift on this shared
machine (another job starting, a CPU frequency change) hits every system alike and none is always first after a
switch.

Times are per query at one client, encode included (a peer encodes its query with sentence-transformers in the timed
path, as rag-service does in its server); `lancedb (vector given)` is LanceDB's fairest case, with the query vector
computed beforehand. `same-parts` and `pgvector` (rag_service.bench.index_peers) are built from the rag-service index
itself (its chunks, its chunk vectors, its int8 query encoder), so they need `index`. A peer that cannot be built here
(a package missing, no local index) is skipped, with the reason in the report and the table.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.bench import peers as peers_mod
from rag_service.bench.latency import clamp_us, new_histogram, summarize

RAG = "rag-service"
LANCE_VECTOR = "lancedb (vector given)"
SAME_PARTS = "same-parts"
PGVECTOR = "pgvector"
PGVECTOR_ALL = "pgvector (all words)"
SYSTEMS = (RAG, "ensemble", "bm25s", "lancedb", LANCE_VECTOR, SAME_PARTS, PGVECTOR, PGVECTOR_ALL)
INDEX_PEERS = (SAME_PARTS, PGVECTOR, PGVECTOR_ALL)


@dataclass
class CompareConfig:
    corpus: Path
    queries: Mapping[str, str]
    qrels: Mapping[str, Mapping[str, int]] | None = None
    index: Path | None = None  # rag-service index to serve (a child process); or target
    target: str | None = None
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    k: int = 10
    rag_top_k: int = 20  # chunks asked from rag-service; the first k distinct documents are its ranking
    warmup: int = 20
    cache_dir: Path | None = peers_mod.DEFAULT_CACHE
    name: str | None = None
    corpus_limit: int | None = None
    # Synthetic corpora: a stand-in for the document encoder (scale runs); None: the real model.
    doc_embedder: Callable[[list[str]], np.ndarray] | None = None
    embedding_note: str = "all-MiniLM-L6-v2 (sentence-transformers), documents and queries"
    # torch intra-op threads here and OMP_NUM_THREADS of a served rag-service: one each, so that on a busy machine
    # no system's thread pool spins against the others (2 threads on this shared 2-core VM made a query encode 30x
    # slower under load); None leaves torch's default.
    threads: int | None = 1


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _mib(n: int | float | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _rag_ranking(reply, k: int) -> list[str]:
    ranking: list[str] = []
    for context in reply.contexts:
        if context.doc_id not in ranking:
            ranking.append(context.doc_id)
            if len(ranking) == k:
                break
    return ranking


def _index_dir(index: Path) -> Path:
    current = Path(index) / "CURRENT"
    return current.resolve() if current.exists() else Path(index).resolve()


def run_compare(config: CompareConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Runs the comparison; torch's, faiss's and the BLAS libraries' thread counts are set for the run
    (config.threads; faiss and BLAS: 1 unless given) and restored after it."""
    import torch

    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    # A peer's faiss search of one query on several OpenMP threads gains nothing, and leaves the other threads
    # spinning for a while after it: on the core that the server's next request needs, since the systems take turns
    # query by query (bench/README.md, "Issue 15", "Idle cores for a lone query").
    faiss: Any = None
    with contextlib.suppress(ImportError):
        import faiss as faiss_module

        faiss = faiss_module
    faiss_threads = faiss.omp_get_max_threads() if faiss is not None else 0
    if faiss is not None:
        faiss.omp_set_num_threads(config.threads or 1)
    # Likewise NumPy's (and faiss's) BLAS pool: OpenBLAS threads spin after a call, and with the default of one per
    # core they took the server's core between the peers' queries (interleaved with same-parts, rag-service's server
    # time went 4.6 / 13.1 ms p50 / p99 with them, 4.5 / 9.1 without; bench/README.md, "Issue 15").
    from threadpoolctl import threadpool_limits

    try:
        with threadpool_limits(limits=config.threads or 1, user_api="blas"):
            return _run_compare(config, progress)
    finally:
        torch.set_num_threads(previous)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_threads)


def _run_compare(config: CompareConfig, progress: Callable[[int, int], None] | None) -> dict:
    import contextlib

    import grpc

    from rag_service.bench.quality import evaluate
    from rag_service.bench.serve import ServerProcess
    from rag_service.pb.rag.v1 import retrieval_pb2 as pb
    from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

    unknown = [s for s in config.systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    if RAG in config.systems and config.index is None and config.target is None:
        raise ValueError("rag-service needs --index (served by a child process) or --target")
    started = time.time()
    corpus = peers_mod.read_beir_corpus(config.corpus, limit=config.corpus_limit)
    if not len(corpus):
        raise ValueError(f"{config.corpus}: no documents")
    qids = list(config.queries)
    texts = [config.queries[q] for q in qids]
    if not qids:
        raise ValueError("no queries")

    rss_start = _rss()
    model = peers_mod.sentence_transformer()
    model_name = peers_mod.default_model_name()
    rss_model = _rss()
    query_vectors = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    if not any(s not in (RAG, *INDEX_PEERS) for s in config.systems):
        # No peer that indexes whole documents (a scale run where they did not fit, or only the peers made of the
        # rag-service index's own vectors): nothing to embed the documents for.
        doc_vectors, encode_seconds, cached = None, 0.0, False
    elif config.doc_embedder is None:
        doc_vectors, encode_seconds, cached = peers_mod.embed_corpus(model, corpus.texts, model_name,
                                                                     config.cache_dir, progress=progress is not None)
    else:
        t0 = time.perf_counter()
        doc_vectors, cached = config.doc_embedder(corpus.texts), False
        query_vectors = config.doc_embedder(texts)
        encode_seconds = time.perf_counter() - t0
    key = peers_mod.corpus_key(model_name, corpus.texts)
    workdir = (config.cache_dir or Path("/tmp/bench")) / "peers" / key

    systems: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    search: dict[str, Callable[[int], list[str]]] = {}
    server: ServerProcess | None = None
    with contextlib.ExitStack() as stack:
        if RAG in config.systems:
            if config.target is not None:
                target = config.target
            elif config.index is not None:
                env = {} if config.threads is None else {"OMP_NUM_THREADS": str(config.threads)}
                server = stack.enter_context(ServerProcess(config.index, extra_env=env))
                target = server.target
            else:
                raise ValueError("rag-service needs --index (served by a child process) or --target")
            channel = stack.enter_context(grpc.insecure_channel(target))
            stub = pb_grpc.RetrieverStub(channel)
            info = stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
            row = {"build_seconds": round(info.build_seconds, 2) if info.build_seconds else None,
                   "index": f"{info.name} {info.version} ({info.chunk_count} chunks, {info.dense_index_type})"}
            if config.index is not None:
                row["disk_mib"] = _mib(peers_mod.dir_size(_index_dir(config.index)))
                manifest = json.loads((_index_dir(config.index) / "manifest.json").read_text())
                encode = manifest.get("timings", {}).get("encode")
                if encode is not None and row["build_seconds"] is not None:
                    row["build_seconds_without_encode"] = round(row["build_seconds"] - encode, 2)
            if server is not None:
                row["server_start_seconds"] = round(server.start_seconds, 1)
            systems[RAG] = row
            requests = [pb.SearchRequest(query=t, top_k=max(config.rag_top_k, config.k), cache=pb.CACHE_BYPASS)
                        for t in texts]
            server_us: list[int] = []

            def rag_search(i: int) -> list[str]:
                reply = stub.Search(requests[i], timeout=30)
                server_us.append(reply.server_time_us)
                return _rag_ranking(reply, config.k)

            search[RAG] = rag_search

        peer_kinds: tuple[tuple[str, Callable[[peers_mod.Corpus, np.ndarray, Any, Path], peers_mod.Peer]], ...] = (
            ("ensemble", peers_mod.EnsemblePeer), ("bm25s", peers_mod.Bm25sPeer), ("lancedb", peers_mod.LanceDbPeer))
        for name, build in peer_kinds:
            wanted = name in config.systems or (name == "lancedb" and LANCE_VECTOR in config.systems)
            # doc_vectors is None only when no peer is wanted.
            if not wanted or doc_vectors is None:
                continue
            before = _rss()
            try:
                peer = build(corpus, doc_vectors, model, workdir / name)
            except ImportError as error:
                for shown in (name, LANCE_VECTOR) if name == "lancedb" else (name,):
                    if shown in config.systems:
                        skipped[shown] = _missing(error)
                continue
            systems[name] = {"build_seconds": round(peer.build_seconds, 2), "disk_mib": _mib(peer.disk_bytes),
                             "memory_mib": _mib(max(_rss() - before, 0))}
            if name in config.systems:

                def by_text(i: int, peer: peers_mod.Peer = peer) -> list[str]:
                    return peer.search(texts[i], config.k)

                search[name] = by_text
            if name == "lancedb" and LANCE_VECTOR in config.systems:
                systems[LANCE_VECTOR] = dict(systems[name])

                def by_vector(i: int, peer: peers_mod.Peer = peer) -> list[str]:
                    return peer.search_vector(texts[i], query_vectors[i], config.k)

                search[LANCE_VECTOR] = by_vector
            if name not in config.systems:
                del systems[name]

        _build_index_peers(config, texts, systems, skipped, search, stack)

        if RAG in systems and server is not None:
            # Server RSS holds Python, torch and the model as this process does after loading the model: the
            # difference estimates what its index costs, comparable with the peers' RSS deltas.
            server_rss = server.rss_bytes()
            systems[RAG]["server_rss_mib"] = _mib(server_rss)
            systems[RAG]["memory_mib"] = _mib(max(server_rss - rss_model, 0))

        names = [s for s in config.systems if s in search]
        # This process holds the corpus, the peers' indexes and the model as millions of Python objects: a collection
        # of the oldest generation paused one timed call by 50-70 ms at 1M passages (the p99.9 of every such run), a
        # pause of the client, not of the system it timed. Frozen, they are not scanned again: the collections that
        # the timed loop's own allocations start stay short, for the in-process peers and the gRPC client alike.
        gc.collect()
        gc.freeze()
        try:
            for i in range(min(config.warmup, len(qids))):
                for name in names:
                    search[name](i)
            if RAG in search:
                server_us.clear()
            times: dict[str, list[float]] = {n: [] for n in names}
            runs: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
            total = len(qids) * len(names)
            for i, qid in enumerate(qids):
                shift = i % len(names)
                for name in names[shift:] + names[:shift]:
                    t0 = time.perf_counter()
                    ranking = search[name](i)
                    times[name].append(time.perf_counter() - t0)
                    runs[name][qid] = {doc: float(config.k - r) for r, doc in enumerate(ranking)}
                if progress is not None and (i % 10 == 9 or i == len(qids) - 1):
                    progress((i + 1) * len(names), total)
        finally:
            gc.unfreeze()
        if RAG in systems and server is not None:
            systems[RAG]["server_rss_mib_after"] = _mib(server.rss_bytes())

    judged = {q: dict(config.qrels[q]) for q in qids if config.qrels and q in config.qrels}
    quality = evaluate({n: {q: runs[n][q] for q in judged} for n in names}, judged) if judged else {}
    for name in names:
        seconds = np.asarray(times[name])
        histogram = new_histogram()
        for s in seconds:
            histogram.record_value(clamp_us(s))
        systems[name].update({
            "latency_ms": summarize(histogram),
            "qps_one_client": round(len(seconds) / seconds.sum(), 1),
            "ndcg@10": round(quality[name]["nDCG@10"], 4) if quality else None,
            "rr@10": round(quality[name]["RR@10"], 4) if quality else None,
            # Each run holds k documents, so ir-measures' R@100 is recall at k.
            f"recall@{config.k}": round(quality[name]["R@100"], 4) if quality else None,
            "histogram": histogram.encode().decode(),
        })
    if RAG in names:
        base = systems[RAG]
        # Time inside the server (validate .. reply); the rest of its latency is gRPC and the client.
        server_time = new_histogram()
        for us in server_us:
            server_time.record_value(clamp_us(us / 1e6))
        base["server_time_ms"] = summarize(server_time)
        for name in names:
            row = systems[name]
            row["ratio_to_rag_service"] = {
                "p50": round(row["latency_ms"]["p50"] / base["latency_ms"]["p50"], 2),
                "p99": round(row["latency_ms"]["p99"] / base["latency_ms"]["p99"], 2),
                "qps": round(row["qps_one_client"] / base["qps_one_client"], 3),
            }
    return {
        "tool": "rag-bench compare", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "corpus": {"name": config.name or Path(config.corpus).name, "path": str(config.corpus),
                   "documents": len(corpus)},
        "queries": len(qids), "judged_queries": len(judged), "k": config.k, "rag_top_k": config.rag_top_k,
        "warmup": config.warmup, "embeddings": config.embedding_note,
        "document_encode": {"seconds": round(encode_seconds, 1), "cached": cached,
                            "note": "shared by the peers, computed once and cached; not in their build_seconds"},
        "model_rss_mib": _mib(rss_model - rss_start), "threads": {"torch": _torch_threads(),
                                                                  "omp": os.environ.get("OMP_NUM_THREADS")},
        "systems": {n: systems[n] for n in names},
        "skipped": {n: skipped[n] for n in config.systems if n in skipped},
    }


def _missing(error: ImportError) -> str:
    return f"not installed: {error.name or error} (pip install rag-service[bench])"


def _build_index_peers(config: CompareConfig, texts: list[str], systems: dict[str, dict], skipped: dict[str, str],
                       search: dict[str, Callable[[int], list[str]]], stack) -> None:
    """Builds the peers made of the rag-service index's own parts (index_peers), or says why one is skipped."""
    from rag_service.bench import index_peers

    wanted = [n for n in INDEX_PEERS if n in config.systems]
    if not wanted:
        return
    if config.index is None:
        for name in wanted:
            skipped[name] = "needs --index: it is built from the rag-service index's chunks, vectors and encoder"
        return
    chunks = index_peers.read_index_chunks(config.index)
    try:
        encoder = index_peers.index_encoder(config.index, threads=config.threads or 1)
    except FileNotFoundError as error:
        for name in wanted:
            skipped[name] = f"the index holds no int8 query encoder ({error})"
        return
    if SAME_PARTS in wanted:
        before = _rss()
        try:
            same = index_peers.SamePartsPeer(chunks, encoder, n_chunks=config.rag_top_k)
        except ImportError as error:
            skipped[SAME_PARTS] = _missing(error)
        else:
            systems[SAME_PARTS] = {"build_seconds": round(same.build_seconds, 2), "disk_mib": _mib(same.disk_bytes),
                                   "memory_mib": _mib(max(_rss() - before, 0))}

            def by_parts(i: int) -> list[str]:
                return same.search(texts[i], config.k)

            search[SAME_PARTS] = by_parts
    pg_wanted = [n for n in wanted if n in (PGVECTOR, PGVECTOR_ALL)]
    if pg_wanted:
        try:
            # One Postgres serves both keyword matches; it is stopped, its files deleted, when the run ends.
            pg = stack.enter_context(index_peers.PgvectorPeer(chunks, encoder, n_chunks=config.rag_top_k))
        except ImportError as error:
            for name in pg_wanted:
                skipped[name] = _missing(error)
            return
        for name in pg_wanted:
            # Postgres's own memory is in its processes, not in this one's RSS.
            systems[name] = {"build_seconds": round(pg.build_seconds, 2), "disk_mib": _mib(pg.disk_bytes),
                             "memory_mib": None, "server_start_seconds": round(pg.start_seconds, 1),
                             "versions": {"postgres": pg.server_version, "pgvector": pg.pgvector_version},
                             "jit_available": pg.jit_available}

            def by_sql(i: int, match: str = "all" if name == PGVECTOR_ALL else "any") -> list[str]:
                return pg.search(texts[i], config.k, match)

            search[name] = by_sql


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def format_table(report: dict) -> str:
    lines = [f"{report['corpus']['name']}: {report['corpus']['documents']} documents, {report['queries']} queries "
             f"({report['judged_queries']} judged), top {report['k']}, one client, interleaved; ms per query",
             f"{'system':<24} {'p50':>7} {'p99':>7} {'p99.9':>7} {'qps':>7} {'nDCG@10':>8} {'build s':>8} "
             f"{'disk MiB':>8} {'mem MiB':>8} {'p50 x':>6} {'p99 x':>6} {'qps x':>6}"]
    for name, row in report["systems"].items():
        lat, ratio = row["latency_ms"], row.get("ratio_to_rag_service", {})
        lines.append(
            f"{name:<24} {lat['p50']:>7.2f} {lat['p99']:>7.2f} {lat['p99.9']:>7.2f} {row['qps_one_client']:>7.1f} "
            f"{_f(row.get('ndcg@10'), 4):>8} {_f(row.get('build_seconds'), 1):>8} {_f(row.get('disk_mib'), 1):>8} "
            f"{_f(row.get('memory_mib'), 0):>8} {_f(ratio.get('p50'), 2):>6} {_f(ratio.get('p99'), 2):>6} "
            f"{_f(ratio.get('qps'), 2):>6}")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"{name:<24} skipped: {reason}")
    encode = report["document_encode"]
    lines.append("x: ratio to rag-service (latency: >1 is slower; qps: <1 is slower). rag-service build time includes "
                 "encoding its chunks; the peers' excludes the shared, cached document encode "
                 f"({encode['seconds']} s{' cached' if encode['cached'] else ''})."
                 " Memory: RSS delta of building each peer in this process; rag-service: server RSS minus this "
                 "process's RSS with the model loaded.")
    return "\n".join(lines)


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
