"""Semantic-cache hit rates on labelled paraphrase pairs: text_a is cached, text_b is asked.

    python bench/experiments/paraphrase_cache.py --index /tmp/idx/scifact \
        --pairs ../shared/data/paraphrase/paws-wiki-dev.tsv ../shared/data/paraphrase/mrpc-train.tsv

For each pair, on an empty cache: text_a through `CachedSearch.run` (stored), then the lookups for text_b
(`CachedSearch.probe`: exact, then semantic) in the default and strict modes. Only hit decisions are measured here,
and they depend on the query (embedding, terms, BM25 candidates, signature), never on the stored contexts: text_a's
search returns no contexts (`Lookahead`), which saves 11,668 full searches. A hit on a pair labelled 1 (same meaning)
is a paraphrase hit; a hit on a pair labelled 0 is a false hit. Strict mode is meant for callers that cache generated
answers on ours (target: false hits <= 2% on PAWS); the default mode's criterion is retrieval fidelity on the served
index (bench/experiments/cache_fidelity.py), and PAWS non-paraphrases with the same words often do retrieve the same
contexts.
The guard's BM25 candidates come from --index (these sentences are not about its documents; the guard still compares
what the index would retrieve for each).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from cache_fidelity import embed  # the script's folder is sys.path[0] when run as a script

from rag_service.core.config import CacheConfig
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams, SearchResult
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.search.cache import CachedSearch
from rag_service.search.pipeline import Pipeline


class Lookahead:
    """The real pipeline for everything the cache asks of it (version, capabilities, guard, encoder), but searches
    that return no contexts (this benchmark never looks at them); what it answers is stored as a real search's is."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.inner = pipeline

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def search(self, params, *, query_vector=None, cache=None, **kwargs) -> SearchResult:
        result = SearchResult(contexts=[], index_version=self.inner.version, stage_us={})
        if cache is not None:
            cache.store(query_vector, result, self.inner.guard)
        return result


def read_pairs(path: Path) -> list[tuple[str, str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(r["text_a"], r["text_b"], int(r["label"])) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, nargs="+", required=True)
    parser.add_argument("--limit", type=int, default=0, help="first N pairs of each file (0: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cache/paraphrase"))
    parser.add_argument("--cosines", default="0.95,0.97,0.98", help="cosine-alone rows for comparison")
    args = parser.parse_args()

    pipeline = Pipeline(load_index(args.index, verify_checksums=False), Encoder())
    config = CacheConfig()
    print(f"default: cosine >= {config.semantic_min_cosine}, term overlap >= {config.guard_min_term_overlap} and BM25 "
          f"top-{config.guard_depth} overlap >= {config.guard_min_overlap}; strict: same content words in order and "
          f"cosine >= {config.strict_min_cosine}")
    print("| pairs | mode | paraphrase pairs | hit rate on paraphrases | non-paraphrase pairs | false hits |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in args.pairs:
        pairs = read_pairs(path)
        if args.limit:
            pairs = pairs[: args.limit]
        started = time.perf_counter()
        va = embed(pipeline.encoder, [a for a, _, _ in pairs], args.work, f"{path.stem}-a")
        vb = embed(pipeline.encoder, [b for _, b, _ in pairs], args.work, f"{path.stem}-b")
        labels = np.array([label for _, _, label in pairs])
        cos = np.einsum("ij,ij->i", va, vb)
        hits = {"default": np.zeros(len(pairs), bool), "strict": np.zeros(len(pairs), bool)}
        cache = CachedSearch(config, Metrics())
        for i, (a, b, _) in enumerate(pairs):
            cache.store.clear()
            cache.run(Lookahead(pipeline), SearchParams(query=a), query_vector=va[i])
            for mode in hits:
                hits[mode][i] = cache.probe(pipeline, SearchParams(query=b, cache=mode), vb[i]) is not None
        rows = [(f"cosine >= {t}", cos >= float(t)) for t in args.cosines.split(",")]
        rows += list(hits.items())
        pos, neg = labels == 1, labels == 0
        for name, h in rows:
            print(f"| {path.name} | {name} | {pos.sum()} | {h[pos].mean():.3f} | {neg.sum()} | {h[neg].mean():.3f} |",
                  flush=True)
        print(f"  ({len(pairs)} pairs in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
