"""The interop conversation, spoken by grpclib (on Python's h2): grant,
queue, cancel, release, and shutdown (hearing `revoked {reason: SHUTDOWN}`
before the stream's UNAVAILABLE).

Usage: python conversation_grpclib.py ADDRESS BROKER_PID LEASE_PB2_PATH

grpclib needs a half-close after `release`: without one, the broker's
RST_STREAM(NO_ERROR) after the trailers surfaces as StreamTerminatedError.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys

from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

TIMEOUT_S = 20

address, broker_pid, lease_pb2_path = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("lease_pb2", lease_pb2_path)
assert spec is not None and spec.loader is not None
pb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pb)

ACQUIRE = "/gpulease.v1.LeaseBroker/AcquireLease"


def fail(message: str) -> None:
    print(f"grpclib: {message}", file=sys.stderr)
    sys.exit(1)


def channel() -> Channel:
    if address.startswith("unix:"):
        return Channel(path=address[len("unix:") :])
    host, port = address.rsplit(":", 1)
    return Channel(host, int(port))


async def open_call(ch: Channel, consumer: str):  # type: ignore[no-untyped-def]
    stream = ch.request(ACQUIRE, Cardinality.STREAM_STREAM, pb.LeaseRequest, pb.LeaseEvent)
    await stream.__aenter__()
    await stream.send_message(pb.LeaseRequest(acquire=pb.Acquire(consumer=consumer)))
    return stream


async def expect(stream, kind: str):  # type: ignore[no-untyped-def]
    event = await asyncio.wait_for(stream.recv_message(), TIMEOUT_S)
    if event is None or event.WhichOneof("kind") != kind:
        fail(f"expected {kind}, got {event}")
    return getattr(event, kind)


async def expect_end(stream, code: Status, half_close: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Reads to the end of the call; `half_close` first ends our side, as
    grpclib wants before it reads the trailers."""
    error = None
    try:
        while True:
            event = await asyncio.wait_for(stream.recv_message(), TIMEOUT_S)
            if event is None:
                break
            if event.WhichOneof("kind") != "queued":
                fail(f"expected the end, got {event}")
        if half_close:
            await stream.end()
        await asyncio.wait_for(stream.recv_trailing_metadata(), TIMEOUT_S)
        got = Status.OK
    except GRPCError as caught:
        got, error = caught.status, caught
    if got != code:
        fail(f"expected {code}, got {got}")
    # Leave the call as its context manager would after the error.
    await stream.__aexit__(None if error is None else type(error), error, None)


async def release(stream) -> None:  # type: ignore[no-untyped-def]
    await stream.send_message(pb.LeaseRequest(release=pb.Release()), end=True)


async def main() -> None:
    ch = channel()
    a = await open_call(ch, "interop-a")
    granted = await expect(a, "granted")
    print(f"grpclib: granted token {granted.fencing_token}")

    b = await open_call(ch, "interop-b")
    queued = await expect(b, "queued")
    if queued.position != 1:
        fail(f"interop-b queued at {queued.position}")
    c = await open_call(ch, "interop-c")
    await expect(c, "queued")
    print("grpclib: two queued")

    await release(c)
    await expect_end(c, Status.OK)
    print("grpclib: cancelled a wait")

    await release(a)
    await expect_end(a, Status.OK)
    following = await expect(b, "granted")
    if following.fencing_token <= granted.fencing_token:
        fail(f"tokens did not increase: {granted.fencing_token} then {following.fencing_token}")
    print(f"grpclib: released; next granted token {following.fencing_token}")

    os.kill(int(broker_pid), signal.SIGTERM)
    revoked = await expect(b, "revoked")
    if revoked.reason != pb.REVOKE_REASON_SHUTDOWN:
        fail(f"revoked for {revoked.reason}")
    await expect_end(b, Status.UNAVAILABLE, half_close=True)
    print("grpclib: heard revoked SHUTDOWN")
    ch.close()


asyncio.run(main())
