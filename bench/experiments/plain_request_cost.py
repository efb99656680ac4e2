"""What a plain request (none of the query API's options) pays in the server's own Python, per step, in µs: run it
with two installs (two commits) to see what a change adds to the fast path.

    .venv/bin/python bench/experiments/plain_request_cost.py --index /tmp/lead/sf
    /work/main/.venv/bin/python bench/experiments/plain_request_cost.py --index /tmp/lead/sf

Steps: validation (api.request.search_params), the cache key (search.cache.CachedSearch.key), the fused-list quality
signals (searcher.quality_signals) and their metrics (Metrics.observe_quality) where the install has them, and the
reply joined from prepared bytes (api.reply.joined, 10 contexts). Each is the best of --repeat runs of --number
calls, so a busy machine inflates it less than a mean would.
"""

from __future__ import annotations

import argparse
import timeit
from pathlib import Path

from rag_service.api import reply
from rag_service.api.request import search_params
from rag_service.core.config import Limits, SearchDefaults
from rag_service.core.metrics import Metrics
from rag_service.core.params import ContextResult, SearchResult
from rag_service.index.load import load_index
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.search import searcher
from rag_service.search.cache import CachedSearch


def best_us(call, number: int, repeat: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    index = load_index(args.index, verify_checksums=False)
    prepared = index.context_bytes()
    defaults, limits = SearchDefaults(), Limits()
    request = pb.SearchRequest(query="what is the effect of vitamin d on bone density", top_k=10)
    params = search_params(request, defaults, limits)
    contexts = [ContextResult(chunk=c, doc_id="d", chunk_id="d#0", title="", text="", metadata={}, score=0.5,
                              bm25_score=1.0, dense_score=0.5, tokens=200) for c in range(10)]
    result = SearchResult(contexts=contexts, index_version=index.version, stage_us={"encode": 3000},
                          route="full", route_reason="within budget")

    class Version:
        version = index.version
        collection = index.name

    steps = {
        "validate": lambda: search_params(request, defaults, limits),
        "cache key": lambda: CachedSearch.key(Version, params),  # type: ignore[arg-type]
        "reply joined": lambda: reply.joined(result, pb.SERVED_FROM_MISS, None, False, 1234, prepared),
    }
    if hasattr(searcher, "quality_signals"):
        import numpy as np

        from rag_service.kernels.native import FusionResult

        ids = np.arange(100, dtype=np.int64)
        fused = FusionResult(ids, np.linspace(1, 0, 100).astype(np.float32), np.zeros(100, np.float32),
                             np.zeros(100, np.float32))
        metrics = Metrics()
        metrics.set_index(type("S", (), {"name": "i", "version": "v", "manifest": {"model": {"name": "m"}},
                                         "n_docs": 0, "n_chunks": 0, "path": ""})())
        result.signals = searcher.quality_signals(fused, ids, ids[::-1].copy())
        steps["quality signals"] = lambda: searcher.quality_signals(fused, ids, ids[::-1].copy())
        steps["quality metrics"] = lambda: metrics.observe_quality(result)
    for name, call in steps.items():
        print(f"{name:16s} {best_us(call, args.number, args.repeat):8.2f} µs")


if __name__ == "__main__":
    main()
