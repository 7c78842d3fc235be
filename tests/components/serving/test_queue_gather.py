"""The batcher's wait for company: the clients of the last batch join the next one, a lone client never waits.

No engine and no clock: arrivals are scheduled on the event loop, and the wait bound is set far
beyond the test's own timeout, so only the stop-when-all-are-here rule can end the merging case.
"""
from __future__ import annotations

import asyncio

from components.serving.generate import Job
from components.serving.metrics import ServeMetrics
from components.serving.queue import Item, ModelQueue

SERVED = object()


def item(loop, key=("ddim", 20, 1.0)) -> Item:
    return Item(SERVED, Job(kind="images", settings={}, batch_key=key), loop.create_future())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def queue(last_batch: int, wait_s: float, max_batch: int = 8) -> ModelQueue:
    q = ModelQueue("m", ServeMetrics(), max_queue=64, max_batch=max_batch, batch_wait_s=wait_s)
    q._wakeup = asyncio.Event()
    q.last_batch = last_batch
    return q


def test_the_last_batchs_clients_coming_back_join_the_waiting_ones_in_one_batch():
    async def scenario():
        loop = asyncio.get_running_loop()
        q = queue(last_batch=3, wait_s=3600.0)
        q.items.extend([item(loop), item(loop)])   # the other half of the clients, already waiting

        def arrive():
            q.items.append(item(loop))
            q._wakeup.set()
        for _ in range(3):                          # the last batch's three clients come back
            loop.call_soon(arrive)
        await q._gather()
        return len(q.items), len(q._take_batch())
    assert run(scenario()) == (5, 5)


def test_the_wait_is_bounded_and_capped_at_max_batch():
    async def scenario():
        loop = asyncio.get_running_loop()
        q = queue(last_batch=4, wait_s=0.01, max_batch=4)
        q.items.append(item(loop))
        await q._gather()                            # nobody comes: back after the bound
        waited_alone = len(q.items)
        q.items.extend(item(loop) for _ in range(3))
        await q._gather()                            # a full batch is there: no wait at all
        return waited_alone, len(q._take_batch())
    assert run(scenario()) == (1, 4)


def test_a_lone_client_or_an_unbatchable_request_never_waits():
    async def scenario():
        loop = asyncio.get_running_loop()
        alone = queue(last_batch=1, wait_s=3600.0)
        alone.items.append(item(loop))
        await alone._gather()                        # the last batch held one request: run at once
        single = queue(last_batch=5, wait_s=3600.0)
        single.items.append(item(loop, key=None))
        await single._gather()                       # a request that runs alone (an inpaint) never waits
        return len(alone.items), len(single.items)
    assert run(scenario()) == (1, 1)
