//! What the core shows of itself: the snapshot for Status and metrics, the
//! held leases, and where each waiter stands for its position updates.

use std::time::{Duration, Instant};

use super::*;

/// A held lease, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HolderView {
    /// The lease's token.
    pub token: FencingToken,
    /// The GPU it holds.
    pub gpu_index: u32,
    /// The most memory its processes were seen using, in MiB.
    pub peak_mib: u64,
    /// The request it was granted for.
    pub request: Request,
    /// How long it has been held.
    pub held: Duration,
    /// Its priority when granted.
    pub priority: i32,
    /// Whether it was asked to make way for a waiter of higher priority.
    pub preempt_requested: bool,
}

/// A waiting request, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WaiterView {
    /// Its place in its GPU's queue; 1 is next.
    pub position: u32,
    /// The GPU it waits for.
    pub gpu_index: u32,
    /// The request.
    pub request: Request,
    /// How long it has waited.
    pub waiting: Duration,
    /// Its effective priority now (its priority plus aging).
    pub priority: i32,
    /// How much longer it is expected to wait, from the hold times learned
    /// per consumer; `None` when unknown.
    pub estimated_wait: Option<Duration>,
}

/// Counts of how leases and requests ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct EndCounts {
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
    /// Leases granted at the moment their requester stopped waiting, so
    /// that the grant never reached it: ended at once, never used.
    pub unclaimed: u64,
    /// Requests whose maximum wait passed.
    pub expired: u64,
}

/// Unloads asked for and how they went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct EvictionStats {
    /// Residents asked to unload.
    pub requested: u64,
    /// Residents whose memory came back in time for a grant.
    pub completed: u64,
    /// Residents that let the unload deadline pass.
    pub failed: u64,
    /// The last consumer whose unload completed.
    pub last_victim: String,
    /// How long that unload took.
    pub last_unload: Duration,
}

/// A resident consumer, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResidentView {
    /// The resident.
    pub resident: Resident,
    /// How long it has been idle.
    pub idle: Duration,
    /// The most memory its consumer was seen using while it held a lease,
    /// in MiB: what a job of it needs, not what it keeps.
    pub peak_mib: u64,
}

/// One GPU, as the snapshot shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GpuView {
    /// What it is.
    pub spec: GpuSpec,
    /// Its latest memory reading, if measured.
    pub reading: Option<MemoryReading>,
    /// Memory the head of its queue could take now, in MiB.
    pub headroom_mib: i64,
    /// Held leases on it.
    pub holders: Vec<HolderView>,
    /// Requests waiting for it, in order.
    pub waiters: Vec<WaiterView>,
    /// Idle consumers keeping memory on it.
    pub residents: Vec<ResidentView>,
    /// Why the head of its queue is not granted.
    pub blocked: Option<String>,
    /// Processes on it that belong to no holder and no resident.
    pub unleased: Vec<ProcessUsage>,
    /// The consumer of the waiter that holds the GPU's reservation.
    pub reserved_for: Option<String>,
    /// Every process on it, with whom it is attributed to.
    pub processes: Vec<AttributedProcess>,
    /// How many requests wait for it; `waiters` may list fewer.
    pub queue_depth: usize,
    /// How long its oldest waiter has waited; zero when nobody waits.
    pub oldest_waiting: Duration,
}

/// A process on a GPU and the consumer it is attributed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AttributedProcess {
    /// The process.
    pub process: ProcessUsage,
    /// The holder or resident it belongs to; empty when unleased.
    pub consumer: String,
    /// How it was tied to that consumer; `None` when unleased.
    pub attribution: Option<Attribution>,
}

/// Everything the core knows, at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// How many leases may be held at once on each GPU.
    pub capacity_per_gpu: u32,
    /// How many leases may be held at once, over all GPUs.
    pub total_capacity: u32,
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
    /// Waiting requests, in queue order (each GPU's first, then each
    /// GPU's second, …); perhaps not all of them, see
    /// [`Scheduler::snapshot_listing`].
    pub waiters: Vec<WaiterView>,
    /// How many requests wait, over all GPUs.
    pub queue_depth: usize,
    /// Configured consumers and those seen since the start, by name.
    pub consumers: Vec<ConsumerRecord>,
    /// How leases and requests ended.
    pub ended: EndCounts,
    /// Every GPU.
    pub gpus: Vec<GpuView>,
    /// Unloads and how they went.
    pub evictions: EvictionStats,
}

impl<W, H: Clone + Default> Scheduler<W, H> {
    /// Visits every waiter in queue order with where it stands. O(queue
    /// length): for periodic position updates, not for every grant.
    /// `limit` visits only the first so many waiters of each GPU.
    pub(crate) fn for_each_waiter(
        &mut self,
        limit: Option<usize>,
        now: Instant,
        mut visit: impl FnMut(WaiterPlace<'_>, &mut W),
    ) {
        let capacity = self.settings.capacity;
        for gpu in &mut self.gpus {
            let depth = saturating_u32(gpu.waiting.len());
            let blocked = gpu.blocked_by().map(|b| b.to_string());
            let take = limit.unwrap_or(usize::MAX);
            let order: Vec<(WaiterId, i32)> = gpu
                .waiting
                .in_order(now)
                .take(take)
                .map(|(id, priority, _)| (id, priority))
                .collect();
            let estimates = gpu.estimate_waits(&self.consumers, capacity, now, order.len());
            for (index, ((id, priority), estimate)) in order.into_iter().zip(estimates).enumerate()
            {
                let place = WaiterPlace {
                    gpu_index: gpu.spec.index,
                    position: saturating_u32(index + 1),
                    queue_depth: depth,
                    blocked: blocked.as_deref(),
                    priority,
                    estimated_wait: estimate,
                };
                if let Some(waiting) = gpu.waiting.get_mut(id) {
                    visit(place, &mut waiting.payload);
                }
            }
        }
    }

    /// The held leases on `gpu_index` (all GPUs with `None`), oldest grant
    /// first.
    pub(crate) fn holders(&self, gpu_index: Option<u32>, now: Instant) -> Vec<HolderView> {
        let mut holders: Vec<HolderView> = self
            .gpus
            .iter()
            .filter(|g| gpu_index.is_none_or(|index| index == g.spec.index))
            .flat_map(|g| {
                g.holding.iter().map(|(token, holding)| HolderView {
                    token: *token,
                    gpu_index: g.spec.index,
                    peak_mib: holding.peak_mib,
                    request: holding.request.clone(),
                    held: now.saturating_duration_since(holding.granted_at),
                    priority: holding.priority,
                    preempt_requested: holding.preempt.is_some(),
                })
            })
            .collect();
        holders.sort_by_key(|h| h.token);
        holders
    }

    /// Everything the core knows, at `now`.
    #[cfg(test)]
    pub(crate) fn snapshot(&self, now: Instant) -> Snapshot {
        self.snapshot_listing(now, usize::MAX)
    }

    /// Everything the core knows, at `now`, listing at most `waiters` of
    /// each GPU's waiters (the first in queue order), so that a snapshot of
    /// a long queue costs in proportion to what is shown. The counts and
    /// the oldest wait still cover everyone.
    pub(crate) fn snapshot_listing(&self, now: Instant, waiters: usize) -> Snapshot {
        let listed = waiters;
        let margin = self.settings.safety_margin_mib;
        let capacity = self.settings.capacity;
        let gpus: Vec<GpuView> = self
            .gpus
            .iter()
            .map(|gpu| {
                let estimates = gpu.estimate_waits(&self.consumers, capacity, now, listed);
                let waiters: Vec<WaiterView> = gpu
                    .waiting
                    .in_order(now)
                    .take(listed)
                    .zip(estimates)
                    .enumerate()
                    .map(|(index, ((_, priority, waiting), estimate))| WaiterView {
                        position: saturating_u32(index + 1),
                        gpu_index: gpu.spec.index,
                        request: waiting.request.clone(),
                        waiting: now.saturating_duration_since(waiting.since),
                        priority,
                        estimated_wait: estimate,
                    })
                    .collect();
                let head = waiters.first().map_or("", |w| w.request.consumer.as_str());
                let processes: Vec<AttributedProcess> = gpu
                    .reading
                    .iter()
                    .flat_map(|r| r.processes.iter())
                    .map(|p| gpu.attribute(p))
                    .collect();
                let known = |p: &ProcessUsage| {
                    gpu.matched.contains_key(&p.pid)
                        || gpu
                            .holding
                            .values()
                            .any(|h| p.belongs_to(h.request.client_pid))
                        || gpu.residents.values().any(|r| p.belongs_to(r.pid))
                };
                GpuView {
                    spec: gpu.spec.clone(),
                    reading: gpu.reading.clone(),
                    headroom_mib: i64::try_from(gpu.headroom(head, margin)).unwrap_or(i64::MAX),
                    holders: self.holders(Some(gpu.spec.index), now),
                    waiters,
                    residents: gpu
                        .residents
                        .values()
                        .map(|r| ResidentView {
                            resident: r.clone(),
                            idle: now.saturating_duration_since(r.idle_since),
                            peak_mib: self.consumers.peak_mib(&r.consumer),
                        })
                        .collect(),
                    blocked: gpu.blocked_by().map(|b| b.to_string()),
                    unleased: gpu
                        .reading
                        .iter()
                        .flat_map(|r| r.processes.iter())
                        .filter(|p| !known(p))
                        .cloned()
                        .collect(),
                    reserved_for: gpu
                        .reserved
                        .and_then(|id| gpu.waiting.get(id))
                        .map(|w| w.request.consumer.clone()),
                    processes,
                    queue_depth: gpu.waiting.len(),
                    oldest_waiting: gpu
                        .waiting
                        .oldest_since()
                        .map_or(Duration::ZERO, |since| now.saturating_duration_since(since)),
                }
            })
            .collect();
        // Queue order: each GPU's first, oldest first, then each GPU's
        // second, and so on.
        let mut waiters: Vec<WaiterView> = gpus.iter().flat_map(|g| g.waiters.clone()).collect();
        waiters.sort_by_key(|w| (w.position, std::cmp::Reverse(w.waiting)));
        Snapshot {
            capacity_per_gpu: saturating_u32(self.settings.capacity),
            total_capacity: saturating_u32(self.settings.capacity.saturating_mul(self.gpus.len())),
            total_grants: self.stats.total_grants,
            last_wait: self.stats.last_wait,
            last_hold: self.stats.last_hold,
            oldest_queued: gpus
                .iter()
                .map(|g| g.oldest_waiting)
                .max()
                .unwrap_or(Duration::ZERO),
            queue_depth: gpus.iter().map(|g| g.queue_depth).sum(),
            holders: self.holders(None, now),
            waiters,
            consumers: self.consumers.records(),
            ended: self.stats.ended,
            gpus,
            evictions: self.stats.evictions.clone(),
        }
    }
}

/// Where a waiting request stands, for position updates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaiterPlace<'a> {
    /// The GPU it waits for.
    pub gpu_index: u32,
    /// Its place in that GPU's queue; 1 is next.
    pub position: u32,
    /// How many wait for that GPU.
    pub queue_depth: u32,
    /// Why the head of that queue is not granted, if it is not.
    pub blocked: Option<&'a str>,
    /// Its effective priority now.
    pub priority: i32,
    /// How much longer it is expected to wait; `None` when unknown.
    pub estimated_wait: Option<Duration>,
}
