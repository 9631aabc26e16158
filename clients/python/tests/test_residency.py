"""The Residency helper against the real broker, with a static inventory of
one 16 GiB GPU: `llm` keeps 10 GiB resident after its lease and unloads on
request over its Residency stream; `image` needs 12 GiB, so granting it
takes llm's memory. Without NVML the broker takes the consumer's word that
the memory is free."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, List

import pytest

import gpulease
import gpulease.aio
from conftest import PATIENCE_S, Broker
from gpulease.v1 import lease_pb2

CONFIG = """
[consumers.llm]
kind = "llm"
vram_mib = 10240
unload = "stream"

[consumers.image]
kind = "image"
vram_mib = 12288
"""


def memory_broker(start_broker: Callable[..., Broker], **settings: Any) -> Broker:
    return start_broker(
        config=CONFIG, gpu__source="static", gpu__static_memory_mib="16384", **settings
    )


def residents(status: lease_pb2.StatusResponse) -> List[str]:
    return [r.consumer for r in status.gpus[0].residents]


def make_llm_resident(broker: Broker) -> None:
    with gpulease.lease("llm", vram_mib=10240, broker=broker.address, max_wait=PATIENCE_S):
        pass
    assert residents(broker.status()) == ["llm"]


def no_helper_threads() -> bool:
    return not any(t.name.startswith("gpulease-residency") for t in threading.enumerate())


def test_the_helper_unloads_when_the_broker_asks(start_broker: Callable[..., Broker]) -> None:
    broker = memory_broker(start_broker)
    seen: List[Any] = []

    def unload(request: gpulease.UnloadRequested) -> None:
        # The broker waits for the answer: llm is still resident, asked to unload.
        (resident,) = broker.status().gpus[0].residents
        seen.append((request, resident.consumer, resident.unload_requested))

    with gpulease.residency("llm", on_unload=unload, broker=broker.address) as helper:
        assert helper.wait_connected(PATIENCE_S)
        assert helper.connected
        make_llm_resident(broker)
        assert seen == []
        with gpulease.lease("image", vram_mib=12288, broker=broker.address, max_wait=PATIENCE_S):
            status = broker.status()
            assert "llm" not in residents(status)
            assert status.gpus[0].holders[0].consumer == "image"
        assert helper.unloads == 1
    assert not helper.connected
    assert no_helper_threads()

    ((request, consumer, asked),) = seen
    assert (consumer, asked) == ("llm", True)
    assert request.gpu_index == 0
    assert request.footprint_mib == 10240
    assert request.for_consumer == "image"
    assert request.deadline_ms == 10_000  # gpu.unload_timeout's default
    status = broker.status()
    assert status.evictions.requested == 1
    assert status.evictions.completed == 1
    assert status.evictions.last_victim == "llm"


def test_a_callback_that_raises_is_logged_and_not_answered(
    start_broker: Callable[..., Broker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = memory_broker(start_broker, gpu__unload_timeout="1s")

    def unload(request: gpulease.UnloadRequested) -> None:
        raise RuntimeError("the model is busy")

    with gpulease.residency("llm", unload, broker=broker.address) as helper:
        assert helper.wait_connected(PATIENCE_S)
        make_llm_resident(broker)
        with pytest.raises(gpulease.LeaseTimeout):
            with gpulease.lease("image", vram_mib=12288, broker=broker.address, max_wait=2):
                pass
        assert helper.unloads == 0
        assert helper.connected  # the stream stays open for the next request
    (resident,) = broker.status().gpus[0].residents
    assert resident.consumer == "llm" and resident.unload_failed
    assert broker.status().evictions.failed == 1
    assert "the on_unload callback raised" in caplog.text
    assert "the model is busy" in caplog.text


def test_the_helper_reconnects_when_the_broker_restarts(
    start_broker: Callable[..., Broker], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpulease")
    first = memory_broker(start_broker)
    calls: List[gpulease.UnloadRequested] = []
    with gpulease.residency("llm", calls.append, broker=first.address) as helper:
        assert helper.wait_connected(PATIENCE_S)
        first.terminate()
        deadline = time.monotonic() + PATIENCE_S
        while helper.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not helper.connected
        # The same address, a new broker: the helper finds it by itself.
        second = memory_broker(start_broker, listen=first.address)
        assert helper.wait_connected(PATIENCE_S)
        assert helper.error is None
        make_llm_resident(second)
        with gpulease.lease("image", vram_mib=12288, broker=second.address, max_wait=PATIENCE_S):
            pass
        assert [c.for_consumer for c in calls] == ["image"]
    assert "reconnecting" in caplog.text


def test_an_unasked_report_unloaded_is_ignored(start_broker: Callable[..., Broker]) -> None:
    broker = memory_broker(start_broker)
    asked: List[Any] = []
    helper = gpulease.residency("llm", asked.append, broker=broker.address)
    try:
        assert helper.wait_connected(PATIENCE_S)
        make_llm_resident(broker)
        # An unasked claim could come from anyone who may open the stream:
        # the broker ignores it, so llm stays resident...
        assert helper.report_unloaded()
        # ...and image's 12 GiB still needs llm to be asked to unload.
        with gpulease.lease("image", vram_mib=12288, broker=broker.address, max_wait=PATIENCE_S):
            pass
        assert [request.for_consumer for request in asked] == ["image"]
        assert broker.status().evictions.requested == 1
    finally:
        helper.close()
    assert not helper.report_unloaded()
    helper.close()  # idempotent
    assert no_helper_threads()


def test_a_refused_helper_retries_and_says_why(
    start_broker: Callable[..., Broker], caplog: pytest.LogCaptureFixture
) -> None:
    broker = memory_broker(start_broker)
    with gpulease.residency("bad name!", lambda request: None, broker=broker.address) as helper:
        with pytest.raises(gpulease.LeaseRejected):
            helper.wait_connected(PATIENCE_S)
        assert isinstance(helper.error, gpulease.LeaseRejected)
    assert "residency of 'bad name!' refused" in caplog.text
    with pytest.raises(TypeError):
        gpulease.residency("llm", None, broker=broker.address)  # type: ignore[arg-type]


def test_the_asyncio_helper_awaits_a_coroutine_callback(
    start_broker: Callable[..., Broker],
) -> None:
    broker = memory_broker(start_broker)

    async def main() -> List[Any]:
        seen: List[Any] = []

        async def unload(request: gpulease.UnloadRequested) -> None:
            await asyncio.sleep(0.05)  # e.g. an HTTP call to the model server
            seen.append(request.for_consumer)

        async with gpulease.aio.residency("llm", unload, broker=broker.address) as helper:
            assert await helper.wait_connected(PATIENCE_S)
            async with gpulease.aio.lease("llm", vram_mib=10240, broker=broker.address):
                pass
            async with gpulease.aio.Client(broker.address) as client:
                assert residents(await client.status()) == ["llm"]
                async with gpulease.aio.lease(
                    "image", vram_mib=12288, broker=broker.address, max_wait=PATIENCE_S
                ):
                    assert "llm" not in residents(await client.status())
            assert helper.unloads == 1
        assert not helper.connected
        return seen

    assert asyncio.run(main()) == ["image"]
    with pytest.raises(RuntimeError):  # outside of an event loop
        gpulease.aio.residency("llm", lambda request: None, broker=broker.address)
