//! What the clients saw: one entry per step of an `AcquireLease` call,
//! stamped with the system-wide monotonic clock. In-process clients keep
//! their entries in memory; worker processes, which may be killed at any
//! moment, append each entry to a file with a single `write`, so that what
//! they recorded before a `SIGKILL` survives it.
//!
//! Every call has its own consumer name (its "op"), so that the broker's log
//! lines, which name the consumer, can be matched to the client's view.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use gpulease_testkit::clock::now_ns;

/// Who made a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientKind {
    /// A tonic client task inside the test process.
    InProcess,
    /// An in-process client whose connection goes through the test's proxy.
    Proxied,
    /// A worker process (this binary, re-executed).
    Worker,
    /// `gpulease run` around a worker command.
    Cli,
}

/// A fault the test injected into a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    /// SIGKILL.
    Kill,
    /// SIGSTOP.
    Stop,
    /// SIGCONT after a stop.
    Cont,
    /// The proxy stopped forwarding the client's connection both ways.
    Blackhole,
    /// SIGKILL of a process still alive when the workload ended.
    CleanupKill,
}

impl FaultKind {
    /// Whether the fault cuts the client off from the broker.
    pub(crate) fn loses_contact(self) -> bool {
        !matches!(self, Self::Cont)
    }
}

/// One step of a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Ev {
    /// About to open the call (recorded before anything is sent).
    Invoke {
        /// The broker generation (start) the call goes to.
        instance: u32,
        /// The process making the call.
        pid: u32,
        /// `Acquire.max_wait_ms`.
        max_wait_ms: u32,
        /// Who makes the call.
        client: ClientKind,
    },
    /// The first event (`Queued` or `Granted`) arrived: the request is in
    /// the queue.
    FirstEvent,
    /// `Granted` arrived.
    Granted {
        /// Its fencing token.
        token: u64,
        /// Its lease id.
        lease_id: String,
        /// Its broker epoch.
        epoch: u64,
    },
    /// About to send `Release` (or half-close) while holding.
    ReleaseSent,
    /// About to send `Release` (or half-close) while waiting.
    CancelSent,
    /// About to drop the call (a cancel), waiting or holding.
    Dropped,
    /// The call ended: `ok`, or the gRPC code (or why it never started).
    Ended {
        /// `ok` or a code name.
        code: String,
    },
    /// The test injected a fault (recorded before the signal is sent).
    Fault {
        /// Which.
        fault: FaultKind,
    },
    /// A read of the fenced counter.
    Read {
        /// The token presented.
        token: u64,
        /// The value read; `None` when the token was refused.
        value: Option<u64>,
    },
    /// A write of the fenced counter.
    Write {
        /// The token presented.
        token: u64,
        /// The value written.
        value: u64,
        /// Whether the counter accepted it.
        accepted: bool,
    },
    /// The command under `gpulease run` is about to exit (its lease is
    /// released after this).
    CommandExit,
}

/// One recorded step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// `CLOCK_MONOTONIC`, nanoseconds.
    pub(crate) t: u64,
    /// The call's consumer name.
    pub(crate) op: String,
    /// What happened.
    pub(crate) ev: Ev,
}

/// Where entries go.
#[derive(Clone, Debug)]
pub(crate) enum Recorder {
    /// Kept in memory.
    Memory(Arc<Mutex<Vec<Entry>>>),
    /// Appended to a file, one JSON line per `write`.
    File(Arc<Mutex<File>>),
}

impl Recorder {
    /// An in-memory recorder.
    pub(crate) fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// A recorder appending to `path`.
    pub(crate) fn file(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::File(Arc::new(Mutex::new(file))))
    }

    /// Records `ev` for `op` now, and returns the time.
    pub(crate) fn record(&self, op: &str, ev: Ev) -> u64 {
        let t = now_ns();
        self.record_at(t, op, ev);
        t
    }

    /// Records `ev` for `op` at `t`.
    pub(crate) fn record_at(&self, t: u64, op: &str, ev: Ev) {
        let entry = Entry {
            t,
            op: op.to_owned(),
            ev,
        };
        match self {
            Self::Memory(entries) => entries.lock().unwrap().push(entry),
            Self::File(file) => {
                let mut line = serde_json::to_string(&entry).expect("entries serialize");
                line.push('\n');
                // One write per entry: a kill between entries loses none.
                let _ = file.lock().unwrap().write_all(line.as_bytes());
            }
        }
    }

    /// Everything recorded in memory so far.
    pub(crate) fn entries(&self) -> Vec<Entry> {
        match self {
            Self::Memory(entries) => entries.lock().unwrap().clone(),
            Self::File(_) => Vec::new(),
        }
    }
}

/// Every entry in the `*.jsonl` files of `dir`. A line cut short by a kill
/// is skipped.
pub(crate) fn load_dir(dir: &Path) -> Vec<Entry> {
    let mut entries = Vec::new();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return entries;
    };
    for file in listing.flatten() {
        if file.path().extension().is_some_and(|e| e == "jsonl")
            && let Ok(text) = std::fs::read_to_string(file.path())
        {
            entries.extend(
                text.lines()
                    .filter_map(|line| serde_json::from_str(line).ok()),
            );
        }
    }
    entries
}

/// A grant as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    /// When it arrived.
    pub(crate) t: u64,
    /// Its token.
    pub(crate) token: u64,
    /// Its lease id.
    pub(crate) lease_id: String,
    /// Its epoch.
    pub(crate) epoch: u64,
}

/// One call, folded from its entries.
#[derive(Clone, Debug, Default)]
pub(crate) struct Op {
    /// The consumer name.
    pub(crate) name: String,
    /// Who made it.
    pub(crate) client: Option<ClientKind>,
    /// The broker generation it went to.
    pub(crate) instance: u32,
    /// The calling process.
    pub(crate) pid: u32,
    /// `Acquire.max_wait_ms`.
    pub(crate) max_wait_ms: u32,
    /// Before the call was opened: a lower bound of its enqueue.
    pub(crate) invoke: Option<u64>,
    /// After the first event arrived: an upper bound of its enqueue.
    pub(crate) first_event: Option<u64>,
    /// The grant, as seen: `t` is an upper bound of the grant.
    pub(crate) granted: Option<Seen>,
    /// Before `Release` was sent while holding.
    pub(crate) release_sent: Option<u64>,
    /// Before `Release` was sent while waiting.
    pub(crate) cancel_sent: Option<u64>,
    /// Before the call was dropped.
    pub(crate) dropped: Option<u64>,
    /// When the client saw the call end, and how.
    pub(crate) ended: Option<(u64, String)>,
    /// Faults injected into the client, in time order.
    pub(crate) faults: Vec<(u64, FaultKind)>,
    /// Counter reads: time, token, value (`None`: refused).
    pub(crate) reads: Vec<(u64, u64, Option<u64>)>,
    /// Counter writes: time, token, value, accepted.
    pub(crate) writes: Vec<(u64, u64, u64, bool)>,
    /// When the command under `gpulease run` exited.
    pub(crate) command_exit: Option<u64>,
}

impl Op {
    /// The first fault that cut the client off from the broker.
    pub(crate) fn fault_at(&self) -> Option<(u64, FaultKind)> {
        self.faults
            .iter()
            .copied()
            .filter(|(_, kind)| kind.loses_contact())
            .min()
    }

    /// When the client saw its cancel complete: it sent `Release` while
    /// waiting and the call then ended OK without a grant.
    pub(crate) fn cancel_completed(&self) -> Option<u64> {
        let (t, code) = self.ended.as_ref()?;
        (self.cancel_sent.is_some() && self.granted.is_none() && code == "ok").then_some(*t)
    }

    /// The earliest moment at which the client, the clock or a fault could
    /// have ended this request's wait, as far as the client knows; `None`
    /// when nothing the client knows of ended it (it then cannot be judged).
    pub(crate) fn wait_end_lower_bound(&self, instance_death: Option<u64>) -> Option<u64> {
        let expiry = (self.max_wait_ms > 0)
            .then(|| {
                self.invoke
                    .map(|t| t + u64::from(self.max_wait_ms) * 1_000_000)
            })
            .flatten();
        [
            self.cancel_sent,
            self.dropped,
            self.fault_at().map(|(t, _)| t),
            expiry,
            instance_death,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When the client or a fault ended the lease, at the earliest, for a
    /// lease the broker says ended `how`; `None` without such evidence.
    ///
    /// A release can only end a lease after it was sent. A disconnect is
    /// attributed to a fault or a drop only when the client had not already
    /// seen its call end before it (a broker that dropped the lease on its
    /// own would be seen that way).
    pub(crate) fn end_lower_bound(&self, how: &str) -> Option<u64> {
        match how {
            "released" | "half_closed" => {
                self.release_sent.or(self.cancel_sent).or(self.command_exit)
            }
            "disconnected" => {
                let cause = [self.dropped, self.fault_at().map(|(t, _)| t)]
                    .into_iter()
                    .flatten()
                    .min()?;
                match &self.ended {
                    Some((seen, _)) if *seen < cause => None,
                    _ => Some(cause),
                }
            }
            _ => None,
        }
    }
}

/// Folds entries into calls, by consumer name.
pub(crate) fn fold(mut entries: Vec<Entry>) -> BTreeMap<String, Op> {
    entries.sort_by_key(|e| e.t);
    let mut ops: BTreeMap<String, Op> = BTreeMap::new();
    for Entry { t, op, ev } in entries {
        let record = ops.entry(op.clone()).or_insert_with(|| Op {
            name: op,
            ..Op::default()
        });
        match ev {
            Ev::Invoke {
                instance,
                pid,
                max_wait_ms,
                client,
            } => {
                record.client = Some(client);
                record.instance = instance;
                record.pid = pid;
                record.max_wait_ms = max_wait_ms;
                record.invoke = Some(t);
            }
            Ev::FirstEvent => {
                record.first_event.get_or_insert(t);
            }
            Ev::Granted {
                token,
                lease_id,
                epoch,
            } => {
                record.first_event.get_or_insert(t);
                record.granted = Some(Seen {
                    t,
                    token,
                    lease_id,
                    epoch,
                });
            }
            Ev::ReleaseSent => {
                record.release_sent.get_or_insert(t);
            }
            Ev::CancelSent => {
                record.cancel_sent.get_or_insert(t);
            }
            Ev::Dropped => {
                record.dropped.get_or_insert(t);
            }
            Ev::Ended { code } => {
                record.ended.get_or_insert((t, code));
            }
            Ev::Fault { fault } => record.faults.push((t, fault)),
            Ev::Read { token, value } => record.reads.push((t, token, value)),
            Ev::Write {
                token,
                value,
                accepted,
            } => record.writes.push((t, token, value, accepted)),
            Ev::CommandExit => {
                record.command_exit.get_or_insert(t);
            }
        }
    }
    ops
}
