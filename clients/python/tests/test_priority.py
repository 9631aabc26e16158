"""Priorities and preemption against the real broker: `priority=` on a lease,
the `Queued` fields that come with it, and a preemptible holder asked to make
way (`preempt_requested`, `on_preempt`) or revoked (REVOKE_REASON_PREEMPTED)."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Awaitable, Callable, List, TypeVar, get_type_hints

import grpc
import pytest

import gpulease
import gpulease.aio
from conftest import PATIENCE_S, Broker, ended
from gpulease._compat import Unpack
from gpulease._protocol import Conversation, LeaseKwargs, LeaseOptions
from gpulease.v1 import lease_pb2
from test_lease import hold_in_thread

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, PATIENCE_S)

    return asyncio.run(bounded())


#: "batch" may be preempted; "mvoice" outranks it. A waiter asks holders in
#: its way to make room after `preempt_after`; no aging, so that priorities
#: stay what the tests set.
PREEMPTION_CONFIG = """
[scheduling]
preempt_after = "200ms"
aging = "0s"

[consumers.batch]
preemptible = true
preempt_grace = "{grace}"

[consumers.mvoice]
priority = 10
"""


def test_every_lease_entry_point_takes_the_same_lease_options() -> None:
    # One definition: each entry point (and LeaseOptions.build, which checks
    # them) takes the options as **options: Unpack[LeaseKwargs], so a type
    # checker sees every keyword; besides them, only the consumer and (for
    # the functions that open their own connection) the connection's.
    unpacked = Unpack[LeaseKwargs]
    connection = {"broker", "token", "token_file", "ca", "cert", "key"}
    for entry, others in (
        (LeaseOptions.build, {"consumer"}),
        (gpulease.lease, {"consumer"} | connection),
        (gpulease.aio.lease, {"consumer"} | connection),
        (gpulease.Client.lease, {"self", "consumer"}),
        (gpulease.aio.Client.lease, {"self", "consumer"}),
    ):
        params = inspect.signature(entry).parameters
        (var_keyword,) = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
        assert get_type_hints(entry, include_extras=True)[var_keyword.name] == unpacked, entry
        assert set(params) - {var_keyword.name} == others, entry
    assert gpulease.LeaseKwargs is LeaseKwargs
    assert set(LeaseKwargs.__annotations__) == {
        "vram_mib",
        "max_wait",
        "gpu",
        "labels",
        "priority",
        "on_queued",
        "on_lost",
        "on_preempt",
    }


def test_every_lease_entry_point_checks_the_lease_options() -> None:
    client = gpulease.Client("127.0.0.1:1")
    aio_client = gpulease.aio.Client("127.0.0.1:1")
    try:
        for entry in (gpulease.lease, gpulease.aio.lease, client.lease, aio_client.lease):
            every: LeaseKwargs = {
                "vram_mib": 1,
                "max_wait": 2,
                "gpu": "GPU-1",
                "labels": {"job": "7"},
                "priority": -1,
                "on_queued": print,
                "on_lost": print,
                "on_preempt": print,
            }
            entry("x", **every)
            with pytest.raises(TypeError, match="unexpected lease option 'vram'"):
                entry("x", vram=1)  # type: ignore[call-arg]
            with pytest.raises(ValueError, match="vram_mib"):
                entry("x", vram_mib=-1)
            with pytest.raises(TypeError, match="gpu"):
                entry("x", gpu=1.0)  # type: ignore[arg-type]
    finally:
        client.close()


def test_priority_is_sent_only_when_given_and_checked() -> None:
    assert not LeaseOptions.build("x").acquire_request().acquire.HasField("priority")
    for priority in (0, -3, 7):
        acquire = LeaseOptions.build("x", priority=priority).acquire_request().acquire
        assert acquire.HasField("priority") and acquire.priority == priority
    with pytest.raises(TypeError):
        gpulease.lease("x", priority=True)
    with pytest.raises(TypeError):
        gpulease.aio.lease("x", priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        gpulease.lease("x", priority=2**31)
    with pytest.raises(TypeError):
        gpulease.lease("x", on_preempt="not callable")  # type: ignore[arg-type]


def test_the_conversation_signals_one_preemption_and_no_release_after_a_revocation() -> None:
    def event(**kind: object) -> lease_pb2.LeaseEvent:
        return lease_pb2.LeaseEvent(**kind)  # type: ignore[arg-type]

    notice = lease_pb2.PreemptRequested(grace_ms=2000, for_consumer="mvoice")
    conversation = Conversation(LeaseOptions.build("batch"), "broker:1")
    conversation.on_wait_event(event(granted=lease_pb2.Granted(lease_id="e-1")))
    assert conversation.on_hold_event(event(preempt_requested=notice)) == notice
    assert conversation.preempt_notice == notice
    assert conversation.on_hold_event(event(preempt_requested=notice)) is None
    revoked = lease_pb2.Revoked(reason=lease_pb2.REVOKE_REASON_PREEMPTED, message="too slow")
    lost = conversation.on_hold_event(event(revoked=revoked))
    assert isinstance(lost, gpulease.LeaseLost)
    assert lost.reason == lease_pb2.REVOKE_REASON_PREEMPTED
    assert "(REVOKE_REASON_PREEMPTED): too slow" in str(lost)
    # The broker ends a revoked lease's stream itself: nothing is written.
    assert conversation.begin_release() is False
    assert conversation.on_hold_end(grpc.StatusCode.ABORTED, "revoked") is None
    assert lost.code == grpc.StatusCode.ABORTED

    held = Conversation(LeaseOptions.build("batch"), "broker:1")
    held.on_wait_event(event(granted=lease_pb2.Granted(lease_id="e-2")))
    assert held.begin_release() is True
    # A request to make way while the client releases is kept, not signalled.
    assert held.on_hold_event(event(preempt_requested=notice)) is None
    assert held.preempt_notice == notice


def test_priority_lowers_a_request_and_a_higher_one_is_clamped(
    start_broker: Callable[..., Broker],
) -> None:
    broker = start_broker(config='[scheduling]\naging = "0s"\n[consumers.mvoice]\npriority = 10\n')
    low_queued: List[lease_pb2.Queued] = []
    low_told = threading.Event()

    def on_low_queued(queued: lease_pb2.Queued) -> None:
        low_queued.append(queued)
        low_told.set()

    with gpulease.lease("first", broker=broker.address):
        low, low_granted, low_release, low_result = hold_in_thread(
            broker, "mvoice", priority=3, labels={"asked": "3"}, on_queued=on_low_queued
        )
        assert low_told.wait(PATIENCE_S)
        high, high_granted, high_release, high_result = hold_in_thread(
            broker, "mvoice", priority=50, labels={"asked": "50"}
        )
        stranger, stranger_granted, stranger_release, stranger_result = hold_in_thread(
            broker, "stranger", priority=-5, labels={"asked": "-5"}
        )
        status = broker.wait_until(lambda s: s.queue_depth == 3, "all three wait")
        waiters = {w.labels["asked"]: w for w in status.waiters}
        # Lowered to 3 as asked; 50 is more than mvoice's 10, so 10; a
        # stranger's 0 lowered to -5.
        assert {asked: w.priority for asked, w in waiters.items()} == {
            "3": 3,
            "50": 10,
            "-5": -5,
        }
        # The clamped request still outranks the lowered one that came first.
        assert {asked: w.position for asked, w in waiters.items()} == {"3": 2, "50": 1, "-5": 3}
        assert low_queued[0].priority == 3
    # The first released: granted by priority.
    assert high_granted.wait(PATIENCE_S)
    assert isinstance(high_result[0], gpulease.Lease), high_result
    (holder,) = broker.status().holders
    assert (holder.labels["asked"], holder.priority) == ("50", 10)
    assert not low_granted.is_set() and not stranger_granted.is_set()
    high_release.set()
    assert low_granted.wait(PATIENCE_S)
    assert isinstance(low_result[0], gpulease.Lease), low_result
    assert not stranger_granted.is_set()
    low_release.set()
    assert stranger_granted.wait(PATIENCE_S)
    assert isinstance(stranger_result[0], gpulease.Lease), stranger_result
    stranger_release.set()
    for thread in (low, high, stranger):
        thread.join(PATIENCE_S)
    assert ended(broker.status())["released"] == 4


def test_on_queued_carries_the_estimated_wait(broker: Broker) -> None:
    with gpulease.lease("first", broker=broker.address):
        # The hold time the broker learns for "first" is the subject here.
        time.sleep(1.0)
    queued: List[lease_pb2.Queued] = []
    told = threading.Event()

    def on_queued(q: lease_pb2.Queued) -> None:
        queued.append(q)
        told.set()

    with gpulease.lease("first", broker=broker.address):
        waiter, granted, release, results = hold_in_thread(
            broker, "second", priority=-2, on_queued=on_queued
        )
        assert told.wait(PATIENCE_S)
        (waiting,) = broker.status().waiters
    release.set()
    assert granted.wait(PATIENCE_S)
    waiter.join(PATIENCE_S)
    assert isinstance(results[0], gpulease.Lease), results
    # About 1 s (the typical hold of "first") less what it has held so far.
    assert queued[0].priority == -2
    assert 0 < queued[0].estimated_wait_ms < 5000, queued[0]
    assert waiting.priority == -2
    assert 0 < waiting.estimated_wait_ms < 5000, waiting


def test_async_priority_is_sent(start_broker: Callable[..., Broker]) -> None:
    broker = start_broker(config="[consumers.mvoice]\npriority = 10\n")

    async def main() -> None:
        async with gpulease.aio.Client(broker.address) as client:
            async with gpulease.aio.lease("mvoice", priority=4, broker=broker.address):
                (holder,) = (await client.status()).holders
                assert holder.priority == 4
            async with client.lease("mvoice"):
                (holder,) = (await client.status()).holders
                assert holder.priority == 10

    run(main())


def test_a_preemptible_holder_is_asked_to_make_way_and_its_release_grants_the_waiter(
    start_broker: Callable[..., Broker],
) -> None:
    broker = start_broker(config=PREEMPTION_CONFIG.format(grace="30s"))
    notices: List[lease_pb2.PreemptRequested] = []
    told = threading.Event()

    def on_preempt(notice: lease_pb2.PreemptRequested) -> None:
        notices.append(notice)
        told.set()

    with gpulease.lease("batch", broker=broker.address, on_preempt=on_preempt) as lease:
        assert not lease.preempt_requested.is_set()
        assert lease.preempt_notice is None
        waiter, granted, release, results = hold_in_thread(broker, "mvoice")
        assert lease.preempt_requested.wait(PATIENCE_S)
        assert told.wait(PATIENCE_S)
        notice = lease.preempt_notice
        assert notice is not None
        assert notices == [notice]
        assert (notice.for_consumer, notice.grace_ms) == ("mvoice", 30_000)
        # Still held: asked, not revoked.
        assert not lease.lost.is_set()
        lease.raise_if_lost()
        status = broker.status()
        (holder,) = status.holders
        assert holder.lease_id == lease.lease_id
        assert holder.preempt_requested
        assert [w.consumer for w in status.waiters] == ["mvoice"]
        assert not granted.is_set()
    # Leaving released the lease in time: no loss, and the waiter is granted.
    assert lease.lost_error is None
    assert granted.wait(PATIENCE_S)
    assert isinstance(results[0], gpulease.Lease), results
    (holder,) = broker.status().holders
    assert (holder.consumer, holder.priority, holder.preempt_requested) == ("mvoice", 10, False)
    release.set()
    waiter.join(PATIENCE_S)
    counts = ended(broker.status())
    assert (counts["released"], counts["revoked"]) == (2, 0)


def test_an_async_holder_that_does_not_make_way_is_revoked(
    start_broker: Callable[..., Broker],
) -> None:
    broker = start_broker(config=PREEMPTION_CONFIG.format(grace="300ms"))
    notices: List[lease_pb2.PreemptRequested] = []
    losses: List[gpulease.LeaseLost] = []

    async def on_preempt(notice: lease_pb2.PreemptRequested) -> None:
        await asyncio.sleep(0)
        notices.append(notice)

    async def main() -> None:
        async with gpulease.aio.Client(broker.address) as client:
            waiter_granted = asyncio.Event()

            async def wait_for_the_gpu() -> str:
                async with client.lease("mvoice") as waiter:
                    waiter_granted.set()
                    return waiter.lease_id

            with pytest.raises(gpulease.LeaseLost) as raised:
                async with client.lease(
                    "batch", on_preempt=on_preempt, on_lost=losses.append
                ) as lease:
                    waiter = asyncio.ensure_future(wait_for_the_gpu())
                    await lease.preempt_requested.wait()
                    # The holder keeps working instead of making way.
                    await lease.lost.wait()
            error = raised.value
            assert error.reason == lease_pb2.REVOKE_REASON_PREEMPTED
            assert error.code == grpc.StatusCode.ABORTED
            assert "REVOKE_REASON_PREEMPTED" in str(error)
            assert losses == [error]
            assert lease.lost_error is error
            assert lease.preempt_notice is not None
            assert notices == [lease.preempt_notice]
            assert (lease.preempt_notice.for_consumer, lease.preempt_notice.grace_ms) == (
                "mvoice",
                300,
            )
            assert await waiter
            assert waiter_granted.is_set()

    run(main())
    counts = ended(broker.status())
    assert (counts["revoked"], counts["released"]) == (1, 1)
