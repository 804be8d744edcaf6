"""Micro-batching of concurrent encode requests: one forward pass for many requests' photos."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from retrieval.encoders import Encoder, batch_len, concat_views

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    tensors: np.ndarray  # (n, C, H, W) preprocessed photos of one request
    future: Future  # resolves to (n, dim) float32 embeddings


class EncodeBatcher:
    """Collects preprocessed photos from concurrent requests for up to ``window_ms`` and encodes them together.

    With ``window_ms=0`` it never waits, but requests that queued up while the model was busy are still
    encoded together; ``max_batch=1`` encodes every request on its own (still on the single model thread).
    A forward pass holds at most ``max_batch`` photos, unless one request alone has more (requests are never split).
    """

    def __init__(self, encoder: Encoder, *, window_ms: float = 5.0, max_batch: int = 32) -> None:
        self.encoder = encoder
        self.window = max(window_ms, 0.0) / 1000.0
        self.max_batch = max(1, max_batch)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="speciesid-encoder", daemon=True)
        self._thread.start()
        self.batches = 0  # forward passes run (for metrics)
        self.images = 0  # photos encoded

    def submit(self, tensors: np.ndarray) -> Future:
        """Queue a (n, C, H, W) batch; the future gives its (n, dim) embeddings."""
        fut: Future = Future()
        self._queue.put(_Job(tensors, fut))
        return fut

    def encode(self, tensors: np.ndarray) -> np.ndarray:
        """Blocking form of :meth:`submit`."""
        return self.submit(tensors).result()

    def close(self) -> None:
        """Stop the worker thread."""
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        carry: _Job | None = None  # a request that would have overfilled the last batch: it opens the next one
        while True:
            job, carry = (carry, None) if carry is not None else (self._queue.get(), None)
            if job is None:
                return
            jobs = [job]
            size = batch_len(job.tensors)
            deadline = None
            while size < self.max_batch:
                try:
                    if self.window <= 0:
                        nxt = self._queue.get_nowait()
                    else:
                        deadline = deadline or time.monotonic() + self.window
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                if size + batch_len(nxt.tensors) > self.max_batch:  # requests are never split
                    carry = nxt
                    break
                jobs.append(nxt)
                size += batch_len(nxt.tensors)
            try:
                emb = self.encoder.encode_batch(concat_views([j.tensors for j in jobs]))
            except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting request
                for j in jobs:
                    j.future.set_exception(exc)
                continue
            self.batches += 1
            self.images += size
            start = 0
            for j in jobs:
                n = batch_len(j.tensors)
                j.future.set_result(emb[start : start + n])
                start += n
