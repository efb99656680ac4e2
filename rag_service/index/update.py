"""Incremental updates: `rag-index add` / `rag-index delete` publish a new version without re-encoding the corpus.

An index version keeps its source documents (documents.jsonl) and the settings it was built with (manifest
"build_config"). An update reads them, applies the change, and runs the ordinary build (index/build.py) over the
result: every artifact any build step writes is derived exactly as a full build would derive it, so an update can
never drift from a rebuild as build steps are added. What makes it cheap is the encoder, the one expensive step:
the build is given an encoder that returns the stored vector for any text it has embedded before (keyed by sha256 of
the text) and runs the model only on new text. Vectors come from the current version's vectors.npy and from an
embedding cache kept in the index root (.embedding-cache/), which also covers texts other steps embed (sentence
windows). An index fresh from `rag-index build` has no cache yet, so its first update also embeds the texts of those
other steps once; later updates embed only new text. Publishing is the build's atomic publish; a server picks the new
version up with ReloadIndex or SIGHUP.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.core.errors import BuildError, RagError
from rag_service.index.chunking import Document, dense_text
from rag_service.index.manifest import check_files, read_manifest
from rag_service.index.publish import CURRENT, current_version_dir, root_lock
from rag_service.index.source import SOURCE_FILE
from rag_service.index.store import DocStore

log = logging.getLogger(__name__)

CACHE_DIR = ".embedding-cache"


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class ReusingEncoder:
    """Wraps an encoder: encode_documents returns known vectors and runs the model only on unseen texts. Everything
    else (name, dim, tokenizer, count_tokens, ...) is the wrapped encoder's."""

    def __init__(self, encoder: Any, known: dict[bytes, np.ndarray]) -> None:
        self._encoder = encoder
        self.known = known
        self.used: set[bytes] = set()
        self.encoded = 0
        self.reused = 0
        self.encoded_texts: list[str] = []  # what reached the model, for the update's report and tests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        keys = [text_key(t) for t in texts]
        new: dict[bytes, str] = {}
        for key, text in zip(keys, texts):
            if key not in self.known:
                new.setdefault(key, text)
        if new:
            self.encoded_texts.extend(new.values())
            vectors = self._encoder.encode_documents(list(new.values()), batch_size=batch_size, progress=progress)
            for key, vector in zip(new, np.asarray(vectors, dtype=np.float32)):
                self.known[key] = vector
        self.encoded += len(new)
        self.reused += len(keys) - sum(1 for k in keys if k in new)
        self.used.update(keys)
        if not keys:
            return np.zeros((0, self._encoder.dim), dtype=np.float32)
        return np.stack([self.known[k] for k in keys]).astype(np.float32, copy=False)


def _cache_paths(root: Path, model: str) -> tuple[Path, Path]:
    slug = hashlib.sha256(model.encode()).hexdigest()[:16]
    return root / CACHE_DIR / f"{slug}.keys.npy", root / CACHE_DIR / f"{slug}.vectors.npy"


def load_cache(root: Path, model: str, dim: int) -> dict[bytes, np.ndarray]:
    """The root's embedding cache for `model`; empty when absent or unreadable (it is only an optimisation)."""
    keys_path, vectors_path = _cache_paths(root, model)
    try:
        keys = np.load(keys_path)
        vectors = np.load(vectors_path, mmap_mode="r")
    except (OSError, ValueError):
        return {}
    if keys.dtype != np.dtype("S32") or vectors.shape != (len(keys), dim):
        log.warning("ignoring embedding cache %s: shape %s does not match %d keys of dim %d", vectors_path,
                    vectors.shape, len(keys), dim)
        return {}
    return {bytes(k): vectors[i] for i, k in enumerate(keys)}


def save_cache(root: Path, model: str, known: dict[bytes, np.ndarray], keep: Iterable[bytes]) -> None:
    """Keeps the vectors of `keep` (the texts of the version just published), written atomically."""
    keys = sorted(set(keep) & known.keys())
    keys_path, vectors_path = _cache_paths(root, model)
    keys_path.parent.mkdir(exist_ok=True)
    suffix = f".tmp-{os.getpid()}-{secrets.token_hex(4)}.npy"
    tmp_keys, tmp_vectors = keys_path.with_name(keys_path.name + suffix), vectors_path.with_name(
        vectors_path.name + suffix)
    try:
        np.save(tmp_vectors, np.stack([known[k] for k in keys]).astype(np.float32) if keys else
                np.zeros((0, 0), np.float32))
        np.save(tmp_keys, np.array(keys, dtype="S32"))
        # Vectors first: a reader that sees new keys always finds vectors of the same length.
        os.replace(tmp_vectors, vectors_path)
        os.replace(tmp_keys, keys_path)
    finally:
        for p in (tmp_keys, tmp_vectors):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _current_vectors(directory: Path, manifest: dict[str, Any]) -> dict[bytes, np.ndarray]:
    """Vector of every chunk of the current version, keyed by the text the encoder saw for it."""
    store = DocStore.load(directory)
    vectors = np.load(directory / "vectors.npy", mmap_mode="r")
    known = {}
    for i in range(store.n_chunks):
        text = dense_text(store.doc_title(store.chunk_doc(i)), store.chunk_text(i))
        known[text_key(text)] = np.asarray(vectors[i], dtype=np.float32)
    return known


@dataclass(frozen=True)
class UpdateResult:
    version_dir: Path
    base_version: str
    added: int
    replaced: int
    deleted: int
    documents: int
    encoded: int
    reused: int
    encoded_texts: list[str]


def _build_config(manifest: dict[str, Any], path: Path, keep: int | None):
    from rag_service.index.build import BuildConfig

    saved = manifest.get("build_config")
    if not isinstance(saved, dict):
        raise BuildError(f"{path}: the manifest records no build_config; this index predates incremental updates, "
                         "rebuild it once with `rag-index build`")
    known = {f.name for f in fields(BuildConfig)}
    settings = {k: v for k, v in saved.items() if k in known}
    if keep is not None:
        settings["keep"] = keep
    return BuildConfig(**settings)


def update_index(root: Path | str, *, add: Sequence[Document] = (), delete: Sequence[str] = (),
                 encoder: Any = None, keep: int | None = None, progress: bool = False) -> UpdateResult:
    """Publishes a new version of the index at `root`: the current documents, minus `delete` (ids), with `add`
    (a document whose id exists replaces it). Raises BuildError; the published version is untouched on failure."""
    root = Path(root).absolute()
    if not (root / CURRENT).is_symlink():
        raise BuildError(f"{root}: not an index root (no {CURRENT} link); updates publish a new version beside the "
                         "current one, so give the root, not a version directory")
    if not add and not delete:
        raise BuildError("nothing to do: no documents to add and no ids to delete")
    with root_lock(root):  # the version updated from is the one CURRENT names now, not after another publish
        base = current_version_dir(root)
    if base is None:
        raise BuildError(f"{root}/{CURRENT}: dangling link")
    try:
        manifest = read_manifest(base)
        check_files(base, manifest, checksums=True)  # never build on a corrupt base
    except RagError as error:
        raise BuildError(f"cannot update from {base}: {error}") from None
    if "shard" in manifest:
        raise BuildError(f"{base}: is shard {manifest['shard']['index']} of {manifest['shard']['count']}; its "
                         "statistics are the whole corpus', which an update of one shard would break: update the "
                         "unsharded index and split it again (rag-index shard), or rebuild with --shards")
    if SOURCE_FILE not in manifest["files"]:
        raise BuildError(f"{base}: keeps no source documents ({SOURCE_FILE}); this index predates incremental "
                         "updates, rebuild it once with `rag-index build`")
    config = _build_config(manifest, base / "manifest.json", keep)

    from rag_service.index.build import build_index, read_beir_jsonl

    docs = read_beir_jsonl(base / SOURCE_FILE)
    position = {d.id: i for i, d in enumerate(docs)}
    seen: set[str] = set()
    for d in add:
        if d.id in seen:
            raise BuildError(f"add: document id {d.id!r} given twice")
        seen.add(d.id)
    both = seen & set(delete)
    if both:
        raise BuildError(f"document {sorted(both)[0]!r} is both added and deleted")
    missing = [i for i in delete if i not in position]
    if missing:
        raise BuildError(f"delete: no document with id {', '.join(repr(m) for m in missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''} in {base.name}")
    replaced = 0
    for d in add:
        if d.id in position:
            docs[position[d.id]] = d
            replaced += 1
        else:
            position[d.id] = len(docs)
            docs.append(d)
    gone = set(delete)
    docs = [d for d in docs if d.id not in gone]
    if not docs:
        raise BuildError(f"the update would leave {root} without documents; an index needs at least one")

    if encoder is None:
        from rag_service.encoder.encode import Encoder

        encoder = Encoder()
    model = manifest["model"]
    if encoder.name != model["name"] or encoder.dim != model["dim"]:
        raise BuildError(f"{base}/manifest.json: built with model {model['name']!r} (dim {model['dim']}), the update "
                         f"would encode with {encoder.name!r} (dim {encoder.dim})")
    known = load_cache(root, encoder.name, encoder.dim)
    known.update(_current_vectors(base, manifest))
    wrapped: list[ReusingEncoder] = []

    def reuse(document_encoder: Any) -> ReusingEncoder:
        # Applied by the build to the encoder it chose for documents, so the choice stays the build's.
        wrapped.append(ReusingEncoder(document_encoder, known))
        return wrapped[-1]

    record = {"base_version": manifest["version"], "added": len(add) - replaced, "replaced": replaced,
              "deleted": len(gone)}
    published = build_index(base, root, config, encoder=encoder, progress=progress, documents=docs,
                            extra_manifest={"update": record,
                                            # a tuned model's settings stay with the index it serves
                                            **({"tuned": manifest["tuned"]} if "tuned" in manifest else {})},
                            wrap_encoder=reuse)
    reusing = wrapped[0]
    try:
        save_cache(root, encoder.name, known, reusing.used)
    except OSError as error:  # the published version is complete; a missing cache only costs time next update
        log.warning("could not save the embedding cache in %s: %s", root / CACHE_DIR, error)
    log.info("update of %s: %s; encoded %d texts, reused %d", root, record, reusing.encoded, reusing.reused)
    return UpdateResult(version_dir=published, base_version=manifest["version"], added=record["added"],
                        replaced=replaced, deleted=len(gone), documents=len(docs), encoded=reusing.encoded,
                        reused=reusing.reused, encoded_texts=reusing.encoded_texts)
