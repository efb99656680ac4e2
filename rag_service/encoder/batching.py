"""Micro-batching of concurrent query encodes: requests in flight at the same moment share one encoder call.

A transformer forward pass over a batch of b short queries costs much less than b passes (the weights are read once,
the matrix products are wider), so when several searches are in flight their queries are encoded together. There is
no background thread: the first request to arrive leads a batch, waits up to `window_ms` for others (less when its
deadline is near), takes up to `max_batch` queued queries, hands leadership on and runs the encoder; the others sleep
until their vector is ready. The wait is bounded by every queued request's deadline, so batching never makes a request
miss a deadline it could have met alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rag_service.encoder.encode import SearchEncoder

# Of the time left before the earliest queued deadline, at most this share is spent waiting for company.
_DEADLINE_SHARE = 0.1


@dataclass
class _Item:
    text: str
    deadline: float | None
    vector: np.ndarray | None = None
    error: BaseException | None = None
    taken: bool = False  # in a batch being encoded
    done: bool = False


class MicroBatcher:
    """Wraps an encoder (Encoder or OnnxEncoder); has the same interface, with single-query encodes batched.

    Thread-safe: built for the server's pipeline threads calling encode_queries([query]) at the same time.
    """

    def __init__(self, encoder: SearchEncoder, window_ms: float = 1.0, max_batch: int = 16) -> None:
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.encoder: SearchEncoder = encoder.encoder if isinstance(encoder, MicroBatcher) else encoder
        self.window = window_ms / 1000.0
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._leading = False
        # Batch sizes seen, for the benchmark and the tests (plain ints under the lock).
        self.batches = 0
        self.batched_queries = 0

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def count_tokens(self, text: str) -> int:
        return self.encoder.count_tokens(text)

    def __getattr__(self, name: str) -> Any:
        # name, dim, count_tokens, ... of the wrapped encoder
        return getattr(self.encoder, name)

    def __repr__(self) -> str:
        return f"MicroBatcher({self.encoder!r}, window_ms={self.window * 1000:g}, max_batch={self.max_batch})"

    def encode_queries(self, texts: Sequence[str] | str, idle: bool = False,
                       deadline: float | None = None) -> np.ndarray:
        # `idle` is not taken up: batching was configured, so a lone query waits for company rather than spreading
        # over the idle cores.
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) != 1:  # already a batch: nothing to gain from waiting
            return self.encoder.encode_queries(texts)
        return self.encode_one(texts[0], deadline)[None, :]

    def encode_one(self, text: str, deadline: float | None = None) -> np.ndarray:
        item = _Item(text, deadline)
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()  # a gathering leader may now have a full batch
        while True:
            with self._cond:
                while not item.done and (self._leading or item.taken):
                    self._cond.wait()
                if item.done:
                    break
                self._leading = True
                batch = self._gather()
                # Leadership passes on before the encoder runs, so the next batch gathers meanwhile.
                self._leading = False
                self._cond.notify_all()
            self._run(batch)
        if item.error is not None:
            raise item.error
        return item.vector  # type: ignore[return-value]  # done without error: set by _run

    def _gather(self) -> list[_Item]:
        """Called with the lock held: waits for company within the window, then takes up to max_batch items."""
        end = time.monotonic() + self.window
        while len(self._queue) < self.max_batch:
            now = time.monotonic()
            deadlines = [i.deadline for i in self._queue if i.deadline is not None]
            limit = end if not deadlines else min(end, now + _DEADLINE_SHARE * max(0.0, min(deadlines) - now))
            if limit <= now:
                break
            self._cond.wait(limit - now)
        batch, self._queue[:] = self._queue[: self.max_batch], self._queue[self.max_batch:]
        for i in batch:
            i.taken = True
        self.batches += 1
        self.batched_queries += len(batch)
        return batch

    def _run(self, batch: list[_Item]) -> None:
        try:
            vectors = self.encoder.encode_queries([i.text for i in batch])
            for i, vector in zip(batch, vectors):
                i.vector = vector
        except BaseException as e:  # noqa: BLE001 - every waiter gets the error, none hangs
            for i in batch:
                i.error = e
        with self._cond:
            for i in batch:
                i.done = True
            self._cond.notify_all()
