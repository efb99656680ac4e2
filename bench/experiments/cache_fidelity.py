"""Fidelity and hit rate of the semantic cache on SciFact's queries and generated variants of them.

    python bench/experiments/cache_fidelity.py --index /tmp/idx/scifact --queries ../shared/data/scifact/queries.jsonl

A stream of every query plus variants (case, punctuation, a leading "is it true that", a dropped or an added stop word,
two words swapped, doubled spaces), in a seeded shuffled order. Fidelity of a semantic hit: overlap@10 between the
contexts served and those of the same query with the cache bypassed. Target: mean >= 0.95 and >= 0.8 for 99% of hits.

1. Calibration: the cache's hit rule replayed over precomputed features (cosine, IDF-weighted term overlap, BM25 top-N
   overlap) for a grid of guard settings; the highest hit rate that meets the target first.
2. The real thing: the stream through `CachedSearch.run` (exact, then semantic lookup, else the pipeline and a store),
   in the default, strict and exact-only modes, with the configured thresholds (or --cosine/--depth/--overlap).
Embeddings are computed in one batch (and kept under --work); the cache path is the server's, given the vector.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from pathlib import Path

import numpy as np

from rag_service.bench.data import load_queries
from rag_service.core.config import CacheConfig
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import Encoder
from rag_service.index.load import load_index
from rag_service.retrievers.analysis import LUCENE_ENGLISH_STOP_WORDS
from rag_service.search.cache import CachedSearch, lexical_overlap, normalise, term_overlap
from rag_service.search.pipeline import Pipeline

TOP_K = 10
ADDABLE = ("the", "a", "of", "in", "for", "that")


def _words(q: str) -> list[str]:
    return q.split()


def v_case(q: str, rng: random.Random) -> str:
    return rng.choice([q.lower(), q.upper(), q[:1].lower() + q[1:] if q[:1].isupper() else q[:1].upper() + q[1:]])


def v_punct(q: str, rng: random.Random) -> str:
    stripped = q.rstrip(".?! ")
    return stripped + "?" if stripped == q else stripped


def v_prefix(q: str, rng: random.Random) -> str:
    return "is it true that " + q[:1].lower() + q[1:]


def v_drop_stop(q: str, rng: random.Random) -> str | None:
    w = _words(q)
    idx = [i for i, t in enumerate(w) if t.lower() in LUCENE_ENGLISH_STOP_WORDS]
    if not idx or len(w) < 3:
        return None
    i = rng.choice(idx)
    return " ".join(w[:i] + w[i + 1:])


def v_add_stop(q: str, rng: random.Random) -> str:
    w = _words(q)
    i = rng.randrange(len(w) + 1)
    return " ".join(w[:i] + [rng.choice(ADDABLE)] + w[i:])


def v_swap(q: str, rng: random.Random) -> str | None:
    w = _words(q)
    if len(w) < 3:
        return None
    i = rng.randrange(len(w) - 1)
    w[i], w[i + 1] = w[i + 1], w[i]
    return " ".join(w)


def v_space(q: str, rng: random.Random) -> str:
    return re.sub(" ", "  ", q, count=2) + " "


VARIANTS = {"case": v_case, "punct": v_punct, "prefix": v_prefix, "drop_stop": v_drop_stop, "add_stop": v_add_stop,
            "swap": v_swap, "space": v_space}


def make_stream(queries: list[str], n_variants: int, seed: int) -> list[tuple[str, str]]:
    """(text, kind) for every original and `n_variants` variants of it, shuffled."""
    rng = random.Random(seed)
    stream = []
    for q in queries:
        stream.append((q, "original"))
        kinds = list(VARIANTS)
        rng.shuffle(kinds)
        made = 0
        for kind in kinds:
            if made == n_variants:
                break
            v = VARIANTS[kind](q, rng)
            if v and v != q:
                stream.append((v, kind))
                made += 1
    rng.shuffle(stream)
    return stream


def embed(encoder: Encoder, texts: list[str], work: Path, tag: str) -> np.ndarray:
    digest = hashlib.sha256(("\n".join(texts) + encoder.name).encode()).hexdigest()[:16]
    path = work / f"{tag}-{digest}.npy"
    if path.exists():
        return np.load(path)
    vectors = encoder.encode_queries(texts)
    work.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def fidelity(served: list[int], fresh: list[int]) -> float:
    return len(set(served) & set(fresh)) / max(len(fresh), 1)


def summary(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return float("nan"), float("nan"), float("nan")
    a = np.asarray(values)
    return float(a.mean()), float(np.percentile(a, 1, method="lower")), float((a >= 0.8).mean())


class Simulation:
    """The cache's hit decisions replayed on precomputed features, so a grid of guard settings takes seconds: the
    same stream, the same rule (entries are the earlier misses; the nearest `candidates` entries at or above the
    cosine threshold, best first, and the first that passes the guard is the hit)."""

    def __init__(self, texts, vectors, refs, bm25_lists, terms, candidates: int) -> None:
        self.keys = [normalise(t) for t in texts]
        self.sims = vectors @ vectors.T
        self.refs, self.bm25, self.terms, self.candidates = refs, bm25_lists, terms, candidates
        self._lex: dict[tuple[int, int, int], float] = {}
        self._terms: dict[tuple[int, int], float] = {}

    def lexical(self, i: int, e: int, n: int) -> float:
        k = (i, e, n)
        if k not in self._lex:
            self._lex[k] = lexical_overlap(np.sort(self.bm25[i][:n]), np.sort(self.bm25[e][:n]))
        return self._lex[k]

    def term(self, i: int, e: int) -> float:
        k = (i, e)
        if k not in self._terms:
            self._terms[k] = term_overlap(self.terms[i], self.terms[e])
        return self._terms[k]

    def run(self, cosine: float, depth: int, overlap: float, term_min: float) -> dict:
        n = len(self.keys)
        entries = np.empty(n, dtype=np.int64)
        size = 0
        cached: set[str] = set()
        fids, exact = [], 0
        for i in range(n):
            if self.keys[i] in cached:
                exact += 1
                continue
            hit = None
            if size:
                sims = self.sims[i, entries[:size]]
                above = np.flatnonzero(sims >= cosine)
                for j in above[np.argsort(-sims[above], kind="stable")][: self.candidates]:
                    e = int(entries[j])
                    if self.term(i, e) >= term_min and self.lexical(i, e, depth) >= overlap:
                        hit = e
                        break
            if hit is None:
                entries[size] = i
                size += 1
                cached.add(self.keys[i])
            else:
                fids.append(fidelity(self.refs[hit], self.refs[i]))
        mean, p1, ok = summary(fids)
        return {"cosine": cosine, "depth": depth, "overlap": overlap, "term_overlap": term_min, "exact": exact,
                "hits": len(fids), "hit_rate": len(fids) / n, "mean": mean, "p1": p1, "share_ge_0.8": ok}


def run_stream(pipeline: Pipeline, stream_texts, vectors, refs, config: CacheConfig, mode: str) -> dict:
    cache = CachedSearch(config, Metrics())
    counts = {"miss": 0, "exact": 0, "semantic": 0}
    fids: list[float] = []
    worst: list[tuple[float, str, float | None]] = []
    started = time.perf_counter()
    for i, text in enumerate(stream_texts):
        served = cache.run(pipeline, SearchParams(query=text, top_k=TOP_K, cache=mode), query_vector=vectors[i])
        counts[served.served_from] += 1
        if served.served_from == "semantic":
            f = fidelity([c.chunk for c in served.result.contexts], refs[i])
            fids.append(f)
            if f < 0.8:
                worst.append((f, text, served.similarity))
    mean, p1, ok = summary(fids)
    n = len(stream_texts)
    return {"mode": mode, "queries": n, **counts, "hit_rate": (counts["exact"] + counts["semantic"]) / n,
            "semantic_rate": counts["semantic"] / n, "fidelity_mean": mean, "fidelity_p1": p1,
            "share_ge_0.8": ok, "entries": len(cache.store), "bytes": cache.store.bytes,
            "seconds": time.perf_counter() - started, "low_fidelity_examples": sorted(worst)[:5]}


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--variants", type=int, default=3, help="variants per query")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cache/fidelity"))
    parser.add_argument("--cosines", type=floats, default=floats("0.93,0.95,0.96,0.97,0.98,0.99"))
    parser.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[10, 20, 100])
    parser.add_argument("--overlaps", type=floats, default=floats("0,0.7,0.8,0.9"))
    parser.add_argument("--term-overlaps", type=floats, default=floats("0,0.7,0.8,0.9,1.0"))
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--cosine", type=float, help="semantic_min_cosine for the stream run (default: config)")
    parser.add_argument("--depth", type=int, help="guard_depth for the stream run (default: config)")
    parser.add_argument("--overlap", type=float, help="guard_min_overlap for the stream run (default: config)")
    parser.add_argument("--term-overlap", type=float,
                        help="guard_min_term_overlap for the stream run (default: config)")
    parser.add_argument("--also", nargs="*", default=[], metavar="COS:DEPTH:OVERLAP:TERMS",
                        help="more default-mode guard settings to run the stream with")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()

    pipeline = Pipeline(load_index(args.index, verify_checksums=False), Encoder())
    queries = list(load_queries(args.queries).values())
    stream = make_stream(queries, args.variants, args.seed)
    texts = [t for t, _ in stream]
    kinds: dict[str, int] = {}
    for _, k in stream:
        kinds[k] = kinds.get(k, 0) + 1
    print(f"stream: {len(texts)} queries ({len(queries)} originals), kinds {kinds}")

    t0 = time.perf_counter()
    vectors = embed(pipeline.encoder, texts, args.work, "stream")
    digest = hashlib.sha256(("\n".join(texts) + pipeline.version).encode()).hexdigest()[:16]
    ref_path = args.work / f"refs-{digest}.json"
    if ref_path.exists():
        saved = json.loads(ref_path.read_text())
        refs, bm25_lists = saved["refs"], [np.asarray(x, dtype=np.int64) for x in saved["bm25"]]
    else:
        refs, bm25_lists = [], []
        for i, text in enumerate(texts):
            params = SearchParams(query=text, top_k=TOP_K)
            refs.append([c.chunk for c in pipeline.search(params, query_vector=vectors[i]).contexts])
            ids, _ = pipeline.index.bm25.search(text, max(args.depths))
            bm25_lists.append(np.asarray(ids, dtype=np.int64))
        ref_path.write_text(json.dumps({"refs": refs, "bm25": [x.tolist() for x in bm25_lists]}))
    print(f"references (cache bypassed): {time.perf_counter() - t0:.1f} s")

    terms = [pipeline.guard.guard_terms(t)[0] for t in texts]
    simulation = Simulation(texts, vectors, refs, bm25_lists, terms, args.candidates)
    t0 = time.perf_counter()
    table = [simulation.run(c, n, o, w) for c in args.cosines for n in args.depths for o in args.overlaps
             for w in args.term_overlaps]
    feasible = [r for r in table if r["hits"] and r["mean"] >= 0.95 and r["p1"] >= 0.8]
    feasible.sort(key=lambda r: (-r["hits"], -r["mean"]))
    print(f"\ncalibration: {len(table)} guard settings replayed in {time.perf_counter() - t0:.0f} s; the best meeting "
          "mean >= 0.95 and p1 >= 0.8 (hit rate = semantic hits / all queries):")
    print("| cosine | BM25 depth | min overlap | min term overlap | semantic hits | hit rate | mean overlap@10 | p1 | "
          "share >= 0.8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in feasible[:10]:
        print(f"| {r['cosine']} | {r['depth']} | {r['overlap']} | {r['term_overlap']} | {r['hits']} | "
              f"{r['hit_rate']:.3f} | {r['mean']:.4f} | {r['p1']:.2f} | {r['share_ge_0.8']:.4f} |")
    print("\nwithout one part of the guard (the rest as configured), for comparison:")
    base = CacheConfig()
    for name, setting in (
            ("cosine alone", (base.semantic_min_cosine, base.guard_depth, 0.0, 0.0)),
            ("no term overlap", (base.semantic_min_cosine, base.guard_depth, base.guard_min_overlap, 0.0)),
            ("no BM25 overlap", (base.semantic_min_cosine, base.guard_depth, 0.0, base.guard_min_term_overlap)),
            ("cosine >= 0.99 alone", (0.99, base.guard_depth, 0.0, 0.0))):
        r = simulation.run(*setting)
        print(f"  {name}: hits {r['hits']} rate {r['hit_rate']:.3f} mean {r['mean']:.4f} p1 {r['p1']:.2f} "
              f"share >= 0.8 {r['share_ge_0.8']:.4f}")

    config = CacheConfig()
    update = {k: v for k, v in (("semantic_min_cosine", args.cosine), ("guard_depth", args.depth),
                                ("guard_min_overlap", args.overlap), ("guard_min_term_overlap", args.term_overlap))
              if v is not None}
    config = config.model_copy(update=update)
    settings = [(config, mode) for mode in ("default", "strict", "exact_only")]
    for extra in args.also:
        cos, depth, overlap, term_min = extra.split(":")
        settings.append((config.model_copy(update={"semantic_min_cosine": float(cos), "guard_depth": int(depth),
                                                   "guard_min_overlap": float(overlap),
                                                   "guard_min_term_overlap": float(term_min)}), "default"))
    print(f"\nstream through CachedSearch.run (strict: same content words in order, cosine >= "
          f"{config.strict_min_cosine})")
    print("| mode | cosine | BM25 depth | min overlap | min term overlap | queries | exact hits | semantic hits | "
          "hit rate (all) | semantic rate | mean overlap@10 | p1 | share >= 0.8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = []
    for cfg, mode in settings:
        r = run_stream(pipeline, texts, vectors, refs, cfg, mode)
        r.update(cosine=cfg.semantic_min_cosine, depth=cfg.guard_depth, overlap=cfg.guard_min_overlap,
                 term_overlap=cfg.guard_min_term_overlap)
        runs.append(r)
        guard = (f"{cfg.semantic_min_cosine} | {cfg.guard_depth} | {cfg.guard_min_overlap} | "
                 f"{cfg.guard_min_term_overlap}" if mode == "default" else " | | | ")
        print(f"| {mode} | {guard} | {r['queries']} | {r['exact']} | {r['semantic']} | {r['hit_rate']:.3f} | "
              f"{r['semantic_rate']:.3f} | {r['fidelity_mean']:.4f} | {r['fidelity_p1']:.2f} | "
              f"{r['share_ge_0.8']:.4f} |", flush=True)
    for r in runs[:2]:
        for f, text, sim in r["low_fidelity_examples"]:
            print(f"  low fidelity ({r['mode']}): {f:.1f} at cosine {sim:.3f}: {text!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"grid": table, "runs": runs}, indent=1, default=str))


if __name__ == "__main__":
    main()
