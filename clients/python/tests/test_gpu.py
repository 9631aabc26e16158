"""`gpu=` on every lease entry point, against a real broker with two GPUs
of the static inventory (no NVML needed): the lease is granted on the GPU it
names, and a GPU the broker does not have is refused. Static GPUs have no
UUID, so a UUID is checked on the wire and by its refusal."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

import pytest

import gpulease
import gpulease.aio
from conftest import PATIENCE_S, Broker
from gpulease._protocol import LeaseOptions

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, PATIENCE_S)

    return asyncio.run(bounded())


@pytest.fixture
def two_gpus(start_broker: Callable[..., Broker]) -> Broker:
    """A broker with two 8 GiB GPUs of the static inventory."""
    return start_broker(gpu__source="static", gpu__static_memory_mib="8192,8192")


def assert_two_gpus(broker: Broker) -> None:
    assert [gpu.index for gpu in broker.status().gpus] == [0, 1]


def test_gpu_is_sent_as_acquire_gpu() -> None:
    def sent(**options: object) -> str:
        return LeaseOptions.build("x", **options).acquire_request().acquire.gpu  # type: ignore[arg-type]

    assert sent() == ""
    assert sent(gpu=None) == ""
    assert sent(gpu=1) == "1"
    assert sent(gpu=0) == "0"
    assert sent(gpu="1") == "1"
    assert sent(gpu=" GPU-1a2b ") == "GPU-1a2b"
    with pytest.raises(ValueError):
        sent(gpu=-1)
    with pytest.raises(TypeError):
        sent(gpu=True)
    with pytest.raises(TypeError):
        sent(gpu=1.0)


def test_a_lease_is_granted_on_the_gpu_it_names(two_gpus: Broker) -> None:
    assert_two_gpus(two_gpus)
    address = two_gpus.address
    with gpulease.lease("a", gpu=1, broker=address, max_wait=30) as one:
        assert one.gpu_index == 1
        # GPU 1 is held: a request for it waits...
        for gpu in (1, "1"):
            with pytest.raises(gpulease.LeaseTimeout):
                with gpulease.lease("b", gpu=gpu, broker=address, max_wait=0):
                    pass
        # ...while GPU 0 is free, also over a client's channel.
        with gpulease.lease("b", gpu="0", broker=address, max_wait=0) as zero:
            assert zero.gpu_index == 0
        with two_gpus.client.lease("c", gpu=0, max_wait=0) as zero:
            assert zero.gpu_index == 0
            holders = {h.consumer: h.gpu_index for h in two_gpus.status().holders}
            assert holders == {"a": 1, "c": 0}
        # Without gpu=, the broker picks the free one.
        with two_gpus.client.lease("d", max_wait=0) as free:
            assert free.gpu_index == 0


def test_a_gpu_the_broker_does_not_have_is_rejected(two_gpus: Broker) -> None:
    for gpu in (2, "7", "GPU-8c4f6a4e"):
        with pytest.raises(gpulease.LeaseRejected) as raised:
            with gpulease.lease("a", gpu=gpu, broker=two_gpus.address, max_wait=5):
                pass
        assert "no GPU is" in raised.value.details, raised.value


def test_async_leases_are_granted_on_the_gpu_they_name(two_gpus: Broker) -> None:
    assert_two_gpus(two_gpus)

    async def main() -> None:
        async with gpulease.aio.lease("a", gpu=1, broker=two_gpus.address, max_wait=30) as one:
            assert one.gpu_index == 1
            async with gpulease.aio.Client(two_gpus.address) as client:
                with pytest.raises(gpulease.LeaseTimeout):
                    async with client.lease("b", gpu="1", max_wait=0):
                        pass
                async with client.lease("b", gpu=0, max_wait=0) as zero:
                    assert zero.gpu_index == 0
                with pytest.raises(gpulease.LeaseRejected):
                    async with client.lease("b", gpu="GPU-8c4f6a4e", max_wait=5):
                        pass
        with pytest.raises(gpulease.LeaseRejected):
            async with gpulease.aio.lease("a", gpu=2, broker=two_gpus.address, max_wait=5):
                pass

    run(main())
    assert two_gpus.status().in_flight == 0
