//! One GPU as the core sees it: its queue and holders, the consumers that
//! stay resident in its memory while idle, its latest memory reading, and
//! the admission of the waiter at the head of its queue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::consumers::ConsumerBook;
use super::queue::Queue;
use super::{AttributedProcess, Attribution, FencingToken, Request, WaiterId};

/// A GPU, as the inventory describes it at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GpuSpec {
    /// Its index, as CUDA and NVML number it.
    pub index: u32,
    /// Its UUID (`GPU-…`); empty when unknown.
    pub uuid: String,
    /// Its product name; empty when unknown.
    pub name: String,
    /// Its memory, in MiB.
    pub total_mib: u64,
    /// Whether readings of its memory will come (NVML). Without them the
    /// core models memory from what it granted and what stays resident.
    pub measured: bool,
}

/// A process using a GPU, in a memory reading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcessUsage {
    /// Its process id.
    pub pid: u32,
    /// The GPU memory it uses, in MiB.
    pub used_mib: u64,
    /// Its parent, grandparent, … as far as they can be found, so that a
    /// child of a lease holder counts as the holder's.
    pub ancestors: Vec<u32>,
}

impl ProcessUsage {
    /// Whether this process is `pid` or one of its descendants.
    pub(crate) fn belongs_to(&self, pid: u32) -> bool {
        pid != 0 && (self.pid == pid || self.ancestors.contains(&pid))
    }
}

/// What the inventory read of a GPU's memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MemoryReading {
    /// Memory in all, in MiB.
    pub total_mib: u64,
    /// Memory in use, in MiB.
    pub used_mib: u64,
    /// Memory free, in MiB.
    pub free_mib: u64,
    /// The processes that use the GPU.
    pub processes: Vec<ProcessUsage>,
}

impl MemoryReading {
    /// The free memory that admission may count on, in MiB: `free_mib`, but
    /// never more than what `processes` leave of `total_mib`.
    ///
    /// A reading is not one snapshot: NVML answers the free memory and the
    /// processes in separate calls, and a process may allocate between
    /// them. Its new memory then shows both as free and as the process's
    /// own, so a holder that just loaded its model would seem to have kept
    /// its promise while that memory still counted as free: the sharing
    /// benchmark's over-commits. Counted once, as used, it cannot be
    /// granted twice.
    pub(crate) fn trusted_free_mib(&self) -> u64 {
        let listed: u64 = self.processes.iter().map(|p| p.used_mib).sum();
        self.free_mib.min(self.total_mib.saturating_sub(listed))
    }
}

/// A consumer that keeps memory on a GPU while it holds no lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Resident {
    /// The consumer.
    pub consumer: String,
    /// The memory it keeps now, in MiB: what its processes hold in the
    /// latest reading (measured GPUs), else its configured size.
    pub footprint_mib: u64,
    /// When its last lease on this GPU ended.
    pub idle_since: Instant,
    /// The process id of its last lease (or of a process its `match` rule
    /// found); 0 when unknown.
    pub pid: u32,
    /// How `pid` was found.
    pub attribution: Option<Attribution>,
    /// Whether a reading ever showed its process on this GPU, so that its
    /// disappearance means it unloaded.
    pub seen: bool,
    /// Whether it was asked to unload, and how that went.
    pub unload: Unload,
}

/// Where a resident stands with unloading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Unload {
    /// Not asked, or the request no longer applies (the waiter it was
    /// asked for was granted, or left).
    #[default]
    NotAsked,
    /// Asked to unload for the head of the queue; its memory is awaited.
    Requested,
    /// It let an unload deadline pass without freeing its memory: not asked
    /// again until its consumer next asks for a lease.
    NotFreed,
}

/// A request to a resident consumer to free its memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UnloadRequest {
    /// The consumer to ask.
    pub consumer: String,
    /// The GPU to free.
    pub gpu_index: u32,
    /// The memory it keeps now, in MiB.
    pub footprint_mib: u64,
    /// The most memory it was seen using while it held a lease, in MiB.
    pub peak_mib: u64,
    /// For whom: the consumer at the head of the queue.
    pub for_consumer: String,
}

/// The state of one GPU.
#[derive(Debug)]
pub(super) struct GpuState<W, H> {
    pub(super) spec: GpuSpec,
    /// Waiting requests, by effective priority and then arrival.
    pub(super) waiting: Queue<W>,
    /// Held leases by token, in grant order.
    pub(super) holding: BTreeMap<FencingToken, Holding<H>>,
    /// Idle consumers keeping memory here, by name.
    pub(super) residents: BTreeMap<String, Resident>,
    /// The processes of the latest reading that consumers' `match` rules
    /// tie to them: pid → consumer.
    pub(super) matched: BTreeMap<u32, String>,
    pub(super) reading: Option<MemoryReading>,
    /// When `reading` was taken.
    pub(super) reading_at: Option<Instant>,
    /// Hand-overs held back until vanished holders' processes leave.
    pub(super) fences: Vec<Fence>,
    /// The head waiter's admission, while it waits for memory.
    pub(super) admission: Option<Admission>,
    /// Why the head of the queue is not granted.
    pub(super) blocked: Option<Blocked>,
    /// When a lease on it last ended: its job memory is being freed, so
    /// memory decisions wait for a reading taken after that.
    pub(super) last_end: Option<Instant>,
    /// The waiter that holds the reservation: it would fit if the leases
    /// backfilled ahead of it ended, so nothing more is granted before it.
    pub(super) reserved: Option<WaiterId>,
}

#[derive(Debug)]
pub(super) struct Holding<H> {
    pub(super) request: Request,
    /// Its priority when granted (before aging).
    pub(super) priority: i32,
    /// Its effective priority when granted (aging included): only a waiter
    /// above it may preempt it. A waiter it was served before cannot undo
    /// that grant the moment it is made.
    pub(super) standing: i32,
    pub(super) granted_at: Instant,
    pub(super) waited: Duration,
    /// The most GPU memory its processes were seen using, in MiB.
    pub(super) peak_mib: u64,
    /// The request's id in the queue.
    pub(super) waiter: WaiterId,
    /// Granted by backfill, ahead of waiters served before it: the newest
    /// waiter's id at the grant, so that the waiters it overtook are those
    /// up to it that were ordered before it.
    pub(super) overtook: Option<WaiterId>,
    /// It was asked to make way for a waiter of higher priority.
    pub(super) preempt: Option<Preempt>,
    /// What the caller keeps with the lease while it is held.
    pub(super) payload: H,
}

/// A holder asked to make way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Preempt {
    /// The waiter it makes way for.
    pub(super) for_waiter: WaiterId,
    /// When its lease is revoked unless it has ended.
    pub(super) deadline: Instant,
    /// Whether the revocation was decided already.
    pub(super) revoked: bool,
}

/// The head waiter's wait for memory: whom it asked to unload, and until
/// when it waits for them.
#[derive(Debug)]
pub(super) struct Admission {
    pub(super) waiter: WaiterId,
    pub(super) victims: Vec<String>,
    pub(super) asked_at: Instant,
    pub(super) deadline: Instant,
}

/// A hand-over held back after a holder vanished (or, at start, while
/// processes that no lease accounts for use the GPU): the next grant waits
/// until a reading taken after `since` shows none of `pids` on the GPU, or
/// until `until`, whichever comes first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fence {
    /// The vanished holder; empty for the startup quarantine.
    pub who: String,
    /// The processes to wait for; empty when unknown (then the full delay).
    pub pids: Vec<u32>,
    /// When the fence went up.
    pub since: Instant,
    /// When it comes down regardless.
    pub until: Instant,
}

/// What admission decided for the head of a queue. Admission keeps the
/// head's `Admission` (whom it asked, until when); why the head waits is
/// its outcome, for the caller to record.
pub(super) enum Admit {
    /// It fits: grant it.
    Grant,
    /// It does not fit yet.
    Wait {
        /// Why, when that changed (`None`: the reason shown stands).
        why: Option<Blocked>,
        /// The residents to ask to unload (none when it waits for memory
        /// to come back on its own).
        unloads: Vec<UnloadRequest>,
    },
}

impl Admit {
    /// Waiting, for the reason already shown, asking nobody.
    fn waiting() -> Self {
        Self::Wait {
            why: None,
            unloads: Vec::new(),
        }
    }
}

impl<H> Holding<H> {
    /// Whether this lease was backfilled ahead of waiter `id`, of
    /// `priority`.
    pub(super) fn overtook(&self, id: WaiterId, priority: i32) -> bool {
        self.overtook.is_some_and(|newest| {
            id <= newest
                && (priority > self.priority || (priority == self.priority && id < self.waiter))
        })
    }
}

impl<W, H> GpuState<W, H> {
    /// Takes down the fences whose processes have left or whose time is
    /// up; returns whether a grant may happen now. A measured GPU also
    /// waits for its first reading.
    pub(super) fn fences_clear(&mut self, now: Instant) -> bool {
        if self.spec.measured && self.reading.is_none() {
            self.blocked = Some(Blocked::NoReading);
            return false;
        }
        let reading = self.reading.as_ref();
        let reading_at = self.reading_at;
        self.fences.retain(|fence| {
            if now >= fence.until {
                return false;
            }
            let fresh = reading_at.is_some_and(|at| at >= fence.since);
            let present = reading.is_some_and(|r| {
                r.processes
                    .iter()
                    .any(|p| fence.pids.iter().any(|pid| p.belongs_to(*pid)))
            });
            !(fresh && !fence.pids.is_empty() && !present)
        });
        match self.fences.first() {
            None => true,
            Some(fence) => {
                self.blocked = Some(Blocked::Fenced {
                    who: fence.who.clone(),
                    pids: fence.pids.clone(),
                    left: fence.until.saturating_duration_since(now),
                });
                false
            }
        }
    }

    /// Drops the head's admission when that head is gone (granted
    /// elsewhere, withdrawn, overtaken by a higher priority): the residents
    /// asked to unload for it are no longer asked.
    pub(super) fn forget_admission(&mut self) {
        let Some(admission) = self.admission.take() else {
            return;
        };
        for victim in &admission.victims {
            if let Some(resident) = self.residents.get_mut(victim)
                && resident.unload == Unload::Requested
            {
                resident.unload = Unload::NotAsked;
            }
        }
    }

    pub(super) fn new(spec: GpuSpec, aging: Duration) -> Self {
        Self {
            spec,
            waiting: Queue::new(aging),
            holding: BTreeMap::new(),
            residents: BTreeMap::new(),
            matched: BTreeMap::new(),
            reading: None,
            reading_at: None,
            fences: Vec::new(),
            admission: None,
            blocked: None,
            last_end: None,
            reserved: None,
        }
    }

    /// The memory the processes of `pid` (and their children), and those
    /// that `consumer`'s `match` rule found, use now, by the latest reading.
    pub(super) fn observed_mib(&self, pid: u32, consumer: &str) -> u64 {
        self.reading.as_ref().map_or(0, |reading| {
            reading
                .processes
                .iter()
                .filter(|p| {
                    p.belongs_to(pid) || self.matched.get(&p.pid).is_some_and(|c| c == consumer)
                })
                .map(|p| p.used_mib)
                .sum()
        })
    }

    /// Whether memory decisions must wait for a reading: a measured GPU
    /// whose latest reading was taken before its latest lease end (the
    /// ended holder's job memory is being freed), or that has none.
    pub(super) fn reading_is_stale(&self) -> bool {
        self.spec.measured
            && match (self.reading_at, self.last_end) {
                (None, _) => true,
                (Some(read), Some(ended)) => read < ended,
                (Some(_), None) => false,
            }
    }

    /// The memory a resident keeps that counts as room for itself: on a
    /// measured GPU what its processes hold in the latest reading (nothing
    /// if they cannot be told apart), else its configured size. Never its
    /// peak: between jobs a process holds only its model.
    fn own_room(&self, resident: &Resident) -> u64 {
        if self.spec.measured {
            self.observed_mib(resident.pid, &resident.consumer)
        } else {
            resident.footprint_mib
        }
    }

    /// The memory a holder takes by the broker's accounting: what it was
    /// promised, or what its processes use if that is more.
    pub(super) fn holder_mib(&self, holding: &Holding<H>) -> u64 {
        if self.spec.measured {
            holding
                .request
                .vram_mib
                .max(self.observed_mib(holding.request.client_pid, &holding.request.consumer))
        } else {
            holding.request.vram_mib
        }
    }

    /// Makes each consumer whose matched processes use this GPU while it
    /// holds no lease here resident, with the memory they use (or, where
    /// NVML does not say, `footprint(consumer)`).
    pub(super) fn adopt_matched(
        &mut self,
        reading: &MemoryReading,
        footprint: impl Fn(&str) -> u64,
        now: Instant,
    ) {
        let mut found: BTreeMap<String, (u64, u32)> = BTreeMap::new();
        for process in &reading.processes {
            if let Some(consumer) = self.matched.get(&process.pid) {
                let entry = found.entry(consumer.clone()).or_insert((0, process.pid));
                entry.0 += process.used_mib;
            }
        }
        for (consumer, (used_mib, pid)) in found {
            if self
                .holding
                .values()
                .any(|h| h.request.consumer == consumer)
            {
                continue;
            }
            let footprint_mib = if used_mib > 0 {
                used_mib
            } else {
                footprint(&consumer)
            };
            let resident = self
                .residents
                .entry(consumer.clone())
                .or_insert_with(|| Resident {
                    consumer,
                    footprint_mib,
                    idle_since: now,
                    pid,
                    attribution: Some(Attribution::Matcher),
                    seen: true,
                    unload: Unload::NotAsked,
                });
            resident.footprint_mib = footprint_mib;
            resident.pid = pid;
            resident.attribution = Some(Attribution::Matcher);
            resident.seen = true;
        }
    }

    /// Whom a process of the latest reading is attributed to, and how: a
    /// holder's or resident's process (or descendant) as they were
    /// identified, else a matched process as `Matcher`.
    pub(super) fn attribute(&self, process: &ProcessUsage) -> AttributedProcess {
        let matched = self.matched.get(&process.pid);
        let by_pid = self
            .holding
            .values()
            .map(|h| {
                (
                    &h.request.consumer,
                    h.request.client_pid,
                    h.request.attribution,
                )
            })
            .chain(
                self.residents
                    .values()
                    .map(|r| (&r.consumer, r.pid, r.attribution)),
            )
            .find(|(_, pid, _)| process.belongs_to(*pid))
            .map(|(consumer, _, how)| (consumer.clone(), how));
        let (consumer, attribution) = by_pid
            .or_else(|| matched.map(|c| (c.clone(), Some(Attribution::Matcher))))
            .unwrap_or_default();
        AttributedProcess {
            process: process.clone(),
            consumer,
            attribution,
        }
    }

    /// Memory that `consumer` could take now, in MiB (negative when even
    /// the margin is not free). Its own resident memory counts as room: it
    /// will reuse what it keeps.
    pub(super) fn headroom(&self, consumer: &str, margin_mib: u64) -> i128 {
        let own = self.residents.get(consumer).map_or(0, |r| self.own_room(r));
        let margin = i128::from(margin_mib);
        match (&self.reading, self.spec.measured) {
            (Some(reading), true) => {
                // Memory promised to holders that their processes have not
                // allocated yet is not really free.
                let promised: u64 = self
                    .holding
                    .values()
                    .map(|h| {
                        h.request.vram_mib.saturating_sub(
                            self.observed_mib(h.request.client_pid, &h.request.consumer),
                        )
                    })
                    .sum();
                i128::from(reading.trusted_free_mib()) - i128::from(promised) - margin
                    + i128::from(own)
            }
            // A GPU of unknown size and no readings: no memory accounting.
            _ if self.spec.total_mib == 0 => i128::from(u64::MAX),
            _ => {
                let held: u64 = self.holding.values().map(|h| h.request.vram_mib).sum();
                let resident: u64 = self.residents.values().map(|r| r.footprint_mib).sum();
                i128::from(self.spec.total_mib) - i128::from(held) - i128::from(resident) - margin
                    + i128::from(own)
            }
        }
    }

    /// How much longer each of the first `limit` waiters, in queue order,
    /// is expected to wait: a permit frees up when a holder reaches its
    /// consumer's typical hold time, and each waiter ahead then holds it for
    /// its own consumer's. Memory is modelled only this far: while the head
    /// cannot be granted (`blocked`), a free permit does not help, and the
    /// next start is when a holder ends. `None` where the estimate depends
    /// on a hold time that has not been learned yet.
    pub(super) fn estimate_waits(
        &self,
        consumers: &ConsumerBook,
        capacity: usize,
        now: Instant,
        limit: usize,
    ) -> Vec<Option<Duration>> {
        use std::cmp::Reverse;
        // `Duration::MAX` stands for "unknown"; it stays unknown when added to.
        let unknown = Duration::MAX;
        let mut free_at: std::collections::BinaryHeap<Reverse<Duration>> = self
            .holding
            .values()
            .map(|h| {
                let held = now.saturating_duration_since(h.granted_at);
                consumers
                    .typical_hold(&h.request.consumer)
                    .map_or(unknown, |typical| typical.saturating_sub(held))
            })
            .chain(std::iter::repeat_n(
                Duration::ZERO,
                if self.blocked.is_some() {
                    0
                } else {
                    capacity.saturating_sub(self.holding.len())
                },
            ))
            .map(Reverse)
            .collect();
        let mut estimates = Vec::new();
        for (_, _, waiting) in self.waiting.in_order(now).take(limit) {
            let Reverse(start) = free_at.pop().unwrap_or(Reverse(unknown));
            estimates.push((start != unknown).then_some(start));
            let hold = consumers
                .typical_hold(&waiting.request.consumer)
                .unwrap_or(unknown);
            free_at.push(Reverse(start.saturating_add(hold)));
        }
        estimates
    }

    /// Whether `request` fits in memory now, without asking anyone to
    /// unload.
    pub(super) fn fits_now(&self, request: &Request, margin_mib: u64) -> bool {
        request.vram_mib == 0
            || (!self.reading_is_stale()
                && i128::from(request.vram_mib) <= self.headroom(&request.consumer, margin_mib))
    }

    /// Decides for the head waiter `id`, which needs `request.vram_mib`.
    /// `consumers` says who may be asked to unload, and in which order.
    pub(super) fn admit(
        &mut self,
        id: WaiterId,
        request: &Request,
        margin_mib: u64,
        unload_timeout: Duration,
        consumers: &ConsumerBook,
        now: Instant,
    ) -> Admit {
        let need_mib = request.vram_mib;
        if need_mib == 0 {
            return Admit::Grant;
        }
        if self.reading_is_stale() {
            // Decide on what the memory is now, not on a reading from
            // before a holder ended: its job memory may be free already,
            // and asking someone to unload for it would be needless.
            let why = (self.blocked.is_none() || self.reading.is_none()).then(|| {
                if self.reading.is_none() {
                    Blocked::NoReading
                } else {
                    Blocked::StaleReading
                }
            });
            return Admit::Wait {
                why,
                unloads: Vec::new(),
            };
        }
        let room = self.headroom(&request.consumer, margin_mib);
        let free_mib = u64::try_from(room.max(0)).unwrap_or(u64::MAX);
        if i128::from(need_mib) <= room {
            return Admit::Grant;
        }
        if let Some(admission) = &self.admission
            && admission.waiter == id
        {
            if now < admission.deadline {
                return Admit::waiting();
            }
            let culprits: Vec<String> = admission
                .victims
                .iter()
                .filter(|victim| self.residents.contains_key(victim.as_str()))
                .cloned()
                .collect();
            for culprit in &culprits {
                if let Some(resident) = self.residents.get_mut(culprit) {
                    resident.unload = Unload::NotFreed;
                }
            }
            self.admission = None;
            if !culprits.is_empty() {
                return Admit::Wait {
                    why: Some(Blocked::NotFreed {
                        culprits,
                        need_mib,
                        free_mib,
                        timeout: unload_timeout,
                    }),
                    unloads: Vec::new(),
                };
            }
        }
        // Culprits stay named for as long as they keep their memory.
        if let Some(Blocked::NotFreed { culprits, .. }) = &self.blocked
            && culprits.iter().any(|c| {
                self.residents
                    .get(c)
                    .is_some_and(|r| r.unload == Unload::NotFreed)
            })
        {
            return Admit::waiting();
        }

        // Idle residents that may not stay beside others, lower priority
        // first, then least recently used, until the request would fit.
        let mut candidates: Vec<&Resident> = self
            .residents
            .values()
            .filter(|r| {
                r.consumer != request.consumer
                    && r.unload != Unload::NotFreed
                    && consumers.is_evictable(&r.consumer)
                    && !self
                        .holding
                        .values()
                        .any(|h| h.request.consumer == r.consumer)
            })
            .collect();
        candidates.sort_by_key(|r| (consumers.priority(&r.consumer), r.idle_since));
        let mut freed = 0i128;
        let mut victims = Vec::new();
        for resident in candidates {
            if room + freed >= i128::from(need_mib) {
                break;
            }
            freed += i128::from(resident.footprint_mib);
            victims.push(resident.consumer.clone());
        }
        if victims.is_empty() || room + freed < i128::from(need_mib) {
            return Admit::Wait {
                why: Some(Blocked::NoRoom {
                    need_mib,
                    free_mib,
                    holders: !self.holding.is_empty(),
                }),
                unloads: Vec::new(),
            };
        }
        let mut requests = Vec::with_capacity(victims.len());
        for victim in &victims {
            if let Some(resident) = self.residents.get_mut(victim) {
                resident.unload = Unload::Requested;
                requests.push(UnloadRequest {
                    consumer: victim.clone(),
                    gpu_index: self.spec.index,
                    footprint_mib: resident.footprint_mib,
                    peak_mib: consumers.peak_mib(victim),
                    for_consumer: request.consumer.clone(),
                });
            }
        }
        self.admission = Some(Admission {
            waiter: id,
            victims,
            asked_at: now,
            deadline: now + unload_timeout,
        });
        Admit::Wait {
            why: Some(Blocked::Unloading { need_mib, free_mib }),
            unloads: requests,
        }
    }
}

/// Why the head of a GPU's queue is not granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// The GPU's memory has not been read yet.
    NoReading,
    /// A lease just ended; its memory is read again before anything that
    /// needs memory is decided.
    StaleReading,
    /// A holder vanished without releasing (or, at start, unknown processes
    /// use the GPU): its processes may still be using it.
    Fenced {
        /// The vanished holder; empty at start.
        who: String,
        /// Its processes.
        pids: Vec<u32>,
        /// How long the wait may still last.
        left: Duration,
    },
    /// Not enough memory, and no idle resident to ask.
    NoRoom {
        /// What the head needs, in MiB.
        need_mib: u64,
        /// What is free for it, in MiB.
        free_mib: u64,
        /// Whether leases are held (their end may make room).
        holders: bool,
    },
    /// Residents were asked to unload (the head's admission says who);
    /// their memory is awaited.
    Unloading {
        /// What the head needs, in MiB.
        need_mib: u64,
        /// What is free for it, in MiB.
        free_mib: u64,
    },
    /// These residents did not free their memory in time.
    NotFreed {
        /// Who did not.
        culprits: Vec<String>,
        /// What the head needs, in MiB.
        need_mib: u64,
        /// What is free for it, in MiB.
        free_mib: u64,
        /// How long they had.
        timeout: Duration,
    },
}

/// Why the head of a GPU's queue waits, as people read it: the reason, and
/// whom it asked to unload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockedBy<'a> {
    reason: &'a Blocked,
    asked: &'a [String],
}

impl<W, H> GpuState<W, H> {
    /// Why the head of the queue waits, if it does.
    pub(super) fn blocked_by(&self) -> Option<BlockedBy<'_>> {
        self.blocked.as_ref().map(|reason| BlockedBy {
            reason,
            asked: self.admission.as_ref().map_or(&[], |a| &a.victims),
        })
    }
}

impl std::fmt::Display for BlockedBy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            Blocked::NoReading => write!(f, "reading the GPU's memory"),
            Blocked::StaleReading => write!(f, "reading the GPU's memory after a lease ended"),
            Blocked::Fenced { who, pids, left } => {
                let pids: Vec<String> = pids.iter().map(ToString::to_string).collect();
                let left = humantime::format_duration(Duration::from_millis(
                    u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                ));
                if who.is_empty() {
                    write!(
                        f,
                        "at start, processes {} held the GPU without a lease; waiting up to {left} for them to leave",
                        pids.join(", ")
                    )
                } else if pids.is_empty() {
                    write!(
                        f,
                        "{who} vanished without releasing; waiting {left} before the next grant"
                    )
                } else {
                    write!(
                        f,
                        "{who} vanished without releasing; waiting up to {left} for its processes ({}) to leave the GPU",
                        pids.join(", ")
                    )
                }
            }
            Blocked::NoRoom {
                need_mib,
                free_mib,
                holders,
            } => {
                write!(f, "needs {need_mib} MiB, {free_mib} MiB free")?;
                if *holders {
                    write!(f, "; waiting for the holders")?;
                }
                Ok(())
            }
            Blocked::Unloading { need_mib, free_mib } if self.asked.is_empty() => write!(
                f,
                "waiting for residents to unload; needs {need_mib} MiB, {free_mib} MiB free"
            ),
            Blocked::Unloading { need_mib, free_mib } => write!(
                f,
                "asked {} to unload; needs {need_mib} MiB, {free_mib} MiB free",
                self.asked.join(", ")
            ),
            Blocked::NotFreed {
                culprits,
                need_mib,
                free_mib,
                timeout,
            } => write!(
                f,
                "{} did not free its memory within {}; needs {need_mib} MiB, {free_mib} MiB free",
                culprits.join(", "),
                humantime::format_duration(*timeout)
            ),
        }
    }
}

/// Whether `process` is the work of `request`'s holder: its process or a
/// descendant, or a process its consumer's `match` rule found.
pub(super) fn owns(
    matched: &BTreeMap<u32, String>,
    process: &ProcessUsage,
    request: &Request,
) -> bool {
    process.belongs_to(request.client_pid) || matched.get(&process.pid) == Some(&request.consumer)
}
