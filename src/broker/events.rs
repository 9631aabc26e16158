//! The broker's log lines and the metrics of its decisions. Events are
//! collected under the core's lock, each with a sequence number taken there
//! (`seq=`, the order of the decisions), and written once it is released.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Broker, Grant, memory_lock};
use crate::core::{EndedLease, FencingToken, LeaseEnd, Preemption, UnloadRequest};
use crate::metrics::UnloadResult;

/// A log line to write once the lock is released.
///
/// Each carries a sequence number taken under the lock, so that a reader of
/// the log can restore the order of the decisions even where two threads'
/// lines come out interleaved.
pub(super) enum Event {
    Granted(u64, String, Grant),
    /// The lease, how it ended, and its id.
    Ended(u64, EndedLease, LeaseEnd, String),
    PreemptRequested(u64, String, Preemption),
    Preempted(u64, String),
    /// Only after about 2^64 grants: grants stop at the ceiling.
    TokensUsedUp,
}

impl Broker {
    /// Writes the log lines of decisions taken under the lock, and counts
    /// them in the metrics; called once the lock is released.
    pub(super) fn emit(&self, log: Vec<Event>) {
        for event in &log {
            match event {
                Event::Granted(_, consumer, grant) => {
                    self.metrics
                        .granted(grant.gpu_index, consumer, grant.waited);
                }
                Event::Ended(_, ended, how, _) => {
                    self.metrics.ended(
                        ended.gpu_index,
                        &ended.consumer,
                        end_name(*how),
                        ended.held,
                    );
                }
                Event::PreemptRequested(..) | Event::Preempted(..) | Event::TokensUsedUp => {}
            }
        }
        write(log);
    }

    /// Remembers that `request` was sent, to count how it ends.
    pub(super) fn unload_sent(&self, request: &UnloadRequest) {
        memory_lock(&self.pending_unloads)
            .entry((request.gpu_index, request.consumer.clone()))
            .or_insert_with(Instant::now);
    }

    /// The adapter for `request` failed: counted as an error now.
    pub(super) fn unload_failed(&self, request: &UnloadRequest) {
        let sent = memory_lock(&self.pending_unloads)
            .remove(&(request.gpu_index, request.consumer.clone()));
        if sent.is_some() {
            self.metrics.unload(
                request.gpu_index,
                &request.consumer,
                UnloadResult::Error,
                None,
            );
        }
    }

    /// Settles the unload requests whose resident is gone (`unloaded`) or
    /// whose deadline passed (`timeout`). Cheap when none is pending, which
    /// is nearly always; called by the memory poller, never on the grant
    /// path.
    pub(super) fn settle_unloads(&self) {
        let mut pending = memory_lock(&self.pending_unloads);
        if pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let still: Vec<bool> = {
            let state = self.lock();
            pending
                .keys()
                .map(|(gpu, consumer)| state.sched.is_resident(*gpu, consumer))
                .collect()
        };
        let timeout = self.unload_timeout();
        let mut settled = Vec::new();
        for (((gpu, consumer), sent), resident) in pending.iter().zip(still) {
            let took = now.saturating_duration_since(*sent);
            if !resident {
                settled.push((*gpu, consumer.clone(), UnloadResult::Unloaded, Some(took)));
            } else if took >= timeout {
                settled.push((*gpu, consumer.clone(), UnloadResult::Timeout, None));
            }
        }
        for (gpu, consumer, result, took) in settled {
            pending.remove(&(gpu, consumer.clone()));
            self.metrics.unload(gpu, &consumer, result, took);
        }
    }
}

fn write(log: Vec<Event>) {
    for event in log {
        match event {
            Event::Granted(seq, consumer, grant) => {
                info!(
                    seq,
                    %consumer,
                    lease_id = %grant.lease_id,
                    token = grant.token.0,
                    waited_ms = millis(grant.waited),
                    "granted"
                );
                // The worst place for a bug: the lease is made, and its
                // holder has not heard of it yet.
                assert!(
                    !fail_point("grant"),
                    "fail point `grant` (GPULEASE_FAIL_POINT)"
                );
            }
            Event::Ended(seq, ended, how, lease_id) => {
                let how = end_name(how);
                if matches!(how, "released" | "half_closed" | "unclaimed") {
                    info!(seq, consumer = %ended.consumer, %lease_id, token = ended.token.0,
                        waited_ms = millis(ended.waited), held_ms = millis(ended.held), how, "lease ended");
                } else {
                    warn!(seq, consumer = %ended.consumer, %lease_id, token = ended.token.0,
                        waited_ms = millis(ended.waited), held_ms = millis(ended.held), how, "lease ended");
                }
            }
            Event::PreemptRequested(seq, lease_id, p) => warn!(
                seq,
                consumer = %p.consumer,
                %lease_id,
                token = p.token.0,
                for_consumer = %p.for_consumer,
                grace_ms = millis(p.grace),
                "asked a preemptible holder to make way"
            ),
            Event::Preempted(seq, lease_id) => warn!(
                seq,
                %lease_id,
                "a preemptible holder did not release within its grace; revoking"
            ),
            Event::TokensUsedUp => {
                tracing::error!(
                    "the fencing tokens are used up; grants stop at the current ceiling"
                );
            }
        }
    }
}

/// Whether the fault `name` is to be injected: `GPULEASE_FAIL_POINT=name`,
/// honoured in debug builds only, so that the tests can show what a bug at
/// that point does to the process (it aborts: see `main`'s panic hook).
fn fail_point(name: &str) -> bool {
    static FAIL_POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    cfg!(debug_assertions)
        && FAIL_POINT
            .get_or_init(|| std::env::var("GPULEASE_FAIL_POINT").ok())
            .as_deref()
            == Some(name)
}

/// The name of a way a lease ends, as logs and metrics spell it.
pub(crate) fn end_name(how: LeaseEnd) -> &'static str {
    match how {
        LeaseEnd::Released => "released",
        LeaseEnd::HalfClosed => "half_closed",
        LeaseEnd::Disconnected => "disconnected",
        LeaseEnd::Unclaimed => "unclaimed",
        LeaseEnd::Revoked(crate::core::RevokeReason::Shutdown) => "revoked_shutdown",
        LeaseEnd::Revoked(crate::core::RevokeReason::MaxHoldExceeded) => "revoked_max_hold",
        LeaseEnd::Revoked(crate::core::RevokeReason::Admin) => "revoked_admin",
        LeaseEnd::Revoked(crate::core::RevokeReason::Preempted) => "revoked_preempted",
    }
}

/// The id of the lease granted with `token` by the broker of `epoch`.
pub(crate) fn lease_id(epoch: u64, token: FencingToken) -> String {
    format!("{epoch:x}-{}", token.0)
}

/// Whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
