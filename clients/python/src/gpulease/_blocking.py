"""The blocking client: `lease()` as a context manager and a decorator, and
`Client` for Status, WatchStatus and RevokeLease. `gpulease.aio` is the same
on asyncio; both drive the shared `Conversation`.

A held lease is one open `AcquireLease` stream. It never carries a gRPC
deadline, since a deadline would also end the lease once granted; waiting is
bounded by `max_wait`, which the broker enforces.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any, Callable, Generator, Iterator, Optional, TypeVar, Union, cast

import grpc

from ._compat import Unpack
from ._protocol import (
    RELEASE_REQUEST,
    RELEASE_TIMEOUT_S,
    Connection,
    Conversation,
    GrantView,
    LeaseKwargs,
    LeaseOptions,
    PathArg,
    call_error,
    report_callback_error,
    revoke_request,
)
from .errors import LeaseLost
from .v1 import lease_pb2
from .v1.lease_pb2_grpc import LeaseBrokerStub

__all__ = ["Client", "Lease", "lease"]

F = TypeVar("F", bound=Callable[..., Any])


class Lease(GrantView):
    """One lease of the GPU: waited for on entry, released on exit.

    Make one with `gpulease.lease()` or `Client.lease()`. Entering blocks
    until the broker grants the lease and raises `LeaseTimeout`,
    `LeaseRejected` or `BrokerUnavailable` when it does not. Leaving releases
    the lease, whether the body returned or raised (KeyboardInterrupt
    included). If the process dies instead, the broker notices the broken
    connection and ends the lease itself.

    While the body runs, `lost` is set (and `on_lost` called, from a
    background thread) as soon as the lease ends without the body asking:
    the broker revoked it or the connection broke. Leaving the `with` block
    then raises that `LeaseLost`, unless the body raised something else.

    A preemptible lease may be asked to make way for a waiter of higher
    priority: `preempt_requested` is set (and `on_preempt` called, from the
    same background thread) with the notice in `preempt_notice`. The lease is
    still held; leave the block within the notice's `grace_ms`, or the broker
    revokes it (`lost`, reason ``REVOKE_REASON_PREEMPTED``).

    A `Lease` is entered once; used as a decorator, it makes a fresh one for
    every call.
    """

    def __init__(
        self,
        options: LeaseOptions,
        connection: Connection,
        channel: Optional[grpc.Channel] = None,
    ) -> None:
        self._options = options
        self._connection = connection
        self._target = connection.target
        self._shared_channel = channel
        self._conversation: Optional[Conversation] = None
        #: Set when the held lease ends on its own while the body still runs.
        self.lost = threading.Event()
        #: Set when the broker asks this (preemptible) lease to make way.
        self.preempt_requested = threading.Event()
        # Guards the conversation between the caller and the watcher thread.
        self._lock = threading.Lock()
        self._owned_channel: Optional[grpc.Channel] = None
        self._call: Optional[Any] = None
        self._feed: Optional[_RequestFeed] = None
        self._watcher: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        conversation = self._conversation
        state = "new"
        if conversation is not None and conversation.granted is not None:
            state = f"lease_id={conversation.granted.lease_id!r}"
            state += " lost" if self.lost.is_set() else ""
            state += " preempt-requested" if self.preempt_requested.is_set() else ""
        return f"<gpulease.Lease {self._options.consumer!r} at {self._target} {state}>"

    def __enter__(self) -> Lease:
        if self._conversation is not None:
            raise RuntimeError("a Lease is entered only once: call gpulease.lease() again")
        conversation = Conversation(self._options, self._target)
        self._conversation = conversation
        channel = self._shared_channel
        if channel is None:
            channel = self._owned_channel = self._connection.open_channel(grpc)
        self._feed = _RequestFeed(conversation.first_request())
        try:
            # No timeout: see the module's docs.
            self._call = LeaseBrokerStub(channel).AcquireLease(
                iter(self._feed), metadata=self._connection.metadata
            )
            self._wait(self._call, conversation)
        except BaseException:
            # Rejected, timed out, interrupted, or a callback raised: cancel
            # the call, which also withdraws the request from the queue.
            self._abandon()
            raise
        self._watcher = threading.Thread(
            target=self._watch,
            name=f"gpulease-lease-{self.lease_id}",
            daemon=True,
        )
        self._watcher.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conversation = self._conversation
        watcher = self._watcher
        assert conversation is not None and watcher is not None and self._feed is not None
        with self._lock:
            lost = conversation.lost
            send_release = conversation.begin_release()
        try:
            if send_release:
                self._feed.release()
            # The broker ends the stream once it has released the lease, so
            # the next holder is already on its way when this returns.
            watcher.join(RELEASE_TIMEOUT_S)
        finally:
            if watcher.is_alive():
                self._abandon()
            else:
                self._close_channel()
        if lost is not None and exc_type is None:
            raise lost

    def __call__(self, func: F) -> F:
        """Holds a fresh lease like this one around every call of `func`."""
        if inspect.iscoroutinefunction(func):
            raise TypeError("use gpulease.aio.lease to decorate a coroutine function")

        @functools.wraps(func)
        def leased(*args: Any, **kwargs: Any) -> Any:
            with Lease(self._options, self._connection, self._shared_channel):
                return func(*args, **kwargs)

        return cast(F, leased)

    def _wait(self, call: Any, conversation: Conversation) -> None:
        """Reads events until the grant; raises the mapped error otherwise."""
        on_queued = self._options.on_queued
        try:
            for event in call:
                queued = conversation.on_wait_event(event)
                if conversation.granted is not None:
                    return
                if queued is not None and on_queued is not None:
                    on_queued(queued)
        except grpc.RpcError as error:
            raise conversation.wait_failed(error.code(), error.details()) from None
        raise conversation.wait_failed(call.code(), call.details())

    def _watch(self) -> None:
        """The watcher thread: reads the held lease's stream to its end."""
        call, conversation, feed = self._call, self._conversation, self._feed
        assert call is not None and conversation is not None and feed is not None
        code: Optional[grpc.StatusCode] = None
        details: Optional[str] = None
        try:
            for event in call:
                with self._lock:
                    signal = conversation.on_hold_event(event)
                if isinstance(signal, LeaseLost):
                    self._signal_lost(signal)
                elif signal is not None:
                    self._signal_preempt(signal)
            code, details = call.code(), call.details()
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
        finally:
            # Unblocks gRPC's sender thread, which waits in the feed.
            feed.stop()
        with self._lock:
            lost = conversation.on_hold_end(code, details)
        if lost is not None:
            self._signal_lost(lost)

    def _signal_lost(self, error: LeaseLost) -> None:
        self.lost.set()
        on_lost = self._options.on_lost
        if on_lost is not None:
            try:
                on_lost(error)
            except Exception:
                report_callback_error("on_lost")

    def _signal_preempt(self, notice: lease_pb2.PreemptRequested) -> None:
        self.preempt_requested.set()
        on_preempt = self._options.on_preempt
        if on_preempt is not None:
            try:
                on_preempt(notice)
            except Exception:
                report_callback_error("on_preempt")

    def _abandon(self) -> None:
        """Ends the call at once; the broker ends the lease or the wait."""
        if self._feed is not None:
            self._feed.stop()
        if self._call is not None:
            self._call.cancel()
        self._close_channel()

    def _close_channel(self) -> None:
        if self._owned_channel is not None:
            self._owned_channel.close()
            self._owned_channel = None


class _RequestFeed:
    """The request stream of one lease: `acquire`, then nothing until the lease
    is to end, then `release` and a half-close.

    gRPC reads it from its own sender thread, which blocks here while the
    lease is held.
    """

    def __init__(self, first: lease_pb2.LeaseRequest) -> None:
        self._first = first
        self._state: Optional[str] = None
        self._changed = threading.Condition()

    def __iter__(self) -> Iterator[lease_pb2.LeaseRequest]:
        yield self._first
        with self._changed:
            self._changed.wait_for(lambda: self._state is not None)
            state = self._state
        if state == "release":
            yield RELEASE_REQUEST

    def release(self) -> None:
        """Sends `release`, then half-closes."""
        self._set("release")

    def stop(self) -> None:
        """Half-closes without sending anything more."""
        self._set("stop")

    def _set(self, state: str) -> None:
        with self._changed:
            if self._state is None:
                self._state = state
                self._changed.notify_all()


def lease(
    consumer: str,
    *,
    broker: Optional[str] = None,
    token: Optional[str] = None,
    token_file: Optional[PathArg] = None,
    ca: Optional[PathArg] = None,
    cert: Optional[PathArg] = None,
    key: Optional[PathArg] = None,
    **options: Unpack[LeaseKwargs],
) -> Lease:
    """A lease of the GPU for `consumer`, to use with `with` or as a decorator.

    - `options`: what the lease asks for: `vram_mib`, `max_wait`, `gpu`,
      `labels`, `priority`, `on_queued`, `on_lost` and `on_preempt`; see
      `LeaseKwargs`, where each is described.
    - `broker`: ``HOST:PORT``, ``http://HOST:PORT``, ``https://HOST:PORT``
      (TLS) or ``unix:/PATH``; default `$GPULEASE_BROKER`, else
      ``127.0.0.1:50051``.
    - `token` or `token_file`: the bearer token (default `$GPULEASE_TOKEN`,
      else the file `$GPULEASE_TOKEN_FILE`); `ca`: the CA bundle that signed
      the broker's certificate (default `$GPULEASE_CA`; implies TLS); `cert`
      and `key`: a client certificate for mutual TLS (default
      `$GPULEASE_CERT`, `$GPULEASE_KEY`). See `Client`.

    Each lease opens its own connection; `Client.lease()` shares the client's.
    """
    lease_options = LeaseOptions.build(consumer, **options)
    connection = Connection.resolve(
        broker, token=token, token_file=token_file, ca=ca, cert=cert, key=key
    )
    return Lease(lease_options, connection)


class Client:
    """A connection to the broker, for Status, WatchStatus, RevokeLease and
    leases. Close it with `close()` or use it as a context manager.

    - `broker`: ``HOST:PORT``, ``http://HOST:PORT``, ``https://HOST:PORT``
      (TLS) or ``unix:/PATH``; default `$GPULEASE_BROKER`, else
      ``127.0.0.1:50051``.
    - `token`: the bearer token, sent with every call as ``authorization:
      Bearer TOKEN``; or `token_file`, a file holding it. When neither is
      given: `$GPULEASE_TOKEN`, else the file `$GPULEASE_TOKEN_FILE`.
    - `ca`: the CA bundle (PEM) that signed the broker's certificate; it
      implies TLS. Default `$GPULEASE_CA`; an ``https://`` broker without one
      is checked against gRPC's default roots (its bundled Mozilla CAs, or
      the file `$GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`).
    - `cert` and `key`: a client certificate and its key (PEM) for mutual
      TLS. Default `$GPULEASE_CERT` and `$GPULEASE_KEY`.

    The files are read here; one that cannot be read is a `ValueError`.
    """

    def __init__(
        self,
        broker: Optional[str] = None,
        *,
        token: Optional[str] = None,
        token_file: Optional[PathArg] = None,
        ca: Optional[PathArg] = None,
        cert: Optional[PathArg] = None,
        key: Optional[PathArg] = None,
    ) -> None:
        self._connection = Connection.resolve(
            broker, token=token, token_file=token_file, ca=ca, cert=cert, key=key
        )
        self.target = self._connection.target
        self._metadata = self._connection.metadata
        self._channel = self._connection.open_channel(grpc)
        self._stub = LeaseBrokerStub(self._channel)

    def __repr__(self) -> str:
        return f"<gpulease.Client {self.target}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection; leases held through it end."""
        self._channel.close()

    def status(self, *, timeout: Optional[float] = 10.0) -> lease_pb2.StatusResponse:
        """One snapshot of the broker. Raises `BrokerUnavailable` when the
        broker cannot be reached or does not answer within `timeout` seconds."""
        try:
            return cast(
                lease_pb2.StatusResponse,
                self._stub.Status(
                    lease_pb2.StatusRequest(), timeout=timeout, metadata=self._metadata
                ),
            )
        except grpc.RpcError as error:
            raise call_error(
                error.code(), error.details(), doing=f"Status at {self.target}"
            ) from None

    def watch(
        self, *, timeout: Optional[float] = None
    ) -> Generator[lease_pb2.StatusResponse, None, None]:
        """A snapshot at once, then a new one after every change (bursts are
        coalesced), until the broker stops or, with `timeout`, that many
        seconds have passed. Leaving the loop early ends the call."""
        call = self._stub.WatchStatus(
            lease_pb2.StatusRequest(), timeout=timeout, metadata=self._metadata
        )
        try:
            for snapshot in call:
                yield snapshot
        except grpc.RpcError as error:
            if timeout is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise call_error(
                error.code(), error.details(), doing=f"WatchStatus at {self.target}"
            ) from None
        finally:
            call.cancel()

    def revoke(
        self,
        lease: Union[str, int],
        message: str = "",
        *,
        timeout: Optional[float] = 10.0,
    ) -> lease_pb2.RevokeLeaseResponse:
        """Ends a held lease on an operator's behalf (RevokeLease): its holder
        gets `LeaseLost` with reason ``REVOKE_REASON_ADMIN``.

        `lease` is its id (``lease.lease_id``, as Status shows it) or its
        fencing token. `message` tells the holder why. The answer's `revoked`
        says whether a held lease ended; a lease that is no longer held is
        left alone, which is no error. Needs the admin token (or the Unix
        socket as the broker's user): `LeaseUnauthorized` otherwise.
        """
        request = revoke_request(lease, message)
        try:
            return cast(
                lease_pb2.RevokeLeaseResponse,
                self._stub.RevokeLease(request, timeout=timeout, metadata=self._metadata),
            )
        except grpc.RpcError as error:
            raise call_error(
                error.code(), error.details(), doing=f"RevokeLease at {self.target}"
            ) from None

    def lease(self, consumer: str, **options: Unpack[LeaseKwargs]) -> Lease:
        """Like `gpulease.lease()`, over this client's connection; the
        options are `LeaseKwargs`."""
        return Lease(LeaseOptions.build(consumer, **options), self._connection, self._channel)
