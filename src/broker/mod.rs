//! The async face of the scheduling core.
//!
//! [`Broker`] owns one [`Scheduler`] behind a `std::sync::Mutex` (no `.await`
//! ever happens while it is held) and turns the core's decisions into channel
//! messages. A consumer's place in the queue is a [`Ticket`], and a held
//! lease is a [`Lease`]: both are guards whose `Drop` gives the place or the
//! permit back, so a task that is cancelled at any `.await` (a client that
//! resets its stream, a connection that drops) can never leak either.
//!
//! Every change of the core goes through one [`Broker::transact`]: lock,
//! change, settle (grant what became grantable), unlock, notify watchers,
//! write the log lines, dispatch unload requests.
//!
//! - `guards.rs`: [`Ticket`] and [`Lease`], and the stream counter;
//! - `holder.rs`: what a held lease carries ([`Grant`], [`Revocation`]);
//! - `positions.rs`: where waiters stand, and the sweep that tells them;
//! - `tokens.rs`: the fencing tokens' ceiling in the state file;
//! - `events.rs`: the log lines and the metrics of decisions;
//! - `memory.rs`: memory readings for the core, and its unload decisions
//!   carried out.
//!
//! Nothing here knows protobuf: the gRPC layer converts at its edge.

#[cfg(test)]
mod deadline_tests;
mod events;
mod guards;
mod holder;
mod memory;
mod positions;
mod tokens;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Limits, UnloadMethod};
use crate::core::{
    Decisions, FencingToken, LeaseEnd, Preemption, Rejection, Request, RevokeReason, Scheduler,
    Settings, Snapshot, UnloadRequest, WaiterId, Withdrawal,
};
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::state::StateFile;

use events::Event;
pub(crate) use events::{lease_id, millis};
pub(crate) use guards::{Lease, PositionUpdates, SessionGuard, Ticket};
pub(crate) use holder::{Grant, PreemptNotice, Revocation};
pub(crate) use memory::ResidencyListener;
use positions::NEAR_SWEEP;
pub(crate) use positions::QueuePosition;
pub(crate) use tokens::Claim;

/// The broker's shared state. Cheap to share: wrap it in an `Arc`.
pub(crate) struct Broker {
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
    /// The core. Each waiter's payload is its [`Seat`]; each held lease's
    /// is the [`Revocation`] its session listens to.
    sched: Scheduler<Seat, Arc<Revocation>>,
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

/// What the core keeps for each waiter: where to deliver the grant and the
/// position updates.
#[derive(Debug)]
struct Seat {
    consumer: String,
    grant: oneshot::Sender<Grant>,
    position: watch::Sender<QueuePosition>,
}

/// What [`Broker::revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RevokeOutcome {
    /// The lease was held, and its session is told to end it.
    Revoked {
        /// Who held it.
        consumer: String,
    },
    /// Nothing was held under that name; nothing changed.
    NotHeld(String),
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
pub(crate) struct BrokerStatus {
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
pub(crate) struct Reloads {
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
    pub(crate) fn start(
        config: &Config,
        inventory: Arc<dyn Inventory>,
        state: StateFile,
        persisted: Claim,
    ) -> Arc<Self> {
        let mut sched = Scheduler::new(settings(config), inventory.gpus(), config.profiles());
        sched.set_tokens(persisted.first_token.saturating_sub(1), persisted.ceiling);
        let broker = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            state: Mutex::new(State {
                sched,
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

    /// This start's epoch: the Unix time of the start in milliseconds, so
    /// that it changes on every start and sorts by start time.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    fn configure_metrics(&self, config: &Config) {
        let consumers: Vec<(String, bool)> = config
            .consumers
            .iter()
            .map(|(name, c)| (name.clone(), c.unload.is_some()))
            .collect();
        // The core's GPUs, not the inventory's: it knows what "no GPUs" means.
        let gpus: Vec<u32> = self.lock().sched.gpus().map(|g| g.index).collect();
        self.metrics.configure(&consumers, &gpus);
    }

    /// The broker's metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics in Prometheus's text format, with the gauges read from a
    /// snapshot taken now (the same one `Status` takes).
    pub(crate) fn exposition(&self) -> String {
        // The gauges need the counts, not the waiters.
        let status = self.status_listing(0);
        self.metrics.render(&status)
    }

    /// How long a resident asked to unload has.
    pub(crate) fn unload_timeout(&self) -> Duration {
        self.live().unload_timeout
    }

    /// The longest a lease may be held, if limited.
    pub(crate) fn max_hold(&self) -> Option<Duration> {
        *self.max_hold.borrow()
    }

    /// Sees every change of `max_hold` (by a reload).
    pub(crate) fn max_hold_changes(&self) -> watch::Receiver<Option<Duration>> {
        self.max_hold.subscribe()
    }

    /// Applies what can change while the broker runs, from `config` (a
    /// reload that has been validated in full): the consumers (sizes,
    /// adapters, and the rest of their profiles), the scheduling settings
    /// (`capacity`, `strict_consumers`, `lock_delay`, `gpu.safety_margin_mib`,
    /// `gpu.unload_timeout`), `gpu.poll_interval` and `max_hold` (held
    /// leases follow it). Waiters, holders and residents stay as they are;
    /// grants that the new settings allow are made at once.
    pub(crate) fn reconfigure(&self, config: &Config) {
        *self
            .live
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Live::from(config);
        self.max_hold.send_replace(config.max_hold);
        let settings = settings(config);
        let consumers: Vec<_> = config.profiles().collect();
        self.update(move |sched, _| sched.reconfigure(settings, consumers));
        self.configure_metrics(config);
        self.poll_now.notify_one();
    }

    /// Records how a reload went (`Err` with why it was refused), for
    /// Status and its watchers.
    pub(crate) fn reloaded(&self, outcome: Result<(), String>) {
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
    pub(crate) fn session(self: &Arc<Self>) -> SessionGuard {
        self.sessions.send_modify(|n| *n += 1);
        SessionGuard {
            broker: Arc::clone(self),
        }
    }

    /// Resolves once no stream is being served.
    pub(crate) async fn sessions_ended(&self) {
        let mut sessions = self.sessions.subscribe();
        let _ = sessions.wait_for(|n| *n == 0).await;
    }

    /// Cancelled when the broker starts shutting down.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// A receiver that sees a new value after every change of state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Puts `request` in a GPU's queue and grants it at once if a permit is
    /// free and its memory fits.
    pub(crate) fn enqueue(self: &Arc<Self>, request: Request) -> Result<Ticket, EnqueueError> {
        let (grant_tx, grant_rx) = oneshot::channel();
        let (position_tx, position_rx) = watch::channel(QueuePosition::unknown());
        let consumer = request.consumer.clone();
        // Read before the core's lock is taken, not under it.
        let limits = self.limits();
        let seat = Seat {
            consumer: consumer.clone(),
            grant: grant_tx,
            position: position_tx,
        };
        let (id, waiting) = self.transact(
            |state, _, now| {
                if state.shutting_down {
                    return Err(EnqueueError::ShuttingDown);
                }
                self.check_room(state, &consumer, &limits)?;
                let (id, gpu_index, position) = state.sched.enqueue(request, seat, now)?;
                state.queue_moved = true;
                Ok((id, gpu_index, position))
            },
            |state, (id, gpu_index, position), now| {
                // Still waiting: grants since it joined only moved it up,
                // and nothing joined after it while the lock was held.
                let waiting = state.sched.is_waiting(id).then(|| {
                    let depth = saturating_u32(state.sched.queue_len(gpu_index));
                    let position = position.min(depth);
                    QueuePosition {
                        position,
                        queue_depth: depth,
                        gpu_index,
                        holders: state.sched.holders(Some(gpu_index), now).into(),
                        blocked_by: state.sched.blocked(gpu_index).map(|b| b.to_string()),
                        priority: state.sched.effective_priority(id, now).unwrap_or(0),
                        estimated_wait: (position as usize <= NEAR_SWEEP)
                            .then(|| state.sched.estimated_wait(gpu_index, position, now))
                            .flatten(),
                    }
                });
                (id, waiting)
            },
        )?;
        if waiting.as_ref().is_some_and(|w| w.blocked_by.is_some()) {
            self.poll_now.notify_one();
        }
        Ok(Ticket {
            broker: Arc::clone(self),
            id,
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
    pub(crate) fn counts(&self) -> (usize, usize) {
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
    pub(crate) fn limits(&self) -> Limits {
        self.live().limits
    }

    /// A snapshot that lists at most `waiters` of each GPU's waiters, so
    /// that its cost under the lock follows what is shown, not the queue.
    pub(crate) fn status_listing(&self, waiters: usize) -> BrokerStatus {
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
    pub(crate) fn revoke(
        &self,
        epoch: Option<u64>,
        token: FencingToken,
        message: &str,
    ) -> RevokeOutcome {
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
        match (holder, state.sched.held(token)) {
            (Some(holder), Some(revocation)) => {
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
    pub(crate) fn shut_down(&self) {
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
        let ended: Result<(), ()> = self.transact(
            |state, log, now| {
                let ended = state.sched.end(token, how, now).ok_or(())?;
                let seq = state.next_seq();
                log.push(Event::Ended(seq, ended, how, self.lease_id(token)));
                Ok(())
            },
            |_, (), _| (),
        );
        if ended.is_ok() {
            // The ended holder's job memory is being freed: read it now,
            // since memory decisions on its GPU wait for a reading after
            // the end.
            self.poll_now.notify_one();
        }
    }

    /// Takes a waiter out of the queue; `false` if it no longer waits. The
    /// next waiter may fit where this one did not, so grants may follow.
    fn withdraw(&self, id: WaiterId, how: Withdrawal) -> bool {
        self.transact(
            |state, _, now| state.sched.withdraw(id, how, now).map(drop).ok_or(()),
            |_, (), _| (),
        )
        .is_ok()
    }

    /// Runs `change` on the core; see [`Broker::transact`].
    fn update(
        &self,
        change: impl FnOnce(&mut Scheduler<Seat, Arc<Revocation>>, std::time::Instant),
    ) {
        let _: Result<(), std::convert::Infallible> = self.transact(
            |state, _, now| {
                change(&mut state.sched, now);
                Ok(())
            },
            |_, (), _| (),
        );
    }

    /// The one way the core changes: under the lock, `change` runs, then
    /// [`Broker::settle`] grants what became grantable and `settled` reads
    /// the result; once the lock is released, watchers are told, the log
    /// lines written and the unload requests dispatched. A `change` that
    /// fails changed nothing: then nothing else happens.
    fn transact<R, T, E>(
        &self,
        change: impl FnOnce(&mut State, &mut Vec<Event>, std::time::Instant) -> Result<R, E>,
        settled: impl FnOnce(&State, R, std::time::Instant) -> T,
    ) -> Result<T, E> {
        let mut log = Vec::new();
        let (result, unloads) = {
            let mut state = self.lock();
            let now = Instant::now().into_std();
            let changed = change(&mut state, &mut log, now)?;
            let unloads = self.settle(&mut state, &mut log);
            (settled(&state, changed, now), unloads)
        };
        self.changed();
        self.emit(log);
        self.dispatch(unloads);
        Ok(result)
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
                if let Some(revocation) = state.sched.held(token) {
                    revocation.fire(
                        RevokeReason::Preempted,
                        "not released within its grace after preempt_requested",
                    );
                    let seq = state.next_seq();
                    log.push(Event::Preempted(seq, self.lease_id(token)));
                }
            }
            if grants.is_empty() {
                self.ensure_tokens(state, log);
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
                let info = Grant {
                    lease_id: self.lease_id(grant.token),
                    token: grant.token,
                    epoch: self.epoch,
                    waited: grant.waited,
                    granted_at: now,
                    gpu_index: grant.gpu_index,
                    gpu_uuid: grant.gpu_uuid,
                    revocation: grant.held,
                };
                let seq = state.next_seq();
                log.push(Event::Granted(seq, consumer, info.clone()));
                if deliver.send(info).is_err()
                    && let Some(ended) =
                        state
                            .sched
                            .end(grant.token, LeaseEnd::Unclaimed, now.into_std())
                {
                    let lease_id = self.lease_id(ended.token);
                    let seq = state.next_seq();
                    log.push(Event::Ended(seq, ended, LeaseEnd::Unclaimed, lease_id));
                }
            }
        }
    }

    /// Tells a preemptible holder's session to ask it to make way.
    fn preempt(&self, state: &mut State, preemption: Preemption, log: &mut Vec<Event>) {
        let Some(revocation) = state.sched.held(preemption.token) else {
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
            unload: config.unload_methods(),
            matchers: Arc::new(crate::matcher::Matchers::new(&config.consumers)),
            unload_timeout: config.gpu.unload_timeout,
            poll_interval: config.gpu.poll_interval,
        }
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn memory_lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
