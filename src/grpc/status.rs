//! The error table: every typed error of the gRPC surface, and the one
//! `match` that turns each into a `tonic::Status`.
//!
//! Each source has its own error type: the broker's [`EnqueueError`] (with
//! the core's [`Rejection`]), the RPC layer's [`RequestError`] (a
//! conversation out of order, a malformed argument), [`LimitError`] (a
//! `[limits]` bound), [`SessionError`] (the broker ends a call it accepted),
//! [`ReloadCallError`] and the auth layer's [`AuthError`]. Everything else
//! returns one of those and converts through [`code`]; no other module
//! builds a `Status`. The message a client sees is the error's `Display`.
//!
//! gRPC itself never produces INVALID_ARGUMENT, FAILED_PRECONDITION,
//! NOT_FOUND or ABORTED, so clients can trust those to come from the broker:
//! here only broker and validation errors map to them. Auth says only
//! UNAUTHENTICATED or PERMISSION_DENIED.

use std::time::Duration;

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::broker::EnqueueError;
use crate::config::Limits;
use crate::core::{ConsumerNameError, Rejection, RevokeReason};
use crate::reload::ReloadError;

/// A request the RPC layer refuses: a conversation out of order, or an
/// argument it cannot read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// `AcquireLease` sent nothing within the first-message timeout.
    #[error("no `acquire` within {} s of opening AcquireLease", .0.as_secs())]
    NoAcquireInTime(Duration),
    /// `AcquireLease` began with something other than `acquire`.
    #[error("the first message of AcquireLease must be `acquire`")]
    FirstNotAcquire,
    /// `AcquireLease` ended before its `acquire`.
    #[error("AcquireLease ended before its `acquire` message")]
    EndedBeforeAcquire,
    /// A waiter sent something other than `release`.
    #[error("only `release` may follow `acquire` on an AcquireLease stream")]
    NotReleaseWhileWaiting,
    /// A holder sent something other than `release`; its lease has ended.
    #[error("only `release` may follow `acquire` on an AcquireLease stream; the lease has ended")]
    NotReleaseWhileHolding,
    /// `Residency` began with something other than `hello`.
    #[error("the first message of Residency must be `hello`")]
    FirstNotHello,
    /// `Residency` sent something other than `unloaded` after `hello`.
    #[error("only `unloaded` may follow `hello` on a Residency stream")]
    NotUnloaded,
    /// `Residency` named a consumer that cannot exist.
    #[error(transparent)]
    BadName(#[from] ConsumerNameError),
    /// `RevokeLease` named a lease id that is not `EPOCH-TOKEN`.
    #[error("{0:?} is not a lease id (EPOCH-TOKEN, as in Granted.lease_id)")]
    NotALeaseId(String),
    /// `RevokeLease` named no lease at all.
    #[error("name the lease by lease_id or fencing_token")]
    NoLeaseNamed,
}

/// A request beyond a `[limits]` bound.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LimitError {
    /// More labels than `limits.max_labels`.
    #[error("{count} labels, more than `limits.max_labels` ({max}) allows")]
    TooManyLabels {
        /// How many the request has.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// A label with an empty key.
    #[error("a label key is empty")]
    EmptyLabelKey,
    /// A label key longer than `limits.max_label_key_bytes`.
    #[error(
        "the label key {prefix:?}… is {bytes} bytes, more than `limits.max_label_key_bytes` ({max}) allows"
    )]
    LabelKeyTooLong {
        /// The key's first characters.
        prefix: String,
        /// Its length.
        bytes: usize,
        /// The limit.
        max: u32,
    },
    /// A label value longer than `limits.max_label_value_bytes`.
    #[error(
        "the value of label {prefix:?} is {bytes} bytes, more than `limits.max_label_value_bytes` ({max}) allows"
    )]
    LabelValueTooLong {
        /// The key's first characters.
        prefix: String,
        /// The value's length.
        bytes: usize,
        /// The limit.
        max: u32,
    },
    /// A message longer than `limits.max_message_bytes`.
    #[error("message too large: more than `limits.max_message_bytes` ({max} bytes) allows")]
    MessageTooLarge {
        /// The limit.
        max: u32,
    },
}

/// Why the broker ends a call it had accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The broker is shutting down (a waiter, or a `Residency` stream).
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The waiter was not granted within its `max_wait_ms`.
    #[error("not granted within max_wait_ms ({} ms)", .0.as_millis())]
    NotGrantedInTime(Duration),
    /// The broker took the lease back (after `Revoked`).
    #[error("{}", revoked_message(*.0))]
    Revoked(RevokeReason),
}

/// Why a `Reload` call changed nothing.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadCallError {
    /// This broker was built without a reloader.
    #[error("this broker cannot reload")]
    Unsupported,
    /// The configuration does not validate: the file must change first.
    #[error(transparent)]
    Refused(#[from] ReloadError),
    /// The reload's task failed.
    #[error("the reload failed: {0}")]
    Failed(String),
}

/// Any error of the gRPC surface.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {
    /// The broker refused to queue a request.
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
    /// The RPC layer refused a request.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A request beyond `[limits]`.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The broker ended an accepted call.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A reload that changed nothing.
    #[error(transparent)]
    Reload(#[from] ReloadCallError),
    /// The caller may not do this.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// What tonic reported reading the client's stream, passed on as it is.
    #[error("{}", .0.message())]
    Transport(Status),
}

/// The table: the code of each error. No arm matches more than one kind of
/// error by a wildcard, so a new variant cannot compile without its row.
fn code(error: &ServiceError) -> Code {
    use Code::*;
    match error {
        ServiceError::Enqueue(error) => match error {
            EnqueueError::Rejected(rejection) => match rejection {
                Rejection::BadName(_) => InvalidArgument,
                Rejection::UnknownConsumer(_) => PermissionDenied,
                Rejection::UnknownGpu(..) => InvalidArgument,
                Rejection::TooLarge { .. } => ResourceExhausted,
            },
            EnqueueError::ShuttingDown => Unavailable,
            EnqueueError::QueueFull { .. } => ResourceExhausted,
        },
        ServiceError::Request(error) => match error {
            RequestError::NoAcquireInTime(_)
            | RequestError::FirstNotAcquire
            | RequestError::EndedBeforeAcquire
            | RequestError::NotReleaseWhileWaiting
            | RequestError::NotReleaseWhileHolding
            | RequestError::FirstNotHello
            | RequestError::NotUnloaded
            | RequestError::BadName(_)
            | RequestError::NotALeaseId(_)
            | RequestError::NoLeaseNamed => InvalidArgument,
        },
        ServiceError::Limit(error) => match error {
            LimitError::TooManyLabels { .. }
            | LimitError::EmptyLabelKey
            | LimitError::LabelKeyTooLong { .. }
            | LimitError::LabelValueTooLong { .. } => InvalidArgument,
            // A quota, the code tonic's docs give for one.
            LimitError::MessageTooLarge { .. } => ResourceExhausted,
        },
        ServiceError::Session(error) => match error {
            SessionError::ShuttingDown => Unavailable,
            SessionError::NotGrantedInTime(_) => DeadlineExceeded,
            SessionError::Revoked(reason) => match reason {
                // The client may simply retry, with the next broker.
                RevokeReason::Shutdown => Unavailable,
                // A higher-level retry: acquire again.
                RevokeReason::MaxHoldExceeded | RevokeReason::Admin | RevokeReason::Preempted => {
                    Aborted
                }
            },
        },
        ServiceError::Reload(error) => match error {
            ReloadCallError::Unsupported => Unimplemented,
            // The file must change before a reload can succeed.
            ReloadCallError::Refused(_) => FailedPrecondition,
            ReloadCallError::Failed(_) => Internal,
        },
        ServiceError::Auth(error) => match error {
            AuthError::MalformedHeader
            | AuthError::UnknownToken
            | AuthError::NeedsOwnToken { .. }
            | AuthError::TokenRequired
            | AuthError::StatusNeedsToken
            | AuthError::OperatorUnidentified => Unauthenticated,
            AuthError::TokenOfAnother { .. }
            | AuthError::UnixUserRefused { .. }
            | AuthError::UnixSocketOnly { .. }
            | AuthError::NotOperator => PermissionDenied,
        },
        ServiceError::Transport(status) => status.code(),
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Transport(status) => status,
            error => Status::new(code(&error), error.to_string()),
        }
    }
}

/// Every source's error converts to a `Status` through the table, so that
/// `?` works in a handler.
macro_rules! through_the_table {
    ($($source:ty),*) => {$(
        impl From<$source> for Status {
            fn from(error: $source) -> Self {
                ServiceError::from(error).into()
            }
        }
    )*};
}

through_the_table!(
    EnqueueError,
    RequestError,
    LimitError,
    SessionError,
    ReloadCallError,
    AuthError
);

/// What the client sees when the broker takes its lease back: the status
/// message after `Revoked`, and the start of `Revoked.message`.
fn revoked_message(reason: RevokeReason) -> &'static str {
    match reason {
        RevokeReason::Shutdown => "lease revoked: the broker is shutting down",
        RevokeReason::MaxHoldExceeded => "lease revoked: held longer than the broker's max_hold",
        RevokeReason::Admin => "lease revoked by an operator",
        RevokeReason::Preempted => "lease revoked: preempted for a waiter of higher priority",
    }
}

/// tonic's status for a message over the decoding limit: OUT_OF_RANGE, with
/// this message. The broker answers RESOURCE_EXHAUSTED, the code for a
/// quota, naming the limit.
const TOO_LARGE: &str = "decoded message length too large";

/// The error for a failure to read a client's message: a message over
/// `limits.max_message_bytes` is a [`LimitError`]; anything else is what
/// tonic said.
pub(crate) fn inbound_error(status: Status, limits: &Limits) -> ServiceError {
    if status.code() == Code::OutOfRange && status.message().contains(TOO_LARGE) {
        LimitError::MessageTooLarge {
            max: limits.max_message_bytes,
        }
        .into()
    } else {
        ServiceError::Transport(status)
    }
}

/// Rewrites a trailers-only response that tonic produced for a unary
/// request over the decoding limit (it decodes before any handler runs), so
/// that it too says what [`LimitError::MessageTooLarge`] says.
pub(crate) fn rewrite_too_large<B>(
    mut response: tonic::codegen::http::Response<B>,
    limit: u32,
) -> tonic::codegen::http::Response<B> {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let too_large_message = headers
        .get("grpc-message")
        .is_some_and(|message| percent_decoded(message.as_bytes()).contains(TOO_LARGE));
    let status = Status::from(LimitError::MessageTooLarge { max: limit });
    // Printable ASCII without `%`: a valid `grpc-message` as it is.
    if out_of_range
        && too_large_message
        && let Ok(message) = tonic::codegen::http::HeaderValue::from_str(status.message())
    {
        let code = tonic::codegen::http::HeaderValue::from(status.code() as i32);
        headers.insert("grpc-status", code);
        headers.insert("grpc-message", message);
    }
    response
}

fn percent_decoded(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(Some(high)), Some(Some(low))) = (
                bytes.get(i + 1).map(|b| hex(*b)),
                bytes.get(i + 2).map(|b| hex(*b)),
            )
        {
            out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
