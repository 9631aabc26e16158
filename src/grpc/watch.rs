//! `WatchStatus`: one [`Watch`] session per call, which sends a snapshot of
//! the broker's status at once and after every change, until the client
//! leaves or the broker shuts down.

use std::ops::ControlFlow;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::{convert, snapshot};
use crate::broker::Broker;
use crate::pb::v1 as pb;

/// Where a session writes its snapshots.
pub(super) type SnapshotSender = mpsc::Sender<Result<pb::StatusResponse, Status>>;

/// One `WatchStatus` call.
pub(super) struct Watch {
    broker: Arc<Broker>,
    /// How many waiters each snapshot lists.
    waiters: usize,
    changes: watch::Receiver<u64>,
    snapshots: SnapshotSender,
}

impl Watch {
    /// A session for `request`, subscribed to the broker's changes from now.
    pub(super) fn new(
        broker: &Arc<Broker>,
        request: &pb::StatusRequest,
        snapshots: SnapshotSender,
    ) -> Self {
        Self {
            broker: Arc::clone(broker),
            waiters: convert::waiters_listed(request),
            changes: broker.subscribe(),
            snapshots,
        }
    }

    /// A snapshot, then one after each change, until the client leaves or
    /// the broker shuts down (after a last snapshot).
    pub(super) async fn run(mut self) {
        loop {
            self.changes.borrow_and_update();
            if self.send_snapshot().await.is_err() {
                return;
            }
            if self.next_change().await.is_break() {
                return;
            }
        }
    }

    /// Waits for the next change. A burst of changes while the snapshot was
    /// being sent marks the receiver once: the next snapshot covers all of
    /// them.
    async fn next_change(&mut self) -> ControlFlow<()> {
        tokio::select! {
            changed = self.changes.changed() => match changed {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            },
            () = self.snapshots.closed() => ControlFlow::Break(()),
            () = self.broker.shutdown_token().cancelled() => {
                let _ = self.send_snapshot().await;
                ControlFlow::Break(())
            }
        }
    }

    /// Sends the status as it is now; an error means the client is gone.
    async fn send_snapshot(&self) -> Result<(), ()> {
        let status = snapshot(&self.broker, self.waiters);
        self.snapshots.send(Ok(status)).await.map_err(drop)
    }
}
