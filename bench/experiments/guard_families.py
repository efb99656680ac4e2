"""The semantic cache's fidelity guard on query variant families it was not fitted to, and on real question streams.

    python bench/experiments/guard_families.py --index /tmp/guard/scifact \
        --queries ../shared/data/scifact/queries.jsonl \
        --pairs ../shared/data/paraphrase/stsb-dev.tsv ../shared/data/paraphrase/mrpc-train.tsv \
        --stream scifact-test=/tmp/guard/scifact:../shared/data/scifact:test \
        --stream cranfield=/tmp/guard/cranfield:../shared/data/cranfield

1. Families. Every query of --queries is cached (its own search); then each family's variant of it is asked once (the
   variants are not stored, so families do not feed each other). The generator's families the defaults were first
   fitted to (punctuation, "is it true that", a dropped or added stop word, two words swapped; case is an exact hit),
   and families made here: synonym swaps (a hand table), reordered clauses, typos (one character edit), added context
   words, a dropped content word, other prefixes; and the paraphrase pairs of --pairs (text_a of every pair cached,
   each text_b asked). All seeded. Fidelity of a semantic hit: overlap@10 of the served contexts (the cached query's
   search) with the asked query's cache-bypassed search. Target per family: mean >= 0.95 and >= 0.8 for 99% of hits.
2. Rules replayed over precomputed features (cosine to the nearest `semantic_candidates` cached queries, the cached
   answer's BM25/dense agreement, same negation/direction/comparison/quantity words, the largest idf of a term in one
   query only, IDF-weighted term overlap, BM25 top-N overlap) for a grid of settings, as
   `CachedSearch.lookup_semantic` decides: the nearest candidates at or above the cosine, best first, the first
   passing the guard is served.
   Fitting = the setting with the most hits over the fitted families among those meeting the target on each fitted
   family; "plain" takes the target as it is, "margin" also asks that the one-sided 95% lower bound of each fitted
   family's mean (mean - 1.645 sd / sqrt(hits)) is >= 0.95, so that a family's few lucky hits do not carry a setting.
   Leave-one-family-out: fitted on all families but one, reported on that one; a rule (the guard's parts with its
   fitting) holds when its worst left-out family meets the target.
3. Real streams (--stream NAME=INDEX:DATA[:SPLIT]: DATA/queries.jsonl in file order, only the queries of
   DATA/qrels/SPLIT.tsv if given): distinct questions one after another through `CachedSearch.run`, before (the old
   defaults: cosine 0.98, BM25 top 100, no word or differing-term check), the old thresholds with the two checks, the
   previous defaults (cosine 0.994, BM25 top-10 overlap 0.8, no agreement floor) and after (the configured defaults),
   in one run; then what the word and differing-term checks cost per lookup.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cache_fidelity import fidelity, summary, v_add_stop, v_case, v_drop_stop, v_prefix, v_punct, v_swap

from rag_service.bench.data import load_qrels, load_queries
from rag_service.core.config import CacheConfig, EncoderSettings
from rag_service.core.metrics import Metrics
from rag_service.core.params import SearchParams
from rag_service.encoder.encode import load_index_encoder
from rag_service.index.load import load_index
from rag_service.retrievers.analysis import LUCENE_ENGLISH_STOP_WORDS
from rag_service.search.cache import (
    CachedSearch,
    answer_agreement,
    differing_idf,
    lexical_overlap,
    normalise,
    term_overlap,
)
from rag_service.search.guard_words import polarity_words
from rag_service.search.pipeline import Pipeline

TOP_K = 10
DEPTHS = (10, 100)
MEAN_TARGET, SHARE_TARGET = 0.95, 0.99
# The defaults before the word and differing-term checks (the "before" of the stream runs), and those thresholds with
# the two checks added (what the checks do on their own).
OLD_THRESHOLDS = {"semantic_min_cosine": 0.98, "guard_depth": 100, "guard_min_overlap": 0.8,
                  "guard_min_term_overlap": 0.7, "guard_min_agreement": 0.0}
# The defaults fitted with the checks but without the agreement floor and with the plain fit.
PREVIOUS = {"semantic_min_cosine": 0.994, "guard_depth": 10, "guard_min_overlap": 0.8, "guard_min_agreement": 0.0}
BEFORE = {**OLD_THRESHOLDS, "guard_polarity_words": False, "guard_max_differing_idf": math.inf}

# -- the families made here -------------------------------------------------------------------------------------------

# Words a user would use for one another in a question; chosen by hand for scientific and everyday questions.
SYNONYMS = {
    "associated": ["linked", "correlated"], "association": ["link", "correlation"], "patients": ["people", "subjects"],
    "risk": ["chance", "likelihood"], "treatment": ["therapy"], "therapy": ["treatment"], "effect": ["impact"],
    "effects": ["impacts"], "disease": ["illness", "disorder"], "children": ["kids"], "women": ["females"],
    "men": ["males"], "levels": ["concentrations", "amounts"], "drug": ["medication", "medicine"],
    "drugs": ["medications", "medicines"], "mice": ["mouse models"], "required": ["needed", "necessary"],
    "important": ["essential", "crucial"], "use": ["usage"], "cause": ["lead to"], "causes": ["leads to"],
    "regulates": ["controls"], "regulate": ["control"], "mortality": ["death rate"], "individuals": ["people"],
    "humans": ["people"], "rate": ["frequency"], "rates": ["frequencies"], "common": ["frequent", "prevalent"],
    "specific": ["particular"], "response": ["reaction"], "function": ["role"], "loss": ["depletion"],
    "cells": ["cellular"], "mutations": ["variants"], "protein": ["polypeptide"], "infection": ["infections"],
    "significantly": ["substantially", "markedly"], "results": ["leads"], "result": ["outcome"],
    "improves": ["enhances"], "reduces": ["lowers", "decreases"], "increases": ["raises", "elevates"],
    "shows": ["demonstrates"], "commonly": ["frequently", "often"], "produce": ["generate", "make"],
    "produces": ["generates", "makes"], "damage": ["injury"], "enough": ["sufficient"], "body": ["organism"],
    "big": ["large"], "fast": ["quick"], "begin": ["start"], "help": ["assist"], "find": ["discover"],
    "buy": ["purchase"], "show": ["demonstrate"], "about": ["regarding"], "kill": ["destroy"],
}
CONTEXT = (" in humans", " in adults", " in clinical studies", " according to recent research",
           " based on the literature", " in patients", " in the general population", " in a randomized trial")
PREFIXES = ("can you tell me whether ", "i read that ", "does the evidence say that ", "question: ",
            "please check: ", "is there evidence that ", "how true is it that ", "fact check: ", "i heard that ",
            "what do studies say about whether ")
CLAUSE = re.compile(r"\b(in|among|during|after|with|for|under|when|by|through|via|from)\b")
KEYS = "qwertyuiopasdfghjklzxcvbnm"


def _lower_first(q: str) -> str:
    return q[:1].lower() + q[1:]


def v_synonym(q: str, rng: random.Random) -> str | None:
    words = q.split()
    spots = [i for i, w in enumerate(words) if w.lower().strip(".,;:?!") in SYNONYMS]
    if not spots:
        return None
    i = rng.choice(spots)
    bare = words[i].lower().strip(".,;:?!")
    tail = words[i][len(words[i].rstrip(".,;:?!")):]
    words[i] = rng.choice(SYNONYMS[bare]) + tail
    return " ".join(words)


def v_reorder(q: str, rng: random.Random) -> str | None:
    """The trailing clause moved to the front ("X reduces Y in mice" -> "In mice, X reduces Y"), else the two
    halves around a comma or an "and" swapped."""
    body = q.rstrip(".?! ")
    end = q[len(body):]
    starts = [m.start() for m in CLAUSE.finditer(body)
              if len(body[:m.start()].split()) >= 3 and len(body[m.start():].split()) >= 2]
    if starts:
        s = rng.choice(starts)
        clause, rest = body[s:].strip(), body[:s].strip().rstrip(",")
        if rest:
            return clause[:1].upper() + clause[1:] + ", " + _lower_first(rest) + end
    for sep in (", ", " and "):
        if sep in body:
            a, b = body.split(sep, 1)
            return b[:1].upper() + b[1:] + sep + _lower_first(a) + end
    return None


def v_typo(q: str, rng: random.Random) -> str | None:
    words = q.split()
    spots = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not spots:
        return None
    i = rng.choice(spots)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    edit = rng.choice(("swap", "delete", "double", "replace"))
    if edit == "swap":
        w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    elif edit == "delete":
        w = w[:j] + w[j + 1:]
    elif edit == "double":
        w = w[:j] + w[j] + w[j:]
    else:
        w = w[:j] + rng.choice(KEYS.replace(w[j].lower(), "")) + w[j + 1:]
    words[i] = w
    return " ".join(words)


def v_context(q: str, rng: random.Random) -> str:
    body = q.rstrip(".?! ")
    return body + rng.choice(CONTEXT) + q[len(body):]


def v_drop_word(q: str, rng: random.Random) -> str | None:
    words = q.split()
    spots = [i for i, w in enumerate(words) if w.lower().strip(".,;:?!") not in LUCENE_ENGLISH_STOP_WORDS]
    if len(words) < 4 or not spots:
        return None
    i = rng.choice(spots)
    return " ".join(words[:i] + words[i + 1:])


def v_other_prefix(q: str, rng: random.Random) -> str:
    return rng.choice(PREFIXES) + _lower_first(q)


Variant = Callable[[str, random.Random], "str | None"]
FAMILIES: dict[str, Variant] = {
    "case": v_case, "punct": v_punct, "prefix": v_prefix, "drop_stop": v_drop_stop, "add_stop": v_add_stop,
    "swap": v_swap,  # the generator the defaults were first fitted to (cache_fidelity.py)
    "synonym": v_synonym, "reorder": v_reorder, "typo": v_typo, "context": v_context, "drop_word": v_drop_word,
    "other_prefix": v_other_prefix,
}


def read_pairs(path: Path, limit: int) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(r["text_a"], r["text_b"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit] if limit else rows


# -- features ---------------------------------------------------------------------------------------------------------


class Corpus:
    """Every text's vector, bypassed search (top 10 chunks and the answer's BM25/dense agreement), BM25 top-100 and
    index terms, computed once (kept under --work, keyed by the texts and the index version)."""

    def __init__(self, pipeline: Pipeline, texts: list[str], work: Path) -> None:
        self.pipeline = pipeline
        self.texts = texts
        self.row = {t: i for i, t in enumerate(texts)}
        digest = hashlib.sha256(("\n".join(texts) + pipeline.version + pipeline.encoder.name).encode()).hexdigest()
        path = work / f"families-{digest[:16]}"
        if (path / "done").exists():
            self.vectors = np.load(path / "vectors.npy")
            saved = json.loads((path / "refs.json").read_text())
        else:
            started = time.perf_counter()
            self.vectors = np.asarray(pipeline.encoder.encode_queries(texts), dtype=np.float32)
            print(f"  encoded {len(texts)} texts in {time.perf_counter() - started:.0f} s", flush=True)
            saved = {"refs": [], "bm25": [], "agreement": []}
            started = time.perf_counter()
            for i, text in enumerate(texts):
                result = pipeline.search(SearchParams(query=text, top_k=TOP_K), query_vector=self.vectors[i])
                saved["refs"].append([c.chunk for c in result.contexts])
                saved["agreement"].append(answer_agreement(result))
                ids, _ = pipeline.index.bm25.search(text, max(DEPTHS))
                saved["bm25"].append([int(x) for x in ids])
                if (i + 1) % 2000 == 0:
                    print(f"  {i + 1} searches, {time.perf_counter() - started:.0f} s", flush=True)
            path.mkdir(parents=True, exist_ok=True)
            np.save(path / "vectors.npy", self.vectors)
            (path / "refs.json").write_text(json.dumps(saved))
            (path / "done").write_text("")
        if "agreement" not in saved:  # kept by an older run: the searches again, from the kept vectors
            saved["agreement"] = [answer_agreement(pipeline.search(SearchParams(query=t, top_k=TOP_K),
                                                                   query_vector=self.vectors[i]))
                                  for i, t in enumerate(texts)]
            (path / "refs.json").write_text(json.dumps(saved))
        self.refs = saved["refs"]
        self.agreement = saved["agreement"]
        self.bm25 = {n: [np.sort(np.asarray(x[:n], dtype=np.int64)) for x in saved["bm25"]] for n in DEPTHS}
        self.terms = [pipeline.guard.guard_terms(t)[0] for t in texts]
        self.polarity = [polarity_words(t) for t in texts]


class Family:
    """One family's asked queries against its cached ones: per asked query, the nearest `k` cached queries and the
    guard's features for each."""

    def __init__(self, name: str, corpus: Corpus, cached: list[str], asked: list[tuple[str, str]], k: int) -> None:
        self.name = name
        c_rows = np.asarray([corpus.row[t] for t in cached])
        keys = {normalise(t) for t in cached}
        self.exact = sum(normalise(a) in keys for _, a in asked)
        asked = [(src, a) for src, a in asked if normalise(a) not in keys]
        self.asked = len(asked)
        a_rows = np.asarray([corpus.row[a] for _, a in asked], dtype=np.int64)
        shape = (len(asked), k)
        self.cos = np.full(shape, -np.inf, dtype=np.float32)
        self.polarity = np.zeros(shape, bool)
        self.differing = np.zeros(shape)
        self.term = np.zeros(shape)
        self.lexical = {n: np.zeros(shape) for n in DEPTHS}
        self.fidelity = np.zeros(shape)
        self.agreement = np.zeros(shape)  # the cached answer's (answer_agreement)
        self.own = np.zeros(shape, bool)  # the candidate is the asked query's own source
        if not asked:
            return
        sims = corpus.vectors[a_rows] @ corpus.vectors[c_rows].T
        for i, (src, _) in enumerate(asked):
            order = np.argsort(-sims[i], kind="stable")[:k]
            a = int(a_rows[i])
            for j, col in enumerate(order):
                e = int(c_rows[col])
                self.cos[i, j] = sims[i, col]
                self.polarity[i, j] = corpus.polarity[a] == corpus.polarity[e]
                self.differing[i, j] = differing_idf(corpus.terms[a], corpus.terms[e])
                self.term[i, j] = term_overlap(corpus.terms[a], corpus.terms[e])
                for n in DEPTHS:
                    self.lexical[n][i, j] = lexical_overlap(corpus.bm25[n][a], corpus.bm25[n][e])
                self.fidelity[i, j] = fidelity(corpus.refs[e], corpus.refs[a])
                self.agreement[i, j] = corpus.agreement[e]
                self.own[i, j] = corpus.texts[e] == src

    def run(self, s: dict) -> dict:
        passes = ((self.cos >= s["cosine"]) & (self.differing < s["max_idf"]) & (self.term >= s["term_overlap"])
                  & (self.lexical[s["depth"]] >= s["overlap"]) & (self.agreement >= s["agreement"]))
        if s["words"]:
            passes &= self.polarity
        hit = passes.any(axis=1)
        first = passes.argmax(axis=1)
        fids = self.fidelity[np.flatnonzero(hit), first[hit]]
        mean, p1, share = summary(fids.tolist())
        low = float(fids.mean() - 1.645 * fids.std() / math.sqrt(len(fids))) if len(fids) else math.nan
        return {"family": self.name, "mean_low": low, "asked": self.asked, "exact": self.exact, "hits": int(hit.sum()),
                "hit_rate": float(hit.mean()) if self.asked else 0.0, "mean": mean, "p1": p1, "share": share,
                "other_source": int((~self.own[np.flatnonzero(hit), first[hit]]).sum())}


def meets(r: dict) -> bool:
    return r["hits"] == 0 or (r["mean"] >= MEAN_TARGET and r["share"] >= SHARE_TARGET)


def meets_with_margin(r: dict) -> bool:
    return meets(r) and (r["hits"] == 0 or r["mean_low"] >= MEAN_TARGET)


COSINES = (0.98, 0.985, 0.988, 0.99, 0.991, 0.992, 0.993, 0.994, 0.995)


def grid(rule: str) -> list[dict]:
    """The settings a rule may be fitted over: "before" has the guard's old parts only (cosine, BM25 overlap, term
    overlap); "after" always has the word check, a differing-term idf limit and an agreement floor as well."""
    base = itertools.product(COSINES, DEPTHS, (0.8, 0.9, 1.0), (0.0, 0.7, 0.8, 0.9))
    extra = ([(False, math.inf, 0.0)] if rule == "before"
             else [(True, x, a) for x in (0.5, 1.0, 1.5, 2.0, 3.0) for a in (0.0, 0.1, 0.2, 0.3, 0.4)])
    return [{"cosine": c, "depth": d, "overlap": o, "term_overlap": t, "words": w, "max_idf": x, "agreement": a}
            for (c, d, o, t), (w, x, a) in itertools.product(base, extra)]


def fit(families: list[Family], settings: list[dict], results: dict, margin: bool = True) -> dict | None:
    """The setting with the most hits over `families` among those meeting the target on each of them, with the
    margin if asked (ties: the higher worst-family mean)."""
    ok = meets_with_margin if margin else meets
    best, best_key = None, None
    for i, s in enumerate(settings):
        rs = [results[(i, f.name)] for f in families]
        if not all(ok(r) for r in rs):
            continue
        key = (sum(r["hits"] for r in rs), min(r["mean"] if r["hits"] else 1.0 for r in rs))
        if best_key is None or key > best_key:
            best, best_key = s, key
    return best


def describe(s: dict) -> str:
    idf = "off" if math.isinf(s["max_idf"]) else f"< {s['max_idf']}"
    return (f"cos >= {s['cosine']}, BM25@{s['depth']} >= {s['overlap']}, terms >= {s['term_overlap']}, "
            f"words {'on' if s['words'] else 'off'}, differing idf {idf}, agreement >= {s['agreement']}")


def _num(x: float, digits: int = 4) -> str:
    return "" if x != x else f"{x:.{digits}f}"  # NaN (no hits) prints empty


def row(r: dict) -> str:
    return (f"{r['asked']} | {r['hits']} | {r['hit_rate']:.3f} | {_num(r['mean'])} | {_num(r['p1'], 1)} | "
            f"{_num(r['share'])} | {r['other_source']}")


# -- real streams -----------------------------------------------------------------------------------------------------


def stream_run(name: str, spec: str, work: Path, configs: dict[str, CacheConfig]) -> list[dict]:
    parts = spec.split(":")
    index_path, data = Path(parts[0]), Path(parts[1])
    index = load_index(index_path, verify_checksums=False)
    pipeline = Pipeline(index, load_index_encoder(EncoderSettings().backend, index.path))
    queries = load_queries(data / "queries.jsonl")
    if len(parts) > 2:
        wanted = load_qrels(data / "qrels" / f"{parts[2]}.tsv")
        queries = {q: t for q, t in queries.items() if q in wanted}
    texts = list(queries.values())
    corpus = Corpus(pipeline, texts, work)
    out = []
    for label, config in configs.items():
        cache = CachedSearch(config, Metrics())
        fids, served, worst = [], {"miss": 0, "exact": 0, "semantic": 0}, []
        for i, text in enumerate(texts):
            s = cache.run(pipeline, SearchParams(query=text, top_k=TOP_K), query_vector=corpus.vectors[i])
            served[s.served_from] += 1
            if s.served_from == "semantic":
                f = fidelity([c.chunk for c in s.result.contexts], corpus.refs[i])
                fids.append(f)
                # The cached claim it was served for: the earlier query nearest to it (the cache's first candidate).
                earlier = corpus.vectors[:i] @ corpus.vectors[i]
                worst.append((f, text, texts[int(np.argmax(earlier))]))
        mean, p1, share = summary(fids)
        out.append({"stream": name, "rule": label, "queries": len(texts), **served,
                    "semantic_rate": served["semantic"] / len(texts), "mean": mean, "p1": p1, "share": share,
                    "examples": sorted(worst)[:6]})
    out.append({"cost": guard_cost(pipeline, corpus, texts)})
    return out


def guard_cost(pipeline: Pipeline, corpus: Corpus, texts: list[str]) -> dict:
    """µs per lookup of the two new checks as `lookup_semantic` runs them: the asked query's words once, then the
    word comparison and the differing-term idf against `semantic_candidates` cached queries (the nearest ones)."""
    k = CacheConfig().semantic_candidates
    sims = corpus.vectors @ corpus.vectors.T
    np.fill_diagonal(sims, -np.inf)
    nearest = np.argsort(-sims, axis=1)[:, :k]
    terms, polarity = corpus.terms, corpus.polarity
    added, lookup = [], []
    config = CacheConfig()
    for _ in range(3):
        for i, text in enumerate(texts):
            t0 = time.perf_counter_ns()
            words = polarity_words(text)
            for e in nearest[i]:
                if words == polarity[e]:
                    differing_idf(terms[i], terms[e])
            t1 = time.perf_counter_ns()
            _, bm25_input = pipeline.guard.guard_terms(text)
            pipeline.guard.lexical_candidates(bm25_input, {}, config.guard_depth)
            t2 = time.perf_counter_ns()
            added.append((t1 - t0) / 1000)
            lookup.append((t2 - t1) / 1000)
    a, b = np.asarray(added), np.asarray(lookup)
    return {"added_p50_us": float(np.median(a)), "added_p99_us": float(np.percentile(a, 99)),
            "existing_p50_us": float(np.median(b)), "existing_p99_us": float(np.percentile(b, 99))}


# -- main -------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--pairs", type=Path, nargs="*", default=[])
    parser.add_argument("--pair-limit", type=int, default=2000, help="first N pairs of each --pairs file (0: all)")
    parser.add_argument("--stream", action="append", default=[], metavar="NAME=INDEX:DATA[:SPLIT]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/guard/work"))
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()

    index = load_index(args.index, verify_checksums=False)
    pipeline = Pipeline(index, load_index_encoder(EncoderSettings().backend, index.path))
    config = CacheConfig()
    k = config.semantic_candidates
    originals = list(dict.fromkeys(load_queries(args.queries).values()))
    made: dict[str, list[tuple[str, str]]] = {}
    for name, make in FAMILIES.items():
        rng = random.Random(f"{args.seed}:{name}")
        made[name] = [(q, v) for q in originals if (v := make(q, rng)) and v != q]
    pairs = {p.stem: read_pairs(p, args.pair_limit) for p in args.pairs}
    texts = list(dict.fromkeys(originals + [v for vs in made.values() for _, v in vs]
                               + [t for ps in pairs.values() for pair in ps for t in pair]))
    print(f"{len(originals)} queries, {len(texts)} distinct texts; families: "
          + ", ".join(f"{n} {len(v)}" for n, v in made.items()) + "; pairs: "
          + ", ".join(f"{n} {len(v)}" for n, v in pairs.items()), flush=True)
    started = time.perf_counter()
    corpus = Corpus(pipeline, texts, args.work)
    print(f"features of every text: {time.perf_counter() - started:.0f} s", flush=True)
    families = [Family(n, corpus, originals, vs, k) for n, vs in made.items()]
    families += [Family(n, corpus, list(dict.fromkeys(a for a, _ in ps)), ps, k) for n, ps in pairs.items()]

    report: dict = {"families": {}, "lofo": {}, "fitted": {}}
    grids = {rule: grid(rule) for rule in ("before", "after")}
    all_results = {rule: {(i, f.name): f.run(s) for i, s in enumerate(settings) for f in families}
                   for rule, settings in grids.items()}
    for rule, margin in (("before", True), ("after", False), ("after", True)):
        settings, results = grids[rule], all_results[rule]
        label = f"{rule}, {'margin' if margin else 'plain'} fit"
        print(f"\n## rule {label}: {len(settings)} settings")
        print("| left out | fitted on the others | asked | semantic hits | hit rate | mean overlap@10 | p1 | "
              "share >= 0.8 | hits on another query | meets |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        lofo = []
        for f in families:
            s = fit([g for g in families if g is not f], settings, results, margin)
            if s is None:
                print(f"| {f.name} | no setting meets the target on the others | | | | | | | | |")
                continue
            r = f.run(s)
            lofo.append({**r, "setting": s, "meets": meets(r)})
            print(f"| {f.name} | {describe(s)} | {row(r)} | {'yes' if meets(r) else '**no**'} |", flush=True)
        if lofo:
            worst = min(lofo, key=lambda r: r["mean"] if r["hits"] else 1.0)
            print(f"worst left-out family: {worst['family']} (mean {_num(worst['mean'])}, share "
                  f"{_num(worst['share'])}); all meet: {all(r['meets'] for r in lofo)}")
        chosen = fit(families, settings, results, margin)
        report["lofo"][label] = lofo
        report["fitted"][label] = chosen
        if rule == "after" and margin:
            print("\nthe differing-term idf limit, everything else fitted on every family:")
            for x in sorted({s["max_idf"] for s in settings}):
                some = [s for s in settings if s["max_idf"] == x]
                best = fit(families, some, {(i, f.name): results[(settings.index(s), f.name)]
                                            for i, s in enumerate(some) for f in families})
                if best is not None:
                    print(f"  idf < {x}: {describe(best)}: {sum(f.run(best)['hits'] for f in families)} hits")
        if chosen is not None:
            print(f"\nfitted on every family: {describe(chosen)}")
            print("| family | asked | exact hits | semantic hits | hit rate | mean overlap@10 | p1 | share >= 0.8 | "
                  "hits on another query |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for f in families:
                r = f.run(chosen)
                print(f"| {f.name} | {r['asked']} | {r['exact']} | {r['hits']} | {r['hit_rate']:.3f} | "
                      f"{_num(r['mean'])} | {_num(r['p1'], 1)} | {_num(r['share'])} | {r['other_source']} |")
    defaults = [{"cosine": config.semantic_min_cosine, "depth": config.guard_depth,
                 "overlap": config.guard_min_overlap, "term_overlap": config.guard_min_term_overlap,
                 "words": config.guard_polarity_words, "max_idf": config.guard_max_differing_idf,
                 "agreement": config.guard_min_agreement},
                {"cosine": 0.98, "depth": 100, "overlap": 0.8, "term_overlap": 0.7, "words": False,
                 "max_idf": math.inf, "agreement": 0.0},
                {"cosine": 0.98, "depth": 100, "overlap": 0.8, "term_overlap": 0.7,
                 "words": config.guard_polarity_words, "max_idf": config.guard_max_differing_idf, "agreement": 0.0},
                {"cosine": 0.994, "depth": 10, "overlap": 0.8, "term_overlap": 0.7,
                 "words": config.guard_polarity_words, "max_idf": config.guard_max_differing_idf, "agreement": 0.0}]
    labels = ("configured defaults", "before (the old defaults)", "the old thresholds with the word and differing-term "
              "checks", "the previous defaults (no agreement floor, plain fit)")
    for label, s in zip(labels, defaults):
        print(f"\n{label}: {describe(s)}")
        print("| family | asked | semantic hits | hit rate | mean overlap@10 | p1 | share >= 0.8 | "
              "hits on another query | meets |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for f in families:
            r = f.run(s)
            report["families"].setdefault(label, []).append(r)
            print(f"| {f.name} | {row(r)} | {'yes' if meets(r) else '**no**'} |")

    streams = []
    configs = {"before": config.model_copy(update=BEFORE),
               "old thresholds + checks": config.model_copy(update=OLD_THRESHOLDS),
               "previous defaults": config.model_copy(update=PREVIOUS), "after": config}
    for spec in args.stream:
        name, _, rest = spec.partition("=")
        print(f"\nstream {name}", flush=True)
        out = stream_run(name, rest, args.work, configs)
        streams.extend(out)
        print("| stream | rule | queries | exact | semantic hits | semantic rate | mean overlap@10 | p1 | "
              "share >= 0.8 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in out[:-1]:
            print(f"| {name} | {r['rule']} | {r['queries']} | {r['exact']} | {r['semantic']} | "
                  f"{r['semantic_rate']:.4f} | {_num(r['mean'])} | {_num(r['p1'], 1)} | {_num(r['share'])} |")
        for r in out[:-1]:
            for f, text, source in r["examples"]:
                print(f"  {r['rule']}: overlap {f:.1f}: {text!r}, served {source!r}'s contexts")
        cost = out[-1]["cost"]
        print(f"  guard cost per lookup: word and differing-term checks p50 {cost['added_p50_us']:.1f} µs, "
              f"p99 {cost['added_p99_us']:.1f} µs; the lookup's existing BM25 terms and top-"
              f"{config.guard_depth}: p50 {cost['existing_p50_us']:.0f} µs, p99 {cost['existing_p99_us']:.0f} µs")
    report["streams"] = streams
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
