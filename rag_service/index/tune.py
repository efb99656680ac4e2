"""Fine-tuning the bi-encoder on a team's judged queries (rag-index tune).

Training pairs come from an index of the team's corpus built with the starting model, so a passage is a chunk exactly
as the index cuts it and encodes it (title prefix included):

- positive: for each (query, relevant document), the document's chunk the starting model scores highest for the
  query (a long paper's relevant passage, not its first 256 tokens);
- hard negatives: chunks ranked high by BM25 or by the starting model whose document is not judged for the query,
  taken in turn from the two lists and sampled (seeded) from their top, one chunk per document;
- in-batch negatives: the other queries' positives and negatives (MultipleNegativesRankingLoss); a batch never holds
  two examples of the same query, whose positives would otherwise count as each other's negatives.

A seeded share of the given queries is held out: their loss picks the epoch (early stopping) and they give the
before/after figures, so no test query is ever needed. The loop is sentence-transformers' loss modules under a plain
PyTorch loop (no `datasets` or `accelerate`): checkpoints every `checkpoint_every` steps and at each epoch's end,
`resume` continues from the last one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rag_service.index.chunking import dense_text
from rag_service.index.load import Index

log = logging.getLogger(__name__)

TUNING_FILE = "rag_tuning.json"  # beside the model's own files: what the refit found, copied into index manifests
CHECKPOINT_DIR = "checkpoint"
LOSSES = ("mnrl", "cached-mnrl")


@dataclass(frozen=True)
class Example:
    qid: str
    query: str
    positive: str
    negatives: tuple[str, ...]


@dataclass(frozen=True)
class TrainConfig:
    # Two epochs at 1e-4 on 128 tokens: the recipe that reached the SciFact targets (bench/README.md, tuning
    # ablation); the held-out loss still picks the epoch kept.
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-4
    warmup: float = 0.1  # share of the steps with a linearly rising learning rate
    negatives: int = 1  # hard negatives per example
    mine_depth: int = 30  # ranks of each retriever that hard negatives are drawn from
    loss: str = "mnrl"
    mini_batch_size: int = 16  # cached-mnrl only: the chunk of a batch that is embedded with gradients at once
    max_seq_length: int = 128
    seed: int = 0
    patience: int = 1  # epochs without a better held-out loss before stopping
    checkpoint_every: int = 50  # optimizer steps between checkpoints (and at each epoch's end)
    threads: int | None = None  # torch threads (None: torch's default)

    def validate(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (in-batch negatives), got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup < 1:
            problems.append(f"warmup must be in [0, 1), got {self.warmup}")
        if self.negatives < 0:
            problems.append(f"negatives must be >= 0, got {self.negatives}")
        if self.mine_depth < 1:
            problems.append(f"mine_depth must be >= 1, got {self.mine_depth}")
        if self.loss not in LOSSES:
            problems.append(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.mini_batch_size < 1:
            problems.append(f"mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.max_seq_length < 8:
            problems.append(f"max_seq_length must be >= 8, got {self.max_seq_length}")
        if self.patience < 0:
            problems.append(f"patience must be >= 0, got {self.patience}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if problems:
            raise ValueError("; ".join(problems))


def split_queries(qids: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out): a seeded shuffle of the sorted ids, the first round(held_out * n) held out (at least one
    when held_out > 0 and there are two or more queries). Disjoint by construction."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be in [0, 1), got {held_out}")
    ordered = sorted(set(qids))
    random.Random(seed).shuffle(ordered)
    n = round(held_out * len(ordered))
    if held_out > 0 and len(ordered) >= 2:
        n = min(max(n, 1), len(ordered) - 1)
    held = sorted(ordered[:n])
    train = sorted(ordered[n:])
    return train, held


def chunk_texts(index: Index) -> tuple[list[str], list[str]]:
    """(text the encoder saw, document id) of every chunk of `index`."""
    store = index.store
    texts, docs = [], []
    for i in range(index.n_chunks):
        d = store.chunk_doc(i)
        texts.append(dense_text(store.doc_title(d), store.chunk_text(i)))
        docs.append(store.doc_id(d))
    return texts, docs


def mine(index: Index, encode_queries: Callable[[list[str]], np.ndarray], queries: Mapping[str, str],
         qrels: Mapping[str, Mapping[str, int]], qids: Sequence[str], negatives: int, depth: int,
         seed: int) -> list[Example]:
    """Examples for `qids` (see the module docstring). `index` is built with the model whose choices these are
    (its chunk vectors score the positives and the dense negatives); a relevant document absent from the index is
    skipped."""
    texts, chunk_doc = chunk_texts(index)
    chunks_of: dict[str, list[int]] = {}
    for i, d in enumerate(chunk_doc):
        chunks_of.setdefault(d, []).append(i)
    vectors = index.dense.vectors
    rng = random.Random(seed)
    examples = []
    asked = [q for q in qids if q in queries and q in qrels]
    for begin in range(0, len(asked), 64):
        batch = asked[begin:begin + 64]
        qvecs = np.asarray(encode_queries([queries[q] for q in batch]), np.float32)
        for qid, qv in zip(batch, qvecs):
            judged = qrels[qid]
            scores = vectors @ qv
            dense_top = np.argsort(-scores, kind="stable")[:depth * 4].tolist()
            bm25_top = index.bm25.search(queries[qid], depth * 4)[0].tolist()
            pool: list[int] = []
            seen_docs: set[str] = set()
            for pair in zip(dense_top, bm25_top + [-1] * (len(dense_top) - len(bm25_top))):
                for c in pair:
                    if c < 0 or chunk_doc[c] in judged or chunk_doc[c] in seen_docs:
                        continue
                    seen_docs.add(chunk_doc[c])
                    pool.append(c)
                if len(pool) >= depth:
                    break
            for doc, grade in sorted(judged.items()):
                if grade <= 0 or doc not in chunks_of:
                    continue
                cands = chunks_of[doc]
                best = cands[int(np.argmax(scores[cands]))]
                picked = rng.sample(pool, min(negatives, len(pool)))
                examples.append(Example(qid=qid, query=queries[qid], positive=texts[best],
                                        negatives=tuple(texts[c] for c in picked)))
    # Every example carries the same number of negatives (one tensor per column); a query with a short pool
    # (a tiny corpus) repeats its last.
    if negatives:
        examples = [e if len(e.negatives) == negatives or not e.negatives
                    else Example(e.qid, e.query, e.positive, e.negatives + (e.negatives[-1],) * (negatives -
                                                                                          len(e.negatives)))
                    for e in examples]
        examples = [e for e in examples if len(e.negatives) == negatives]
    return examples


def batches(examples: Sequence[Example], batch_size: int, seed: int) -> list[list[int]]:
    """Seeded shuffle cut into batches with no query twice in a batch (a repeat moves to the next batch that does
    not hold it yet); the last batch may be short."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    out: list[list[int]] = []
    qids: list[set[str]] = []
    for i in order:
        q = examples[i].qid
        for b, held in zip(out, qids):
            if len(b) < batch_size and q not in held:
                b.append(i)
                held.add(q)
                break
        else:
            out.append([i])
            qids.append({q})
    return out


@dataclass
class TrainResult:
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: train_loss, held_out_loss
    seconds: float = 0.0
    steps: int = 0
    examples: int = 0
    held_out_examples: int = 0


def _loss_module(model: Any, config: TrainConfig) -> Any:
    try:  # sentence-transformers >= 6 moved the losses; the old path still imports there, with a warning
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses  # type: ignore[attr-defined,no-redef]

    if config.loss == "cached-mnrl":
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    return losses.MultipleNegativesRankingLoss(model)


def _features(model: Any, examples: Sequence[Example], rows: Sequence[int], negatives: int) -> list[dict[str, Any]]:
    columns = [[examples[i].query for i in rows], [examples[i].positive for i in rows]]
    columns += [[examples[i].negatives[k] for i in rows] for k in range(negatives)]
    # preprocess replaced tokenize in sentence-transformers 6 (which still has it, deprecated)
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    out = []
    for texts in columns:
        feats = tokenize(texts)
        out.append({k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in feats.items()})
    return out


def held_out_loss(model: Any, loss: Any, examples: Sequence[Example], config: TrainConfig) -> float:
    """Mean loss over fixed batches of the held-out examples (same batches every epoch, so epochs compare)."""
    import torch

    if not examples:
        return float("nan")
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for rows in batches(examples, config.batch_size, config.seed):
            if len(rows) < 2:
                continue
            value = loss(_features(model, examples, rows, config.negatives), None)
            total += float(value) * len(rows)
            n += len(rows)
    return total / n if n else float("nan")


def _save_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    import torch

    work = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}, work / "state.pt")
    (work / "progress.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.rename(directory, old)
    os.rename(work, directory)
    shutil.rmtree(old, ignore_errors=True)


def train(base_model: str, examples: Sequence[Example], held_out: Sequence[Example], output: Path,
          work_dir: Path, config: TrainConfig = TrainConfig(), resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Fine-tunes `base_model` and saves the epoch with the lowest held-out loss to `output` (a sentence-transformers
    model folder). Checkpoints go to work_dir/checkpoint; with `resume` the run continues from there (same data and
    config expected: the recorded config is compared)."""
    import torch
    from sentence_transformers import SentenceTransformer

    config.validate()
    if not examples:
        raise ValueError("no training example: no query with a relevant document in the corpus")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    model = SentenceTransformer(base_model, device="cpu")
    # Training may truncate to fewer tokens than the model reads (attention costs grow with the square of the
    # length); the saved model keeps its own length, which the index's chunking is planned around.
    serving_length = model.max_seq_length
    training_length = min(int(serving_length or config.max_seq_length), config.max_seq_length)

    def save() -> None:
        model.max_seq_length = serving_length
        model.save(str(output))
        model.max_seq_length = training_length

    model.max_seq_length = training_length
    loss = _loss_module(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    per_epoch = [batches(examples, config.batch_size, config.seed + epoch) for epoch in range(config.epochs)]
    total_steps = sum(len(b) for b in per_epoch)
    warm = max(1, int(config.warmup * total_steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    checkpoint = work_dir / CHECKPOINT_DIR
    recorded = {"config": asdict(config), "base_model": str(base_model), "examples": len(examples),
                "held_out_examples": len(held_out)}
    state: dict[str, Any] = {**recorded, "epoch": 0, "batch": 0, "step": 0, "history": [], "best_loss": None,
                             "best_epoch": 0, "bad_epochs": 0, "epoch_loss_sum": 0.0, "epoch_loss_n": 0,
                             "seconds": 0.0}
    if resume and (checkpoint / "progress.json").is_file():
        saved = json.loads((checkpoint / "progress.json").read_text(encoding="utf-8"))
        differs = [k for k in recorded if saved.get(k) != recorded[k]]
        if differs:
            raise ValueError(f"{checkpoint}: cannot resume, the run differs in {', '.join(differs)}")
        blob = torch.load(checkpoint / "state.pt", weights_only=False)
        model.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        state = saved
        log.info("resuming at epoch %d batch %d (step %d)", state["epoch"], state["batch"], state["step"])
    elif resume:
        log.warning("%s: no checkpoint, starting afresh", checkpoint)
    if not state["history"]:
        before = held_out_loss(model, loss, held_out, config)
        state["history"].append({"epoch": 0, "train_loss": float("nan"), "held_out_loss": before})
        state["best_loss"] = before
        save()  # epoch 0 (the starting model) stands until an epoch beats it
    elapsed_before = float(state["seconds"])
    resumed_at = time.perf_counter()
    bar = tqdm(total=total_steps, initial=state["step"], desc="tuning", unit="step", disable=not progress,
               dynamic_ncols=True)
    stopped = False
    try:
        while state["epoch"] < config.epochs and not stopped:
            epoch = state["epoch"]
            model.train()
            plan = per_epoch[epoch]
            while state["batch"] < len(plan):
                rows = plan[state["batch"]]
                state["batch"] += 1
                if len(rows) < 2:  # a lone example has no in-batch negative to learn from
                    continue
                value = loss(_features(model, examples, rows, config.negatives), None)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["epoch_loss_sum"] += float(value.detach()) * len(rows)
                state["epoch_loss_n"] += len(rows)
                bar.update(1)
                bar.set_postfix(loss=f"{float(value.detach()):.4f}", epoch=epoch + 1)
                if state["step"] % config.checkpoint_every == 0 and state["batch"] < len(plan):
                    state["seconds"] = elapsed_before + time.perf_counter() - resumed_at
                    _save_checkpoint(checkpoint, model, optimizer, scheduler, state)
            held = held_out_loss(model, loss, held_out, config)
            train_loss = state["epoch_loss_sum"] / max(state["epoch_loss_n"], 1)
            state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "held_out_loss": held})
            log.info("epoch %d: train loss %.4f, held-out loss %.4f", epoch + 1, train_loss, held)
            bar.write(f"epoch {epoch + 1}: train loss {train_loss:.4f}, held-out loss {held:.4f}")
            # No held-out examples: every epoch is kept (the last one wins).
            if math.isnan(held) or held < state["best_loss"]:
                state["best_loss"], state["best_epoch"], state["bad_epochs"] = held, epoch + 1, 0
                save()
            else:
                state["bad_epochs"] += 1
                stopped = state["bad_epochs"] > config.patience
                if stopped:
                    bar.write(f"early stop: held-out loss has not improved for {state['bad_epochs']} epoch(s)")
            state.update(epoch=epoch + 1, batch=0, epoch_loss_sum=0.0, epoch_loss_n=0)
            state["seconds"] = elapsed_before + time.perf_counter() - resumed_at
            _save_checkpoint(checkpoint, model, optimizer, scheduler, state)
    finally:
        bar.close()
    return TrainResult(best_epoch=int(state["best_epoch"]), history=list(state["history"]),
                       seconds=elapsed_before + time.perf_counter() - resumed_at, steps=int(state["step"]),
                       examples=len(examples), held_out_examples=len(held_out))


def read_tuning(model_dir: Path | str) -> dict[str, Any] | None:
    """The refit settings a tuned model folder carries (TUNING_FILE), or None for any other model folder."""
    path = Path(model_dir) / TUNING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("search"), dict):
        raise ValueError(f"{path}: expected an object with a 'search' object")
    search = data["search"]
    if search.get("fusion") not in ("weighted", "rrf"):
        raise ValueError(f"{path}: search.fusion must be weighted or rrf, got {search.get('fusion')!r}")
    weight = search.get("dense_weight")
    if not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"{path}: search.dense_weight must be a number in [0, 1], got {weight!r}")
    depth = search.get("depth")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"{path}: search.depth must be an integer >= 1, got {depth!r}")
    return data


def publish_with_tuning(root: Path | str, tuning: dict[str, Any], keep: int = 1) -> Path:
    """Publishes the current version of the index at `root` again, its files hard-linked (copied where links are
    not possible), with `tuning` in the manifest: what `rag-index build --model` of the tuned model folder writes,
    without encoding the corpus a second time when tune has just built that index to refit on."""
    from rag_service.index import manifest as manifest_mod
    from rag_service.index import publish as publish_mod

    root = Path(root)
    current = publish_mod.current_version_dir(root)
    if current is None:
        raise ValueError(f"{root}: no published version to add the tuned settings to")
    manifest = manifest_mod.read_manifest(current)
    tmp = publish_mod.make_tmp_dir(root)
    try:
        for name in manifest["files"]:
            try:
                os.link(current / name, tmp / name)
            except OSError:
                shutil.copyfile(current / name, tmp / name)
        created = manifest_mod.utc_now()
        published = publish_mod.publish(root, tmp, {
            **manifest, "tuned": tuning, "version": manifest_mod.make_version(created, manifest["files"]),
            "created_at": manifest_mod.iso_utc(created)}, keep=keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return published
