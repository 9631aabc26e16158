//! What can go wrong while taking a lease, and how a held lease can end
//! without its owner ending it.

use crate::connect::ConnectError;
use crate::pb::v1 as pb;

/// Why a call of this crate failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request cannot be sent as asked (for example a `max_wait` longer
    /// than the proto's 49 days); nothing was sent.
    #[error("{0}")]
    InvalidRequest(String),
    /// The broker refused the call or it failed, with this gRPC status: for
    /// example `DEADLINE_EXCEEDED` when `max_wait` passed before the grant,
    /// `INVALID_ARGUMENT` or `RESOURCE_EXHAUSTED` for a request that can
    /// never be granted, `PERMISSION_DENIED` or `UNAUTHENTICATED` for a
    /// missing or wrong token, `UNAVAILABLE` when the broker went away.
    #[error("the broker answered {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The broker revoked the request before granting it (for example
    /// because it is shutting down).
    #[error("the broker revoked the request: {message}")]
    Revoked {
        /// Why, as the broker says.
        reason: pb::RevokeReason,
        /// A sentence for people.
        message: String,
    },
    /// The broker ended the call without granting a lease or saying why.
    #[error("the broker ended the call without granting a lease")]
    Ended,
    /// The lease had already been lost when its owner released it: the
    /// work done under it may have overlapped another holder's.
    #[error("the lease was lost before it was released: {0}")]
    Lost(Lost),
}

/// How a held lease ended without its owner ending it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Lost {
    /// The broker revoked it: `max_hold` passed, an operator revoked it,
    /// the broker shut down, or a preemptible lease did not make way in
    /// time.
    #[error("the broker revoked the lease: {message}")]
    Revoked {
        /// Why, as the broker says.
        reason: pb::RevokeReason,
        /// A sentence for people.
        message: String,
    },
    /// The broker ended the call without saying why.
    #[error("the broker ended the lease")]
    Ended,
    /// The call failed: the broker or the connection to it went away.
    #[error("the lease was lost: {}", .0.message())]
    Failed(tonic::Status),
}
