"""`gpulease.Client`: Status and WatchStatus."""

from __future__ import annotations

import threading
from typing import Callable

import pytest

import gpulease
from conftest import PATIENCE_S, Broker, ended
from gpulease.v1 import lease_pb2
from test_lease import free_port


def test_status_describes_the_broker(broker: Broker) -> None:
    with gpulease.lease("tts", vram_mib=3000, broker=broker.address):
        pass
    with gpulease.Client(broker.address) as client:
        status = client.status()
    assert isinstance(status, lease_pb2.StatusResponse)
    assert status.capacity == 1
    assert status.in_flight == 0
    assert status.queue_depth == 0
    assert status.total_grants == 1
    assert status.broker.version
    assert status.broker.epoch > 0
    assert not status.broker.shutting_down
    (consumer,) = status.consumers
    assert consumer.name == "tts"
    assert consumer.grants == 1
    assert not consumer.configured
    assert ended(status)["released"] == 1


def test_capacity_comes_from_the_broker(start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(capacity="2")
    with (
        gpulease.lease("a", broker=broker.address),
        gpulease.lease("b", max_wait=0, broker=broker.address),
    ):
        status = broker.status()
        assert status.capacity == 2
        assert status.in_flight == 2
        assert sorted(h.consumer for h in status.holders) == ["a", "b"]


def test_watch_sends_a_snapshot_then_one_per_change(broker: Broker) -> None:
    with gpulease.Client(broker.address) as client:
        snapshots = client.watch(timeout=PATIENCE_S)
        first = next(snapshots)
        assert first.in_flight == 0 and first.total_grants == 0
        with gpulease.lease("watched", broker=broker.address) as lease:
            held = next(s for s in snapshots if s.in_flight == 1)
            assert held.holders[0].lease_id == lease.lease_id
        done = next(s for s in snapshots if s.in_flight == 0)
        assert done.total_grants == 1
        assert ended(done)["released"] == 1
        snapshots.close()


def test_watch_shows_waiters(broker: Broker) -> None:
    with gpulease.lease("holder", broker=broker.address):
        waiter_done = threading.Event()

        def wait() -> None:
            try:
                with gpulease.lease(
                    "waiter", max_wait=PATIENCE_S, broker=broker.address, labels={"job": "7"}
                ):
                    pass
            finally:
                waiter_done.set()

        thread = threading.Thread(target=wait)
        thread.start()
        status = broker.wait_until(lambda s: s.queue_depth == 1, "the waiter queues")
        (waiter,) = status.waiters
        assert waiter.consumer == "waiter"
        assert waiter.position == 1
        assert dict(waiter.labels) == {"job": "7"}
    assert waiter_done.wait(PATIENCE_S)
    thread.join(PATIENCE_S)


def test_watch_ends_with_a_last_snapshot_when_the_broker_stops(
    start_broker: Callable[..., Broker],
) -> None:
    broker = start_broker(shutdown_grace="10s")
    with gpulease.Client(broker.address) as client:
        snapshots = client.watch()
        first = next(snapshots)
        broker.stop()
        rest = list(snapshots)
    broker.wait_graceful_exit()
    assert not first.broker.shutting_down
    assert rest, "no snapshot after the first"
    assert rest[-1].broker.shutting_down, f"the last snapshot:\n{rest[-1]}"


def test_status_without_a_broker_raises_broker_unavailable() -> None:
    with gpulease.Client(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(gpulease.BrokerUnavailable):
            client.status(timeout=PATIENCE_S)
        with pytest.raises(gpulease.BrokerUnavailable):
            next(client.watch())
