"""A lease holder in its own Python process, driven by the tests.

holder.py rounds BROKER CONSUMER ROUNDS HOLD_S
    prints "ready", waits for a line on stdin, then takes the lease ROUNDS
    times, holding it HOLD_S seconds each time, and prints one JSON line
    per round: {"enter": ns, "exit": ns, "token": n} (CLOCK_MONOTONIC,
    which all processes share), then "done".
holder.py hold BROKER CONSUMER
    takes the lease, prints "granted LEASE_ID", and holds it until killed;
    on SIGINT (KeyboardInterrupt) it leaves the `with` and prints
    "released", or "gave up waiting" if it was not granted yet.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import gpulease


def rounds(broker: str, consumer: str, count: int, hold_s: float) -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    records = []
    for _ in range(count):
        with gpulease.lease(consumer, max_wait=60, broker=broker) as lease:
            enter = time.monotonic_ns()
            time.sleep(hold_s)
            exit_ = time.monotonic_ns()
        records.append({"enter": enter, "exit": exit_, "token": lease.fencing_token})
    for record in records:
        print(json.dumps(record), flush=True)
    print("done", flush=True)


def hold(broker: str, consumer: str) -> None:
    granted = False
    try:
        with gpulease.lease(consumer, max_wait=60, broker=broker) as lease:
            granted = True
            print("granted", lease.lease_id, flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("released" if granted else "gave up waiting", flush=True)


def main() -> None:
    mode, broker, consumer, *rest = sys.argv[1:]
    if mode == "rounds":
        rounds(broker, consumer, int(rest[0]), float(rest[1]))
    elif mode == "hold":
        hold(broker, consumer)
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
