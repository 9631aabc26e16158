//! The scheduling core: a pure, synchronous state machine that decides who
//! holds the GPU.
//!
//! It keeps the FIFO queue of waiting requests, the held leases (at most
//! `capacity`), the consumers it has seen and the statistics. Every method
//! takes `now` as an argument and returns decisions (grant this waiter, this
//! lease ended); nothing here sleeps, awaits, or knows about tokio, tonic,
//! prost or NVML. The async layer (`crate::broker`) owns one `Scheduler`
//! behind a mutex and turns its decisions into messages.
//!
//! Each waiter carries a payload `W` chosen by the caller (the broker stores
//! the channel that delivers the grant there). The core hands the payload
//! back when it grants or withdraws the waiter, so the caller never has to
//! keep a second map in step with this one.

mod consumers;
mod name;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub use consumers::{ConsumerKind, ConsumerProfile, ConsumerRecord};
pub use name::{ConsumerNameError, validate_consumer_name};

use consumers::ConsumerBook;

/// Identifies a waiting request. Ids increase in arrival order, so the
/// queue's order is the order of its ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaiterId(u64);

/// The fencing token of a grant. Strictly increasing over all grants of one
/// `Scheduler`; it also names the lease while it is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// What a consumer asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The consumer's name; see [`validate_consumer_name`].
    pub consumer: String,
    /// The VRAM the work needs, in MiB; 0 when unknown.
    pub vram_mib: u64,
    /// The consumer's process id; 0 when unknown.
    pub client_pid: u32,
    /// Free-form labels, shown in the snapshot.
    pub labels: BTreeMap<String, String>,
}

/// Why a request cannot even join the queue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The consumer's name is not acceptable.
    #[error(transparent)]
    BadName(#[from] ConsumerNameError),
    /// Strict mode is on and the consumer is not configured.
    #[error("consumer {0:?} is not in the broker's configuration and strict_consumers is on")]
    UnknownConsumer(String),
}

/// How a held lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// The consumer sent `Release`.
    Released,
    /// The consumer half-closed its side of the stream.
    HalfClosed,
    /// The call was cancelled or the connection was lost.
    Disconnected,
    /// The broker ended the lease.
    Revoked(RevokeReason),
}

/// Why the broker revoked a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    /// The broker is shutting down.
    Shutdown,
    /// The lease outlived the configured maximum hold time.
    MaxHoldExceeded,
    /// An operator revoked it.
    Admin,
}

/// How a waiting request left the queue without a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withdrawal {
    /// The consumer stopped waiting (release, cancel, disconnect, shutdown).
    Withdrawn,
    /// Its maximum wait passed.
    Expired,
}

/// A decision to grant the lease to a waiter.
#[derive(Debug)]
pub struct Grant<W> {
    /// The waiter that was granted; it is no longer in the queue.
    pub waiter: WaiterId,
    /// The new lease's token.
    pub token: FencingToken,
    /// How long the request waited.
    pub waited: Duration,
    /// The payload the waiter was enqueued with.
    pub payload: W,
}

/// A lease that has just ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedLease {
    /// Who held it.
    pub consumer: String,
    /// Its token.
    pub token: FencingToken,
    /// How long it was held.
    pub held: Duration,
    /// How long it had waited before the grant.
    pub waited: Duration,
}

/// A held lease, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderView {
    /// The lease's token.
    pub token: FencingToken,
    /// The request it was granted for.
    pub request: Request,
    /// How long it has been held.
    pub held: Duration,
}

/// A waiting request, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaiterView {
    /// Its place in the queue; 1 is next.
    pub position: u32,
    /// The request.
    pub request: Request,
    /// How long it has waited.
    pub waiting: Duration,
}

/// Counts of how leases and requests ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndCounts {
    /// Leases ended by `Release`.
    pub released: u64,
    /// Leases ended by a half-close.
    pub half_closed: u64,
    /// Leases ended by cancel or a lost connection.
    pub disconnected: u64,
    /// Leases the broker revoked.
    pub revoked: u64,
    /// Requests withdrawn before a grant.
    pub withdrawn: u64,
    /// Requests whose maximum wait passed.
    pub expired: u64,
}

/// Everything the core knows, at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// How many leases may be held at once.
    pub capacity: u32,
    /// Grants since the start.
    pub total_grants: u64,
    /// How long the last granted request waited.
    pub last_wait: Duration,
    /// How long the last ended lease was held.
    pub last_hold: Duration,
    /// How long the oldest waiter has waited; zero when nobody waits.
    pub oldest_queued: Duration,
    /// Held leases, oldest grant first.
    pub holders: Vec<HolderView>,
    /// Waiting requests, in queue order.
    pub waiters: Vec<WaiterView>,
    /// Configured consumers and those seen since the start, by name.
    pub consumers: Vec<ConsumerRecord>,
    /// How leases and requests ended.
    pub ended: EndCounts,
}

/// The scheduling state of one GPU's leases.
///
/// Invariants, checked by the property test in `tests.rs`:
/// - at most `capacity` leases are held;
/// - waiters are granted strictly in arrival order, and only while queued;
/// - fencing tokens strictly increase;
/// - a lease or a waiter ends exactly once; ending it again does nothing.
#[derive(Debug)]
pub struct Scheduler<W> {
    capacity: usize,
    strict: bool,
    next_waiter: u64,
    last_token: u64,
    /// Waiting requests by id; ids grow with arrival, so this is FIFO order.
    waiting: BTreeMap<WaiterId, Waiting<W>>,
    /// Held leases by token, in grant order.
    holding: BTreeMap<FencingToken, Holding>,
    consumers: ConsumerBook,
    stats: Stats,
}

#[derive(Debug)]
struct Waiting<W> {
    request: Request,
    since: Instant,
    payload: W,
}

#[derive(Debug)]
struct Holding {
    request: Request,
    granted_at: Instant,
    waited: Duration,
}

#[derive(Debug, Default)]
struct Stats {
    total_grants: u64,
    last_wait: Duration,
    last_hold: Duration,
    ended: EndCounts,
}

impl<W> Scheduler<W> {
    /// A scheduler for `capacity` concurrent leases (at least 1).
    ///
    /// `consumers` are the configured consumers; with `strict`, nobody else
    /// may enqueue.
    pub fn new(
        capacity: usize,
        strict: bool,
        consumers: impl IntoIterator<Item = ConsumerProfile>,
    ) -> Self {
        Self {
            capacity: capacity.max(1),
            strict,
            next_waiter: 0,
            last_token: 0,
            waiting: BTreeMap::new(),
            holding: BTreeMap::new(),
            consumers: ConsumerBook::new(consumers),
            stats: Stats::default(),
        }
    }

    /// How many leases may be held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many leases are held now.
    pub fn in_flight(&self) -> usize {
        self.holding.len()
    }

    /// How many requests wait now.
    pub fn queue_depth(&self) -> usize {
        self.waiting.len()
    }

    /// The last fencing token handed out; 0 before the first grant.
    pub fn last_token(&self) -> FencingToken {
        FencingToken(self.last_token)
    }

    /// Puts a request at the back of the queue.
    ///
    /// Returns its id and its position (1 = next). The request is not granted
    /// here, even when a permit is free: call [`Scheduler::grant_ready`]
    /// afterwards, which keeps the one place where grants happen.
    pub fn enqueue(
        &mut self,
        request: Request,
        payload: W,
        now: Instant,
    ) -> Result<(WaiterId, u32), Rejection> {
        validate_consumer_name(&request.consumer)?;
        if self.strict && !self.consumers.is_configured(&request.consumer) {
            return Err(Rejection::UnknownConsumer(request.consumer));
        }
        self.consumers.touch(&request.consumer, now).waiting += 1;
        self.next_waiter += 1;
        let id = WaiterId(self.next_waiter);
        let waiting = Waiting {
            request,
            since: now,
            payload,
        };
        self.waiting.insert(id, waiting);
        Ok((id, saturating_u32(self.waiting.len())))
    }

    /// Grants the lease to waiters at the head of the queue while permits are
    /// free, and returns those grants in order. Costs O(grants · log n),
    /// never O(queue length).
    pub fn grant_ready(&mut self, now: Instant) -> Vec<Grant<W>> {
        let mut grants = Vec::new();
        while self.holding.len() < self.capacity {
            let Some((waiter, waiting)) = self.waiting.pop_first() else {
                break;
            };
            self.last_token += 1;
            let token = FencingToken(self.last_token);
            let waited = now.saturating_duration_since(waiting.since);
            let record = self.consumers.touch(&waiting.request.consumer, now);
            record.waiting = record.waiting.saturating_sub(1);
            record.holding += 1;
            record.grants += 1;
            self.stats.total_grants += 1;
            self.stats.last_wait = waited;
            self.holding.insert(
                token,
                Holding {
                    request: waiting.request,
                    granted_at: now,
                    waited,
                },
            );
            grants.push(Grant {
                waiter,
                token,
                waited,
                payload: waiting.payload,
            });
        }
        grants
    }

    /// Takes a request out of the queue without granting it.
    ///
    /// Returns its payload, or `None` if it is no longer waiting (it was
    /// granted or withdrawn before); in that case nothing changes.
    pub fn withdraw(&mut self, id: WaiterId, how: Withdrawal, now: Instant) -> Option<W> {
        let waiting = self.waiting.remove(&id)?;
        let record = self.consumers.touch(&waiting.request.consumer, now);
        record.waiting = record.waiting.saturating_sub(1);
        match how {
            Withdrawal::Withdrawn => self.stats.ended.withdrawn += 1,
            Withdrawal::Expired => self.stats.ended.expired += 1,
        }
        Some(waiting.payload)
    }

    /// Ends a held lease and frees its permit.
    ///
    /// Returns what ended, or `None` if the token does not name a held lease
    /// (it ended before): ending a lease twice is harmless and changes
    /// nothing. Call [`Scheduler::grant_ready`] afterwards.
    pub fn end(&mut self, token: FencingToken, how: LeaseEnd, now: Instant) -> Option<EndedLease> {
        let holding = self.holding.remove(&token)?;
        let held = now.saturating_duration_since(holding.granted_at);
        let record = self.consumers.touch(&holding.request.consumer, now);
        record.holding = record.holding.saturating_sub(1);
        self.stats.last_hold = held;
        let ended = &mut self.stats.ended;
        match how {
            LeaseEnd::Released => ended.released += 1,
            LeaseEnd::HalfClosed => ended.half_closed += 1,
            LeaseEnd::Disconnected => ended.disconnected += 1,
            LeaseEnd::Revoked(_) => ended.revoked += 1,
        }
        Some(EndedLease {
            consumer: holding.request.consumer,
            token,
            held,
            waited: holding.waited,
        })
    }

    /// Whether `id` names a request that waits now.
    pub fn is_waiting(&self, id: WaiterId) -> bool {
        self.waiting.contains_key(&id)
    }

    /// Whether `token` names a lease that is held now.
    pub fn is_held(&self, token: FencingToken) -> bool {
        self.holding.contains_key(&token)
    }

    /// Visits every waiter in queue order with its position (1 = next).
    /// O(queue length): for periodic position updates, not for every grant.
    pub fn for_each_waiter(&mut self, mut visit: impl FnMut(u32, &mut W)) {
        for (index, waiting) in self.waiting.values_mut().enumerate() {
            visit(saturating_u32(index + 1), &mut waiting.payload);
        }
    }

    /// The held leases, oldest grant first.
    pub fn holders(&self, now: Instant) -> Vec<HolderView> {
        self.holding
            .iter()
            .map(|(token, holding)| HolderView {
                token: *token,
                request: holding.request.clone(),
                held: now.saturating_duration_since(holding.granted_at),
            })
            .collect()
    }

    /// Everything the core knows, at `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let waiters: Vec<WaiterView> = self
            .waiting
            .values()
            .enumerate()
            .map(|(index, waiting)| WaiterView {
                position: saturating_u32(index + 1),
                request: waiting.request.clone(),
                waiting: now.saturating_duration_since(waiting.since),
            })
            .collect();
        Snapshot {
            capacity: saturating_u32(self.capacity),
            total_grants: self.stats.total_grants,
            last_wait: self.stats.last_wait,
            last_hold: self.stats.last_hold,
            oldest_queued: waiters.first().map_or(Duration::ZERO, |w| w.waiting),
            holders: self.holders(now),
            waiters,
            consumers: self.consumers.records(),
            ended: self.stats.ended,
        }
    }

    /// Withdraws every waiter, for shutdown; returns their payloads in queue
    /// order.
    pub fn drain_waiters(&mut self, now: Instant) -> VecDeque<W> {
        let ids: Vec<WaiterId> = self.waiting.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| self.withdraw(id, Withdrawal::Withdrawn, now))
            .collect()
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
