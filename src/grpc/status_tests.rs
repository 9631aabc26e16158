//! The error table's tests: every error through the table, and no
//! `Status` built anywhere else.

use super::*;

fn rejected(rejection: Rejection) -> ServiceError {
    EnqueueError::Rejected(rejection).into()
}

/// One of every error, with the code and message a client sees. The
/// messages are the ones the integration and client tests match on.
fn every_error() -> Vec<(ServiceError, Code, &'static str)> {
    use Code::*;
    let second = Duration::from_secs(30);
    let reload = ReloadError("`capacity`: must be between 1 and 1024".into());
    vec![
        (
            rejected(Rejection::BadName(ConsumerNameError::Empty)),
            InvalidArgument,
            "consumer name is empty; give 1 to 64 characters of [A-Za-z0-9._-]",
        ),
        (
            rejected(Rejection::UnknownConsumer("x".into())),
            PermissionDenied,
            "consumer \"x\" is not in the broker's configuration and strict_consumers is on",
        ),
        (
            rejected(Rejection::UnknownGpu("7".into(), "GPUs 0 and 1".into())),
            InvalidArgument,
            "no GPU is \"7\"; the broker has GPUs 0 and 1",
        ),
        (
            rejected(Rejection::TooLarge {
                need_mib: 9,
                total_mib: 8,
            }),
            ResourceExhausted,
            "the request needs 9 MiB but the largest GPU it may use has 8 MiB",
        ),
        (
            EnqueueError::ShuttingDown.into(),
            Unavailable,
            "the broker is shutting down",
        ),
        (
            EnqueueError::QueueFull {
                waiting: 3,
                whose: String::new(),
                key: "max_waiters",
            }
            .into(),
            ResourceExhausted,
            "queue full: 3 requests wait already, the most `limits.max_waiters` allows",
        ),
        (
            RequestError::NoAcquireInTime(second).into(),
            InvalidArgument,
            "no `acquire` within 30 s of opening AcquireLease",
        ),
        (
            RequestError::FirstNotAcquire.into(),
            InvalidArgument,
            "the first message of AcquireLease must be `acquire`",
        ),
        (
            RequestError::EndedBeforeAcquire.into(),
            InvalidArgument,
            "AcquireLease ended before its `acquire` message",
        ),
        (
            RequestError::NotReleaseWhileWaiting.into(),
            InvalidArgument,
            "only `release` may follow `acquire` on an AcquireLease stream",
        ),
        (
            RequestError::NotReleaseWhileHolding.into(),
            InvalidArgument,
            "only `release` may follow `acquire` on an AcquireLease stream; the lease has ended",
        ),
        (
            RequestError::FirstNotHello.into(),
            InvalidArgument,
            "the first message of Residency must be `hello`",
        ),
        (
            RequestError::NotUnloaded.into(),
            InvalidArgument,
            "only `unloaded` may follow `hello` on a Residency stream",
        ),
        (
            RequestError::BadName(ConsumerNameError::BadChar(' ')).into(),
            InvalidArgument,
            "consumer name has ' '; only [A-Za-z0-9._-] is allowed",
        ),
        (
            RequestError::NotALeaseId("x".into()).into(),
            InvalidArgument,
            "\"x\" is not a lease id (EPOCH-TOKEN, as in Granted.lease_id)",
        ),
        (
            RequestError::NoLeaseNamed.into(),
            InvalidArgument,
            "name the lease by lease_id or fencing_token",
        ),
        (
            LimitError::TooManyLabels { count: 3, max: 2 }.into(),
            InvalidArgument,
            "3 labels, more than `limits.max_labels` (2) allows",
        ),
        (
            LimitError::EmptyLabelKey.into(),
            InvalidArgument,
            "a label key is empty",
        ),
        (
            LimitError::LabelKeyTooLong {
                prefix: "k".into(),
                bytes: 9,
                max: 8,
            }
            .into(),
            InvalidArgument,
            "the label key \"k\"… is 9 bytes, more than `limits.max_label_key_bytes` (8) allows",
        ),
        (
            LimitError::LabelValueTooLong {
                prefix: "k".into(),
                bytes: 9,
                max: 8,
            }
            .into(),
            InvalidArgument,
            "the value of label \"k\" is 9 bytes, more than `limits.max_label_value_bytes` (8) allows",
        ),
        (
            LimitError::MessageTooLarge { max: 64 }.into(),
            ResourceExhausted,
            "message too large: more than `limits.max_message_bytes` (64 bytes) allows",
        ),
        (
            SessionError::ShuttingDown.into(),
            Unavailable,
            "the broker is shutting down",
        ),
        (
            SessionError::NotGrantedInTime(Duration::from_millis(150)).into(),
            DeadlineExceeded,
            "not granted within max_wait_ms (150 ms)",
        ),
        (
            SessionError::Revoked(RevokeReason::Shutdown).into(),
            Unavailable,
            "lease revoked: the broker is shutting down",
        ),
        (
            SessionError::Revoked(RevokeReason::MaxHoldExceeded).into(),
            Aborted,
            "lease revoked: held longer than the broker's max_hold",
        ),
        (
            SessionError::Revoked(RevokeReason::Admin).into(),
            Aborted,
            "lease revoked by an operator",
        ),
        (
            SessionError::Revoked(RevokeReason::Preempted).into(),
            Aborted,
            "lease revoked: preempted for a waiter of higher priority",
        ),
        (
            ReloadCallError::Unsupported.into(),
            Unimplemented,
            "this broker cannot reload",
        ),
        (
            ReloadCallError::Refused(reload).into(),
            FailedPrecondition,
            "the configuration is not valid, so the running one is kept: `capacity`: must be between 1 and 1024",
        ),
        (
            ReloadCallError::Failed("it panicked".into()).into(),
            Internal,
            "the reload failed: it panicked",
        ),
        (
            AuthError::MalformedHeader.into(),
            Unauthenticated,
            "the authorization header is not `Bearer TOKEN`",
        ),
        (
            AuthError::UnknownToken.into(),
            Unauthenticated,
            "unknown token",
        ),
        (
            AuthError::TokenOfAnother {
                owner: "a".into(),
                consumer: "b".into(),
            }
            .into(),
            PermissionDenied,
            "the token belongs to consumer \"a\", not \"b\"",
        ),
        (
            AuthError::UnixUserRefused {
                uid: 1000,
                consumer: "b".into(),
            }
            .into(),
            PermissionDenied,
            "uid 1000 may not act as consumer \"b\" (unix_users/unix_groups)",
        ),
        (
            AuthError::NeedsOwnToken {
                consumer: "b".into(),
            }
            .into(),
            Unauthenticated,
            "consumer \"b\" needs its token",
        ),
        (
            AuthError::TokenRequired.into(),
            Unauthenticated,
            "this broker requires `authorization: Bearer TOKEN`",
        ),
        (
            AuthError::UnixSocketOnly {
                consumer: "b".into(),
            }
            .into(),
            PermissionDenied,
            "consumer \"b\" may only be used over the Unix socket",
        ),
        (
            AuthError::StatusNeedsToken.into(),
            Unauthenticated,
            "Status needs a token on this broker (auth.status_requires_token)",
        ),
        (
            AuthError::OperatorUnidentified.into(),
            Unauthenticated,
            "operator calls need the admin token, or the Unix socket as the broker's user",
        ),
        (
            AuthError::NotOperator.into(),
            PermissionDenied,
            "operator calls need the admin token, or the Unix socket as the broker's user",
        ),
        (
            ServiceError::Transport(Status::unknown("h2 protocol error")),
            Unknown,
            "h2 protocol error",
        ),
    ]
}

/// Which source an error comes from, by an exhaustive match: a new
/// source fails to compile here until it is given a name and samples.
fn source(error: &ServiceError) -> &'static str {
    match error {
        ServiceError::Enqueue(_) => "broker",
        ServiceError::Request(_) => "request",
        ServiceError::Limit(_) => "limits",
        ServiceError::Session(_) => "session",
        ServiceError::Reload(_) => "reload",
        ServiceError::Auth(_) => "auth",
        ServiceError::Transport(_) => "transport",
    }
}

#[test]
fn every_error_has_its_row() {
    for (error, code, message) in every_error() {
        let described = format!("{error:?}");
        let status = Status::from(error);
        assert_eq!(status.code(), code, "{described}");
        assert_eq!(status.message(), message, "{described}");
    }
}

#[test]
fn codes_clients_trust_come_only_from_the_broker() {
    let sources: std::collections::BTreeSet<_> =
        every_error().iter().map(|(e, _, _)| source(e)).collect();
    assert_eq!(sources.len(), 7, "a source without samples: {sources:?}");
    for (error, code, _) in every_error() {
        let from = source(&error);
        if matches!(
            code,
            Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound | Code::Aborted
        ) {
            assert!(
                matches!(from, "broker" | "request" | "limits" | "session" | "reload"),
                "{error:?} gives {code:?}"
            );
        }
        if from == "auth" {
            assert!(
                matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                "{error:?} gives {code:?}"
            );
        }
    }
}

/// No module but this one builds a `Status`: every other place returns a
/// typed error and converts through the table.
#[test]
fn no_status_is_built_outside_the_table() {
    const BUILDERS: &[&str] = &[
        "new",
        "with_details",
        "with_metadata",
        "with_details_and_metadata",
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
        "from_error",
    ];
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = [src.join("grpc/status.rs"), src.join("grpc/status_tests.rs")];
    let mut offenders = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            // The benchmark's baseline server is its own program.
            if path.is_dir() && path != src.join("bin") {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !table.contains(&path) {
                let text = std::fs::read_to_string(&path).unwrap();
                for (number, line) in text.lines().enumerate() {
                    let built = BUILDERS
                        .iter()
                        .any(|b| line.contains(&format!("Status::{b}(")));
                    if built {
                        offenders.push(format!("{}:{}: {line}", path.display(), number + 1));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "a Status built outside the table:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn an_oversized_unary_request_is_rewritten() {
    let response = tonic::codegen::http::Response::builder()
        .header("grpc-status", "11")
        .header("grpc-message", "decoded%20message%20length%20too%20large")
        .body(())
        .unwrap();
    let rewritten = rewrite_too_large(response, 64);
    let headers = rewritten.headers();
    assert_eq!(headers["grpc-status"], "8");
    assert_eq!(
        headers["grpc-message"],
        "message too large: more than `limits.max_message_bytes` (64 bytes) allows"
    );
}
