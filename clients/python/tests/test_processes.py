"""Leases held by separate Python processes: the exclusion the broker exists
for, and what happens when a holder is interrupted or killed."""

from __future__ import annotations

import json
import signal
import threading
from typing import Callable, Dict, List

import gpulease
from conftest import PATIENCE_S, Broker, Holder, ended

PROCESSES = 4
ROUNDS = 3
HOLD_S = 0.05


def test_leases_of_several_processes_never_overlap(
    broker: Broker, holders: Callable[..., Holder]
) -> None:
    procs = [
        holders("rounds", broker.address, f"proc{i}", str(ROUNDS), str(HOLD_S))
        for i in range(PROCESSES)
    ]
    # Everyone has imported grpc and waits for the start, so they contend.
    for proc in procs:
        proc.expect("ready")
    for proc in procs:
        assert proc.process.stdin is not None
        proc.process.stdin.write("go\n")
        proc.process.stdin.flush()

    intervals: List[Dict[str, int]] = []
    for proc in procs:
        out, err = proc.process.communicate(timeout=60)
        assert proc.process.returncode == 0, err
        lines = out.splitlines()
        assert lines[-1] == "done", out
        intervals += [json.loads(line) for line in lines[:-1]]

    assert len(intervals) == PROCESSES * ROUNDS
    intervals.sort(key=lambda r: r["enter"])
    for before, after in zip(intervals, intervals[1:]):
        assert before["exit"] <= after["enter"], f"two holders at once: {before} and {after}"
        # Fencing tokens grow in the order of the grants.
        assert before["token"] < after["token"]

    status = broker.status()
    assert status.in_flight == 0
    assert status.total_grants == PROCESSES * ROUNDS
    assert ended(status)["released"] == PROCESSES * ROUNDS


def test_sigkill_of_the_holder_process_grants_the_next_waiter(
    broker: Broker, holders: Callable[..., Holder]
) -> None:
    victim = holders("hold", broker.address, "victim")
    victim.expect("granted")

    granted = threading.Event()
    errors: List[BaseException] = []

    def wait() -> None:
        try:
            with gpulease.lease("next", max_wait=PATIENCE_S, broker=broker.address):
                granted.set()
        except BaseException as error:  # reported by the test
            errors.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    broker.wait_until(lambda s: s.queue_depth == 1, "the waiter queues behind the victim")
    assert not granted.is_set()

    victim.process.send_signal(signal.SIGKILL)
    assert granted.wait(PATIENCE_S), errors
    waiter.join(PATIENCE_S)
    assert not errors

    counts = ended(broker.status())
    assert counts["disconnected"] == 1
    assert counts["released"] == 1


def test_ctrl_c_in_the_holder_process_releases_the_lease(
    broker: Broker, holders: Callable[..., Holder]
) -> None:
    holder = holders("hold", broker.address, "interrupted")
    holder.expect("granted")
    assert broker.status().in_flight == 1

    holder.process.send_signal(signal.SIGINT)
    holder.expect("released")
    assert holder.process.wait(PATIENCE_S) == 0

    status = broker.status()
    assert status.in_flight == 0
    # A real `release`, not a dropped connection.
    assert ended(status)["released"] == 1
    assert ended(status)["disconnected"] == 0


def test_ctrl_c_while_waiting_withdraws_the_request(
    broker: Broker, holders: Callable[..., Holder]
) -> None:
    with gpulease.lease("first", broker=broker.address):
        waiter = holders("hold", broker.address, "waiter")
        broker.wait_until(lambda s: s.queue_depth == 1, "the waiter process queues")
        waiter.process.send_signal(signal.SIGINT)
        waiter.expect("gave up waiting")
        assert waiter.process.wait(PATIENCE_S) == 0
        status = broker.wait_until(lambda s: s.queue_depth == 0, "the request is withdrawn")
        assert ended(status)["withdrawn"] == 1
        assert status.in_flight == 1
