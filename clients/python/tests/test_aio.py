"""`gpulease.aio` against the real broker. Each test runs its own event loop
with `asyncio.run`, so no pytest plugin is needed."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Awaitable, Callable, List, Tuple, TypeVar

import grpc
import pytest

import gpulease
import gpulease.aio
from conftest import PATIENCE_S, Broker, ended
from gpulease.v1 import lease_pb2

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, PATIENCE_S)

    return asyncio.run(bounded())


async def until(
    client: gpulease.aio.Client,
    predicate: Callable[[lease_pb2.StatusResponse], bool],
    what: str,
) -> lease_pb2.StatusResponse:
    """Watches Status until `predicate` holds (see conftest's wait_until)."""
    last = None
    async for snapshot in client.watch(timeout=PATIENCE_S):
        last = snapshot
        if predicate(snapshot):
            return snapshot
    raise AssertionError(f"timed out waiting until {what}; last status:\n{last}")


def test_async_lease_is_granted_and_released(broker: Broker) -> None:
    async def main() -> None:
        async with gpulease.aio.lease(
            "async-tts", vram_mib=2000, max_wait=30, broker=broker.address
        ) as lease:
            assert lease.lease_id
            assert lease.fencing_token >= 1
            async with gpulease.aio.Client(broker.address) as client:
                status = await client.status()
            assert status.holders[0].lease_id == lease.lease_id
            assert status.holders[0].client_pid == os.getpid()
            assert lease.broker_epoch == status.broker.epoch

    run(main())
    assert broker.status().in_flight == 0
    assert ended(broker.status())["released"] == 1


def test_async_leases_exclude_each_other(broker: Broker) -> None:
    intervals: List[Tuple[float, float]] = []

    async def work(name: str) -> None:
        for _ in range(3):
            async with gpulease.aio.lease(name, broker=broker.address):
                enter = time.monotonic()
                await asyncio.sleep(0.02)
                intervals.append((enter, time.monotonic()))

    async def main() -> None:
        await asyncio.gather(*(work(f"task{i}") for i in range(3)))

    run(main())
    intervals.sort()
    assert len(intervals) == 9
    for (_, exit_), (enter, _) in zip(intervals, intervals[1:]):
        assert exit_ <= enter
    assert broker.status().total_grants == 9


def test_async_max_wait_raises_lease_timeout(broker: Broker) -> None:
    async def main() -> None:
        async with gpulease.aio.lease("holder", broker=broker.address):
            with pytest.raises(gpulease.LeaseTimeout) as raised:
                async with gpulease.aio.lease("impatient", max_wait=0.2, broker=broker.address):
                    pytest.fail("granted while the holder holds the lease")
            assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    run(main())
    assert ended(broker.status())["expired"] == 1


def test_async_rejection_and_unavailability(broker: Broker) -> None:
    async def main() -> None:
        with pytest.raises(gpulease.LeaseRejected):
            async with gpulease.aio.lease("bad name", broker=broker.address):
                pass
        with pytest.raises(gpulease.BrokerUnavailable):
            async with gpulease.aio.lease("x", broker="unix:/nonexistent/gpulease.sock"):
                pass

    run(main())


def test_cancelling_a_waiting_task_withdraws_its_request(broker: Broker) -> None:
    async def main() -> None:
        async with gpulease.aio.Client(broker.address) as client:
            async with client.lease("holder"):
                told = asyncio.Event()

                async def wait() -> None:
                    async with client.lease("waiter", on_queued=lambda q: told.set()):
                        pytest.fail("granted while the holder holds the lease")

                waiter = asyncio.ensure_future(wait())
                await told.wait()
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                status = await until(client, lambda s: s.queue_depth == 0, "the waiter withdraws")
                assert ended(status)["withdrawn"] == 1
                assert status.in_flight == 1

    run(main())


def test_cancelling_a_holding_task_releases_its_lease(broker: Broker) -> None:
    async def main() -> None:
        granted = asyncio.Event()

        async def hold() -> None:
            async with gpulease.aio.lease("holder", broker=broker.address):
                granted.set()
                await asyncio.sleep(3600)

        holder = asyncio.ensure_future(hold())
        await granted.wait()
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder

    run(main())
    status = broker.status()
    assert status.in_flight == 0
    assert ended(status)["released"] == 1


def test_async_lost_fires_when_the_broker_shuts_down(start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(shutdown_grace="10s")
    lost_calls: List[gpulease.LeaseLost] = []

    async def on_lost(error: gpulease.LeaseLost) -> None:
        lost_calls.append(error)

    async def main() -> gpulease.aio.Lease:
        with pytest.raises(gpulease.LeaseLost) as raised:
            async with gpulease.aio.lease(
                "doomed", broker=broker.address, on_lost=on_lost
            ) as lease:
                broker.stop()
                await lease.lost.wait()
        assert raised.value.reason == lease_pb2.REVOKE_REASON_SHUTDOWN
        assert lost_calls == [raised.value]
        return lease

    try:
        lease = run(main())
    finally:
        broker.wait_graceful_exit()
    assert lease.lost_error is lost_calls[0]


def test_async_decorator_and_status_watch(broker: Broker) -> None:
    seen: List[int] = []

    @gpulease.aio.lease("decorated", broker=broker.address)
    async def work(client: gpulease.aio.Client) -> int:
        return (await client.status()).in_flight

    async def main() -> None:
        async with gpulease.aio.Client(broker.address) as client:
            watch = client.watch(timeout=PATIENCE_S)
            seen.append((await watch.__anext__()).total_grants)
            assert await work(client) == 1
            assert await work(client) == 1
            async for snapshot in watch:
                seen.append(snapshot.total_grants)
                if snapshot.total_grants == 2 and snapshot.in_flight == 0:
                    break
            await watch.aclose()

    run(main())
    assert seen[0] == 0
    assert seen[-1] == 2

    with pytest.raises(TypeError):

        @gpulease.aio.lease("decorated", broker=broker.address)
        def not_this_way() -> None:
            pass


def test_async_callbacks_may_be_coroutines(broker: Broker) -> None:
    queued: List[Any] = []

    async def main() -> None:
        told = asyncio.Event()

        async def on_queued(q: lease_pb2.Queued) -> None:
            await asyncio.sleep(0)
            queued.append((q.position, q.queue_depth, [h.consumer for h in q.holders]))
            told.set()

        async with gpulease.aio.Client(broker.address) as client:
            async with client.lease("first"):
                second = client.lease("second", on_queued=on_queued)
                waiter = asyncio.ensure_future(second.__aenter__())
                await told.wait()
            assert await waiter is second
            await second.__aexit__(None, None, None)

    run(main())
    assert queued == [(1, 1, ["first"])]
