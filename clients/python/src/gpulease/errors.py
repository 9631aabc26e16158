"""The exceptions of the gpulease client: one small hierarchy under `LeaseError`.

Every failure the client reports is a `LeaseError`; the subclasses say what
the caller can do about it:

- `LeaseTimeout`: the lease was not granted within `max_wait`. Try later.
- `LeaseRejected`: the broker refused the request (bad consumer name, a
  consumer the broker does not know, ...). Retrying will not help.
  `LeaseUnauthorized`, a kind of it, says the credentials do not allow it:
  no token or an unknown one, or another consumer's.
- `BrokerUnavailable`: the broker cannot be reached or is shutting down.
  Retrying may help once it is back.
- `LeaseLost`: a lease that was granted ended while the body still ran
  (the broker revoked it, or the connection broke). Work done after the loss
  ran without the GPU being reserved.
"""

from __future__ import annotations

from typing import Optional

import grpc

__all__ = [
    "BrokerUnavailable",
    "LeaseError",
    "LeaseLost",
    "LeaseRejected",
    "LeaseTimeout",
    "LeaseUnauthorized",
]


class LeaseError(Exception):
    """Any failure to get, hold or ask about a lease.

    `code` is the gRPC status code the broker (or the gRPC library) ended the
    call with, when there was one, and `details` its message.
    """

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class LeaseTimeout(LeaseError):
    """The lease was not granted within `max_wait` (DEADLINE_EXCEEDED)."""


class LeaseRejected(LeaseError):
    """The broker refused the request.

    INVALID_ARGUMENT (for example a consumer name outside ``[A-Za-z0-9._-]``)
    or RESOURCE_EXHAUSTED (more memory than any GPU has); PERMISSION_DENIED
    and UNAUTHENTICATED are its subclass `LeaseUnauthorized`.
    """


class LeaseUnauthorized(LeaseRejected):
    """The broker does not let this caller do that.

    UNAUTHENTICATED: no token where the broker requires one, or a token it
    does not know. PERMISSION_DENIED: the token (or the Unix user) may not
    act as this consumer, an operator call without the admin token, or a
    consumer the broker does not know (``strict_consumers``).
    """


class BrokerUnavailable(LeaseError):
    """The broker could not be reached, stopped answering, or is shutting down
    (UNAVAILABLE)."""


class LeaseLost(LeaseError):
    """A granted lease ended while it was still in use.

    `reason` is the broker's `RevokeReason` (an int of
    `gpulease.v1.lease_pb2.RevokeReason`) when the broker revoked the lease,
    and ``None`` when the stream broke without a revocation (the broker was
    killed, the connection dropped).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: Optional[int] = None,
        code: Optional[grpc.StatusCode] = None,
        details: str = "",
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.reason = reason
