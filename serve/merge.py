"""One model call for every batch that queued while the model was busy.

Ray Serve's ``@serve.batch`` (2.60) forms the next batch as soon as requests arrive, even while the
previous batch is still running, and holds it at ``max_concurrent_batches``. Under steady closed-loop
load the batches therefore stay as small cohorts of the requests that happened to arrive together.
On an H200 at 16 clients, the generator ran 1-3 requests per call, and each call took as long as a
full one, because decoding is launch-bound (benchmarks/results/README.md, fourth session). The same
happens on CPU: 1.6-1.9 requests per call at 16 clients with the tiny models.

So the batched methods let Serve start many batches at once and park them here. Whichever batch gets
the model next runs every parked batch in one call, up to ``max_items`` requests. Serve still forms
the batches (its size and wait settings apply); this only stops them from queueing behind each other
one by one. Serve skips a request whose client has gone when its batch starts; a batch now starts at
once, so ``dropped(item)`` lets the call skip such requests instead (their result is None).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: ``max_concurrent_batches`` for the batched methods: how many of Serve's batches may be parked at once.
#: Past it, batches wait in Serve's own queue and join a later call.
PARK_SLOTS = 256


@dataclass
class CallInfo:
    requests: int
    """Requests in the model call that served this batch (this batch and those merged with it)."""
    model_ms: float
    """That call's own time, without the time spent parked (in the reranker it includes any wait for
    the call of its other batched method, which shares the model)."""


class MergedCalls:
    """``await merged(items)`` -> (one result per item, CallInfo); ``run(items)`` is the model call."""

    def __init__(
        self,
        run: Callable[[list], Awaitable[Sequence[Any]]],
        max_items: int,
        dropped: Callable[[Any], bool] = lambda item: False,
    ):
        if max_items < 1:
            raise ValueError(f"max_items: must be >= 1, got {max_items}")
        self._run = run
        self._dropped = dropped
        self.max_items = max_items
        self._parked: list[tuple[list, asyncio.Future]] = []
        self._turn = asyncio.Lock()
        self._inflight: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    async def __call__(self, items: Sequence[Any]) -> tuple[list, CallInfo]:
        done = asyncio.get_running_loop().create_future()
        self._parked.append((list(items), done))
        while not done.done():
            async with self._turn:
                if done.done():  # a call run while we waited for our turn took our batch
                    break
                take = self._take()
                if not take:  # ours is in a call whose caller was cancelled; that call still answers
                    break
                # Shielded: a caller cancelled mid-call must not leave the batches it took unanswered.
                task = asyncio.ensure_future(self._serve(take))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                await asyncio.shield(task)
        return await done

    def _take(self) -> list[tuple[list, asyncio.Future]]:
        """Parked batches, oldest first, while they fit in max_items (the first always goes)."""
        take, n = [], 0
        while self._parked and (not take or n + len(self._parked[0][0]) <= self.max_items):
            batch = self._parked.pop(0)
            take.append(batch)
            n += len(batch[0])
        return take

    async def _serve(self, take: list[tuple[list, asyncio.Future]]) -> None:
        flat = [x for items, _ in take for x in items]
        keep = [not self._dropped(x) for x in flat]  # read once: a client may leave during the call
        live = [x for x, k in zip(flat, keep) if k]
        t0 = time.perf_counter()
        try:
            results = list(await self._run(live)) if live else []
            if len(results) != len(live):
                raise RuntimeError(f"model call returned {len(results)} results for {len(live)} requests")
        except BaseException as e:  # every batch of this call gets the error; later calls go on
            cancelled = isinstance(e, asyncio.CancelledError)
            for _, done in take:
                if done.done():
                    continue
                if cancelled:
                    done.cancel()
                else:
                    done.set_exception(e)
                    done.exception()  # its caller may be gone: no "exception never retrieved" noise
            if not isinstance(e, Exception):  # cancellation, interpreter exit: not the model's error
                raise
            return
        info = CallInfo(requests=len(live), model_ms=(time.perf_counter() - t0) * 1000.0)
        out = iter(results)
        per_item = [next(out) if k else None for k in keep]
        i = 0
        for items, done in take:
            if not done.done():
                done.set_result((per_item[i : i + len(items)], info))
            i += len(items)
