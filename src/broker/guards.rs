//! The guards that make cancellation safe: a [`Ticket`] is a place in the
//! queue and a [`Lease`] a held permit; dropping either (a task cancelled at
//! any `.await`) gives it back. [`SessionGuard`] counts the streams being
//! served, for shutdown.

use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{Broker, Grant, QueuePosition, Revocation};
use crate::core::{LeaseEnd, WaiterId, Withdrawal};

/// A stream being served; see [`Broker::session`].
#[derive(Debug)]
pub(crate) struct SessionGuard {
    pub(super) broker: Arc<Broker>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.broker
            .sessions
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A place in the queue. Dropping it gives the place up (and ends the lease
/// if it was granted in the meantime), so a cancelled task leaks nothing.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(super) broker: Arc<Broker>,
    pub(super) id: WaiterId,
    /// `None` once the channel has delivered or closed.
    pub(super) grant: Option<oneshot::Receiver<Grant>>,
    /// Whether the request had to wait when it was enqueued.
    pub(super) waited: bool,
    pub(super) positions: PositionUpdates,
    pub(super) done: bool,
}

/// A waiting request's position, as the periodic sweep updates it.
#[derive(Debug)]
pub(crate) struct PositionUpdates {
    pub(super) receiver: watch::Receiver<QueuePosition>,
    pub(super) last: QueuePosition,
}

impl PositionUpdates {
    /// Where the request stood when last looked at.
    pub(crate) fn current(&self) -> &QueuePosition {
        &self.last
    }

    /// Waits until the position improves, and returns it.
    ///
    /// Cancel-safe: dropping the future loses nothing. Pends forever once
    /// the request no longer waits, so it can sit in a `select!` beside
    /// [`Ticket::granted`].
    pub(crate) async fn improved(&mut self) -> &QueuePosition {
        loop {
            if self.receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let latest = self.receiver.borrow_and_update().clone();
            if latest.position < self.last.position || latest.blocked_by != self.last.blocked_by {
                self.last = latest;
                return &self.last;
            }
        }
    }
}

impl Ticket {
    /// Whether the request had to wait: no permit was free when it arrived.
    /// Such a request is told `Queued` first, even if its grant follows a
    /// moment later.
    pub(crate) fn had_to_wait(&self) -> bool {
        self.waited
    }

    /// The request's position updates, to await beside [`Ticket::granted`].
    /// Only the first call gets them; later calls get a stream that never
    /// changes.
    pub(crate) fn take_positions(&mut self) -> PositionUpdates {
        let (_, idle) = watch::channel(self.positions.last.clone());
        let last = self.positions.last.clone();
        std::mem::replace(
            &mut self.positions,
            PositionUpdates {
                receiver: idle,
                last,
            },
        )
    }

    /// Waits for the grant. Returns `None` if the broker withdrew the
    /// request (it is shutting down).
    ///
    /// Cancel-safe: dropping the future keeps the place in the queue; only
    /// dropping the `Ticket` gives it up.
    pub(crate) async fn granted(&mut self) -> Option<Lease> {
        let result = self.grant.as_mut()?.await;
        self.grant = None;
        self.done = result.is_ok();
        Some(self.lease(result.ok()?))
    }

    /// The grant, if it has already been made.
    pub(crate) fn try_granted(&mut self) -> Option<Lease> {
        let grant = self.take_grant()?;
        self.done = true;
        Some(self.lease(grant))
    }

    fn take_grant(&mut self) -> Option<Grant> {
        match self.grant.as_mut()?.try_recv() {
            Ok(grant) => {
                self.grant = None;
                Some(grant)
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.grant = None;
                None
            }
        }
    }

    /// Stops waiting. Returns the lease if the grant came first; `None`
    /// when the request was withdrawn (by this call, or by shutdown).
    pub(crate) fn withdraw(mut self, how: Withdrawal) -> Option<Lease> {
        self.done = true;
        if self.broker.withdraw(self.id, how) {
            return None;
        }
        let grant = self.take_grant()?;
        Some(self.lease(grant))
    }

    fn lease(&self, grant: Grant) -> Lease {
        Lease {
            broker: Arc::clone(&self.broker),
            grant,
            ended: false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done || self.broker.withdraw(self.id, Withdrawal::Withdrawn) {
            return;
        }
        // Granted, but nobody took the lease: end it at once, unclaimed.
        if let Some(grant) = self.take_grant() {
            self.lease(grant).end(LeaseEnd::Unclaimed);
        }
    }
}

/// A held lease. Dropping it without [`Lease::end`] ends it as
/// `Disconnected`, so a cancelled task never keeps the GPU.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(super) broker: Arc<Broker>,
    pub(super) grant: Grant,
    pub(super) ended: bool,
}

impl Lease {
    /// The grant's particulars.
    pub(crate) fn grant(&self) -> &Grant {
        &self.grant
    }

    /// Fires when an operator revokes this lease.
    pub(crate) fn revocation(&self) -> &Revocation {
        &self.grant.revocation
    }

    /// When the broker's `max_hold` ends this lease, if it is limited.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.broker
            .max_hold()
            .map(|hold| self.grant.granted_at + hold)
    }

    /// Ends the lease, recording how.
    pub(crate) fn end(mut self, how: LeaseEnd) {
        self.ended = true;
        self.broker.finish(self.grant.token, how);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.ended {
            self.broker.finish(self.grant.token, LeaseEnd::Disconnected);
        }
    }
}
