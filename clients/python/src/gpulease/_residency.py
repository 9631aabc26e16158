"""The `Residency` helper of the blocking client: a daemon thread that keeps
the consumer's `Residency` stream open and frees its GPU memory when the
broker asks (`unload = "stream"` in the broker's configuration).

`gpulease.aio.residency` is the same on asyncio; both are thin drivers of
the shared `ResidencyLoop` (the reconnect loop's rules, backoff and error
mapping, without I/O) in `_protocol`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional, Tuple

import grpc

from ._protocol import (
    Connection,
    PathArg,
    ResidencyLoop,
    UnloadCallback,
    report_callback_error,
    unloaded_report,
)
from .errors import LeaseError
from .v1 import lease_pb2
from .v1.lease_pb2_grpc import LeaseBrokerStub

__all__ = ["Residency", "residency"]

#: How long `close()` waits for the helper thread (and a running callback).
CLOSE_TIMEOUT_S = 5.0


class Residency:
    """Listens for the broker's unload requests for one consumer, on a daemon
    thread, from when it is made until `close()` (or the end of its `with`
    block).

    For each ``unload_requested`` the thread calls `on_unload` with the
    `UnloadRequested` message (`gpu_index`, `footprint_mib`, `for_consumer`,
    `deadline_ms`) and, once it returns, answers ``unloaded`` for that GPU,
    which lets the broker grant the waiting request. If `on_unload` raises,
    the error is logged and nothing is answered: the broker waits for the
    memory until its `unload_timeout`. Requests are handled one at a time.

    A stream that breaks (the broker restarts, the network drops) is opened
    again, after 0.5 s and then up to 30 s apart; so is one the broker
    refuses (a bad token, a consumer it does not know), with an error in the
    log each time. `connected` says whether the stream is open now;
    `wait_connected()` waits until it is.
    """

    def __init__(
        self,
        consumer: str,
        on_unload: UnloadCallback,
        connection: Connection,
    ) -> None:
        if not isinstance(consumer, str):
            raise TypeError(f"consumer must be a str, not {type(consumer).__name__}")
        if not callable(on_unload):
            raise TypeError("on_unload must be callable")
        self.consumer = consumer
        self.target = connection.target
        self._connection = connection
        self._on_unload = on_unload
        # The loop's state; guarded by `_changed`, notified on every change.
        self._loop = ResidencyLoop(consumer, connection.target)
        self._changed = threading.Condition()
        self._call: Optional[Any] = None
        self._feed: Optional[_ReportFeed] = None
        self._thread = threading.Thread(
            target=self._run, name=f"gpulease-residency-{consumer}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<gpulease.Residency {self.consumer!r} at {self.target} {self._loop.state()}>"

    def __enter__(self) -> Residency:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the stream is open now: the broker can ask this consumer to
        unload."""
        return self._loop.connected

    @property
    def unloads(self) -> int:
        """How many unload requests were answered ``unloaded``."""
        return self._loop.unloads

    @property
    def error(self) -> Optional[LeaseError]:
        """Why the last stream failed or ended; ``None`` while one is open."""
        return self._loop.error

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Waits until the stream is open; returns whether it is.

        Raises the `LeaseRejected` (usually `LeaseUnauthorized`) error if
        the broker refused the stream, so that a bad token or consumer shows
        at once instead of as a timeout.
        """
        with self._changed:
            self._changed.wait_for(self._loop.settled, timeout)
            return self._loop.connected_or_raise()

    def report_unloaded(self, gpu_index: Optional[int] = None) -> bool:
        """Sends an `unloaded` report (for `gpu_index`, or every GPU with
        ``None``). The broker believes it only as the answer to an unload
        request it sent, and ignores (and logs) a claim it did not ask for:
        memory freed on its own comes back through NVML's readings, or the
        consumer's `idle_ttl`. Returns whether it could be sent (the stream
        is open)."""
        with self._changed:
            feed = self._feed if self._loop.connected else None
        if feed is None:
            return False
        feed.send(unloaded_report(gpu_index))
        return True

    def close(self, timeout: Optional[float] = CLOSE_TIMEOUT_S) -> None:
        """Ends the stream and stops the thread; waits up to `timeout` seconds
        for an unload callback that is running. Idempotent."""
        with self._changed:
            self._loop.closing = True
            call, feed = self._call, self._feed
            self._changed.notify_all()
        if feed is not None:
            feed.stop()
        if call is not None:
            call.cancel()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        """The thread: one stream after another until `close()`."""
        loop = self._loop
        while True:
            was_open, error = self._attempt()
            with self._changed:
                stop = loop.attempt_ended(error)
                self._changed.notify_all()
            if stop:
                return
            delay = loop.retry_delay(was_open, error)
            with self._changed:
                if self._changed.wait_for(lambda: loop.closing, delay):
                    return

    def _attempt(self) -> Tuple[bool, LeaseError]:
        """One stream, from `hello` to its end; returns whether it was open,
        and why it ended."""
        loop = self._loop
        channel = self._connection.open_channel(grpc)
        feed = _ReportFeed(loop.hello())
        was_open = False
        try:
            call = LeaseBrokerStub(channel).Residency(
                iter(feed), metadata=self._connection.metadata
            )
            with self._changed:
                if loop.closing:
                    call.cancel()
                    return False, loop.closed_error()
                self._call, self._feed = call, feed
            # The broker answers with its headers once it has read `hello`
            # and registered the stream; a refusal ends the call instead.
            call.initial_metadata()
            if not call.done():
                with self._changed:
                    loop.opened()
                    self._changed.notify_all()
                was_open = True
            for command in call:
                self._handle(command, feed)
            code, details = call.code(), call.details()
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        finally:
            feed.stop()
            with self._changed:
                loop.connected = False
                self._call = self._feed = None
            channel.close()
        return was_open, loop.stream_ended(code, details)

    def _handle(self, command: lease_pb2.ResidencyCommand, feed: _ReportFeed) -> None:
        request = self._loop.unload_request(command)
        if request is None:
            return
        try:
            self._on_unload(request)
        except Exception:
            report_callback_error("on_unload")
            return
        feed.send(unloaded_report(request.gpu_index))
        with self._changed:
            self._loop.answered()


class _ReportFeed:
    """The request stream of one `Residency` call: `hello`, then each report
    as it is sent, until `stop()` half-closes it. gRPC reads it from its own
    sender thread."""

    def __init__(self, hello: lease_pb2.ResidencyReport) -> None:
        self._reports: queue.Queue[Optional[lease_pb2.ResidencyReport]] = queue.Queue()
        self._reports.put(hello)

    def __iter__(self) -> Iterator[lease_pb2.ResidencyReport]:
        while True:
            report = self._reports.get()
            if report is None:
                return
            yield report

    def send(self, report: lease_pb2.ResidencyReport) -> None:
        self._reports.put(report)

    def stop(self) -> None:
        self._reports.put(None)


def residency(
    consumer: str,
    on_unload: UnloadCallback,
    *,
    broker: Optional[str] = None,
    token: Optional[str] = None,
    token_file: Optional[PathArg] = None,
    ca: Optional[PathArg] = None,
    cert: Optional[PathArg] = None,
    key: Optional[PathArg] = None,
) -> Residency:
    """Starts listening for the broker's unload requests for `consumer`, on
    a daemon thread; returns the `Residency` handle, which `close()` (or
    leaving its `with` block) stops.

    `on_unload(request)` is called, on that thread, with each
    `UnloadRequested`; it frees the consumer's GPU memory on
    `request.gpu_index` and returns, and the broker is told ``unloaded``. It
    may take up to `request.deadline_ms`; if it raises, nothing is told.

    The broker must know the consumer with ``unload = "stream"``. `broker`,
    `token`, `token_file`, `ca`, `cert` and `key` are as for
    `gpulease.Client`; with tokens on, the consumer's own token (or the
    admin's) is needed.
    """
    connection = Connection.resolve(
        broker, token=token, token_file=token_file, ca=ca, cert=cert, key=key
    )
    return Residency(consumer, on_unload, connection)
