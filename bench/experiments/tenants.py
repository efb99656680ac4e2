"""Tenant isolation on SciFact: recall@10 of the tenant-filtered dense stage against an exact scan of the tenant's
chunks, and Search p50/p99 with a tenant against unfiltered Search, interleaved over gRPC.

    python bench/experiments/tenants.py --index /tmp/lead/sf --data ../shared/data/scifact --work /tmp/tenant \
        --tenants 100 --queries 300 --json /tmp/tenant/tenants.json

The index: every document of the built SciFact index `--index` gets a seeded synthetic tenant (one of `--tenants`,
uniformly) as keyword metadata `tenant`. Two index roots are written under `--work`: `sf-tenants` with tenant key
`tenant` (as `rag-index build --tenant-key tenant` records it, checked by the build's own check) and `sf-plain`
without one (`--dense-index hnsw`: `sf-tenants-hnsw` and `sf-plain-hnsw`, an HNSW graph over the same vectors). Only
the document store differs from the source index (it is rewritten with the metadata); chunks, BM25, vectors, windows
and the encoder export are the source's files, hard-linked: metadata changes none of them, and re-encoding SciFact
would take this machine ~25 minutes for the same vectors.

Part 1, in process: the tenant index's first stage as the server runs it (`Pipeline.retrieve`, the request's params
after api/tenancy.py has ANDed the tenant into the filter) with the query vector given. Recall@10: the dense stage's
top 10 against the exact top 10 among the tenant's chunks (a brute-force scan of the vectors under the mask).

Part 2, over gRPC: both roots served by `rag-serve` child processes (defaults, 2 workers); per query, in a seeded
random order, three Search calls with CACHE_BYPASS: unfiltered on sf-plain, `tenant` on sf-tenants (the tenant
enforced by the server), and the same tenant as an explicit `filter` on sf-plain (what the enforcement amounts to).
Client wall time per call; p50/p99 and their ratios to unfiltered. Every tenant reply's contexts are checked to be
the tenant's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import grpc
import numpy as np

from rag_service.api import tenancy
from rag_service.api.auth import EVERYTHING
from rag_service.bench.data import load_queries
from rag_service.bench.serve import ServerProcess
from rag_service.core.config import Limits
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import OnnxEncoder
from rag_service.index import manifest as manifest_mod
from rag_service.index import metadata as metadata_mod
from rag_service.index import publish as publish_mod
from rag_service.index.chunking import Document
from rag_service.index.load import load_index, resolve_version_dir
from rag_service.index.manifest import read_manifest
from rag_service.index.store import DocStore, write_store
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc
from rag_service.retrievers import dense as dense_mod
from rag_service.search.pipeline import Pipeline

FIELD = "tenant"


def tenant_name(i: int) -> str:
    return f"t{i:03d}"


def derive(source: Path, root: Path, tenants: int, seed: int, tenant_key: str | None, dense_kind: str) -> Path:
    """An index root holding the source index with a seeded tenant per document (see the module docstring);
    `dense_kind` hnsw builds an HNSW graph over the source's vectors in place of its dense index."""
    src = resolve_version_dir(source)
    manifest = read_manifest(src)
    store = DocStore.load(src)
    assign = np.random.default_rng(seed).integers(0, tenants, store.n_docs)
    docs = [Document(id=store.doc_id(d), title=store.doc_title(d), text="",
                     metadata={**store.doc_metadata_raw(d), FIELD: tenant_name(int(assign[d]))})
            for d in range(store.n_docs)]
    chunks = [store.chunk(c) for c in range(store.n_chunks)]
    schema = metadata_mod.resolve_schema(docs)
    if tenant_key is not None:
        metadata_mod.check_tenant_key(tenant_key, docs, schema)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tmp = publish_mod.make_tmp_dir(root)
    write_store(tmp, docs, chunks, schema)
    params = dict(manifest["params"])
    if dense_kind != "source":
        vectors = np.load(src / dense_mod.VECTORS_FILE)
        dense_mod.write_dense(tmp, dense_mod.build_dense_index(vectors, dense_kind), vectors, dense_kind)
        params.update(dense_index=dense_kind, dense_index_requested=dense_kind)
    for path in src.iterdir():  # everything the metadata does not change: the source's own files
        if path.is_file() and path.name != manifest_mod.MANIFEST_FILE and not (tmp / path.name).exists():
            os.link(path, tmp / path.name)
    files = manifest_mod.file_entries(tmp)
    created = manifest_mod.utc_now()
    derived = {**manifest, "name": root.name, "version": manifest_mod.make_version(created, files),
               "created_at": manifest_mod.iso_utc(created), "metadata_fields": sorted(schema),
               "metadata_schema": schema, "tenant_key": tenant_key, "params": params,
               "build_config": {**manifest.get("build_config", {}), "tenant_key": tenant_key},
               "derived": {"from": str(src), "tenants": tenants, "seed": seed}, "files": files}
    return publish_mod.publish(root, tmp, derived, keep=1)


def exact_top(vectors: np.ndarray, q: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    allowed = np.flatnonzero(mask)
    scores = vectors[allowed] @ q
    return allowed[np.lexsort((allowed, -scores))[:k]]


def stats(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def recall(tenant_root: Path, queries: list[str], tenants_of_queries: list[str]) -> dict:
    index = load_index(tenant_root, verify_checksums=False)
    assert index.tenant_key == FIELD
    encoder = OnnxEncoder(index.path, "onnx-int8", threads=1)
    pipeline = Pipeline(index, encoder)
    vectors = np.asarray(index.dense.vectors, dtype=np.float32)
    qvec = encoder.encode_queries(queries)
    limits = Limits()
    recalls, allowed, leaks, times = [], [], 0, []
    for query, q, tenant in zip(queries, qvec, tenants_of_queries):
        params = tenancy.apply(SearchParams(query=query, top_k=10, depth=100), tenant, EVERYTHING, FIELD, limits)
        started = time.perf_counter()
        candidates = pipeline.retrieve(params, query_vector=q)
        times.append(time.perf_counter() - started)
        mask = index.filter_mask(None, params.filter)
        assert mask is not None
        allowed.append(float(mask.mean()))
        want = exact_top(vectors, q, mask, 10)
        got = candidates.dense[0][:10]
        found = np.concatenate([candidates.bm25[0], candidates.dense[0], candidates.fused.ids]).astype(np.int64)
        leaks += int(np.count_nonzero(~mask[found]))
        recalls.append(len(set(got.tolist()) & set(want.tolist())) / max(1, len(want)))
    return {"chunks": index.n_chunks, "documents": index.n_docs, "dense_kind": index.dense.kind,
            "allowed_share_mean": round(float(np.mean(allowed)), 5),
            "allowed_share_min": round(float(np.min(allowed)), 5), "recall@10": round(float(np.mean(recalls)), 4),
            "recall@10_min": round(float(np.min(recalls)), 4), "first_stage": stats(times),
            "candidates_of_other_tenants": leaks}


def latency(plain_root: Path, tenant_root: Path, queries: list[str], tenants_of_queries: list[str],
            seed: int) -> dict:
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"unfiltered": [], "tenant": [], "filter": []}
    foreign = 0
    with ServerProcess(plain_root) as plain, ServerProcess(tenant_root) as keyed, \
            grpc.insecure_channel(plain.target) as plain_channel, grpc.insecure_channel(keyed.target) as channel:
        plain_stub, keyed_stub = pb_grpc.RetrieverStub(plain_channel), pb_grpc.RetrieverStub(channel)
        info = keyed_stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30)
        assert info.tenant_key == FIELD, info.tenant_key

        def call(arm: str, query: str, tenant: str) -> pb.SearchResponse:
            request = pb.SearchRequest(query=query, cache=pb.CACHE_BYPASS)
            stub = plain_stub
            if arm == "tenant":
                request.tenant, stub = tenant, keyed_stub
            elif arm == "filter":
                request.filter.must.add(key=FIELD).match.keyword = tenant
            started = time.perf_counter()
            reply = stub.Search(request, timeout=60)
            times[arm].append(time.perf_counter() - started)
            return reply

        for query, tenant in zip(queries[:20], tenants_of_queries):  # warm: both servers, every arm
            for arm in times:
                call(arm, query, tenant)
        for values in times.values():
            values.clear()
        for query, tenant in zip(queries, tenants_of_queries):
            for arm in rng.permutation(list(times)):
                reply = call(str(arm), query, tenant)
                if arm != "unfiltered":
                    foreign += sum(1 for c in reply.contexts if c.metadata.get(FIELD) != tenant)
    base = stats(times["unfiltered"])
    rows = {"unfiltered": {**base, "p50_ratio": 1.0, "p99_ratio": 1.0}}
    for arm in ("tenant", "filter"):
        s = stats(times[arm])
        rows[arm] = {**s, "p50_ratio": round(s["p50_ms"] / base["p50_ms"], 2),
                     "p99_ratio": round(s["p99_ms"] / base["p99_ms"], 2)}
    return {"calls_per_arm": len(queries), "rows": rows, "contexts_of_other_tenants": foreign}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True, help="A built SciFact index (root or version).")
    parser.add_argument("--data", type=Path, required=True, help="SciFact in BEIR layout (queries.jsonl).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tenant"), help="Where the two roots are written.")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--dense-index", choices=["source", "flat", "hnsw"], default="source",
                        help="The dense index of both roots: the source's (SciFact builds flat), or one built here.")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    suffix = "" if args.dense_index == "source" else f"-{args.dense_index}"
    tenant_root = args.work / f"sf-tenants{suffix}"
    plain_root = args.work / f"sf-plain{suffix}"
    derive(args.index, tenant_root, args.tenants, args.seed, FIELD, args.dense_index)
    derive(args.index, plain_root, args.tenants, args.seed, None, args.dense_index)
    queries = list(load_queries(args.data / "queries.jsonl").values())[: args.queries]
    rng = np.random.default_rng(args.seed + 1)
    tenants_of_queries = [tenant_name(int(t)) for t in rng.integers(0, args.tenants, len(queries))]
    out: dict = {"source": str(args.index), "tenants": args.tenants, "queries": len(queries), "seed": args.seed,
                 "dense_index": args.dense_index}
    out["recall"] = recall(tenant_root, queries, tenants_of_queries)
    print(json.dumps(out["recall"], indent=1), flush=True)
    if not args.skip_latency:
        out["search"] = latency(plain_root, tenant_root, queries, tenants_of_queries, args.seed)
        print(json.dumps(out["search"], indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
