"""The asyncio client, on `grpc.aio`: ``async with gpulease.aio.lease(...)``,
`gpulease.aio.Client` and ``async with gpulease.aio.residency(...)``.

It behaves as the blocking client does (see `gpulease.lease`) and shares its
options, protocol rules and error mapping; only the waiting differs. The
callbacks run in the event loop; one that returns an awaitable is awaited.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, AsyncGenerator, Callable, Optional, Tuple, TypeVar, Union, cast

import grpc
import grpc.aio

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
    ResidencyLoop,
    UnloadCallback,
    call_error,
    report_callback_error,
    revoke_request,
    unloaded_report,
)
from ._residency import CLOSE_TIMEOUT_S
from .errors import LeaseError, LeaseLost
from .v1 import lease_pb2
from .v1.lease_pb2_grpc import LeaseBrokerStub

__all__ = ["Client", "Lease", "Residency", "lease", "residency"]

F = TypeVar("F", bound=Callable[..., Any])


class Lease(GrantView):
    """One lease of the GPU on asyncio: waited for by ``async with``, released
    when the block ends, raises or is cancelled.

    `lost` is an `asyncio.Event` set when the lease ends on its own while the
    body runs (`on_lost` is called then too); leaving the block then raises
    that `LeaseLost` unless the body raised something else. Cancelling the
    task while it waits gives up its place in the queue.

    `preempt_requested` is an `asyncio.Event` set when the broker asks this
    preemptible lease to make way (`on_preempt` is called then too, with the
    notice that `preempt_notice` keeps); the lease is still held, and is
    revoked unless the block ends within the notice's `grace_ms`.
    """

    def __init__(
        self,
        options: LeaseOptions,
        connection: Connection,
        client: Optional[Client] = None,
    ) -> None:
        self._options = options
        self._connection = connection
        self._target = connection.target
        self._client = client
        self._conversation: Optional[Conversation] = None
        # Made on entry, in the running loop (Python 3.9 binds an Event to
        # a loop when it is made).
        self._lost: Optional[asyncio.Event] = None
        self._preempt_requested: Optional[asyncio.Event] = None
        self._owned_channel: Optional[grpc.aio.Channel] = None
        self._call: Optional[Any] = None
        self._watcher: Optional[asyncio.Task[None]] = None

    @property
    def lost(self) -> asyncio.Event:
        """Set when the held lease ends on its own while the body still runs."""
        if self._lost is None:
            raise RuntimeError("the lease has not been entered yet")
        return self._lost

    @property
    def preempt_requested(self) -> asyncio.Event:
        """Set when the broker asks this (preemptible) lease to make way."""
        if self._preempt_requested is None:
            raise RuntimeError("the lease has not been entered yet")
        return self._preempt_requested

    def __repr__(self) -> str:
        conversation = self._conversation
        state = "new"
        if conversation is not None and conversation.granted is not None:
            state = f"lease_id={conversation.granted.lease_id!r}"
            state += " lost" if conversation.lost is not None else ""
            state += " preempt-requested" if conversation.preempt_notice is not None else ""
        return f"<gpulease.aio.Lease {self._options.consumer!r} at {self._target} {state}>"

    async def __aenter__(self) -> Lease:
        if self._conversation is not None:
            raise RuntimeError("a Lease is entered only once: call gpulease.aio.lease() again")
        conversation = Conversation(self._options, self._target)
        self._conversation = conversation
        self._lost = asyncio.Event()
        self._preempt_requested = asyncio.Event()
        if self._client is not None:
            channel = self._client._channel_in_loop()
        else:
            channel = self._owned_channel = self._connection.open_channel(grpc.aio)
        try:
            # No timeout: a deadline would also end the granted lease.
            self._call = LeaseBrokerStub(channel).AcquireLease(metadata=self._connection.metadata)
            await self._wait(self._call, conversation)
        except BaseException:
            await self._abandon()
            raise
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conversation, call, watcher = self._conversation, self._call, self._watcher
        assert conversation is not None and call is not None and watcher is not None
        lost = conversation.lost
        send_release = conversation.begin_release()
        try:
            if not watcher.done():
                if send_release:
                    try:
                        await call.write(RELEASE_REQUEST)
                        await call.done_writing()
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        pass  # The stream has just ended; the watcher says how.
                # The broker ends the stream once it has released the lease.
                await asyncio.wait_for(asyncio.shield(watcher), RELEASE_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        finally:
            if not watcher.done():
                await self._abandon()
            else:
                await self._close_channel()
        if lost is not None and exc_type is None:
            raise lost

    def __call__(self, func: F) -> F:
        """Holds a fresh lease like this one around every call of the
        coroutine function `func`."""
        if not inspect.iscoroutinefunction(func):
            raise TypeError("gpulease.aio.lease decorates coroutine functions; use gpulease.lease")

        @functools.wraps(func)
        async def leased(*args: Any, **kwargs: Any) -> Any:
            async with Lease(self._options, self._connection, self._client):
                return await func(*args, **kwargs)

        return cast(F, leased)

    async def _wait(self, call: Any, conversation: Conversation) -> None:
        """Reads events until the grant; raises the mapped error otherwise."""
        on_queued = self._options.on_queued
        try:
            await call.write(conversation.first_request())
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    break
                queued = conversation.on_wait_event(event)
                if conversation.granted is not None:
                    return
                if queued is not None and on_queued is not None:
                    result = on_queued(queued)
                    if inspect.isawaitable(result):
                        await result
        except grpc.aio.AioRpcError as error:
            raise conversation.wait_failed(error.code(), error.details()) from None
        except asyncio.InvalidStateError:
            pass  # Written to a call that had ended; its status says why.
        raise conversation.wait_failed(await call.code(), await call.details())

    async def _watch(self) -> None:
        """The watcher task: reads the held lease's stream to its end."""
        call, conversation = self._call, self._conversation
        assert call is not None and conversation is not None
        code: Optional[grpc.StatusCode] = None
        details: Optional[str] = None
        try:
            while True:
                event = await call.read()
                if event is grpc.aio.EOF:
                    break
                signal = conversation.on_hold_event(event)
                if isinstance(signal, LeaseLost):
                    await self._signal_lost(signal)
                elif signal is not None:
                    await self._signal_preempt(signal)
            code, details = await call.code(), await call.details()
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details()
        lost = conversation.on_hold_end(code, details)
        if lost is not None:
            await self._signal_lost(lost)

    async def _signal_lost(self, error: LeaseLost) -> None:
        self.lost.set()
        on_lost = self._options.on_lost
        if on_lost is not None:
            try:
                result = on_lost(error)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                report_callback_error("on_lost")

    async def _signal_preempt(self, notice: lease_pb2.PreemptRequested) -> None:
        self.preempt_requested.set()
        on_preempt = self._options.on_preempt
        if on_preempt is not None:
            try:
                result = on_preempt(notice)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                report_callback_error("on_preempt")

    async def _abandon(self) -> None:
        """Ends the call at once; the broker ends the lease or the wait."""
        if self._call is not None:
            self._call.cancel()
        await self._close_channel()

    async def _close_channel(self) -> None:
        channel, self._owned_channel = self._owned_channel, None
        if channel is not None:
            await channel.close()


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
    """A lease of the GPU for `consumer`, to use with ``async with`` or to
    decorate a coroutine function. The arguments are those of
    `gpulease.lease()`; the options are `LeaseKwargs`."""
    lease_options = LeaseOptions.build(consumer, **options)
    connection = Connection.resolve(
        broker, token=token, token_file=token_file, ca=ca, cert=cert, key=key
    )
    return Lease(lease_options, connection)


class Client:
    """A connection to the broker on asyncio, for Status, WatchStatus,
    RevokeLease and leases. The arguments are those of `gpulease.Client`. The
    channel opens on first use, in the running event loop."""

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
        self._channel: Optional[grpc.aio.Channel] = None

    def __repr__(self) -> str:
        return f"<gpulease.aio.Client {self.target}>"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; leases held through it end."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def _channel_in_loop(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._connection.open_channel(grpc.aio)
        return self._channel

    def _stub(self) -> LeaseBrokerStub:
        return LeaseBrokerStub(self._channel_in_loop())

    async def status(self, *, timeout: Optional[float] = 10.0) -> lease_pb2.StatusResponse:
        """One snapshot of the broker; see `gpulease.Client.status`."""
        try:
            response = await self._stub().Status(
                lease_pb2.StatusRequest(), timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise call_error(
                error.code(), error.details(), doing=f"Status at {self.target}"
            ) from None
        return cast(lease_pb2.StatusResponse, response)

    async def watch(
        self, *, timeout: Optional[float] = None
    ) -> AsyncGenerator[lease_pb2.StatusResponse, None]:
        """Snapshots as they change; see `gpulease.Client.watch`."""
        call = self._stub().WatchStatus(
            lease_pb2.StatusRequest(), timeout=timeout, metadata=self._metadata
        )
        try:
            while True:
                snapshot = await call.read()
                if snapshot is grpc.aio.EOF:
                    return
                yield snapshot
        except grpc.aio.AioRpcError as error:
            if timeout is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise call_error(
                error.code(), error.details(), doing=f"WatchStatus at {self.target}"
            ) from None
        finally:
            call.cancel()

    async def revoke(
        self,
        lease: Union[str, int],
        message: str = "",
        *,
        timeout: Optional[float] = 10.0,
    ) -> lease_pb2.RevokeLeaseResponse:
        """Ends a held lease on an operator's behalf; see
        `gpulease.Client.revoke`."""
        request = revoke_request(lease, message)
        try:
            response = await self._stub().RevokeLease(
                request, timeout=timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            raise call_error(
                error.code(), error.details(), doing=f"RevokeLease at {self.target}"
            ) from None
        return cast(lease_pb2.RevokeLeaseResponse, response)

    def lease(self, consumer: str, **options: Unpack[LeaseKwargs]) -> Lease:
        """Like `gpulease.aio.lease()`, over this client's connection; the
        options are `LeaseKwargs`."""
        return Lease(LeaseOptions.build(consumer, **options), self._connection, self)


class Residency:
    """Listens for the broker's unload requests for one consumer, in a task
    of the running event loop, until `close()` or the end of its
    ``async with`` block; see `gpulease.Residency`.

    `on_unload` runs in the event loop: a coroutine function (or one that
    returns an awaitable) is awaited. Blocking work in a plain function
    blocks the loop; wrap it with `asyncio.to_thread`.
    """

    def __init__(self, consumer: str, on_unload: UnloadCallback, connection: Connection) -> None:
        if not isinstance(consumer, str):
            raise TypeError(f"consumer must be a str, not {type(consumer).__name__}")
        if not callable(on_unload):
            raise TypeError("on_unload must be callable")
        running = asyncio.get_running_loop()  # RuntimeError outside of one
        self.consumer = consumer
        self.target = connection.target
        self._connection = connection
        self._on_unload = on_unload
        self._loop = ResidencyLoop(consumer, connection.target)
        # Made here, in the running loop (Python 3.9 binds them to it).
        self._changed = asyncio.Condition()
        self._closed = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._in_callback = False
        self._call: Optional[Any] = None
        self._task = running.create_task(self._run())

    def __repr__(self) -> str:
        return f"<gpulease.aio.Residency {self.consumer!r} at {self.target} {self._loop.state()}>"

    async def __aenter__(self) -> Residency:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether the stream is open now."""
        return self._loop.connected

    @property
    def unloads(self) -> int:
        """How many unload requests were answered ``unloaded``."""
        return self._loop.unloads

    @property
    def error(self) -> Optional[LeaseError]:
        """Why the last stream failed or ended; ``None`` while one is open."""
        return self._loop.error

    async def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Waits until the stream is open; returns whether it is. Raises the
        `LeaseRejected` error if the broker refused the stream."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(self._loop.settled), timeout)
        except asyncio.TimeoutError:
            pass
        return self._loop.connected_or_raise()

    async def report_unloaded(self, gpu_index: Optional[int] = None) -> bool:
        """Sends an `unloaded` report, believed only as the answer to an
        unload request; see `gpulease.Residency.report_unloaded`."""
        call = self._call if self._loop.connected else None
        if call is None:
            return False
        try:
            async with self._write_lock:
                await call.write(unloaded_report(gpu_index))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return False
        return True

    async def close(self, timeout: Optional[float] = CLOSE_TIMEOUT_S) -> None:
        """Ends the stream and the task; waits up to `timeout` seconds for an
        unload callback that is running. Idempotent."""
        self._loop.closing = True
        self._closed.set()
        await self._notify()
        task = self._task
        if task.done() or task is asyncio.current_task():
            return
        if self._in_callback:
            # The task stops by itself once the callback has returned.
            await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        """The task: one stream after another until `close()`."""
        loop = self._loop
        while True:
            was_open, error = await self._attempt()
            stop = loop.attempt_ended(error)
            await self._notify()
            if stop:
                return
            delay = loop.retry_delay(was_open, error)
            try:
                await asyncio.wait_for(self._closed.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass

    async def _attempt(self) -> Tuple[bool, LeaseError]:
        """One stream, from `hello` to its end; returns whether it was open,
        and why it ended."""
        loop = self._loop
        channel = self._connection.open_channel(grpc.aio)
        was_open = False
        call = LeaseBrokerStub(channel).Residency(metadata=self._connection.metadata)
        self._call = call
        code: Optional[grpc.StatusCode] = None
        details: Optional[str] = None
        try:
            try:
                await call.write(loop.hello())
                # The broker answers with its headers once it has registered
                # the stream; a refusal ends the call instead.
                await call.initial_metadata()
                if not call.done():
                    loop.opened()
                    was_open = True
                    await self._notify()
                while not loop.closing:
                    command = await call.read()
                    if command is grpc.aio.EOF:
                        break
                    await self._handle(command, call)
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details()
            except asyncio.InvalidStateError:
                pass  # Written to a call that had ended; its status says why.
            if loop.closing:
                return was_open, loop.closed_error()
            if code is None:
                code, details = await call.code(), await call.details()
        finally:
            loop.connected = False
            self._call = None
            call.cancel()
            await channel.close()
        return was_open, loop.stream_ended(code, details)

    async def _handle(self, command: lease_pb2.ResidencyCommand, call: Any) -> None:
        request = self._loop.unload_request(command)
        if request is None:
            return
        self._in_callback = True
        try:
            result = self._on_unload(request)
            if inspect.isawaitable(result):
                await result
        except Exception:
            report_callback_error("on_unload")
            return
        finally:
            self._in_callback = False
        async with self._write_lock:
            await call.write(unloaded_report(request.gpu_index))
        self._loop.answered()


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
    """Starts listening for the broker's unload requests for `consumer` in a
    task of the running event loop; see `gpulease.residency`. Call it in a
    coroutine: ``async with gpulease.aio.residency(...)``."""
    connection = Connection.resolve(
        broker, token=token, token_file=token_file, ca=ca, cert=cert, key=key
    )
    return Residency(consumer, on_unload, connection)
