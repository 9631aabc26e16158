"""What the blocking and the asyncio clients share, so that they cannot drift
apart: the broker address and credentials (`Connection`), the channel
options, a lease's options (`LeaseKwargs`, checked by `LeaseOptions.build`),
the rules of the `AcquireLease` conversation (`Conversation`) and of the
`Residency` reconnect loop (`ResidencyLoop`), without any I/O, and the one
mapping from gRPC status codes to `LeaseError`s.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, List, Mapping, Optional, Tuple, Union

import grpc

from ._compat import TypedDict, Unpack
from .errors import (
    BrokerUnavailable,
    LeaseError,
    LeaseLost,
    LeaseRejected,
    LeaseTimeout,
    LeaseUnauthorized,
)
from .v1 import lease_pb2

logger = logging.getLogger("gpulease")

#: The broker address used when neither `broker=` nor `$GPULEASE_BROKER` is set.
DEFAULT_BROKER = "127.0.0.1:50051"

#: The environment variable naming the broker (as for the `gpulease` CLI).
BROKER_ENV = "GPULEASE_BROKER"

#: The environment variables of the credentials, as for the `gpulease` CLI:
#: the bearer token, or a file holding it; the CA bundle (PEM) that signed
#: the broker's certificate; a client certificate and its key, for mutual TLS.
TOKEN_ENV = "GPULEASE_TOKEN"
TOKEN_FILE_ENV = "GPULEASE_TOKEN_FILE"
CA_ENV = "GPULEASE_CA"
CERT_ENV = "GPULEASE_CERT"
KEY_ENV = "GPULEASE_KEY"

#: How long leaving a lease waits for the broker to confirm the release before
#: it cancels the call instead (which ends the lease too).
RELEASE_TIMEOUT_S = 5.0

#: The largest `max_wait_ms` the wire format carries (uint32).
_MAX_WAIT_MS_LIMIT = 2**32 - 1

#: The range of `Acquire.priority` on the wire (int32). The broker lowers a
#: value above the consumer's configured priority to it, and keeps every
#: priority within its own bounds.
_PRIORITY_RANGE = (-(2**31), 2**31 - 1)

#: Options for every channel to the broker.
#:
#: Keepalive pings let a client that holds a lease notice a broker that froze
#: or a network that silently dropped: the lease's `lost` signal fires within
#: about 15 s. `max_pings_without_data = 0` is needed because a held lease
#: sends no data for as long as it is held, and gRPC would otherwise stop
#: pinging after two pings; and gRPC waits for a ping's answer for
#: `ping_timeout_ms` (one minute by default), not for `keepalive_timeout_ms`
#: alone. The broker is local infrastructure, so an `http_proxy` in the
#: environment is never used for it.
CHANNEL_OPTIONS: List[Tuple[str, Union[int, str]]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_http_proxy", 0),
]


def channel_options(target: str) -> List[Tuple[str, Union[int, str]]]:
    """The options for a channel to `target`.

    Over a Unix socket, gRPC's default `:authority` is not one that the
    broker's HTTP/2 server accepts (it resets every stream with
    PROTOCOL_ERROR), so the authority is set to ``localhost`` there.
    """
    options = list(CHANNEL_OPTIONS)
    if target.startswith("unix:"):
        options.append(("grpc.default_authority", "localhost"))
    return options


QueuedCallback = Callable[[lease_pb2.Queued], object]
"""Called with each `Queued` event while a request waits."""

LostCallback = Callable[[LeaseLost], object]
"""Called once with the `LeaseLost` error when a held lease ends on its own."""

PreemptCallback = Callable[[lease_pb2.PreemptRequested], object]
"""Called once with the `PreemptRequested` notice when the broker asks a
preemptible holder to make way for a waiter of higher priority."""

MaxWait = Union[float, int, timedelta, None]


_ADDRESS_FORMS = "use HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:/PATH"


def parse_broker(broker: Optional[str]) -> Tuple[str, bool]:
    """The gRPC target for a broker address, and whether it asked for TLS.

    `broker` is ``HOST:PORT``, ``http://HOST:PORT``, ``https://HOST:PORT``
    (TLS) or ``unix:/PATH`` (as the `gpulease` CLI takes them); ``None`` or
    ``""`` means `$GPULEASE_BROKER`, else `DEFAULT_BROKER`.
    """
    address = (broker or os.environ.get(BROKER_ENV) or DEFAULT_BROKER).strip()
    if address.startswith("unix:"):
        # gRPC understands unix:/path, unix:///path and unix:relative itself.
        return address, False
    https = address.startswith("https://")
    if address.startswith(("http://", "https://")):
        address = address.split("://", 1)[1].rstrip("/")
    elif "://" in address:
        raise ValueError(f"{address!r} is not a broker address: {_ADDRESS_FORMS}")
    if not address or "/" in address:
        raise ValueError(f"{address!r} is not a broker address: {_ADDRESS_FORMS}")
    return address, https


def resolve_target(broker: Optional[str]) -> str:
    """The gRPC target for a broker address; see `parse_broker`."""
    return parse_broker(broker)[0]


PathArg = Union[str, os.PathLike[str]]
"""A file name, as a str or a `pathlib.Path`."""


def _read_file(path: PathArg, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ValueError(f"cannot read {what} {os.fspath(path)!r}: {error.strerror}") from error


def _checked_token(token: str, where: str) -> str:
    """The token without surrounding whitespace; refuses one that cannot be
    sent in a header. The message never shows the token itself."""
    if not isinstance(token, str):
        raise TypeError(f"the token must be a str, not {type(token).__name__}")
    token = token.strip()
    if not token:
        raise ValueError(f"the token ({where}) is empty")
    if not all(" " <= c <= "~" for c in token):
        raise ValueError(f"the token ({where}) is not printable ASCII")
    return token


def _from_env(value: Optional[PathArg], env: str) -> Optional[PathArg]:
    """`value`, else the environment variable `env` if it is set and not empty."""
    if value is not None:
        return value
    return os.environ.get(env) or None


@dataclass(frozen=True)
class Connection:
    """Where the broker is and how to prove who we are, resolved once from
    the arguments and the environment and shared by every client.

    The token goes with every call as ``authorization: Bearer TOKEN``. TLS is
    on for an ``https://`` address, a CA bundle or a client certificate; a
    Unix socket never uses it (the broker checks the caller's Unix
    credentials there instead).
    """

    target: str
    token: Optional[str] = field(default=None, repr=False)
    tls: bool = False
    root_certificates: Optional[bytes] = field(default=None, repr=False)
    certificate_chain: Optional[bytes] = field(default=None, repr=False)
    private_key: Optional[bytes] = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls,
        broker: Optional[str] = None,
        *,
        token: Optional[str] = None,
        token_file: Optional[PathArg] = None,
        ca: Optional[PathArg] = None,
        cert: Optional[PathArg] = None,
        key: Optional[PathArg] = None,
    ) -> Connection:
        """Checks the connection arguments that every client takes.

        - `broker`: see `parse_broker`.
        - `token`, or `token_file` (a file holding it; surrounding whitespace
          is ignored): the bearer token. When both are ``None``:
          `$GPULEASE_TOKEN`, else the file `$GPULEASE_TOKEN_FILE`, else none.
        - `ca`: the CA bundle (PEM) that signed the broker's certificate;
          implies TLS. Default `$GPULEASE_CA`; without one, an ``https://``
          broker is checked against gRPC's default roots.
        - `cert` and `key`: a client certificate and its key (PEM), for
          mutual TLS; they imply TLS. Default `$GPULEASE_CERT` and
          `$GPULEASE_KEY`.

        The files are read now: a missing one is a `ValueError` here, not a
        failed call later.
        """
        target, https = parse_broker(broker)
        if token is not None and token_file is not None:
            raise ValueError("give either token or token_file, not both")
        if token is not None:
            token = _checked_token(token, "token=")
        elif token_file is not None:
            token = _checked_token(
                _read_file(token_file, "the token file").decode("utf-8", "replace"),
                f"in {os.fspath(token_file)!r}",
            )
        elif os.environ.get(TOKEN_ENV):
            token = _checked_token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
        elif os.environ.get(TOKEN_FILE_ENV):
            path = os.environ[TOKEN_FILE_ENV]
            token = _checked_token(
                _read_file(path, f"the token file (${TOKEN_FILE_ENV})").decode("utf-8", "replace"),
                f"in {path!r}",
            )

        if target.startswith("unix:"):
            # TLS settings from the environment are meant for TCP brokers.
            if ca is not None or cert is not None or key is not None:
                raise ValueError("TLS (ca, cert, key) is for TCP brokers, not a Unix socket")
            return cls(target=target, token=token)
        ca = _from_env(ca, CA_ENV)
        cert = _from_env(cert, CERT_ENV)
        key = _from_env(key, KEY_ENV)
        if (cert is None) != (key is None):
            raise ValueError(
                f"mutual TLS needs both a client certificate and its key (cert/${CERT_ENV}"
                f" and key/${KEY_ENV})"
            )
        if not (https or ca is not None or cert is not None):
            return cls(target=target, token=token)
        return cls(
            target=target,
            token=token,
            tls=True,
            root_certificates=_read_file(ca, "the CA bundle") if ca is not None else None,
            certificate_chain=(
                _read_file(cert, "the client certificate") if cert is not None else None
            ),
            private_key=_read_file(key, "the client key") if key is not None else None,
        )

    @property
    def metadata(self) -> Optional[Tuple[Tuple[str, str], ...]]:
        """The metadata of every call: the bearer token, if there is one."""
        if self.token is None:
            return None
        return (("authorization", f"Bearer {self.token}"),)

    def open_channel(self, api: Any) -> Any:
        """A new channel to the broker from `api`, which is `grpc` (a
        `grpc.Channel`) or `grpc.aio` (a `grpc.aio.Channel`)."""
        options = channel_options(self.target)
        if not self.tls:
            return api.insecure_channel(self.target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
        return api.secure_channel(self.target, credentials, options=options)


def max_wait_ms(max_wait: MaxWait) -> int:
    """`max_wait` (seconds or a timedelta) as the wire's `max_wait_ms`.

    ``None`` waits forever (0 on the wire). ``0`` does not wait: it is sent as
    1 ms, so the lease is granted only if the GPU is free right now.
    """
    if max_wait is None:
        return 0
    if isinstance(max_wait, timedelta):
        seconds = max_wait.total_seconds()
    elif isinstance(max_wait, (int, float)) and not isinstance(max_wait, bool):
        seconds = float(max_wait)
    else:
        raise TypeError(f"max_wait must be seconds or a timedelta, not {type(max_wait).__name__}")
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"max_wait must not be negative, got {max_wait!r}")
    millis = max(1, math.ceil(seconds * 1000))
    if millis > _MAX_WAIT_MS_LIMIT:
        raise ValueError(f"max_wait is at most {_MAX_WAIT_MS_LIMIT // 1000} s, got {max_wait!r}")
    return millis


GpuArg = Union[int, str, None]
"""Which GPU a lease asks for: its index (an int, or a str of digits) or its
UUID (``"GPU-…"``); ``None`` or ``""`` lets the broker choose."""


class LeaseKwargs(TypedDict, total=False):
    """The options of a lease, taken as keywords by every lease entry point:
    `gpulease.lease()`, `gpulease.Client.lease()`, `gpulease.aio.lease()`
    and `gpulease.aio.Client.lease()`. This is their one definition; use it
    to type a wrapper's ``**options: Unpack[LeaseKwargs]``. Each may be left
    out:

    - `vram_mib`: the GPU memory the work needs, in MiB (default 0: unknown).
    - `max_wait`: seconds (or a timedelta) to wait at most; ``None`` (the
      default) waits forever, ``0`` takes the lease only if the GPU is free
      right now. Raises `LeaseTimeout` when it passes.
    - `gpu`: which GPU, by index (``1`` or ``"1"``) or UUID (``"GPU-…"``);
      ``None`` (the default) takes whichever GPU can grant soonest. A GPU the
      broker does not have is a `LeaseRejected`.
    - `labels`: free-form strings shown in the broker's Status.
    - `priority`: this request's priority; it may be lower than the
      consumer's configured one (0 if none), never higher: the broker lowers
      a higher value to the consumer's. ``None`` (the default) sends none,
      so the consumer's own applies.
    - `on_queued`: called with each `Queued` event (position, queue depth,
      holders, priority, estimated wait) while waiting, in the waiting
      thread (on asyncio: in the loop, awaited if it returns an awaitable).
    - `on_lost`: called once with the `LeaseLost` error if the lease ends
      while the body runs, from a background thread (on asyncio: in the loop).
    - `on_preempt`: called once with the `PreemptRequested` notice
      (`grace_ms`, `for_consumer`) if the broker asks this preemptible lease
      to make way, from the same background thread (a loss is noticed only
      once it returns); see `gpulease.Lease`.
    """

    vram_mib: int
    max_wait: MaxWait
    gpu: GpuArg
    labels: Optional[Mapping[str, str]]
    priority: Optional[int]
    on_queued: Optional[QueuedCallback]
    on_lost: Optional[LostCallback]
    on_preempt: Optional[PreemptCallback]


#: The names of the lease options, for the check of unknown keywords.
LEASE_OPTION_NAMES = frozenset(LeaseKwargs.__annotations__)


def gpu_selector(gpu: GpuArg) -> str:
    """`gpu` as the wire's `Acquire.gpu`: ``""`` for any GPU, else the index
    in decimal or the UUID. The broker checks that the GPU exists."""
    if gpu is None:
        return ""
    if isinstance(gpu, int) and not isinstance(gpu, bool):
        if gpu < 0:
            raise ValueError(f"gpu must be a GPU index (>= 0) or UUID, got {gpu!r}")
        return str(gpu)
    if not isinstance(gpu, str):
        raise TypeError(f"gpu must be an int index, a str index or UUID, or None, not {gpu!r}")
    return gpu.strip()


@dataclass(frozen=True)
class LeaseOptions:
    """What one lease asks for, checked once and shared by both clients."""

    consumer: str
    vram_mib: int = 0
    max_wait_ms: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    on_queued: Optional[QueuedCallback] = None
    on_lost: Optional[LostCallback] = None
    priority: Optional[int] = None
    on_preempt: Optional[PreemptCallback] = None
    #: `Acquire.gpu`: an index or UUID, or ``""`` for any GPU.
    gpu: str = ""

    @classmethod
    def build(cls, consumer: str, **options: Unpack[LeaseKwargs]) -> LeaseOptions:
        """Checks a consumer and its `LeaseKwargs`, as every lease entry point
        passes them on; an unknown keyword is a `TypeError`, as for any call.

        The consumer name itself is checked by the broker (INVALID_ARGUMENT),
        so that the rule lives in one place; so is whether `gpu` exists.
        """
        unknown = sorted(set(options) - LEASE_OPTION_NAMES)
        if unknown:
            raise TypeError(
                f"unexpected lease option {unknown[0]!r}; the options are "
                + ", ".join(sorted(LEASE_OPTION_NAMES))
            )
        if not isinstance(consumer, str):
            raise TypeError(f"consumer must be a str, not {type(consumer).__name__}")
        vram_mib = options.get("vram_mib", 0)
        if isinstance(vram_mib, bool) or not isinstance(vram_mib, int) or vram_mib < 0:
            raise ValueError(f"vram_mib must be a non-negative int, got {vram_mib!r}")
        checked_labels = dict(options.get("labels") or {})
        for key, value in checked_labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"labels must map str to str, got {key!r}: {value!r}")
        priority = options.get("priority")
        if priority is not None:
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise TypeError(f"priority must be an int or None, not {type(priority).__name__}")
            low, high = _PRIORITY_RANGE
            if not low <= priority <= high:
                raise ValueError(f"priority must be a 32-bit int, got {priority!r}")
        on_queued = options.get("on_queued")
        on_lost = options.get("on_lost")
        on_preempt = options.get("on_preempt")
        for name, callback in (
            ("on_queued", on_queued),
            ("on_lost", on_lost),
            ("on_preempt", on_preempt),
        ):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be callable, got {callback!r}")
        return cls(
            consumer=consumer,
            vram_mib=vram_mib,
            max_wait_ms=max_wait_ms(options.get("max_wait")),
            labels=checked_labels,
            on_queued=on_queued,
            on_lost=on_lost,
            priority=priority,
            on_preempt=on_preempt,
            gpu=gpu_selector(options.get("gpu")),
        )

    def acquire_request(self) -> lease_pb2.LeaseRequest:
        """The first message of the stream; the pid is read now, not at import,
        so that a forked worker reports its own. `priority` is sent only when
        it was given: unset, the broker uses the consumer's own."""
        acquire = lease_pb2.Acquire(
            consumer=self.consumer,
            vram_mib=self.vram_mib,
            max_wait_ms=self.max_wait_ms,
            client_pid=os.getpid(),
            labels=dict(self.labels),
            gpu=self.gpu,
        )
        if self.priority is not None:
            acquire.priority = self.priority
        return lease_pb2.LeaseRequest(acquire=acquire)


RELEASE_REQUEST = lease_pb2.LeaseRequest(release=lease_pb2.Release())

_UNAUTHORIZED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})

_REJECTED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


def error_from_status(
    code: Optional[grpc.StatusCode], details: Optional[str], *, doing: str
) -> LeaseError:
    """The one mapping from a gRPC status to a `LeaseError`, for any call but
    a lease that is already held (see `Conversation.on_hold_end`).

    `doing` names the call for the message, e.g. ``"lease for 'tts' at
    127.0.0.1:50051"``. DEADLINE_EXCEEDED is a `LeaseTimeout`: the broker
    sends it when `max_wait` passes (the client never puts a deadline on
    `AcquireLease`); on the other calls it can only mean the broker did not
    answer in time, which `Conversation` never sees.
    """
    details = details or ""
    name = code.name if code is not None else "no status"
    message = f"{doing}: {details} ({name})" if details else f"{doing}: {name}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return LeaseTimeout(message, code=code, details=details)
    if code in _UNAUTHORIZED:
        return LeaseUnauthorized(message, code=code, details=details)
    if code in _REJECTED:
        return LeaseRejected(message, code=code, details=details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return BrokerUnavailable(message, code=code, details=details)
    return LeaseError(message, code=code, details=details)


def call_error(
    code: Optional[grpc.StatusCode], details: Optional[str], *, doing: str
) -> LeaseError:
    """`error_from_status` for Status, WatchStatus, RevokeLease and Residency,
    whose own deadline passing means the broker did not answer:
    `BrokerUnavailable`."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = details or "no answer in time"
        return BrokerUnavailable(f"{doing}: {details} ({code.name})", code=code, details=details)
    return error_from_status(code, details, doing=doing)


def revoke_request(lease: Union[str, int], message: str = "") -> lease_pb2.RevokeLeaseRequest:
    """The `RevokeLease` request for a lease named by its id (``"EPOCH-TOKEN"``,
    as `Granted.lease_id` and Status show it) or its fencing token (an int, or
    a str of digits, as `gpulease revoke` takes it)."""
    if not isinstance(message, str):
        raise TypeError(f"message must be a str, not {type(message).__name__}")
    if isinstance(lease, int) and not isinstance(lease, bool):
        if lease <= 0:
            raise ValueError(f"a fencing token is a positive int, got {lease!r}")
        return lease_pb2.RevokeLeaseRequest(fencing_token=lease, message=message)
    if not isinstance(lease, str):
        raise TypeError(f"name the lease by its id (str) or fencing token (int), not {lease!r}")
    lease = lease.strip()
    if lease.isdigit() and lease.isascii():
        return lease_pb2.RevokeLeaseRequest(fencing_token=int(lease), message=message)
    if not lease:
        raise ValueError("name the lease by its id or fencing token")
    return lease_pb2.RevokeLeaseRequest(lease_id=lease, message=message)


UnloadCallback = Callable[[lease_pb2.UnloadRequested], object]
"""Called with each `UnloadRequested` of a `Residency` stream; returns once
the memory is free."""


def residency_hello(consumer: str) -> lease_pb2.ResidencyReport:
    """The first message of a `Residency` stream."""
    return lease_pb2.ResidencyReport(hello=lease_pb2.ResidencyHello(consumer=consumer))


def unloaded_report(gpu_index: Optional[int]) -> lease_pb2.ResidencyReport:
    """`unloaded` for one GPU, or for every GPU with ``None``."""
    if gpu_index is None:
        return lease_pb2.ResidencyReport(unloaded=lease_pb2.Unloaded(all_gpus=True))
    return lease_pb2.ResidencyReport(unloaded=lease_pb2.Unloaded(gpu_index=gpu_index))


class Backoff:
    """How long a `Residency` helper waits before it calls again: from
    `first` seconds, doubling up to `most`, with some jitter so that helpers
    do not call in step; back to `first` once a stream was open."""

    def __init__(self, first: float = 0.5, most: float = 30.0) -> None:
        self.first = first
        self.most = most
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self.most, self._next * 2)
        return delay * random.uniform(0.8, 1.2)


def report_residency_failure(
    error: LeaseError, consumer: str, delay: float, was_open: bool
) -> None:
    """Logs why a `Residency` stream failed or ended, and when the next try is."""
    if isinstance(error, LeaseRejected):
        # Retrying does not help until the broker's configuration or the
        # token changes, but a background helper has nobody to raise to.
        logger.error(
            "gpulease: residency of %r refused: %s; retrying in %.1f s", consumer, error, delay
        )
    elif was_open:
        logger.warning(
            "gpulease: the residency stream of %r ended: %s; reconnecting in %.1f s",
            consumer,
            error,
            delay,
        )
    else:
        logger.warning(
            "gpulease: cannot open the residency stream of %r: %s; retrying in %.1f s",
            consumer,
            error,
            delay,
        )


class ResidencyLoop:
    """The rules of a `Residency` helper, without I/O: one stream after
    another until it is closed, and what each stream's end means.

    The blocking helper (a thread) and the asyncio one (a task) both drive
    it: they open a stream that starts with `hello`, call `opened` once the
    broker has registered it, pass each command to `unload_request`, answer
    a request with `unloaded_report` once `on_unload` returned and count it
    with `answered`; then turn the stream's end into an error with
    `stream_ended` (or `closed_error`), hand it to `attempt_ended`, and wait
    `retry_delay` before the next stream. The blocking driver calls all but
    `retry_delay` under its lock.
    """

    def __init__(self, consumer: str, target: str) -> None:
        self.consumer = consumer
        self.target = target
        self.backoff = Backoff()
        #: Whether a stream is open now.
        self.connected = False
        #: Set by `close()`; the loop stops at the next chance.
        self.closing = False
        #: Why the last stream failed or ended; ``None`` while one is open.
        self.error: Optional[LeaseError] = None
        #: The broker's refusal of the last stream, if that is why it ended.
        self.rejected: Optional[LeaseRejected] = None
        #: How many unload requests were answered ``unloaded``.
        self.unloads = 0

    @property
    def doing(self) -> str:
        return f"Residency of {self.consumer!r} at {self.target}"

    def state(self) -> str:
        """For `repr`."""
        return "closed" if self.closing else "connected" if self.connected else "connecting"

    def hello(self) -> lease_pb2.ResidencyReport:
        """The first message of every stream."""
        return residency_hello(self.consumer)

    def opened(self) -> None:
        """The broker answered `hello` with its headers: the stream is open."""
        self.connected = True
        self.error = self.rejected = None
        logger.info("gpulease: residency of %r at %s is open", self.consumer, self.target)

    def unload_request(
        self, command: lease_pb2.ResidencyCommand
    ) -> Optional[lease_pb2.UnloadRequested]:
        """The unload request in `command` to hand to `on_unload`, if it is one."""
        if command.WhichOneof("kind") != "unload_requested":
            return None  # a command newer than these stubs
        request = command.unload_requested
        logger.info(
            "gpulease: the broker asks %r to unload from GPU %d (%d MiB) for %r",
            self.consumer,
            request.gpu_index,
            request.footprint_mib,
            request.for_consumer,
        )
        return request

    def answered(self) -> None:
        """An unload request was answered ``unloaded`` (`unloaded_report`)."""
        self.unloads += 1

    def closed_error(self) -> LeaseError:
        """Why a stream ended that `close()` ended."""
        return LeaseError(f"{self.doing}: closed")

    def stream_ended(self, code: Optional[grpc.StatusCode], details: Optional[str]) -> LeaseError:
        """Why a stream ended with this status."""
        if code == grpc.StatusCode.OK:
            return LeaseError(f"{self.doing}: the broker ended the stream", code=code)
        return call_error(code, details, doing=self.doing)

    def attempt_ended(self, error: LeaseError) -> bool:
        """Records the end of a stream; returns whether the loop stops
        (`close()` was called)."""
        self.connected = False
        if self.closing:
            return True
        self.error = error
        if isinstance(error, LeaseRejected):
            self.rejected = error
        return False

    def retry_delay(self, was_open: bool, error: LeaseError) -> float:
        """How long to wait before the next stream; logs why and how long."""
        # A refusal will not go away by itself: never retry it quickly.
        if was_open and not isinstance(error, LeaseRejected):
            self.backoff.reset()
        delay = self.backoff.next_delay()
        report_residency_failure(error, self.consumer, delay, was_open)
        return delay

    def settled(self) -> bool:
        """Whether `wait_connected` has its answer."""
        return self.connected or self.rejected is not None or self.closing

    def connected_or_raise(self) -> bool:
        """`wait_connected`'s answer: whether the stream is open; raises the
        broker's refusal if that is why it is not."""
        if self.connected:
            return True
        if self.rejected is not None:
            raise self.rejected
        return False


class Conversation:
    """The rules of one `AcquireLease` stream, without I/O.

    The blocking and the asyncio lease both feed it what they read and act on
    what it returns; neither decides anything about the protocol itself.
    """

    def __init__(self, options: LeaseOptions, target: str) -> None:
        self.options = options
        self.target = target
        self.granted: Optional[lease_pb2.Granted] = None
        #: The loss of the held lease, once there was one.
        self.lost: Optional[LeaseLost] = None
        #: The broker's request to make way, once it came.
        self.preempt_notice: Optional[lease_pb2.PreemptRequested] = None
        #: Set when the client began to end the lease itself.
        self.releasing = False

    @property
    def doing(self) -> str:
        return f"lease for {self.options.consumer!r} at {self.target}"

    def first_request(self) -> lease_pb2.LeaseRequest:
        return self.options.acquire_request()

    def on_wait_event(self, event: lease_pb2.LeaseEvent) -> Optional[lease_pb2.Queued]:
        """Reads one event before the grant; returns a `Queued` to report.

        After it returns with `granted` set, the lease is held.
        """
        kind = event.WhichOneof("kind")
        if kind == "granted":
            self.granted = event.granted
        elif kind == "queued":
            return event.queued
        # A `revoked` before the grant is never sent; the end of the stream
        # that follows it says what happened. Nor is `preempt_requested`,
        # which is for holders.
        return None

    def begin_release(self) -> bool:
        """Marks that the client ends the lease now; returns whether to send
        `release`. Not once the lease was lost: the broker ends that stream
        itself, and a write racing its end can make gRPC report its own
        error in place of the broker's status (grpc.aio turns a failed
        write into INTERNAL, "Internal error from Core")."""
        self.releasing = True
        return self.lost is None

    def wait_failed(self, code: Optional[grpc.StatusCode], details: Optional[str]) -> LeaseError:
        """The error for a stream that ended before the grant."""
        if code == grpc.StatusCode.OK:
            return LeaseError(
                f"{self.doing}: the broker ended the call without granting the lease",
                code=code,
                details=details or "",
            )
        return error_from_status(code, details, doing=self.doing)

    def on_hold_event(
        self, event: lease_pb2.LeaseEvent
    ) -> Union[LeaseLost, lease_pb2.PreemptRequested, None]:
        """Reads one event while the lease is held; returns what to signal:
        a new loss, or a first request to make way (the lease stays held;
        one that comes once the lease is lost or being released is kept
        but not signalled)."""
        kind = event.WhichOneof("kind")
        if kind == "preempt_requested":
            if self.preempt_notice is not None:
                return None
            self.preempt_notice = event.preempt_requested
            if self.lost is not None or self.releasing:
                return None
            return self.preempt_notice
        if kind != "revoked" or self.lost is not None:
            return None
        revoked = event.revoked
        self.lost = LeaseLost(
            f"{self._lease_name()} was revoked by the broker"
            f" ({_reason_name(revoked.reason)}): {revoked.message}",
            reason=revoked.reason,
            details=revoked.message,
        )
        return self.lost

    def on_hold_end(
        self, code: Optional[grpc.StatusCode], details: Optional[str]
    ) -> Optional[LeaseLost]:
        """Reads the end of the stream of a held lease; returns a new loss.

        The end the client asked for (after `releasing`) is no loss.
        """
        if self.lost is not None:
            # Revoked first: the status that follows only confirms it.
            if self.lost.code is None:
                self.lost.code = code
            return None
        if self.releasing:
            return None
        name = code.name if code is not None else "no status"
        self.lost = LeaseLost(
            f"{self._lease_name()} was lost: the stream to the broker ended"
            f" ({name}: {details or 'no details'})",
            code=code,
            details=details or "",
        )
        return self.lost

    def _lease_name(self) -> str:
        lease_id = self.granted.lease_id if self.granted is not None else "?"
        return f"lease {lease_id} of {self.options.consumer!r} at {self.target}"


def _reason_name(reason: int) -> str:
    try:
        return lease_pb2.RevokeReason.Name(reason)
    except ValueError:  # a reason newer than these stubs
        return str(reason)


def report_callback_error(what: str) -> None:
    """Logs an exception raised by a user's `on_lost`, `on_preempt` or
    `on_unload` callback, which runs where nobody could catch it."""
    logger.exception("gpulease: the %s callback raised", what)


class GrantView:
    """The read-only view of a lease that both `Lease` classes expose."""

    _conversation: Optional[Conversation]

    @property
    def granted(self) -> lease_pb2.Granted:
        """The broker's `Granted` message. Raises `LeaseError` before the grant."""
        conversation = self._conversation
        if conversation is None or conversation.granted is None:
            raise LeaseError("the lease has not been granted: use it inside `with`")
        return conversation.granted

    @property
    def lease_id(self) -> str:
        """The lease's unique name, for logs and Status."""
        return self.granted.lease_id

    @property
    def fencing_token(self) -> int:
        """Strictly increasing over all grants of one broker process; a resource
        that remembers the highest token it saw can refuse a late writer."""
        return self.granted.fencing_token

    @property
    def broker_epoch(self) -> int:
        """Changes on every broker start; with `fencing_token` it names the grant."""
        return self.granted.broker_epoch

    @property
    def gpu_index(self) -> int:
        """The index of the granted GPU."""
        return self.granted.gpu_index

    @property
    def gpu_uuid(self) -> str:
        """The UUID of the granted GPU; empty when the broker does not know it."""
        return self.granted.gpu_uuid

    @property
    def waited_ms(self) -> int:
        """How long the request waited in the queue, in milliseconds."""
        return self.granted.waited_ms

    @property
    def preempt_notice(self) -> Optional[lease_pb2.PreemptRequested]:
        """The broker's request to make way (`grace_ms`, `for_consumer`),
        once it came; else ``None``. The lease is still held then: release
        it within `grace_ms`, or the broker revokes it."""
        conversation = self._conversation
        return conversation.preempt_notice if conversation is not None else None

    @property
    def lost_error(self) -> Optional[LeaseLost]:
        """Why the held lease was lost, once it was; else ``None``."""
        conversation = self._conversation
        return conversation.lost if conversation is not None else None

    def raise_if_lost(self) -> None:
        """Raises `LeaseLost` if the lease was lost; call it between steps of
        long GPU work."""
        error = self.lost_error
        if error is not None:
            raise error
