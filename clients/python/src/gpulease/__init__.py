"""gpulease: the Python client of the gpulease GPU lease broker.

Hold the GPU around GPU work::

    import gpulease

    with gpulease.lease("mvoice", vram_mib=4000, max_wait=30) as lease:
        print("holding", lease.lease_id, "token", lease.fencing_token)
        ...  # use the GPU

The same as a decorator (``@gpulease.lease("mvoice")``), on asyncio
(``async with gpulease.aio.lease("mvoice")``), `Client` for the broker's
Status, WatchStatus and RevokeLease, and `residency()` to free a consumer's
GPU memory when the broker asks. The messages are the ones generated from
the broker's proto, in `gpulease.v1.lease_pb2`.
"""

from . import aio
from ._blocking import Client, Lease, lease
from ._protocol import (
    BROKER_ENV,
    CA_ENV,
    CERT_ENV,
    DEFAULT_BROKER,
    KEY_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    LeaseKwargs,
)
from ._residency import Residency, residency
from .errors import (
    BrokerUnavailable,
    LeaseError,
    LeaseLost,
    LeaseRejected,
    LeaseTimeout,
    LeaseUnauthorized,
)
from .v1.lease_pb2 import (
    Granted,
    PreemptRequested,
    Queued,
    RevokeLeaseResponse,
    RevokeReason,
    StatusResponse,
    UnloadRequested,
)

__version__ = "0.1.0"

__all__ = [
    "BROKER_ENV",
    "CA_ENV",
    "CERT_ENV",
    "DEFAULT_BROKER",
    "KEY_ENV",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "BrokerUnavailable",
    "Client",
    "Granted",
    "Lease",
    "LeaseError",
    "LeaseKwargs",
    "LeaseLost",
    "LeaseRejected",
    "LeaseTimeout",
    "LeaseUnauthorized",
    "PreemptRequested",
    "Queued",
    "Residency",
    "RevokeLeaseResponse",
    "RevokeReason",
    "StatusResponse",
    "UnloadRequested",
    "aio",
    "lease",
    "residency",
]
