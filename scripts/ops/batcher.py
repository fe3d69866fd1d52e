"""Dynamic batching for one model version, in the serving process: what TorchServe's frontend
does for its workers, for engines that have no batcher of their own (KServe's ModelServer).

Requests wait in one bounded queue per version. Each of the version's workers takes the first
request waiting, then more until it holds `batch_size` requests or `max_delay` seconds have
passed since it took the first, and runs the batch in its own thread (a worker's handler is
never used by two batches at once). A batch therefore never mixes versions, and what one item
of it answers is the handler's business (each item has its own status). A full queue refuses
at once (`QueueFull`), so that a burst is answered 503 rather than left waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """The version's queue holds `size` requests already."""

    def __init__(self, size: int):
        super().__init__(f"the model's queue is full ({size} requests waiting); retry later")
        self.size = size


class Batcher:
    """Batches for `workers`, each a callable that answers a list of requests in order."""

    def __init__(
        self, workers: Sequence[Callable[[list], list]], batch_size: int, max_delay: float, queue_size: int = 100
    ):
        if not workers:
            raise ValueError("a batcher needs at least one worker")
        self.workers = list(workers)
        self.batch_size = max(1, batch_size)
        self.max_delay = max(0.0, max_delay)
        self.queue_size = queue_size
        self.queue: asyncio.Queue | None = None
        self.tasks: list[asyncio.Task] = []
        self.threads = [ThreadPoolExecutor(1, thread_name_prefix=f"worker{i}") for i in range(len(self.workers))]

    def start(self) -> None:
        """Start the workers' loops on the running event loop."""
        self.queue = asyncio.Queue(self.queue_size)
        self.tasks = [asyncio.create_task(self._loop(i)) for i in range(len(self.workers))]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for thread in self.threads:
            thread.shutdown(wait=False)

    async def submit(self, request: Any) -> tuple[Any, float]:
        """The answer to `request` and the seconds it waited in the queue; QueueFull when full."""
        if self.queue is None:
            raise RuntimeError("Batcher.submit before start")
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((request, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull(self.queue_size) from None
        return await future

    async def _loop(self, index: int) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            taken = [time.perf_counter()]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.batch_size:
                try:
                    if self.queue.empty():
                        left = deadline - loop.time()
                        if left <= 0:
                            break
                        item = await asyncio.wait_for(self.queue.get(), left)
                    else:
                        item = self.queue.get_nowait()
                except TimeoutError:
                    break
                batch.append(item)
                taken.append(time.perf_counter())
            requests = [request for request, _, _ in batch]
            try:
                answers = await loop.run_in_executor(self.threads[index], self.workers[index], requests)
                if len(answers) != len(requests):
                    raise RuntimeError(f"worker answered {len(answers)} of {len(requests)} requests")
            except Exception as e:  # noqa: BLE001 - handed to each caller of the batch
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future, queued), answer, start in zip(batch, answers, taken):
                if not future.done():  # a caller that went away is not answered
                    future.set_result((answer, start - queued))
