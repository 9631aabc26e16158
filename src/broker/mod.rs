//! The async face of the scheduling core.
//!
//! [`Broker`] owns one [`Scheduler`] behind a `std::sync::Mutex` (no `.await`
//! ever happens while it is held) and turns the core's decisions into channel
//! messages. A consumer's place in the queue is a [`Ticket`], and a held
//! lease is a [`Lease`]: both are guards whose `Drop` gives the place or the
//! permit back, so a task that is cancelled at any `.await` (a client that
//! resets its stream, a connection that drops) can never leak either.
//!
//! `memory.rs` keeps the core fed with GPU memory readings and carries out
//! its unload decisions.
//!
//! Nothing here knows protobuf: the gRPC layer converts at its edge.

#[cfg(test)]
mod deadline_tests;
mod memory;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, Limits, UnloadMethod};
use crate::core::{
    Decisions, FencingToken, HolderView, LeaseEnd, Preemption, Rejection, Request, RevokeReason,
    Scheduler, Settings, Snapshot, UnloadRequest, WaiterId, Withdrawal,
};
use crate::inventory::Inventory;
use crate::metrics::{Metrics, UnloadResult};
use crate::state::{Persisted, StateError, StateFile, TOKEN_BLOCK};

pub use memory::ResidencyListener;

/// How often waiters are told about a better position, at most. Position
/// updates are sent by a periodic sweep rather than on every grant, so that
/// one grant costs O(1) however long the queue is.
pub const POSITION_UPDATE_INTERVAL: Duration = Duration::from_millis(250);

/// The broker's shared state. Cheap to share: wrap it in an `Arc`.
pub struct Broker {
    /// This broker, for tasks that must not keep it alive.
    this: std::sync::Weak<Broker>,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    shutdown: CancellationToken,
    epoch: u64,
    started: Instant,
    /// The longest a lease may be held; a reload changes it, and held
    /// leases follow.
    max_hold: watch::Sender<Option<Duration>>,
    inventory: Arc<dyn Inventory>,
    /// What a reload may change outside the core.
    live: std::sync::RwLock<Live>,
    reloads: Mutex<Reloads>,
    /// Wakes the memory poller early (a request started waiting for memory).
    poll_now: tokio::sync::Notify,
    state_file: StateFile,
    /// Streams being served (lease sessions, watchers, residency listeners).
    sessions: watch::Sender<usize>,
    /// Whether a higher token ceiling is being written.
    raising_ceiling: std::sync::atomic::AtomicBool,
    residency: memory::Listeners,
    metrics: Metrics,
    /// Unload requests sent and not yet settled, by GPU and consumer, with
    /// when they were sent: for the unload metrics.
    pending_unloads: Mutex<std::collections::HashMap<(u32, String), Instant>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("epoch", &self.epoch)
            .field("inventory", &self.inventory.source())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    sched: Scheduler<Seat>,
    /// Each held lease's GPU, and how to tell its session that an operator
    /// revoked it.
    revocations: std::collections::HashMap<FencingToken, HeldLease>,
    shutting_down: bool,
    /// Set when the queue's order changed since the last position sweep.
    queue_moved: bool,
    /// When the memory poller next wakes up by itself.
    poller_wakes_at: Option<std::time::Instant>,
    /// The last sequence number given to a logged decision.
    log_seq: u64,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.log_seq += 1;
        self.log_seq
    }
}

/// The settings outside the core that a reload changes.
#[derive(Debug)]
struct Live {
    /// `[limits]`: the queue's bounds and the labels' apply live; the
    /// servers keep the stream and message bounds they started with.
    limits: Limits,
    unload: std::collections::BTreeMap<String, UnloadMethod>,
    /// The consumers' `match` rules, applied to every reading.
    matchers: Arc<crate::matcher::Matchers>,
    unload_timeout: Duration,
    poll_interval: Duration,
}

/// What the broker keeps for each held lease besides the core.
#[derive(Debug)]
struct HeldLease {
    revocation: Arc<Revocation>,
    gpu_index: u32,
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
    /// How many requests wait for the same GPU.
    pub queue_depth: u32,
    /// The GPU it waits for.
    pub gpu_index: u32,
    /// Who holds that GPU.
    pub holders: Arc<[HolderView]>,
    /// Why the head of the queue is not granted although a permit is free.
    pub blocked_by: Option<String>,
    /// The request's effective priority now.
    pub priority: i32,
    /// How much longer it is expected to wait; `None` when unknown.
    pub estimated_wait: Option<Duration>,
}

impl QueuePosition {
    /// Where a request stands before anything is known.
    fn unknown() -> Self {
        Self {
            position: u32::MAX,
            queue_depth: 0,
            gpu_index: 0,
            holders: Arc::from([]),
            blocked_by: None,
            priority: 0,
            estimated_wait: None,
        }
    }
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
pub struct Revocation {
    fired: CancellationToken,
    reason: std::sync::OnceLock<(RevokeReason, String)>,
    preempt_asked: CancellationToken,
    preempt: std::sync::OnceLock<PreemptNotice>,
}

/// A request to a preemptible holder to make way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreemptNotice {
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
    pub async fn fired(&self) {
        self.fired.cancelled().await;
    }

    /// Why it was revoked (an operator's, unless a preemption's), and the
    /// operator's message.
    pub fn reason(&self) -> (RevokeReason, &str) {
        self.reason
            .get()
            .map_or((RevokeReason::Admin, ""), |(reason, message)| {
                (*reason, message.as_str())
            })
    }

    /// Resolves once the holder is asked to make way; see
    /// [`Revocation::preempt_notice`]. Cancel-safe.
    pub async fn preempt_requested(&self) {
        self.preempt_asked.cancelled().await;
    }

    /// The request to make way, once asked.
    pub fn preempt_notice(&self) -> Option<&PreemptNotice> {
        self.preempt.get()
    }

    /// Revokes the lease, once; later calls change nothing.
    fn fire(&self, reason: RevokeReason, message: &str) {
        let _ = self.reason.set((reason, message.to_owned()));
        self.fired.cancel();
    }

    fn ask_to_preempt(&self, notice: PreemptNotice) {
        if self.preempt.set(notice).is_ok() {
            self.preempt_asked.cancel();
        }
    }
}

/// What [`Broker::revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The lease was held, and its session is told to end it.
    Revoked {
        /// Who held it.
        consumer: String,
    },
    /// Nothing was held under that name; nothing changed.
    NotHeld(String),
}

/// The epoch and tokens a start claimed in the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// This start's epoch.
    pub epoch: u64,
    /// The first token it hands out.
    pub first_token: u64,
    /// The ceiling on disk.
    pub ceiling: u64,
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
    /// As many requests wait as `[limits]` allows.
    #[error("queue full: {waiting} requests {whose}wait already, the most `limits.{key}` allows")]
    QueueFull {
        /// How many wait.
        waiting: u32,
        /// `"of consumer \"NAME\" "` for the per-consumer limit, else empty.
        whose: String,
        /// The limit's key.
        key: &'static str,
    },
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
    /// Where GPUs are learned: `"nvml"` or `"static"`.
    pub inventory: &'static str,
    /// How each consumer with an unload adapter is asked to unload.
    pub unload: std::collections::BTreeMap<String, &'static str>,
    /// Each consumer's `match` rule, as Status shows it.
    pub matchers: std::collections::BTreeMap<String, String>,
    /// How the reloads of the configuration went.
    pub reloads: Reloads,
    /// Log lines dropped because stderr was blocked or closed.
    pub log_lines_dropped: u64,
}

/// How the reloads of the configuration went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloads {
    /// Reloads applied since the start.
    pub applied: u64,
    /// Why the last one was refused; empty when it applied.
    pub last_error: String,
}

impl Broker {
    /// A broker configured by `config` over `inventory`. Its epoch and
    /// first tokens come from `state`, which must already hold `persisted`
    /// (see [`Broker::claim`]); later ceilings are written there before
    /// they are used. Spawns the position sweep and the memory poller,
    /// which stop at shutdown.
    pub fn start(
        config: &Config,
        inventory: Arc<dyn Inventory>,
        state: StateFile,
        persisted: Claim,
    ) -> Arc<Self> {
        let mut sched = Scheduler::new(
            settings(config),
            inventory.gpus(),
            config.consumers.iter().cloned(),
        );
        sched.set_tokens(persisted.first_token.saturating_sub(1), persisted.ceiling);
        let broker = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            state: Mutex::new(State {
                sched,
                revocations: std::collections::HashMap::new(),
                shutting_down: false,
                queue_moved: false,
                log_seq: 0,
                poller_wakes_at: None,
            }),
            changes: watch::Sender::new(0),
            shutdown: CancellationToken::new(),
            epoch: persisted.epoch,
            state_file: state,
            sessions: watch::Sender::new(0),
            raising_ceiling: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
            max_hold: watch::Sender::new(config.max_hold),
            inventory,
            live: std::sync::RwLock::new(Live::from(config)),
            reloads: Mutex::new(Reloads::default()),
            poll_now: tokio::sync::Notify::new(),
            residency: memory::Listeners::default(),
            metrics: Metrics::new(),
            pending_unloads: Mutex::new(std::collections::HashMap::new()),
        });
        broker.configure_metrics(config);
        tokio::spawn(Arc::clone(&broker).sweep_positions());
        tokio::spawn(Arc::clone(&broker).poll_memory());
        broker
    }

    /// Claims this start's epoch and a block of tokens in `state`, durably,
    /// before anything is served: the epoch is the Unix time in
    /// milliseconds, or one more than the last start's if the clock went
    /// back; tokens start above the last ceiling written. Blocking.
    pub fn claim(state: &StateFile, previous: Persisted) -> Result<Claim, StateError> {
        // Checked: a ceiling near `u64::MAX` must stop the broker, not wrap
        // around to tokens that were handed out long ago.
        let overflow = |what: &str| StateError::Damaged {
            path: state.path(),
            problem: format!("has no room left for {what}"),
        };
        let next_epoch = previous
            .epoch
            .checked_add(1)
            .ok_or_else(|| overflow("another epoch"))?;
        let epoch = new_epoch().max(next_epoch);
        let first_token = previous
            .token_ceiling
            .checked_add(1)
            .ok_or_else(|| overflow("another token"))?;
        let ceiling = previous
            .token_ceiling
            .checked_add(TOKEN_BLOCK)
            .ok_or_else(|| overflow("another block of tokens"))?;
        state
            .store(Persisted {
                token_ceiling: ceiling,
                epoch,
            })
            .map_err(|source| StateError::Io {
                path: state.path(),
                source,
            })?;
        Ok(Claim {
            epoch,
            first_token,
            ceiling,
        })
    }

    /// Writes a higher token ceiling in the background once fewer than half
    /// a block of tokens is left, and lets the core use it once it is on
    /// disk. Grants wait (they are never made above a ceiling on disk) if
    /// the writing falls behind or fails.
    fn ensure_tokens(&self, state: &State) {
        use std::sync::atomic::Ordering;
        if state.sched.tokens_left() >= TOKEN_BLOCK / 2
            || self.raising_ceiling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let ceiling = state
            .sched
            .last_token()
            .0
            .checked_add(state.sched.tokens_left())
            .and_then(|ceiling| ceiling.checked_add(TOKEN_BLOCK));
        let Some(ceiling) = ceiling else {
            // Only after about 2^64 grants; grants stop at the ceiling.
            tracing::error!("the fencing tokens are used up; grants stop at the current ceiling");
            return;
        };
        let persisted = Persisted {
            token_ceiling: ceiling,
            epoch: self.epoch,
        };
        let (file, this) = (self.state_file.clone(), self.this.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.raising_ceiling.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(async move {
            let stored = tokio::task::spawn_blocking(move || file.store(persisted)).await;
            let Some(broker) = this.upgrade() else { return };
            match stored {
                Ok(Ok(())) => broker.update(|sched, _| sched.raise_token_ceiling(ceiling)),
                Ok(Err(e)) => tracing::error!(error = %e, "cannot write the token ceiling; grants stop at the current one"),
                Err(e) => tracing::error!(error = %e, "the token ceiling writer failed"),
            }
            broker.raising_ceiling.store(false, Ordering::Release);
        });
    }

    /// This start's epoch: the Unix time of the start in milliseconds, so
    /// that it changes on every start and sorts by start time.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn configure_metrics(&self, config: &Config) {
        let consumers: Vec<(String, bool)> = config
            .consumers
            .iter()
            .map(|c| (c.name.clone(), config.unload.contains_key(&c.name)))
            .collect();
        let mut gpus: Vec<u32> = self.inventory.gpus().iter().map(|g| g.index).collect();
        if gpus.is_empty() {
            gpus.push(0);
        }
        self.metrics.configure(&consumers, &gpus);
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics in Prometheus's text format, with the gauges read from a
    /// snapshot taken now (the same one `Status` takes).
    pub fn exposition(&self) -> String {
        // The gauges need the counts, not the waiters.
        let status = self.status_listing(0);
        let gpus = u32::try_from(status.core.gpus.len().max(1)).unwrap_or(1);
        self.metrics.render(&status, status.core.capacity / gpus)
    }

    /// How long a resident asked to unload has.
    pub fn unload_timeout(&self) -> Duration {
        self.live().unload_timeout
    }

    /// The longest a lease may be held, if limited.
    pub fn max_hold(&self) -> Option<Duration> {
        *self.max_hold.borrow()
    }

    /// Sees every change of `max_hold` (by a reload).
    pub fn max_hold_changes(&self) -> watch::Receiver<Option<Duration>> {
        self.max_hold.subscribe()
    }

    /// Applies what can change while the broker runs, from `config` (a
    /// reload that has been validated in full): the consumers (sizes,
    /// adapters, and the rest of their profiles), the scheduling settings
    /// (`capacity`, `strict_consumers`, `lock_delay`, `gpu.safety_margin_mib`,
    /// `gpu.unload_timeout`), `gpu.poll_interval` and `max_hold` (held
    /// leases follow it). Waiters, holders and residents stay as they are;
    /// grants that the new settings allow are made at once.
    pub fn reconfigure(&self, config: &Config) {
        *self
            .live
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Live::from(config);
        self.max_hold.send_replace(config.max_hold);
        let settings = settings(config);
        let consumers = config.consumers.clone();
        self.update(move |sched, _| sched.reconfigure(settings, consumers));
        self.configure_metrics(config);
        self.poll_now.notify_one();
    }

    /// Records how a reload went (`Err` with why it was refused), for
    /// Status and its watchers.
    pub fn reloaded(&self, outcome: Result<(), String>) {
        {
            let mut reloads = memory_lock(&self.reloads);
            match outcome {
                Ok(()) => {
                    reloads.applied += 1;
                    reloads.last_error.clear();
                }
                Err(why) => reloads.last_error = why,
            }
        }
        self.changed();
    }

    fn live(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        self.live
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a stream being served until the guard is dropped, so that
    /// shutdown knows when every stream has ended.
    pub fn session(self: &Arc<Self>) -> SessionGuard {
        self.sessions.send_modify(|n| *n += 1);
        SessionGuard {
            broker: Arc::clone(self),
        }
    }

    /// Resolves once no stream is being served.
    pub async fn sessions_ended(&self) {
        let mut sessions = self.sessions.subscribe();
        let _ = sessions.wait_for(|n| *n == 0).await;
    }

    /// Cancelled when the broker starts shutting down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A receiver that sees a new value after every change of state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Puts `request` in a GPU's queue and grants it at once if a permit is
    /// free and its memory fits.
    pub fn enqueue(self: &Arc<Self>, request: Request) -> Result<Ticket, EnqueueError> {
        let (grant_tx, grant_rx) = oneshot::channel();
        let (position_tx, position_rx) = watch::channel(QueuePosition::unknown());
        let consumer = request.consumer.clone();
        let mut log = Vec::new();
        let now = Instant::now().into_std();
        // Read before the core's lock is taken, not under it.
        let limits = self.limits();
        let (id, waiting, unloads) = {
            let mut state = self.lock();
            if state.shutting_down {
                return Err(EnqueueError::ShuttingDown);
            }
            self.check_room(&state, &consumer, &limits)?;
            let seat = Seat {
                consumer: consumer.clone(),
                grant: grant_tx,
                position: position_tx,
            };
            let (id, gpu_index, position) = state.sched.enqueue(request, seat, now)?;
            state.queue_moved = true;
            let unloads = self.settle(&mut state, &mut log);
            // Still waiting: grants since it joined only moved it up, and
            // nothing joined after it while the lock was held.
            let waiting = state.sched.is_waiting(id).then(|| {
                let depth = saturating_u32(state.sched.queue_len(gpu_index));
                let position = position.min(depth);
                QueuePosition {
                    position,
                    queue_depth: depth,
                    gpu_index,
                    holders: state.sched.holders(Some(gpu_index), now).into(),
                    blocked_by: state.sched.blocked(gpu_index).map(ToString::to_string),
                    priority: state.sched.effective_priority(id, now).unwrap_or(0),
                    estimated_wait: (position as usize <= NEAR_SWEEP)
                        .then(|| state.sched.estimated_wait(gpu_index, position, now))
                        .flatten(),
                }
            });
            (id, waiting, unloads)
        };
        self.changed();
        self.emit(log);
        self.dispatch(unloads);
        if waiting.as_ref().is_some_and(|w| w.blocked_by.is_some()) {
            self.poll_now.notify_one();
        }
        Ok(Ticket {
            broker: Arc::clone(self),
            id,
            consumer,
            grant: Some(grant_rx),
            waited: waiting.is_some(),
            positions: PositionUpdates {
                receiver: position_rx,
                last: waiting.unwrap_or(QueuePosition {
                    position: 0,
                    ..QueuePosition::unknown()
                }),
            },
            done: false,
        })
    }

    /// How many leases are held and how many requests wait, over all GPUs.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.sched.in_flight(), state.sched.queue_depth())
    }

    /// Refuses a request once `[limits]` says the queue is full, over all
    /// GPUs or for its consumer: every waiter costs memory (and a place in
    /// every snapshot), so their number is bounded.
    fn check_room(
        &self,
        state: &State,
        consumer: &str,
        limits: &Limits,
    ) -> Result<(), EnqueueError> {
        let waiting = saturating_u32(state.sched.queue_depth());
        if waiting >= limits.max_waiters {
            return Err(EnqueueError::QueueFull {
                waiting,
                whose: String::new(),
                key: "max_waiters",
            });
        }
        let mine = state.sched.waiting_of(consumer);
        if mine >= limits.max_waiters_per_consumer {
            return Err(EnqueueError::QueueFull {
                waiting: mine,
                whose: format!("of consumer {consumer:?} "),
                key: "max_waiters_per_consumer",
            });
        }
        Ok(())
    }

    /// The bounds on what one client can make the broker hold or send,
    /// as the last reload set them.
    pub fn limits(&self) -> Limits {
        self.live().limits
    }

    /// A snapshot of everything.
    pub fn status(&self) -> BrokerStatus {
        self.status_listing(usize::MAX)
    }

    /// A snapshot that lists at most `waiters` of each GPU's waiters, so
    /// that its cost under the lock follows what is shown, not the queue.
    pub fn status_listing(&self, waiters: usize) -> BrokerStatus {
        let state = self.lock();
        BrokerStatus {
            core: state
                .sched
                .snapshot_listing(Instant::now().into_std(), waiters),
            epoch: self.epoch,
            uptime: self.started.elapsed(),
            shutting_down: state.shutting_down,
            inventory: self.inventory.source(),
            unload: self
                .live()
                .unload
                .iter()
                .map(|(name, method)| (name.clone(), method.name()))
                .collect(),
            reloads: memory_lock(&self.reloads).clone(),
            log_lines_dropped: crate::logging::lines_dropped(),
            matchers: self
                .live()
                .matchers
                .iter()
                .map(|(name, rule)| (name.clone(), rule.to_string()))
                .collect(),
        }
    }

    /// Revokes the lease named by `token` (and `epoch`, when the caller
    /// named one), on an operator's behalf. Fenced and idempotent: a token
    /// that is not held now, or one from another start of the broker,
    /// changes nothing.
    pub fn revoke(&self, epoch: Option<u64>, token: FencingToken, message: &str) -> RevokeOutcome {
        let name = lease_id(epoch.unwrap_or(self.epoch), token);
        if epoch.is_some_and(|e| e != self.epoch) {
            return RevokeOutcome::NotHeld(format!(
                "lease {name} is from an earlier start of the broker; nothing was revoked"
            ));
        }
        let state = self.lock();
        let holder = state
            .sched
            .holders(None, Instant::now().into_std())
            .into_iter()
            .find(|h| h.token == token);
        match (holder, state.revocations.get(&token)) {
            (Some(holder), Some(HeldLease { revocation, .. })) => {
                revocation.fire(RevokeReason::Admin, message);
                RevokeOutcome::Revoked {
                    consumer: holder.request.consumer,
                }
            }
            _ => {
                let held: Vec<String> = state
                    .sched
                    .holders(None, Instant::now().into_std())
                    .iter()
                    .map(|h| format!("{} ({})", self.lease_id(h.token), h.request.consumer))
                    .collect();
                let now = if held.is_empty() {
                    "no lease is held".to_owned()
                } else {
                    format!("held now: {}", held.join(", "))
                };
                RevokeOutcome::NotHeld(format!(
                    "lease {name} is not held (it ended, or was never granted); nothing was revoked; {now}"
                ))
            }
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
        let unloads = {
            let mut state = self.lock();
            let now = Instant::now().into_std();
            let Some(ended) = state.sched.end(token, how, now) else {
                return;
            };
            let gpu_index = state
                .revocations
                .remove(&token)
                .map_or(0, |held| held.gpu_index);
            let seq = state.next_seq();
            log.push(Event::Ended(
                seq,
                ended,
                how,
                self.lease_id(token),
                gpu_index,
            ));
            self.settle(&mut state, &mut log)
        };
        self.changed();
        self.emit(log);
        self.dispatch(unloads);
        // The ended holder's job memory is being freed: read it now, since
        // memory decisions on its GPU wait for a reading after the end.
        self.poll_now.notify_one();
    }

    /// Takes a waiter out of the queue; `false` if it no longer waits. The
    /// next waiter may fit where this one did not, so grants may follow.
    fn withdraw(&self, id: WaiterId, how: Withdrawal) -> bool {
        let mut log = Vec::new();
        let unloads = {
            let mut state = self.lock();
            if state
                .sched
                .withdraw(id, how, Instant::now().into_std())
                .is_none()
            {
                return false;
            }
            self.settle(&mut state, &mut log)
        };
        self.changed();
        self.emit(log);
        self.dispatch(unloads);
        true
    }

    /// Runs `change` on the core under the lock, then grants what became
    /// grantable, and reports the change.
    fn update(&self, change: impl FnOnce(&mut Scheduler<Seat>, std::time::Instant)) {
        let mut log = Vec::new();
        let unloads = {
            let mut state = self.lock();
            change(&mut state.sched, Instant::now().into_std());
            self.settle(&mut state, &mut log)
        };
        self.changed();
        self.emit(log);
        self.dispatch(unloads);
    }

    /// Grants while permits are free and memory fits, and delivers each
    /// grant; returns the unload requests to carry out once the lock is
    /// released. A waiter whose receiver is gone is never left holding a
    /// permit: its lease ends at once and the next waiter is granted instead.
    fn settle(&self, state: &mut State, log: &mut Vec<Event>) -> Vec<UnloadRequest> {
        let now = Instant::now();
        let mut unloads = Vec::new();
        // Positions or the reason the head waits may have changed.
        state.queue_moved = true;
        loop {
            let Decisions {
                grants,
                unloads: asked,
                preemptions,
                revocations,
            } = state.sched.grant_ready(now.into_std());
            unloads.extend(asked);
            for preemption in preemptions {
                self.preempt(state, preemption, log);
            }
            for token in revocations {
                if let Some(HeldLease { revocation, .. }) = state.revocations.get(&token) {
                    revocation.fire(
                        RevokeReason::Preempted,
                        "not released within its grace after preempt_requested",
                    );
                    let seq = state.next_seq();
                    log.push(Event::Preempted(seq, self.lease_id(token)));
                }
            }
            if grants.is_empty() {
                self.ensure_tokens(state);
                // A change can bring the core's next deadline forward (a
                // waiter that may preempt, an unload to wait for): wake the
                // poller, which sleeps until the deadline it saw last.
                if let Some(deadline) = state.sched.next_deadline(now.into_std())
                    && state.poller_wakes_at.is_none_or(|at| deadline < at)
                {
                    state.poller_wakes_at = Some(deadline);
                    self.poll_now.notify_one();
                }
                return unloads;
            }
            for grant in grants {
                let Seat {
                    consumer,
                    grant: deliver,
                    ..
                } = grant.payload;
                let revocation = Arc::new(Revocation::default());
                state.revocations.insert(
                    grant.token,
                    HeldLease {
                        revocation: Arc::clone(&revocation),
                        gpu_index: grant.gpu_index,
                    },
                );
                let info = Grant {
                    lease_id: self.lease_id(grant.token),
                    token: grant.token,
                    epoch: self.epoch,
                    waited: grant.waited,
                    granted_at: now,
                    gpu_index: grant.gpu_index,
                    gpu_uuid: grant.gpu_uuid,
                    revocation,
                };
                let seq = state.next_seq();
                log.push(Event::Granted(seq, consumer, info.clone()));
                if deliver.send(info).is_err() {
                    let ended = state
                        .sched
                        .end(grant.token, LeaseEnd::Unclaimed, now.into_std());
                    state.revocations.remove(&grant.token);
                    if let Some(ended) = ended {
                        let lease_id = self.lease_id(ended.token);
                        let seq = state.next_seq();
                        log.push(Event::Ended(
                            seq,
                            ended,
                            LeaseEnd::Unclaimed,
                            lease_id,
                            grant.gpu_index,
                        ));
                    }
                }
            }
        }
    }

    /// Tells a preemptible holder's session to ask it to make way.
    fn preempt(&self, state: &mut State, preemption: Preemption, log: &mut Vec<Event>) {
        let Some(HeldLease { revocation, .. }) = state.revocations.get(&preemption.token) else {
            return;
        };
        revocation.ask_to_preempt(PreemptNotice {
            grace: preemption.grace,
            for_consumer: preemption.for_consumer.clone(),
        });
        let seq = state.next_seq();
        log.push(Event::PreemptRequested(
            seq,
            self.lease_id(preemption.token),
            preemption,
        ));
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

    /// Tells waiters whose position improved (or whose reason for waiting
    /// changed): the first [`NEAR_SWEEP`] of each queue every tick, the rest
    /// every [`FULL_SWEEP_EVERY`] ticks; every
    /// [`POSITION_UPDATE_INTERVAL`] at most, until shutdown.
    async fn sweep_positions(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(POSITION_UPDATE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether the queue moved since the last sweep of every waiter.
        let mut far_moved = false;
        for tick in 1u64.. {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let mut state = self.lock();
            let moved = std::mem::take(&mut state.queue_moved);
            far_moved |= moved;
            // Near the head every tick; everyone only every few ticks, so
            // that a long queue costs the lock (and its waiters messages)
            // in proportion to its head, not its length.
            let everyone = far_moved && tick % FULL_SWEEP_EVERY == 0;
            if !moved && !everyone {
                continue;
            }
            if everyone {
                far_moved = false;
            }
            let limit = (!everyone).then_some(NEAR_SWEEP);
            let now = Instant::now().into_std();
            let gpus: Vec<u32> = state.sched.gpus().map(|gpu| gpu.index).collect();
            let holders: Vec<Arc<[HolderView]>> = gpus
                .iter()
                .map(|index| state.sched.holders(Some(*index), now).into())
                .collect();
            state.sched.for_each_waiter(limit, now, |place, seat| {
                // Only the head's reason matters to it; the others wait
                // behind the head whatever the reason.
                let blocked_by = place
                    .blocked
                    .filter(|_| place.position == 1)
                    .map(ToString::to_string);
                seat.position.send_if_modified(|current| {
                    let changed = worth_telling(place.position, current.position)
                        || (place.position == current.position && blocked_by != current.blocked_by);
                    if changed {
                        let slot = gpus.iter().position(|index| *index == place.gpu_index);
                        *current = QueuePosition {
                            position: place.position,
                            queue_depth: place.queue_depth,
                            gpu_index: place.gpu_index,
                            holders: slot
                                .map_or_else(|| Arc::from([]), |s| Arc::clone(&holders[s])),
                            blocked_by,
                            priority: place.priority,
                            estimated_wait: place.estimated_wait,
                        };
                    }
                    changed
                });
            });
        }
    }
}

/// Whether a waiter told `told` should hear that it is now at `position`:
/// always near the head, and further back only once the position has
/// improved by a tenth. A waiter then hears O(log n) updates while a queue
/// of n drains, so a grant costs O(log n) messages amortised, not O(n).
fn worth_telling(position: u32, told: u32) -> bool {
    position < told && (position <= NEAR_HEAD || u64::from(position) * 10 <= u64::from(told) * 9)
}

/// Waiters this close to the head hear every improvement.
const NEAR_HEAD: u32 = 16;

/// How many waiters per GPU the sweep visits on every tick.
const NEAR_SWEEP: usize = 64;

/// Every how many ticks the sweep visits every waiter.
const FULL_SWEEP_EVERY: u64 = 8;

/// A stream being served; see [`Broker::session`].
#[derive(Debug)]
pub struct SessionGuard {
    broker: Arc<Broker>,
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

    /// Stops waiting. Returns the lease if the grant came first; `None`
    /// when the request was withdrawn (by this call, or by shutdown).
    pub fn withdraw(mut self, how: Withdrawal) -> Option<Lease> {
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
        // Granted, but nobody took the lease: end it at once, unclaimed.
        if let Some(grant) = self.take_grant() {
            self.lease(grant).end(LeaseEnd::Unclaimed);
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

    /// Fires when an operator revokes this lease.
    pub fn revocation(&self) -> &Revocation {
        &self.grant.revocation
    }

    /// When the broker's `max_hold` ends this lease, if it is limited.
    pub fn deadline(&self) -> Option<Instant> {
        self.broker
            .max_hold()
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
///
/// Each carries a sequence number taken under the lock, so that a reader of
/// the log can restore the order of the decisions even where two threads'
/// lines come out interleaved.
enum Event {
    Granted(u64, String, Grant),
    /// The lease, how it ended, its id and its GPU.
    Ended(u64, crate::core::EndedLease, LeaseEnd, String, u32),
    PreemptRequested(u64, String, Preemption),
    Preempted(u64, String),
}

impl Broker {
    /// Writes the log lines of decisions taken under the lock, and counts
    /// them in the metrics; called once the lock is released.
    fn emit(&self, log: Vec<Event>) {
        for event in &log {
            match event {
                Event::Granted(_, consumer, grant) => {
                    self.metrics
                        .granted(grant.gpu_index, consumer, grant.waited);
                }
                Event::Ended(_, ended, how, _, gpu_index) => {
                    self.metrics
                        .ended(*gpu_index, &ended.consumer, end_name(*how), ended.held);
                }
                Event::PreemptRequested(..) | Event::Preempted(..) => {}
            }
        }
        emit(log);
    }

    /// Remembers that `request` was sent, to count how it ends.
    fn unload_sent(&self, request: &UnloadRequest) {
        memory_lock(&self.pending_unloads)
            .entry((request.gpu_index, request.consumer.clone()))
            .or_insert_with(Instant::now);
    }

    /// The adapter for `request` failed: counted as an error now.
    fn unload_failed(&self, request: &UnloadRequest) {
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
    fn settle_unloads(&self) {
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

fn memory_lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn emit(log: Vec<Event>) {
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
            Event::Ended(seq, ended, how, lease_id, _) => {
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

/// The core's settings, from the configuration.
fn settings(config: &Config) -> Settings {
    Settings {
        capacity: config.capacity as usize,
        strict: config.strict_consumers,
        safety_margin_mib: config.gpu.safety_margin_mib,
        unload_timeout: config.gpu.unload_timeout,
        lock_delay: config.lock_delay,
        backfill: config.scheduling.backfill,
        aging: config.scheduling.aging,
        preempt_after: config.scheduling.preempt_after,
    }
}

impl From<&Config> for Live {
    fn from(config: &Config) -> Self {
        Self {
            limits: config.limits,
            unload: config.unload.clone(),
            matchers: Arc::new(crate::matcher::Matchers::new(&config.matchers)),
            unload_timeout: config.gpu.unload_timeout,
            poll_interval: config.gpu.poll_interval,
        }
    }
}

/// The name of a way a lease ends, as logs and metrics spell it.
pub fn end_name(how: LeaseEnd) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draining_queue_tells_each_waiter_a_few_times() {
        assert!(worth_telling(16, 17) && worth_telling(1, 2));
        assert!(!worth_telling(990, 1000) && worth_telling(900, 1000));
        assert!(!worth_telling(5, 5) && !worth_telling(6, 5));
        // The last of 10,000 waiters, as the queue drains one by one.
        let (mut told, mut updates) = (10_000, 0);
        for position in (1..10_000).rev() {
            if worth_telling(position, told) {
                told = position;
                updates += 1;
            }
        }
        assert_eq!(told, 1);
        assert!(updates < 16 + 70, "{updates} updates");
    }
}
