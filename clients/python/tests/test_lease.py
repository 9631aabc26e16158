"""The blocking `gpulease.lease()` against the real broker."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

import grpc
import pytest

import gpulease
from conftest import PATIENCE_S, Broker, ended
from gpulease import _protocol
from gpulease.v1 import lease_pb2


def free_port() -> int:
    """A port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hold_in_thread(
    broker: Broker, consumer: str, **kwargs: object
) -> Tuple[threading.Thread, threading.Event, threading.Event, List[object]]:
    """Takes a lease in a thread; returns (thread, granted, release, results).

    The lease is held until `release` is set; `results` gets the `Lease` or the
    exception."""
    granted, release = threading.Event(), threading.Event()
    results: List[object] = []

    def run() -> None:
        try:
            with gpulease.lease(consumer, broker=broker.address, **kwargs) as lease:  # type: ignore[arg-type]
                results.append(lease)
                granted.set()
                release.wait(PATIENCE_S)
        except BaseException as error:
            results.append(error)
            granted.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, granted, release, results


def test_a_lease_is_granted_described_and_released(broker: Broker) -> None:
    with gpulease.lease(
        "mvoice", vram_mib=4000, max_wait=30, broker=broker.address, labels={"job": "42"}
    ) as lease:
        assert lease.lease_id
        assert lease.fencing_token >= 1
        assert lease.gpu_index == 0
        assert lease.waited_ms >= 0
        assert not lease.lost.is_set()
        status = broker.status()
        assert lease.broker_epoch == status.broker.epoch
        assert status.in_flight == 1
        (holder,) = status.holders
        assert holder.lease_id == lease.lease_id
        assert holder.consumer == "mvoice"
        assert holder.fencing_token == lease.fencing_token
        assert holder.vram_mib == 4000
        assert holder.client_pid == os.getpid()
        assert dict(holder.labels) == {"job": "42"}
    # Leaving waits until the broker has released the lease.
    status = broker.status()
    assert status.in_flight == 0
    assert ended(status)["released"] == 1
    assert lease.lost_error is None


def test_an_exception_in_the_body_releases_the_lease(broker: Broker) -> None:
    with pytest.raises(ValueError, match="boom"):
        with gpulease.lease("failing", broker=broker.address):
            raise ValueError("boom")
    assert broker.status().in_flight == 0
    assert ended(broker.status())["released"] == 1
    # The GPU is free at once.
    with gpulease.lease("after", max_wait=0, broker=broker.address):
        pass


def test_keyboard_interrupt_in_the_body_releases_the_lease(broker: Broker) -> None:
    with pytest.raises(KeyboardInterrupt):
        with gpulease.lease("interrupted", broker=broker.address):
            raise KeyboardInterrupt
    assert broker.status().in_flight == 0
    assert ended(broker.status())["released"] == 1


def test_interrupt_while_waiting_withdraws_the_request(broker: Broker) -> None:
    def interrupt(queued: lease_pb2.Queued) -> None:
        raise KeyboardInterrupt

    with gpulease.lease("first", broker=broker.address):
        with pytest.raises(KeyboardInterrupt):
            with gpulease.lease("second", broker=broker.address, on_queued=interrupt):
                pytest.fail("granted while the first holds the lease")
        status = broker.wait_until(lambda s: s.queue_depth == 0, "the request is withdrawn")
        assert ended(status)["withdrawn"] == 1
        assert status.in_flight == 1


def test_max_wait_passing_raises_lease_timeout(broker: Broker) -> None:
    with gpulease.lease("holder", broker=broker.address):
        started = time.monotonic()
        with pytest.raises(gpulease.LeaseTimeout) as raised:
            with gpulease.lease("impatient", max_wait=0.3, broker=broker.address):
                pytest.fail("granted while the holder holds the lease")
        assert time.monotonic() - started < PATIENCE_S
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert isinstance(raised.value, gpulease.LeaseError)
        status = broker.status()
        assert status.in_flight == 1
        assert status.queue_depth == 0
        assert ended(status)["expired"] == 1


def test_max_wait_zero_takes_only_a_free_gpu(broker: Broker) -> None:
    with gpulease.lease("first", max_wait=0, broker=broker.address):
        with pytest.raises(gpulease.LeaseTimeout):
            with gpulease.lease("second", max_wait=0, broker=broker.address):
                pass


def test_a_bad_consumer_name_is_rejected(broker: Broker) -> None:
    with pytest.raises(gpulease.LeaseRejected) as raised:
        with gpulease.lease("not a name!", broker=broker.address):
            pass
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_consumer_is_rejected_by_a_strict_broker(
    start_broker: Callable[..., Broker],
) -> None:
    strict = start_broker(strict_consumers="true")
    with pytest.raises(gpulease.LeaseRejected) as raised:
        with gpulease.lease("stranger", broker=strict.address):
            pass
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_no_broker_raises_broker_unavailable(tmp_path: Path) -> None:
    with pytest.raises(gpulease.BrokerUnavailable):
        with gpulease.lease("lonely", broker=f"127.0.0.1:{free_port()}"):
            pass
    with pytest.raises(gpulease.BrokerUnavailable):
        with gpulease.lease("lonely", broker=f"unix:{tmp_path / 'nobody.sock'}"):
            pass


def test_a_unix_socket_broker(start_broker: Callable[..., Broker], tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    broker = start_broker(socket=path)
    assert f"unix:{path}" in broker.addresses
    with gpulease.lease("local", broker=f"unix:{path}") as lease:
        assert gpulease.Client(f"unix:{path}").status().holders[0].lease_id == lease.lease_id
    assert broker.status().in_flight == 0


def test_the_broker_defaults_to_gpulease_broker_from_the_environment(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPULEASE_BROKER", broker.address)
    with gpulease.lease("from-env") as lease:
        assert gpulease.Client().status().holders[0].lease_id == lease.lease_id
    monkeypatch.delenv("GPULEASE_BROKER")
    assert gpulease.Client().target == "127.0.0.1:50051"
    assert gpulease.Client(f"http://{broker.address}").target == broker.address


def test_bad_arguments_fail_before_any_call() -> None:
    with pytest.raises(ValueError):
        gpulease.lease("x", max_wait=-1)
    with pytest.raises(ValueError):
        gpulease.lease("x", vram_mib=-5)
    with pytest.raises(ValueError):
        gpulease.lease("x", broker="ftp://example.invalid:21")
    with pytest.raises(TypeError):
        gpulease.lease("x", labels={"n": 1})  # type: ignore[dict-item]
    assert _protocol.max_wait_ms(None) == 0
    assert _protocol.max_wait_ms(0) == 1
    assert _protocol.max_wait_ms(1.5) == 1500


def test_a_lease_as_a_decorator_holds_a_fresh_lease_per_call(broker: Broker) -> None:
    tokens: List[int] = []

    @gpulease.lease("decorated", broker=broker.address)
    def work(x: int) -> int:
        status = broker.status()
        assert status.in_flight == 1
        tokens.append(status.holders[0].fencing_token)
        return x * 2

    assert work(2) == 4
    assert work(3) == 6
    assert tokens[0] < tokens[1]
    assert broker.status().total_grants == 2
    assert broker.status().in_flight == 0

    with pytest.raises(TypeError):

        @gpulease.lease("decorated", broker=broker.address)
        async def not_this_way() -> None:
            pass


def test_a_lease_is_entered_only_once(broker: Broker) -> None:
    lease = gpulease.lease("once", broker=broker.address)
    with lease:
        pass
    with pytest.raises(RuntimeError):
        with lease:
            pass


def test_on_queued_reports_the_position_while_waiting(broker: Broker) -> None:
    second_positions: List[Tuple[int, int, List[str]]] = []
    third_positions: List[Tuple[int, int, List[str]]] = []
    second_told, third_told, third_is_next = threading.Event(), threading.Event(), threading.Event()

    def second_queued(q: lease_pb2.Queued) -> None:
        second_positions.append((q.position, q.queue_depth, [h.consumer for h in q.holders]))
        second_told.set()

    def third_queued(q: lease_pb2.Queued) -> None:
        third_positions.append((q.position, q.queue_depth, [h.consumer for h in q.holders]))
        third_told.set()
        if q.position == 1:
            third_is_next.set()

    with gpulease.lease("first", broker=broker.address):
        second, second_granted, second_release, second_result = hold_in_thread(
            broker, "second", on_queued=second_queued
        )
        assert second_told.wait(PATIENCE_S)
        third, third_granted, third_release, third_result = hold_in_thread(
            broker, "third", on_queued=third_queued
        )
        assert third_told.wait(PATIENCE_S)
    # The first released: the second holds, the third is next.
    assert second_granted.wait(PATIENCE_S)
    assert third_is_next.wait(PATIENCE_S)
    second_release.set()
    assert third_granted.wait(PATIENCE_S)
    third_release.set()
    second.join(PATIENCE_S)
    third.join(PATIENCE_S)

    assert isinstance(second_result[0], gpulease.Lease), second_result
    assert isinstance(third_result[0], gpulease.Lease), third_result
    assert second_positions == [(1, 1, ["first"])]
    assert third_positions[0] == (2, 2, ["first"])
    assert third_positions[-1] == (1, 1, ["second"])


def test_lost_fires_when_the_broker_shuts_down_mid_lease(
    start_broker: Callable[..., Broker],
) -> None:
    broker = start_broker(shutdown_grace="10s")
    calls: List[gpulease.LeaseLost] = []
    with pytest.raises(gpulease.LeaseLost) as raised:
        with gpulease.lease("doomed", broker=broker.address, on_lost=calls.append) as lease:
            broker.stop()
            assert lease.lost.wait(PATIENCE_S)
    broker.wait_graceful_exit()
    assert raised.value.reason == lease_pb2.REVOKE_REASON_SHUTDOWN
    assert calls == [raised.value]
    assert lease.lost_error is raised.value
    with pytest.raises(gpulease.LeaseLost):
        lease.raise_if_lost()


def test_lost_fires_when_the_broker_is_killed_mid_lease(broker: Broker) -> None:
    calls: List[gpulease.LeaseLost] = []
    with pytest.raises(gpulease.LeaseLost) as raised:
        with gpulease.lease("doomed", broker=broker.address, on_lost=calls.append) as lease:
            broker.kill()
            assert lease.lost.wait(PATIENCE_S)
    assert raised.value.reason is None
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert calls == [raised.value]


def test_a_loss_does_not_hide_the_body_s_own_exception(broker: Broker) -> None:
    with pytest.raises(ZeroDivisionError):
        with gpulease.lease("doomed", broker=broker.address) as lease:
            broker.terminate()
            assert lease.lost.wait(PATIENCE_S)
            _ = 1 / 0


def test_waiters_get_broker_unavailable_when_the_broker_shuts_down(broker: Broker) -> None:
    calls: List[gpulease.LeaseLost] = []
    with pytest.raises(gpulease.LeaseLost):
        with gpulease.lease("holder", broker=broker.address, on_lost=calls.append):
            waiter, granted, _, results = hold_in_thread(broker, "waiter")
            broker.wait_until(lambda s: s.queue_depth == 1, "the waiter queues")
            broker.terminate()
            assert granted.wait(PATIENCE_S)
            waiter.join(PATIENCE_S)
    assert isinstance(results[0], gpulease.BrokerUnavailable), results


def test_a_held_lease_survives_keepalive_pings(
    start_broker: Callable[..., Broker], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = start_broker(keepalive__interval="200ms", keepalive__timeout="1s")
    monkeypatch.setattr(
        _protocol,
        "CHANNEL_OPTIONS",
        [(k, 100 if k == "grpc.keepalive_time_ms" else v) for k, v in _protocol.CHANNEL_OPTIONS],
    )
    with gpulease.lease("patient", broker=broker.address) as lease:
        # The duration is the subject here: many pings each way.
        time.sleep(1.5)
        assert not lease.lost.is_set()
        assert broker.status().in_flight == 1
    assert ended(broker.status())["released"] == 1


def test_lost_fires_when_the_broker_freezes_mid_lease(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_keepalive = {
        "grpc.keepalive_time_ms": 200,
        "grpc.keepalive_timeout_ms": 500,
        "grpc.http2.ping_timeout_ms": 500,
    }
    monkeypatch.setattr(
        _protocol,
        "CHANNEL_OPTIONS",
        [(k, fast_keepalive.get(k, v)) for k, v in _protocol.CHANNEL_OPTIONS],
    )
    with pytest.raises(gpulease.LeaseLost) as raised:
        with gpulease.lease("stuck", broker=broker.address) as lease:
            broker.process.send_signal(signal.SIGSTOP)
            try:
                assert lease.lost.wait(PATIENCE_S)
            finally:
                broker.process.send_signal(signal.SIGCONT)
    assert raised.value.reason is None
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


def test_client_lease_shares_the_client_s_connection(broker: Broker) -> None:
    with gpulease.Client(broker.address) as client:
        with client.lease("shared") as lease:
            assert client.status().holders[0].lease_id == lease.lease_id
        with client.lease("shared") as again:
            assert again.fencing_token > lease.fencing_token
        assert client.status().in_flight == 0
