"""GaLore's projection refreshes (an SVD per weight) run side by side on CUDA streams.

One cuSOLVER SVD of a transformer-sized gradient keeps the GPU busy for a fraction of its time
(19 ms each, 4.0 s for SmolLM2-135M's 210 weights on an H100; 9.0 s for gemma-3-1b-it's 182), and
``torch.linalg.svd`` waits on the host for its convergence check. Several host threads, each issuing
the same call on its own stream, overlap them: 1.0 s and 3.3 s with 8 threads, bit-identical
results (``benchmarks/profile_trial.py --svd``). On CPU the work runs inline: LAPACK already uses
every core.

The gradient's memory was allocated on the backward stream; ``record_stream`` keeps the allocator
from handing it out again before the side stream has read it. At most ``2 × workers`` gradients wait
at once (the backward hook blocks beyond that), so a refresh step never holds every full gradient.
The projection of each gradient with its new matrix runs back on the submitting thread and stream.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

WORKERS = 8


class RefreshPool:
    """``submit(svd, then, grad)``: ``svd(grad)`` on a worker's stream, then ``then(grad)`` on the
    submitting thread's stream once that SVD is done; on CPU both at once. ``wait()`` finishes all.

    ``svd`` must not run matrix products: every (thread, stream) pair that calls cuBLAS keeps a
    workspace of its own (tens of MB each, counted as allocated memory), so the projections
    (``then``) stay on the streams that already have one."""

    def __init__(self, device: torch.device, workers: int = WORKERS, waiting: int | None = None):
        """``waiting``: how many gradients may wait for their SVD before ``submit`` blocks (2 × workers by
        default, so a layer-wise step frees full gradients as it goes; callers whose gradients stay
        allocated anyway may let them all wait)."""
        self.cuda = device.type == "cuda" and workers > 0
        self.device = device
        self.workers = workers
        self.waiting = 2 * workers if waiting is None else waiting
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._queue: deque = deque()  # (future of the done event, then, grad), in submission order

    def _stream(self) -> torch.cuda.Stream:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(device=self.device)
        return s

    def submit(self, svd: Callable[[torch.Tensor], None], then: Callable[[torch.Tensor], None],
               grad: torch.Tensor) -> None:
        if not self.cuda:
            svd(grad)
            then(grad)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="galore-refresh")
            weakref.finalize(self, self._pool.shutdown, wait=False)  # the threads end with the optimizer
        ready = torch.cuda.Event()
        ready.record()  # on the stream that produced the gradient (backward's, or the optimizer step's)

        def run() -> torch.cuda.Event:
            stream = self._stream()
            stream.wait_event(ready)
            grad.record_stream(stream)
            with torch.cuda.stream(stream):
                svd(grad)
                done = torch.cuda.Event()
                done.record()
            return done

        self._queue.append((self._pool.submit(run), then, grad))
        self._finish(keep=self.waiting)

    def _finish(self, keep: int) -> None:
        """Run ``then`` for finished SVDs in order, waiting for the oldest while more than ``keep`` wait."""
        while self._queue and (len(self._queue) > keep or self._queue[0][0].done()):
            future, then, grad = self._queue.popleft()
            try:
                done = future.result()
            except BaseException:  # a failed SVD fails the step: nothing left queued runs into a later one
                for f, _, _ in self._queue:
                    f.cancel()
                self._queue.clear()
                raise
            torch.cuda.current_stream().wait_event(done)
            then(grad)

    def wait(self) -> None:
        if self._queue:
            self._finish(keep=0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
