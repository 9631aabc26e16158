//! Exit statuses of the command line, after `sysexits.h`, and the one place
//! that turns a gRPC status into a message and an exit status.

use tonic::{Code, Status};

/// A process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExitCode(pub u8);

impl ExitCode {
    /// Success.
    pub(crate) const OK: Self = Self(0);
    /// Bad usage or configuration (`EX_USAGE`).
    pub(crate) const USAGE: Self = Self(64);
    /// The broker refused the request's data (`EX_DATAERR`).
    pub(crate) const DATA: Self = Self(65);
    /// The broker cannot be reached or went away (`EX_UNAVAILABLE`).
    pub(crate) const UNAVAILABLE: Self = Self(69);
    /// Something failed inside the broker or this program (`EX_SOFTWARE`).
    pub(crate) const SOFTWARE: Self = Self(70);
    /// A file the broker needs cannot be written (`EX_CANTCREAT`).
    pub(crate) const CANNOT_CREATE: Self = Self(73);
    /// Waiting timed out; try again later (`EX_TEMPFAIL`).
    pub(crate) const TEMPFAIL: Self = Self(75);
    /// Not allowed (`EX_NOPERM`).
    pub(crate) const NOPERM: Self = Self(77);
    /// The broker's configuration is not valid (`EX_CONFIG`).
    pub(crate) const CONFIG: Self = Self(78);
    /// The command could not be executed.
    pub(crate) const CANNOT_EXECUTE: Self = Self(126);
    /// The command was not found.
    pub(crate) const NOT_FOUND: Self = Self(127);
}

/// A client command's failure: what to tell the user, and how to exit.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) code: ExitCode,
}

impl Failure {
    pub(crate) fn new(code: ExitCode, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

impl From<gpulease_client::ConnectError> for Failure {
    fn from(error: gpulease_client::ConnectError) -> Self {
        let code = match error {
            gpulease_client::ConnectError::BadAddress(_)
            | gpulease_client::ConnectError::BadCredentials(_) => ExitCode::USAGE,
            gpulease_client::ConnectError::Unreachable { .. } => ExitCode::UNAVAILABLE,
        };
        // The innermost cause says what happened ("Connection refused").
        let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&error);
        while let Some(next) = cause.and_then(std::error::Error::source) {
            cause = Some(next);
        }
        let source = cause.map(|c| format!(" ({c})")).unwrap_or_default();
        Self::new(code, format!("{error}{source}"))
    }
}

impl From<gpulease_client::Error> for Failure {
    fn from(error: gpulease_client::Error) -> Self {
        use gpulease_client::Error;
        match error {
            Error::Connect(error) => error.into(),
            Error::Status(status) => status.into(),
            Error::InvalidRequest(message) => Self::new(ExitCode::USAGE, message),
            Error::Revoked { .. } | Error::Ended | Error::Lost(_) => {
                Self::new(ExitCode::UNAVAILABLE, error.to_string())
            }
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        let code = match status.code() {
            // A request larger than any GPU never fits: retrying is useless.
            Code::InvalidArgument | Code::ResourceExhausted => ExitCode::DATA,
            Code::PermissionDenied | Code::Unauthenticated => ExitCode::NOPERM,
            Code::DeadlineExceeded => ExitCode::TEMPFAIL,
            Code::Unavailable | Code::Cancelled | Code::Aborted => ExitCode::UNAVAILABLE,
            _ => ExitCode::SOFTWARE,
        };
        let message = if status.message().is_empty() {
            format!("the broker answered {:?}", status.code())
        } else {
            format!(
                "the broker answered {:?}: {}",
                status.code(),
                status.message()
            )
        };
        Self::new(code, message)
    }
}
