//! The async face of the scheduling core.
//!
//! [`Broker`] owns one [`Scheduler`] behind a `std::sync::Mutex` (no `.await`
//! ever happens while it is held) and turns the core's decisions into channel
//! messages. A consumer's place in the queue is a [`Ticket`], and a held
//! lease is a [`Lease`]: both are guards whose `Drop` gives the place or the
//! permit back, so a task that is cancelled at any `.await` (a client that
//! resets its stream, a connection that drops) can never leak either.
//!
//! Nothing here knows protobuf: the gRPC layer converts at its edge.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::core::{
    FencingToken, HolderView, LeaseEnd, Rejection, Request, Scheduler, Snapshot, WaiterId,
    Withdrawal,
};

/// How often waiters are told about a better position, at most. Position
/// updates are sent by a periodic sweep rather than on every grant, so that
/// one grant costs O(1) however long the queue is.
pub const POSITION_UPDATE_INTERVAL: Duration = Duration::from_millis(250);

/// The broker's shared state. Cheap to share: wrap it in an `Arc`.
#[derive(Debug)]
pub struct Broker {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    shutdown: CancellationToken,
    epoch: u64,
    started: Instant,
    max_hold: Option<Duration>,
}

#[derive(Debug)]
struct State {
    sched: Scheduler<Seat>,
    shutting_down: bool,
    /// Set when the queue's order changed since the last position sweep.
    queue_moved: bool,
}

/// What the core keeps for each waiter: where to deliver the grant and the
/// position updates.
#[derive(Debug)]
struct Seat {
    consumer: String,
    grant: oneshot::Sender<Grant>,
    position: watch::Sender<QueuePosition>,
}

/// Where a waiting request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuePosition {
    /// Its place; 1 is next.
    pub position: u32,
    /// How many requests wait in all.
    pub queue_depth: u32,
    /// Who holds the GPU.
    pub holders: Arc<[HolderView]>,
}

/// A granted lease's particulars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
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
}

/// Why a request cannot join the queue.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The core refused it.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
}

/// The broker and the statistics that live outside the core.
#[derive(Clone, Debug)]
pub struct BrokerStatus {
    /// The core's snapshot.
    pub core: Snapshot,
    /// The broker's epoch.
    pub epoch: u64,
    /// How long the broker has run.
    pub uptime: Duration,
    /// Whether it refuses new requests.
    pub shutting_down: bool,
}

impl Broker {
    /// A broker configured by `config`, with a fresh epoch. Spawns the
    /// position sweep, which stops at shutdown.
    pub fn start(config: &Config) -> Arc<Self> {
        let sched = Scheduler::new(
            config.capacity as usize,
            config.strict_consumers,
            config.consumers.iter().cloned(),
        );
        let broker = Arc::new(Self {
            state: Mutex::new(State {
                sched,
                shutting_down: false,
                queue_moved: false,
            }),
            changes: watch::Sender::new(0),
            shutdown: CancellationToken::new(),
            epoch: new_epoch(),
            started: Instant::now(),
            max_hold: config.max_hold,
        });
        tokio::spawn(Arc::clone(&broker).sweep_positions());
        broker
    }

    /// This start's epoch: the Unix time of the start in milliseconds, so
    /// that it changes on every start and sorts by start time.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The longest a lease may be held, if limited.
    pub fn max_hold(&self) -> Option<Duration> {
        self.max_hold
    }

    /// Cancelled when the broker starts shutting down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A receiver that sees a new value after every change of state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Puts `request` in the queue and grants it at once if a permit is free.
    pub fn enqueue(self: &Arc<Self>, request: Request) -> Result<Ticket, EnqueueError> {
        let (grant_tx, grant_rx) = oneshot::channel();
        let (position_tx, position_rx) = watch::channel(QueuePosition {
            position: u32::MAX,
            queue_depth: 0,
            holders: Arc::from([]),
        });
        let consumer = request.consumer.clone();
        let mut log = Vec::new();
        let (id, queue_depth) = {
            let mut state = self.lock();
            if state.shutting_down {
                return Err(EnqueueError::ShuttingDown);
            }
            let seat = Seat {
                consumer: consumer.clone(),
                grant: grant_tx,
                position: position_tx,
            };
            let (id, _) = state
                .sched
                .enqueue(request, seat, Instant::now().into_std())?;
            state.queue_moved = true;
            self.settle(&mut state, &mut log);
            let queue_depth = state
                .sched
                .is_waiting(id)
                .then(|| saturating_u32(state.sched.queue_depth()));
            (id, queue_depth)
        };
        self.changed();
        emit(log);
        // If the request still waits, it is last: nothing was enqueued after
        // it while the lock was held.
        let holders = match queue_depth {
            Some(_) => Arc::from(self.status_holders()),
            None => Arc::from([]),
        };
        Ok(Ticket {
            broker: Arc::clone(self),
            id,
            consumer,
            grant: Some(grant_rx),
            waited: queue_depth.is_some(),
            positions: PositionUpdates {
                receiver: position_rx,
                last: QueuePosition {
                    position: queue_depth.unwrap_or(0),
                    queue_depth: queue_depth.unwrap_or(0),
                    holders,
                },
            },
            done: false,
        })
    }

    fn status_holders(&self) -> Vec<HolderView> {
        self.lock().sched.holders(Instant::now().into_std())
    }

    /// A snapshot of everything.
    pub fn status(&self) -> BrokerStatus {
        let state = self.lock();
        BrokerStatus {
            core: state.sched.snapshot(Instant::now().into_std()),
            epoch: self.epoch,
            uptime: self.started.elapsed(),
            shutting_down: state.shutting_down,
        }
    }

    /// Starts shutting down: refuses new requests, withdraws every waiter
    /// (their `Ticket::granted` returns `None`) and tells every session to
    /// revoke its lease.
    pub fn shut_down(&self) {
        let drained = {
            let mut state = self.lock();
            state.shutting_down = true;
            state.sched.drain_waiters(Instant::now().into_std())
        };
        // Dropping the seats closes every waiter's grant channel.
        drop(drained);
        self.shutdown.cancel();
        self.changed();
    }

    /// Ends the lease named by `token`, once; later calls do nothing.
    fn finish(&self, token: FencingToken, how: LeaseEnd) {
        let mut log = Vec::new();
        {
            let mut state = self.lock();
            let now = Instant::now().into_std();
            if let Some(ended) = state.sched.end(token, how, now) {
                log.push(Event::Ended(ended, how, self.lease_id(token)));
                self.settle(&mut state, &mut log);
            } else {
                return;
            }
        }
        self.changed();
        emit(log);
    }

    /// Takes a waiter out of the queue; `false` if it no longer waits.
    fn withdraw(&self, id: WaiterId, how: Withdrawal) -> bool {
        let withdrawn = {
            let mut state = self.lock();
            let seat = state.sched.withdraw(id, how, Instant::now().into_std());
            if seat.is_some() {
                state.queue_moved = true;
            }
            seat.is_some()
        };
        if withdrawn {
            self.changed();
        }
        withdrawn
    }

    /// Grants while permits are free, and delivers each grant. A waiter
    /// whose receiver is gone is never left holding a permit: its lease ends
    /// at once and the next waiter is granted instead.
    fn settle(&self, state: &mut State, log: &mut Vec<Event>) {
        let now = Instant::now();
        loop {
            let grants = state.sched.grant_ready(now.into_std());
            if grants.is_empty() {
                return;
            }
            state.queue_moved = true;
            for grant in grants {
                let Seat {
                    consumer,
                    grant: deliver,
                    ..
                } = grant.payload;
                let info = Grant {
                    lease_id: self.lease_id(grant.token),
                    token: grant.token,
                    epoch: self.epoch,
                    waited: grant.waited,
                    granted_at: now,
                };
                log.push(Event::Granted(consumer, info.clone()));
                if deliver.send(info).is_err() {
                    let ended =
                        state
                            .sched
                            .end(grant.token, LeaseEnd::Disconnected, now.into_std());
                    if let Some(ended) = ended {
                        let lease_id = self.lease_id(ended.token);
                        log.push(Event::Ended(ended, LeaseEnd::Disconnected, lease_id));
                    }
                }
            }
        }
    }

    fn lease_id(&self, token: FencingToken) -> String {
        lease_id(self.epoch, token)
    }

    fn changed(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held would be a bug in the core; the
        // state is still the best there is, so keep serving with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tells waiters whose position improved, every
    /// [`POSITION_UPDATE_INTERVAL`] at most, until shutdown.
    async fn sweep_positions(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(POSITION_UPDATE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let mut state = self.lock();
            if !std::mem::take(&mut state.queue_moved) {
                continue;
            }
            let holders: Arc<[HolderView]> = state.sched.holders(Instant::now().into_std()).into();
            let queue_depth = saturating_u32(state.sched.queue_depth());
            state.sched.for_each_waiter(|position, seat| {
                seat.position.send_if_modified(|current| {
                    let better = position < current.position;
                    if better {
                        *current = QueuePosition {
                            position,
                            queue_depth,
                            holders: Arc::clone(&holders),
                        };
                    }
                    better
                });
            });
        }
    }
}

/// A place in the queue. Dropping it gives the place up (and ends the lease
/// if it was granted in the meantime), so a cancelled task leaks nothing.
#[derive(Debug)]
pub struct Ticket {
    broker: Arc<Broker>,
    id: WaiterId,
    consumer: String,
    /// `None` once the channel has delivered or closed.
    grant: Option<oneshot::Receiver<Grant>>,
    /// Whether the request had to wait when it was enqueued.
    waited: bool,
    positions: PositionUpdates,
    done: bool,
}

/// A waiting request's position, as the periodic sweep updates it.
#[derive(Debug)]
pub struct PositionUpdates {
    receiver: watch::Receiver<QueuePosition>,
    last: QueuePosition,
}

impl PositionUpdates {
    /// Where the request stood when last looked at.
    pub fn current(&self) -> &QueuePosition {
        &self.last
    }

    /// Waits until the position improves, and returns it.
    ///
    /// Cancel-safe: dropping the future loses nothing. Pends forever once
    /// the request no longer waits, so it can sit in a `select!` beside
    /// [`Ticket::granted`].
    pub async fn improved(&mut self) -> &QueuePosition {
        loop {
            if self.receiver.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let latest = self.receiver.borrow_and_update().clone();
            if latest.position < self.last.position {
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
    pub fn had_to_wait(&self) -> bool {
        self.waited
    }

    /// The request's position updates, to await beside [`Ticket::granted`].
    /// Only the first call gets them; later calls get a stream that never
    /// changes.
    pub fn take_positions(&mut self) -> PositionUpdates {
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
    pub async fn granted(&mut self) -> Option<Lease> {
        let result = self.grant.as_mut()?.await;
        self.grant = None;
        self.done = result.is_ok();
        Some(self.lease(result.ok()?))
    }

    /// The grant, if it has already been made.
    pub fn try_granted(&mut self) -> Option<Lease> {
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

    /// Stops waiting. Returns the lease instead if the grant came first.
    pub fn withdraw(mut self, how: Withdrawal) -> Result<(), Lease> {
        self.done = true;
        if self.broker.withdraw(self.id, how) {
            return Ok(());
        }
        match self.take_grant() {
            Some(grant) => Err(self.lease(grant)),
            // Withdrawn by the broker's shutdown.
            None => Ok(()),
        }
    }

    fn lease(&self, grant: Grant) -> Lease {
        Lease {
            broker: Arc::clone(&self.broker),
            consumer: self.consumer.clone(),
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
        // Granted, but nobody took the lease: end it at once.
        if let Some(grant) = self.take_grant() {
            drop(self.lease(grant));
        }
    }
}

/// A held lease. Dropping it without [`Lease::end`] ends it as
/// `Disconnected`, so a cancelled task never keeps the GPU.
#[derive(Debug)]
pub struct Lease {
    broker: Arc<Broker>,
    consumer: String,
    grant: Grant,
    ended: bool,
}

impl Lease {
    /// The grant's particulars.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// The consumer holding it.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// When the broker's `max_hold` ends this lease, if it is limited.
    pub fn deadline(&self) -> Option<Instant> {
        self.broker
            .max_hold
            .map(|hold| self.grant.granted_at + hold)
    }

    /// Ends the lease, recording how.
    pub fn end(mut self, how: LeaseEnd) {
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

/// A log line to write once the lock is released.
enum Event {
    Granted(String, Grant),
    Ended(crate::core::EndedLease, LeaseEnd, String),
}

fn emit(log: Vec<Event>) {
    for event in log {
        match event {
            Event::Granted(consumer, grant) => info!(
                %consumer,
                lease_id = %grant.lease_id,
                token = grant.token.0,
                waited_ms = millis(grant.waited),
                "granted"
            ),
            Event::Ended(ended, how, lease_id) => {
                let how = end_name(how);
                if matches!(how, "released" | "half_closed") {
                    info!(consumer = %ended.consumer, %lease_id, token = ended.token.0,
                        waited_ms = millis(ended.waited), held_ms = millis(ended.held), how, "lease ended");
                } else {
                    warn!(consumer = %ended.consumer, %lease_id, token = ended.token.0,
                        waited_ms = millis(ended.waited), held_ms = millis(ended.held), how, "lease ended");
                }
            }
        }
    }
}

/// The name of a way a lease ends, as logs and metrics spell it.
pub fn end_name(how: LeaseEnd) -> &'static str {
    match how {
        LeaseEnd::Released => "released",
        LeaseEnd::HalfClosed => "half_closed",
        LeaseEnd::Disconnected => "disconnected",
        LeaseEnd::Revoked(crate::core::RevokeReason::Shutdown) => "revoked_shutdown",
        LeaseEnd::Revoked(crate::core::RevokeReason::MaxHoldExceeded) => "revoked_max_hold",
        LeaseEnd::Revoked(crate::core::RevokeReason::Admin) => "revoked_admin",
    }
}

/// The id of the lease granted with `token` by the broker of `epoch`.
pub fn lease_id(epoch: u64, token: FencingToken) -> String {
    format!("{epoch:x}-{}", token.0)
}

/// Whole milliseconds, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn new_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, millis)
}
