"""Adds sentence windows to a COPY of a built index, with window embeddings cached across runs (experiments only).

    python bench/experiments/add_windows.py --index /tmp/idx/scifact --output /tmp/rerank/scifact \
        [--window-sentences 2] [--cache /tmp/rerank/cache]

`rag-index build` writes the same files itself (rag_service.index.build: the windows step); this script exists so
that reranker experiments can try window sizes on an existing index without re-encoding the chunks, and without
re-encoding a window text already embedded by an earlier run (the cache is keyed by the text and the model).
Prints the windows step's time and size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rag_service.encoder.encode import Encoder
from rag_service.index import manifest as manifest_mod
from rag_service.index import windows as windows_mod
from rag_service.index.load import resolve_version_dir
from rag_service.index.store import DocStore
from rag_service.retrievers.analysis import Analyzer


class CachedEncoder:
    """encode_documents through a text -> vector cache on disk (one .npy of vectors + one JSON list of digests)."""

    def __init__(self, encoder: Encoder, directory: Path, cached_only: bool = False) -> None:
        self.encoder = encoder
        self.cached_only = cached_only
        self.missing = 0
        self.dim = encoder.dim
        self.directory = directory / encoder.name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keys_path = self.directory / "keys.json"
        self.vectors_path = self.directory / "vectors.npy"
        if self.keys_path.exists():
            keys = json.loads(self.keys_path.read_text())
            self.vectors = np.load(self.vectors_path)
        else:
            keys, self.vectors = [], np.zeros((0, self.dim), np.float32)
        self.index = {k: i for i, k in enumerate(keys)}
        self.encoded = 0

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        missing = list({k: t for k, t in zip(keys, texts) if k not in self.index}.items())  # input order
        if missing and self.cached_only:
            # Experiments only: zero rows (int8 all zero once stored) mark windows not encoded yet; their window
            # features are meaningless, so experiments use only chunks listed as complete.
            self.missing = len(missing)
            out = np.zeros((len(keys), self.dim), np.float32)
            known = [i for i, k in enumerate(keys) if k in self.index]
            out[known] = self.vectors[[self.index[keys[i]] for i in known]]
            return out
        if missing:
            print(f"encoding {len(missing)} of {len(texts)} texts (the rest are cached)", flush=True)
            # Saved every few thousand texts, so an interrupted run resumes where it stopped.
            for begin in range(0, len(missing), 1024):
                part = missing[begin:begin + 1024]
                new = self.encoder.encode_documents([t for _, t in part], batch_size=batch_size, progress=progress)
                self.encoded += len(part)
                base = len(self.vectors)
                self.vectors = np.concatenate([self.vectors, new])
                for j, (k, _) in enumerate(part):
                    self.index[k] = base + j
                np.save(self.vectors_path, self.vectors)
                self.keys_path.write_text(json.dumps(sorted(self.index, key=self.index.get)))
        return self.vectors[[self.index[k] for k in keys]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--window-sentences", type=int, default=windows_mod.DEFAULT_WINDOW_SENTENCES)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rerank/cache"))
    parser.add_argument("--cached-only", action="store_true",
                        help="encode nothing: windows not in the cache get zero vectors; the chunks that have such "
                             "windows are listed in OUTPUT/missing_chunks.json (experiments on the cached part only)")
    parser.add_argument("--priority", type=Path,
                        help="JSON {chunk id: best rank}: windows of better-ranked chunks are encoded (and cached) "
                             "first, so an interrupted run has what evaluation needs most")
    args = parser.parse_args()

    source = resolve_version_dir(args.index)
    manifest = manifest_mod.read_manifest(source)
    target = args.output.absolute() / source.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in manifest["files"]:
        if name not in windows_mod.FILES:
            shutil.copy2(source / name, target / name)
    store = DocStore.load(target)
    titles = [store.doc_title(store.chunk_doc(i)) for i in range(store.n_chunks)]
    texts = [store.chunk_text(i) for i in range(store.n_chunks)]
    analyzer = Analyzer.from_settings(manifest["analyzer"])
    vocab = json.loads((target / "bm25_vocab.json").read_text())
    encoder = CachedEncoder(Encoder(), args.cache, cached_only=args.cached_only)
    if args.priority and not args.cached_only:
        ranks = {int(k): v for k, v in json.loads(args.priority.read_text()).items()}
        order = sorted(range(store.n_chunks), key=lambda c: ranks.get(c, 10**9))
        first: dict[str, None] = {}
        for c in order:
            for text in windows_mod.chunk_windows(analyzer, titles[c], texts[c], args.window_sentences).texts:
                first.setdefault(text)
        encoder.encode_documents(list(first), progress=True)
    started = time.perf_counter()
    data = windows_mod.build_windows(titles, texts, analyzer, vocab, encoder,
                                     window_sentences=args.window_sentences, progress=True)
    seconds = time.perf_counter() - started
    if args.cached_only:
        bad = ~np.any(data.vectors != 0, axis=1)
        print(f"{encoder.missing} window texts not cached; {int(bad.sum())} window rows have no vector")
        chunk_of = np.repeat(np.arange(data.n_chunks), np.diff(data.window_offsets))
        (args.output / "missing_chunks.json").write_text(json.dumps(sorted(set(chunk_of[bad].tolist()))))
    data.write(target)
    manifest["files"] = manifest_mod.file_entries(target)
    manifest["windows"] = data.params
    manifest_mod.write_manifest(target, manifest)
    current = args.output.absolute() / "CURRENT"
    if current.is_symlink() or current.exists():
        current.unlink()
    current.symlink_to(target.name)
    sizes = {n: manifest["files"][n]["bytes"] for n in windows_mod.FILES}
    print(json.dumps({"index": str(target), "windows": data.params, "seconds": round(seconds, 1),
                      "newly_encoded": encoder.encoded, "bytes": sizes, "total_bytes": sum(sizes.values())}, indent=2))


if __name__ == "__main__":
    main()
