"""A bounded queue per model and the worker that empties it, micro-batching what it can.

    q = ModelQueue("digits-unet", metrics, max_queue=16, max_batch=8, batch_wait_s=0.005)
    images = await q.submit(served, job, timeout_s=60)      # QueueFull -> 429, TimeoutError -> 504

One worker per model runs the engine on a thread (onnxruntime releases the GIL), one batch at a
time. A batch is the first waiting request plus the waiting requests with the same version and
batch key (diffusion: same steps and guidance; causal text: same prompt length, length,
temperature and top_k), up to max_batch. When the last batch held several (requests are
arriving together), the worker first waits up to batch_wait_s for as many more as that batch held
(its clients coming back), so concurrent clients share one batch rather than alternating between
two half-size ones; a lone request on a quiet model runs at once (no added latency at concurrency
1). A request that timed out before its batch started is dropped, so an abandoned request costs no
engine time.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from components.errors import ServerError
from components.serving.generate import Job, run_jobs
from components.serving.metrics import ServeMetrics
from components.serving.models import Served

log = logging.getLogger("genflow.serve")


class QueueFull(ServerError):
    """The model's queue holds max_queue requests: answered 429 with Retry-After."""


@dataclass
class Item:
    served: Served
    job: Job
    future: asyncio.Future
    abandoned: bool = False


@dataclass
class ModelQueue:
    name: str
    metrics: ServeMetrics
    max_queue: int = 16
    max_batch: int = 8
    batch_wait_s: float = 0.005
    items: deque = field(default_factory=deque)
    depth: int = 0           # admitted and not yet finished (waiting or running)
    last_batch: int = 1      # size of the batch run last: > 1 means requests arrive together
    _wakeup: Optional[asyncio.Event] = None
    _task: Optional[asyncio.Task] = None

    def start(self) -> None:
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._work(), name=f"serve-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, served: Served, job: Job, timeout_s: float) -> list[str]:
        """Queue a checked job and wait for its outputs (at most timeout_s, then TimeoutError)."""
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.name}: {self.depth} requests queued (the limit, --max-queue "
                            f"{self.max_queue}); retry shortly")
        self.start()
        item = Item(served, job, asyncio.get_running_loop().create_future())
        self.depth += 1
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        self.items.append(item)
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
        except asyncio.TimeoutError:
            item.abandoned = True
            raise

    def _finish(self, items: list[Item]) -> None:
        self.depth -= len(items)
        self.metrics.queue_depth.labels(self.name).set(self.depth)

    def _take_batch(self) -> list[Item]:
        first = self.items.popleft()
        batch = [first]
        if first.job.batch_key is None or self.max_batch < 2:
            return batch
        for it in list(self.items):
            if len(batch) >= self.max_batch:
                break
            if it.served is first.served and it.job.batch_key == first.job.batch_key:
                self.items.remove(it)
                batch.append(it)
        return batch

    async def _gather(self) -> None:
        """Wait at most batch_wait_s for the clients of the last batch to come back, so that requests
        arriving together share one batch instead of alternating in two half-size ones. Only when the
        last batch held several (a lone client never waits) and only until they are all here."""
        head = self.items[0]
        if head.job.batch_key is None or self.max_batch < 2 or self.last_batch < 2:
            return
        want = min(self.max_batch, len(self.items) + self.last_batch)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while len(self.items) < want:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _work(self) -> None:
        while True:
            while not self.items:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            batch = self._take_batch()
            dropped = [it for it in batch if it.abandoned]
            batch = [it for it in batch if not it.abandoned]
            self._finish(dropped)
            if not batch:
                continue
            self.metrics.batch_size.labels(self.name).observe(len(batch))
            self.last_batch = len(batch)
            engine = batch[0].served.engine
            try:
                outputs = await asyncio.to_thread(run_jobs, engine, [it.job for it in batch])
            except asyncio.CancelledError:
                self._finish(batch)
                raise
            except Exception as e:  # handed to each waiting request; the worker goes on
                for it in batch:
                    if not it.future.done() and not it.abandoned:  # nobody would read an abandoned one
                        it.future.set_exception(e)
            else:
                for it, out in zip(batch, outputs):
                    if not it.future.done():
                        it.future.set_result(out)
            self._finish(batch)
