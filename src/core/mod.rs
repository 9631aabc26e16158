//! The scheduling core: a pure, synchronous state machine that decides who
//! holds which GPU.
//!
//! Per GPU it keeps a queue of waiting requests (by effective priority,
//! then arrival; backfill may grant a later one that fits now, within the
//! reservation rule), the held leases (at
//! most `capacity`), the consumers that stay resident in its memory while
//! idle, and its latest memory reading; across GPUs it keeps the consumers
//! it has seen and the statistics. Before granting the head of a queue it
//! checks that the request fits in the GPU's memory, and if not, decides
//! which idle residents to ask to unload (`gpu.rs`). Every method takes `now`
//! as an argument and returns decisions (grant this waiter, ask that
//! consumer to unload); nothing here sleeps, awaits, or knows about tokio,
//! tonic, prost or NVML. The async layer (`crate::broker`) owns one
//! `Scheduler` behind a mutex and turns its decisions into messages.
//!
//! Each waiter carries a payload `W` chosen by the caller (the broker stores
//! the channel that delivers the grant there). The core hands the payload
//! back when it grants or withdraws the waiter. Each held lease carries a
//! payload `H` in the same way (the broker's revocation), made at the grant
//! and dropped when the lease ends, so the caller never has to keep a second
//! map in step with the core's.

mod attribution;
mod consumers;
mod gpu;
#[cfg(test)]
mod memory_tests;
mod name;
mod queue;
mod scheduler;
#[cfg(test)]
mod script;
mod sharing;
#[cfg(test)]
mod sharing_tests;
#[cfg(test)]
mod tests;
mod view;

use std::collections::BTreeMap;
use std::time::Duration;

pub(crate) use attribution::Attribution;
pub(crate) use consumers::{ConsumerKind, ConsumerProfile, ConsumerRecord, DEFAULT_PREEMPT_GRACE};
pub(crate) use gpu::{
    Blocked, BlockedBy, Fence, GpuSpec, MemoryReading, ProcessUsage, Resident, Unload,
    UnloadRequest,
};
pub(crate) use name::{ConsumerNameError, validate_consumer_name};
pub(crate) use queue::{MAX_PRIORITY, MIN_PRIORITY};
pub(crate) use scheduler::Scheduler;
pub(crate) use view::{
    AttributedProcess, EndCounts, EvictionStats, GpuView, HolderView, Snapshot, WaiterView,
};

use consumers::ConsumerBook;
use gpu::{Admit, GpuState, Holding, Preempt};
use queue::Waiting;

/// How many waiters past the head backfill looks at for one that fits now.
/// A bound, so that finding the next grant never scans a long queue.
pub(crate) const BACKFILL_WINDOW: usize = 32;

/// Identifies a waiting request. Ids increase in arrival order, so the
/// queue's order is the order of its ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct WaiterId(u64);

/// The fencing token of a grant. Strictly increasing over all grants of one
/// `Scheduler`; it also names the lease while it is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct FencingToken(pub u64);

/// What a consumer asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Request {
    /// The consumer's name; see [`validate_consumer_name`].
    pub consumer: String,
    /// The VRAM the work needs, in MiB; 0 when unknown.
    pub vram_mib: u64,
    /// The consumer's process id; 0 when unknown.
    pub client_pid: u32,
    /// How `client_pid` was found; `None` when it is unknown.
    pub attribution: Option<Attribution>,
    /// Free-form labels, shown in the snapshot.
    pub labels: BTreeMap<String, String>,
    /// Which GPU it wants.
    pub gpu: GpuChoice,
    /// A priority below its consumer's, if it asks for one; a higher one is
    /// lowered to the consumer's.
    pub priority: Option<i32>,
}

/// Which GPU a request wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum GpuChoice {
    /// Whichever can take it soonest.
    #[default]
    Any,
    /// The GPU with this index.
    Index(u32),
    /// The GPU with this UUID.
    Uuid(String),
}

/// How the scheduler is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    /// How many leases may be held at once on each GPU (at least 1).
    pub capacity: usize,
    /// Refuse consumers that are not configured.
    pub strict: bool,
    /// Memory kept free on every GPU beyond what requests ask, in MiB.
    pub safety_margin_mib: u64,
    /// How long a resident asked to unload has to free its memory.
    pub unload_timeout: Duration,
    /// After a holder vanishes without releasing, how long the next grant on
    /// a measured GPU may wait for its processes to leave; zero turns it off.
    pub lock_delay: Duration,
    /// Whether later requests that fit now may be granted while the head of
    /// the queue cannot be, within the reservation rule; `false` is strict
    /// FIFO within each priority.
    pub backfill: bool,
    /// A waiter's effective priority rises by one for every whole `aging` it
    /// has waited; zero turns aging off.
    pub aging: Duration,
    /// How long a waiter must have waited before a lower-priority,
    /// preemptible holder in its way is asked to make room.
    pub preempt_after: Duration,
}

impl Default for Settings {
    /// One lease per GPU, strict FIFO, no aging: the plainest scheduler.
    fn default() -> Self {
        Self {
            capacity: 1,
            strict: false,
            safety_margin_mib: 0,
            unload_timeout: Duration::from_secs(10),
            lock_delay: Duration::ZERO,
            backfill: false,
            aging: Duration::ZERO,
            preempt_after: Duration::from_secs(30),
        }
    }
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
    /// No GPU has that index or UUID.
    #[error("no GPU is {0:?}; the broker has {1}")]
    UnknownGpu(String, String),
    /// The request needs more memory than the chosen GPUs have.
    #[error("the request needs {need_mib} MiB but the largest GPU it may use has {total_mib} MiB")]
    TooLarge {
        /// What it needs.
        need_mib: u64,
        /// What the largest eligible GPU has.
        total_mib: u64,
    },
}

/// How a held lease ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// The consumer sent `Release`.
    Released,
    /// The consumer half-closed its side of the stream.
    HalfClosed,
    /// The call was cancelled or the connection was lost.
    Disconnected,
    /// Granted just as the consumer stopped waiting, so the grant never
    /// reached it: no GPU work can have happened under this lease.
    Unclaimed,
    /// The broker ended the lease.
    Revoked(RevokeReason),
}

/// Why the broker revoked a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RevokeReason {
    /// The broker is shutting down.
    Shutdown,
    /// The lease outlived the configured maximum hold time.
    MaxHoldExceeded,
    /// An operator revoked it.
    Admin,
    /// It did not make way in time for a waiter of higher priority.
    Preempted,
}

/// How a waiting request left the queue without a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Withdrawal {
    /// The consumer stopped waiting (release, cancel, disconnect, shutdown).
    Withdrawn,
    /// Its maximum wait passed.
    Expired,
}

/// A decision to grant the lease to a waiter.
#[derive(Debug)]
pub(crate) struct Grant<W, H> {
    /// The waiter that was granted; it is no longer in the queue. The
    /// broker knows its waiter by the payload; the property tests check
    /// the order of grants by this id.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the tests"))]
    pub waiter: WaiterId,
    /// The new lease's token.
    pub token: FencingToken,
    /// The granted GPU's index.
    pub gpu_index: u32,
    /// The granted GPU's UUID; empty when unknown.
    pub gpu_uuid: String,
    /// How long the request waited.
    pub waited: Duration,
    /// The payload the waiter was enqueued with.
    pub payload: W,
    /// The holder's payload, made for this grant (`H::default()`): the core
    /// keeps it with the lease until the lease ends (see
    /// [`Scheduler::held`]), and this is a clone of it.
    pub held: H,
}

/// A lease that has just ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EndedLease {
    /// Who held it.
    pub consumer: String,
    /// Its token.
    pub token: FencingToken,
    /// How long it was held.
    pub held: Duration,
    /// How long it had waited before the grant.
    pub waited: Duration,
    /// The GPU it held.
    pub gpu_index: u32,
}

/// A decision to ask a holder to make way for a waiter of higher priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Preemption {
    /// The lease to end.
    pub token: FencingToken,
    /// Its holder.
    pub consumer: String,
    /// Who waits for it.
    pub for_consumer: String,
    /// How long the holder has before its lease is revoked.
    pub grace: Duration,
}

/// What [`Scheduler::grant_ready`] decided.
#[derive(Debug)]
pub(crate) struct Decisions<W, H> {
    /// Grants, in order.
    pub grants: Vec<Grant<W, H>>,
    /// Residents to ask to unload.
    pub unloads: Vec<UnloadRequest>,
    /// Holders to ask to make way.
    pub preemptions: Vec<Preemption>,
    /// Leases to revoke ([`RevokeReason::Preempted`]): asked to make way,
    /// their grace passed.
    pub revocations: Vec<FencingToken>,
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
