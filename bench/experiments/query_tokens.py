"""The query encoder's token ids: the Hugging Face tokenizer against the native WordPiece (kernels.native.wordpiece),
warm and after a cache-flushing write, and whether they agree.

    python bench/experiments/query_tokens.py --index /tmp/lead/sf2 --queries ../shared/data/scifact/queries.jsonl \
        --check ../shared/data/cranfield/queries.jsonl

The tokenizer is the index's (its ONNX export's), set up as OnnxEncoder runs it (truncated at the model's length).
Each of the first `--limit` queries is tokenized twice per pass, once each way, the order alternating query by
query; the second pass writes `--flush-mb` MB before every call (an encode's and a search's effect on the caches).
Printed: p50 / p99 µs per way and pass, then over every query of `--queries` and `--check` and `--random` seeded
random ASCII texts, how many the WordPiece answered and how many of those differ from the tokenizer (0 expected).
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from rag_service.bench.data import load_queries
from rag_service.encoder import onnx_export
from rag_service.encoder.encode import checked_wordpiece
from rag_service.index.load import resolve_version_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--check", type=Path, action="append", default=[], help="more query files to compare on")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--flush-mb", type=int, default=32)
    parser.add_argument("--random", type=int, default=30000, help="seeded random ASCII texts to compare on")
    args = parser.parse_args()

    directory = resolve_version_dir(args.index)
    config = json.loads((directory / onnx_export.CONFIG_FILE).read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(directory / onnx_export.TOKENIZER_FILE))
    tokenizer.enable_truncation(max_length=int(config["max_seq_length"]))
    tokenizer.enable_padding()
    wordpiece = checked_wordpiece(tokenizer)
    if wordpiece is None:
        raise SystemExit("no native WordPiece for this tokenizer (see the log)")

    texts = list(load_queries(args.queries).values())
    junk = np.ones(args.flush_mb * (1 << 20) // 4, np.float32)
    ways = {"tokenizer": lambda q: np.array(tokenizer.encode(q).ids, dtype=np.int64), "WordPiece": wordpiece.encode}
    for flush in (False, True):
        times: dict[str, list[float]] = {name: [] for name in ways}
        for i, query in enumerate(texts[:args.limit] * 2):
            for name in (list(ways) if i % 2 == 0 else list(reversed(ways))):
                if flush:
                    junk += 1.0
                started = time.perf_counter_ns()
                ways[name](query)
                times[name].append((time.perf_counter_ns() - started) / 1e3)
        label = f"after a {args.flush_mb} MB write" if flush else "warm"
        print(label + ": " + " | ".join(f"{name} p50 {np.percentile(v, 50):.1f} p99 {np.percentile(v, 99):.1f} µs"
                                        for name, v in times.items()))

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    \t\n"
    pieces = [p for p in tokenizer.get_vocab() if p.isascii()]
    randoms = [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) if i % 2 else
                rng.choice([" ", "", "-", "."]).join(rng.choice(pieces) for _ in range(rng.randint(0, 12))))
               for i in range(args.random)]
    sets = {str(args.queries): texts, **{str(p): list(load_queries(p).values()) for p in args.check},
            f"{args.random} random texts": randoms}
    for name, items in sets.items():
        answered = differ = 0
        for text in items:
            ids = wordpiece.encode(text)
            if ids is None:
                continue
            answered += 1
            differ += ids.tolist() != tokenizer.encode(text).ids
        print(f"{name}: {len(items)} texts, {answered} answered by the WordPiece, {differ} differ from the tokenizer")


if __name__ == "__main__":
    main()
