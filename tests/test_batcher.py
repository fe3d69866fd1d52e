"""The dynamic batcher of the kserve engine (scripts/ops/batcher.py) on its own: requests that
arrive together share a batch up to batch_size within max_delay, each worker runs one batch at
a time, a full queue refuses at once, and a batch that raises answers each of its callers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from scripts.ops.batcher import Batcher, QueueFull

pytestmark = pytest.mark.unit


def recording_worker(batches: list, delay: float = 0.0):
    def work(requests: list) -> list:
        batches.append(list(requests))
        time.sleep(delay)
        return [f"answer {r}" for r in requests]

    return work


def test_requests_that_arrive_together_share_a_batch_up_to_batch_size():
    batches: list = []

    async def main():
        b = Batcher([recording_worker(batches)], batch_size=4, max_delay=0.5)
        b.start()
        answers = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.stop()
        return answers

    answers = asyncio.run(main())
    assert [a for a, _ in answers] == [f"answer {i}" for i in range(10)]  # each caller gets its own answer
    assert [len(x) for x in batches] == [4, 4, 2]  # full batches at once; the rest after max_delay
    assert all(waited >= 0 for _, waited in answers)


def test_a_lone_request_waits_no_longer_than_max_delay():
    batches: list = []

    async def main():
        b = Batcher([recording_worker(batches)], batch_size=8, max_delay=0.2)
        b.start()
        start = time.perf_counter()
        await b.submit("only")
        took = time.perf_counter() - start
        await b.stop()
        return took

    took = asyncio.run(main())
    assert batches == [["only"]] and 0.15 <= took < 2


def test_each_worker_runs_one_batch_at_a_time_and_workers_run_side_by_side():
    running, most = [0], [0]
    lock = threading.Lock()

    def work(requests):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return requests

    async def main(n_workers):
        b = Batcher([work] * n_workers, batch_size=1, max_delay=0)
        b.start()
        await asyncio.gather(*(b.submit(i) for i in range(6)))
        await b.stop()

    asyncio.run(main(1))
    assert most[0] == 1
    most[0] = 0
    asyncio.run(main(3))
    assert most[0] == 3


def test_a_full_queue_refuses_at_once():
    release = threading.Event()

    def blocked(requests):
        release.wait(10)
        return requests

    async def main():
        b = Batcher([blocked], batch_size=1, max_delay=0, queue_size=2)
        b.start()
        first = asyncio.ensure_future(b.submit("running"))
        await asyncio.sleep(0.1)  # the worker holds the first request
        waiting = [asyncio.ensure_future(b.submit(f"queued {i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="queue is full"):
            await b.submit("one too many")
        release.set()
        done = await asyncio.gather(first, *waiting)
        await b.stop()
        return done

    assert [a for a, _ in asyncio.run(main())] == ["running", "queued 0", "queued 1"]


def test_a_batch_that_raises_answers_each_caller_with_the_error_and_the_batcher_goes_on():
    calls = []

    def flaky(requests):
        calls.append(requests)
        if len(calls) == 1:
            raise RuntimeError("worker died")
        return requests

    async def main():
        b = Batcher([flaky], batch_size=2, max_delay=0.2)
        b.start()
        failed = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        after = await b.submit(3)
        await b.stop()
        return failed, after

    failed, after = asyncio.run(main())
    assert [str(e) for e in failed] == ["worker died", "worker died"]
    assert after[0] == 3
