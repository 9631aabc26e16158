//! What a held lease carries: its particulars, and the broker's word to its
//! session outside its own stream (a request to make way, a revocation).
//! The core keeps one [`Revocation`] with each held lease as its payload.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::{FencingToken, RevokeReason};

/// A granted lease's particulars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    /// The lease's id: the broker's epoch and the token.
    pub lease_id: String,
    /// The fencing token.
    pub token: FencingToken,
    /// The broker's epoch.
    pub epoch: u64,
    /// How long the request waited.
    pub waited: Duration,
    /// When it was granted.
    pub granted_at: Instant,
    /// The granted GPU's index.
    pub gpu_index: u32,
    /// The granted GPU's UUID; empty when unknown.
    pub gpu_uuid: String,
    /// Fires when the broker asks the holder to make way, and when an
    /// operator or a preemption revokes the lease.
    pub revocation: Arc<Revocation>,
}

/// The broker's word to one lease's session, outside its own stream: a
/// request to make way (preemption), and a revocation (by an operator, or
/// after a preemption's grace). Each happens at most once.
#[derive(Debug, Default)]
pub(crate) struct Revocation {
    pub(super) fired: CancellationToken,
    reason: std::sync::OnceLock<(RevokeReason, String)>,
    preempt_asked: CancellationToken,
    preempt: std::sync::OnceLock<PreemptNotice>,
}

/// A request to a preemptible holder to make way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PreemptNotice {
    /// How long it has to release.
    pub grace: Duration,
    /// Who it makes way for.
    pub for_consumer: String,
}

impl PartialEq for Revocation {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Revocation {}

impl Revocation {
    /// Resolves once the lease is revoked. Cancel-safe.
    pub(crate) async fn fired(&self) {
        self.fired.cancelled().await;
    }

    /// Why it was revoked (an operator's, unless a preemption's), and the
    /// operator's message.
    pub(crate) fn reason(&self) -> (RevokeReason, &str) {
        self.reason
            .get()
            .map_or((RevokeReason::Admin, ""), |(reason, message)| {
                (*reason, message.as_str())
            })
    }

    /// Resolves once the holder is asked to make way; see
    /// [`Revocation::preempt_notice`]. Cancel-safe.
    pub(crate) async fn preempt_requested(&self) {
        self.preempt_asked.cancelled().await;
    }

    /// The request to make way, once asked.
    pub(crate) fn preempt_notice(&self) -> Option<&PreemptNotice> {
        self.preempt.get()
    }

    /// Revokes the lease, once; later calls change nothing.
    pub(super) fn fire(&self, reason: RevokeReason, message: &str) {
        let _ = self.reason.set((reason, message.to_owned()));
        self.fired.cancel();
    }

    pub(super) fn ask_to_preempt(&self, notice: PreemptNotice) {
        if self.preempt.set(notice).is_ok() {
            self.preempt_asked.cancel();
        }
    }
}
