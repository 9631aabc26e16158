//! The worker processes that the workload starts, kills and freezes: this
//! same binary, re-executed with `GPULEASE_HISTORY_WORKER` set.
//!
//! - `client`: one `AcquireLease` call of its own. Once granted it reads
//!   the fenced counter, works for a while, writes the value plus one and
//!   releases. Like a careless process, it does not watch for the loss of
//!   its lease while it works: a worker frozen with SIGSTOP and woken after
//!   the broker gave its lease away still writes, and the counter's token
//!   check must refuse it.
//! - `command`: the command of `gpulease run`, which learns its token from
//!   `GPULEASE_FENCING_TOKEN`, and otherwise does the same.
//!
//! Both record what they see in their own history file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::counter::Counter;
use crate::history::{ClientKind, Ev, Recorder};

/// Selects worker mode and its role.
pub(crate) const ROLE: &str = "GPULEASE_HISTORY_WORKER";
/// The consumer name of the call.
pub(crate) const OP: &str = "GPULEASE_HISTORY_OP";
/// The history file to append to.
pub(crate) const FILE: &str = "GPULEASE_HISTORY_FILE";
/// The counter file, if the workload has one.
pub(crate) const COUNTER: &str = "GPULEASE_HISTORY_COUNTER";
/// The broker's address (`client` only).
pub(crate) const ADDR: &str = "GPULEASE_HISTORY_ADDR";
/// The broker generation (`client` only).
pub(crate) const INSTANCE: &str = "GPULEASE_HISTORY_INSTANCE";
/// How long to hold, in milliseconds.
pub(crate) const HOLD_MS: &str = "GPULEASE_HISTORY_HOLD_MS";
/// `Acquire.max_wait_ms` (`client` only).
pub(crate) const MAX_WAIT_MS: &str = "GPULEASE_HISTORY_MAX_WAIT_MS";

/// Runs the worker `role`; the process exits with what this returns.
pub(crate) fn main(role: &str) -> ExitCode {
    let env = |key: &str| std::env::var(key).unwrap_or_default();
    let number = |key: &str| env(key).parse::<u64>().unwrap_or(0);
    let op = env(OP);
    let recorder = match Recorder::file(&PathBuf::from(env(FILE))) {
        Ok(recorder) => recorder,
        Err(e) => {
            eprintln!("history worker: cannot open its history file: {e}");
            return ExitCode::from(70);
        }
    };
    let counter = std::env::var_os(COUNTER).map(|path| Counter::open(&PathBuf::from(path)));
    let hold = Duration::from_millis(number(HOLD_MS));
    match role {
        "client" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(client(
                &recorder,
                &op,
                &env(ADDR),
                u32::try_from(number(INSTANCE)).unwrap_or(0),
                u32::try_from(number(MAX_WAIT_MS)).unwrap_or(0),
                counter.as_ref(),
                hold,
            ));
            ExitCode::SUCCESS
        }
        "command" => {
            let token = number("GPULEASE_FENCING_TOKEN");
            recorder.record(
                &op,
                Ev::Granted {
                    token,
                    lease_id: env("GPULEASE_LEASE_ID"),
                    epoch: number("GPULEASE_BROKER_EPOCH"),
                },
            );
            work(&recorder, &op, counter.as_ref(), token, hold);
            recorder.record(&op, Ev::CommandExit);
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("history worker: unknown role {role:?}");
            ExitCode::from(64)
        }
    }
}

/// Reads the counter, works for `hold`, writes the value plus one.
fn work(recorder: &Recorder, op: &str, counter: Option<&Counter>, token: u64, hold: Duration) {
    let read = counter.map(|counter| counter.read(token).ok().flatten());
    if let Some(value) = read {
        recorder.record(op, Ev::Read { token, value });
    }
    std::thread::sleep(hold);
    if let (Some(counter), Some(Some(value))) = (counter, read) {
        let accepted = counter.write(token, value + 1).unwrap_or(false);
        recorder.record(
            op,
            Ev::Write {
                token,
                value: value + 1,
                accepted,
            },
        );
    }
}

async fn client(
    recorder: &Recorder,
    op: &str,
    addr: &str,
    instance: u32,
    max_wait_ms: u32,
    counter: Option<&Counter>,
    hold: Duration,
) {
    let pid = std::process::id();
    recorder.record(
        op,
        Ev::Invoke {
            instance,
            pid,
            max_wait_ms,
            client: ClientKind::Worker,
        },
    );
    let ended = |code: String| {
        recorder.record(op, Ev::Ended { code });
    };
    let mut client = match crate::broker::connect(addr).await {
        Ok(client) => client,
        Err(_) => return ended("unreachable".to_owned()),
    };
    let (requests, outgoing) = mpsc::channel(4);
    let acquire = pb::Acquire {
        consumer: op.to_owned(),
        max_wait_ms,
        client_pid: pid,
        ..pb::Acquire::default()
    };
    let _ = requests
        .send(pb::LeaseRequest {
            kind: Some(RequestKind::Acquire(acquire)),
        })
        .await;
    let mut events = match client.acquire_lease(ReceiverStream::new(outgoing)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return ended(code_name(&status)),
    };
    let mut first = true;
    let token = loop {
        match events.message().await {
            Ok(Some(event)) => {
                if std::mem::take(&mut first) {
                    recorder.record(op, Ev::FirstEvent);
                }
                if let Some(EventKind::Granted(granted)) = event.kind {
                    recorder.record(
                        op,
                        Ev::Granted {
                            token: granted.fencing_token,
                            lease_id: granted.lease_id,
                            epoch: granted.broker_epoch,
                        },
                    );
                    break granted.fencing_token;
                }
            }
            Ok(None) => return ended("ok".to_owned()),
            Err(status) => return ended(code_name(&status)),
        }
    };
    // Blocking on purpose: this process works without looking at its lease.
    work(recorder, op, counter, token, hold);
    recorder.record(op, Ev::ReleaseSent);
    let _ = requests
        .send(pb::LeaseRequest {
            kind: Some(RequestKind::Release(pb::Release {})),
        })
        .await;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return "ok".to_owned(),
                Err(status) => return code_name(&status),
            }
        }
    })
    .await;
    ended(end.unwrap_or_else(|_| "no_end".to_owned()));
}

/// A gRPC status code as the history spells it.
pub(crate) fn code_name(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}
