"""The asyncio client, on `grpc.aio`: ``async with gpulease.aio.lease(...)``
and `gpulease.aio.Client`.

It behaves as the blocking client does (see `gpulease.lease`) and shares its
options, protocol rules and error mapping; only the waiting differs. The
callbacks run in the event loop; one that returns an awaitable is awaited.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, AsyncIterator, Callable, Mapping, Optional, TypeVar, cast

import grpc
import grpc.aio

from ._protocol import (
    RELEASE_REQUEST,
    RELEASE_TIMEOUT_S,
    Conversation,
    GrantView,
    LeaseOptions,
    LostCallback,
    MaxWait,
    QueuedCallback,
    call_error,
    channel_options,
    report_callback_error,
    resolve_target,
)
from .errors import LeaseLost
from .v1 import lease_pb2
from .v1.lease_pb2_grpc import LeaseBrokerStub

__all__ = ["Client", "Lease", "lease"]

F = TypeVar("F", bound=Callable[..., Any])


class Lease(GrantView):
    """One lease of the GPU on asyncio: waited for by ``async with``, released
    when the block ends, raises or is cancelled.

    `lost` is an `asyncio.Event` set when the lease ends on its own while the
    body runs (`on_lost` is called then too); leaving the block then raises
    that `LeaseLost` unless the body raised something else. Cancelling the
    task while it waits gives up its place in the queue.
    """

    def __init__(
        self,
        options: LeaseOptions,
        target: str,
        client: Optional[Client] = None,
    ) -> None:
        self._options = options
        self._target = target
        self._client = client
        self._conversation: Optional[Conversation] = None
        # Made on entry, in the running loop (Python 3.9 binds an Event to
        # a loop when it is made).
        self._lost: Optional[asyncio.Event] = None
        self._owned_channel: Optional[grpc.aio.Channel] = None
        self._call: Optional[Any] = None
        self._watcher: Optional[asyncio.Task[None]] = None

    @property
    def lost(self) -> asyncio.Event:
        """Set when the held lease ends on its own while the body still runs."""
        if self._lost is None:
            raise RuntimeError("the lease has not been entered yet")
        return self._lost

    def __repr__(self) -> str:
        conversation = self._conversation
        state = "new"
        if conversation is not None and conversation.granted is not None:
            state = f"lease_id={conversation.granted.lease_id!r}"
            state += " lost" if conversation.lost is not None else ""
        return f"<gpulease.aio.Lease {self._options.consumer!r} at {self._target} {state}>"

    async def __aenter__(self) -> Lease:
        if self._conversation is not None:
            raise RuntimeError("a Lease is entered only once: call gpulease.aio.lease() again")
        conversation = Conversation(self._options, self._target)
        self._conversation = conversation
        self._lost = asyncio.Event()
        if self._client is not None:
            channel = self._client._channel_in_loop()
        else:
            channel = self._owned_channel = grpc.aio.insecure_channel(
                self._target, options=channel_options(self._target)
            )
        try:
            # No timeout: a deadline would also end the granted lease.
            self._call = LeaseBrokerStub(channel).AcquireLease()
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
        conversation.releasing = True
        try:
            if not watcher.done():
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
            async with Lease(self._options, self._target, self._client):
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
                lost = conversation.on_hold_event(event)
                if lost is not None:
                    await self._signal_lost(lost)
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
    vram_mib: int = 0,
    max_wait: MaxWait = None,
    broker: Optional[str] = None,
    labels: Optional[Mapping[str, str]] = None,
    on_queued: Optional[QueuedCallback] = None,
    on_lost: Optional[LostCallback] = None,
) -> Lease:
    """A lease of the GPU for `consumer`, to use with ``async with`` or to
    decorate a coroutine function. The arguments are those of
    `gpulease.lease()`."""
    options = LeaseOptions.build(
        consumer,
        vram_mib=vram_mib,
        max_wait=max_wait,
        labels=labels,
        on_queued=on_queued,
        on_lost=on_lost,
    )
    return Lease(options, resolve_target(broker))


class Client:
    """A connection to the broker on asyncio, for Status, WatchStatus and
    leases. The channel opens on first use, in the running event loop."""

    def __init__(self, broker: Optional[str] = None) -> None:
        self.target = resolve_target(broker)
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
            self._channel = grpc.aio.insecure_channel(
                self.target, options=channel_options(self.target)
            )
        return self._channel

    def _stub(self) -> LeaseBrokerStub:
        return LeaseBrokerStub(self._channel_in_loop())

    async def status(self, *, timeout: Optional[float] = 10.0) -> lease_pb2.StatusResponse:
        """One snapshot of the broker; see `gpulease.Client.status`."""
        try:
            response = await self._stub().Status(lease_pb2.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise call_error(
                error.code(), error.details(), doing=f"Status at {self.target}"
            ) from None
        return cast(lease_pb2.StatusResponse, response)

    async def watch(
        self, *, timeout: Optional[float] = None
    ) -> AsyncIterator[lease_pb2.StatusResponse]:
        """Snapshots as they change; see `gpulease.Client.watch`."""
        call = self._stub().WatchStatus(lease_pb2.StatusRequest(), timeout=timeout)
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

    def lease(
        self,
        consumer: str,
        *,
        vram_mib: int = 0,
        max_wait: MaxWait = None,
        labels: Optional[Mapping[str, str]] = None,
        on_queued: Optional[QueuedCallback] = None,
        on_lost: Optional[LostCallback] = None,
    ) -> Lease:
        """Like `gpulease.aio.lease()`, over this client's connection."""
        options = LeaseOptions.build(
            consumer,
            vram_mib=vram_mib,
            max_wait=max_wait,
            labels=labels,
            on_queued=on_queued,
            on_lost=on_lost,
        )
        return Lease(options, self.target, self)
