//! The scheduler: every GPU's queue, holders and residents, and the one
//! place where grants are decided ([`Scheduler::grant_ready`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::*;

/// The scheduling state of every GPU's leases.
///
/// Invariants, checked by the property tests (`tests.rs`: order, tokens and
/// ends without memory; `sharing_tests.rs`: priorities, aging, backfill and
/// the reservation, memory against a model and against the truth;
/// `memory_tests.rs`: several GPUs):
/// - at most `capacity` leases are held on each GPU;
/// - each GPU's waiters are granted by effective priority, then arrival,
///   and among equal priorities never after a later arrival except by
///   backfill within the reservation rule; only while queued;
/// - at a grant that names its memory, it fits by the core's accounting;
/// - fencing tokens strictly increase;
/// - a lease or a waiter ends exactly once; ending it again does nothing.
#[derive(Debug)]
pub(crate) struct Scheduler<W, H = ()> {
    pub(super) settings: Settings,
    next_waiter: u64,
    last_token: u64,
    /// No token above this is handed out (the mark persisted on disk).
    token_ceiling: u64,
    pub(super) gpus: Vec<GpuState<W, H>>,
    pub(super) consumers: ConsumerBook,
    pub(super) stats: Stats,
}

#[derive(Debug, Default)]
pub(super) struct Stats {
    pub(super) total_grants: u64,
    pub(super) last_wait: Duration,
    pub(super) last_hold: Duration,
    pub(super) ended: EndCounts,
    pub(super) evictions: EvictionStats,
}

impl<W, H: Clone + Default> Scheduler<W, H> {
    /// A scheduler for `gpus` (one unmeasured GPU of unknown size when
    /// empty), with the configured `consumers`.
    pub(crate) fn new(
        settings: Settings,
        gpus: Vec<GpuSpec>,
        consumers: impl IntoIterator<Item = ConsumerProfile>,
    ) -> Self {
        let gpus = if gpus.is_empty() {
            vec![GpuSpec {
                index: 0,
                uuid: String::new(),
                name: String::new(),
                total_mib: 0,
                measured: false,
            }]
        } else {
            gpus
        };
        Self {
            settings: Settings {
                capacity: settings.capacity.max(1),
                ..settings
            },
            next_waiter: 0,
            last_token: 0,
            token_ceiling: u64::MAX,
            gpus: gpus
                .into_iter()
                .map(|spec| GpuState::new(spec, settings.aging))
                .collect(),
            consumers: ConsumerBook::new(consumers),
            stats: Stats::default(),
        }
    }

    /// A scheduler for one GPU of unknown size, without memory accounting.
    #[cfg(test)]
    pub(crate) fn single(
        capacity: usize,
        strict: bool,
        consumers: impl IntoIterator<Item = ConsumerProfile>,
    ) -> Self {
        let settings = Settings {
            capacity,
            strict,
            ..Settings::default()
        };
        Self::new(settings, Vec::new(), consumers)
    }

    /// How many leases are held now, over all GPUs.
    pub(crate) fn in_flight(&self) -> usize {
        self.gpus.iter().map(|g| g.holding.len()).sum()
    }

    /// How many requests wait now, over all GPUs.
    pub(crate) fn queue_depth(&self) -> usize {
        self.gpus.iter().map(|g| g.waiting.len()).sum()
    }

    /// How many requests of `consumer` wait now, over all GPUs.
    pub(crate) fn waiting_of(&self, consumer: &str) -> u32 {
        self.consumers.waiting(consumer)
    }

    /// The priority a request waits with: its consumer's (0 for strangers),
    /// or the lower one it asked for, within the bounds.
    fn priority_of(&self, request: &Request) -> i32 {
        let own = self.consumers.priority(&request.consumer);
        request
            .priority
            .map_or(own, |asked| asked.min(own))
            .clamp(MIN_PRIORITY, MAX_PRIORITY)
    }

    /// The last fencing token handed out; 0 before the first grant.
    pub(crate) fn last_token(&self) -> FencingToken {
        FencingToken(self.last_token)
    }

    /// Hands out tokens after `last_issued`, up to `ceiling` (see
    /// [`Scheduler::raise_token_ceiling`]). For a broker that persisted
    /// `ceiling` before it serves, so that tokens never repeat or go back,
    /// whatever happens to the process.
    pub(crate) fn set_tokens(&mut self, last_issued: u64, ceiling: u64) {
        self.last_token = self.last_token.max(last_issued);
        self.token_ceiling = ceiling.max(self.last_token);
    }

    /// Allows tokens up to `ceiling`, once it is persisted.
    pub(crate) fn raise_token_ceiling(&mut self, ceiling: u64) {
        self.token_ceiling = self.token_ceiling.max(ceiling);
    }

    /// How many tokens may still be handed out before the ceiling.
    pub(crate) fn tokens_left(&self) -> u64 {
        self.token_ceiling.saturating_sub(self.last_token)
    }

    /// The GPUs.
    pub(crate) fn gpus(&self) -> impl Iterator<Item = &GpuSpec> {
        self.gpus.iter().map(|g| &g.spec)
    }

    /// Puts a request in a GPU's queue (the one it names, or the one that
    /// can take it soonest), behind every waiter of its priority or higher.
    ///
    /// Returns its id, the GPU's index and its position there (1 = next).
    /// The request is not granted here, even when it could be: call
    /// [`Scheduler::grant_ready`] afterwards, which keeps the one place where
    /// grants happen.
    pub(crate) fn enqueue(
        &mut self,
        request: Request,
        payload: W,
        now: Instant,
    ) -> Result<(WaiterId, u32, u32), Rejection> {
        validate_consumer_name(&request.consumer)?;
        if self.settings.strict && !self.consumers.is_configured(&request.consumer) {
            return Err(Rejection::UnknownConsumer(request.consumer));
        }
        let slot = self.choose_gpu(&request)?;
        let record = self.consumers.touch(&request.consumer, now);
        record.waiting += 1;
        // A consumer that asks again is not a culprit any more.
        for gpu in &mut self.gpus {
            if let Some(resident) = gpu.residents.get_mut(&request.consumer)
                && resident.unload == Unload::NotFreed
            {
                resident.unload = Unload::NotAsked;
            }
        }
        self.next_waiter += 1;
        let id = WaiterId(self.next_waiter);
        let priority = self.priority_of(&request);
        let gpu = &mut self.gpus[slot];
        let position = gpu.waiting.ahead_of_newcomer(priority, now) + 1;
        gpu.waiting.insert(
            id,
            Waiting {
                request,
                priority,
                since: now,
                payload,
            },
        );
        Ok((id, gpu.spec.index, saturating_u32(position)))
    }

    fn choose_gpu(&self, request: &Request) -> Result<usize, Rejection> {
        let eligible: Vec<usize> = match &request.gpu {
            GpuChoice::Any => (0..self.gpus.len()).collect(),
            GpuChoice::Index(index) => self
                .gpus
                .iter()
                .position(|g| g.spec.index == *index)
                .into_iter()
                .collect(),
            GpuChoice::Uuid(uuid) => self
                .gpus
                .iter()
                .position(|g| !g.spec.uuid.is_empty() && g.spec.uuid.eq_ignore_ascii_case(uuid))
                .into_iter()
                .collect(),
        };
        if eligible.is_empty() {
            let asked = match &request.gpu {
                GpuChoice::Index(index) => index.to_string(),
                GpuChoice::Uuid(uuid) => uuid.clone(),
                GpuChoice::Any => String::new(),
            };
            let known: Vec<String> = self
                .gpus
                .iter()
                .map(|g| {
                    if g.spec.uuid.is_empty() {
                        g.spec.index.to_string()
                    } else {
                        format!("{} ({})", g.spec.index, g.spec.uuid)
                    }
                })
                .collect();
            return Err(Rejection::UnknownGpu(asked, known.join(", ")));
        }
        // A GPU of unknown size (0) takes any request.
        let fits = |slot: &usize| {
            let total = self.gpus[*slot].spec.total_mib;
            total == 0 || request.vram_mib <= total
        };
        let fitting: Vec<usize> = eligible.iter().copied().filter(fits).collect();
        if fitting.is_empty() {
            let total_mib = eligible
                .iter()
                .map(|slot| self.gpus[*slot].spec.total_mib)
                .max()
                .unwrap_or(0);
            return Err(Rejection::TooLarge {
                need_mib: request.vram_mib,
                total_mib,
            });
        }
        // Soonest: one that could grant at once, then the shortest line.
        let margin = self.settings.safety_margin_mib;
        let key = |slot: &usize| {
            let gpu = &self.gpus[*slot];
            let now_free = gpu.waiting.is_empty()
                && gpu.holding.len() < self.settings.capacity
                && (request.vram_mib == 0
                    || i128::from(request.vram_mib) <= gpu.headroom(&request.consumer, margin));
            let line = gpu.waiting.len() + gpu.holding.len();
            (!now_free, line, gpu.spec.index)
        };
        Ok(fitting.into_iter().min_by_key(key).expect("not empty"))
    }

    /// Grants the lease to waiters at the head of each GPU's queue while
    /// permits are free and their memory fits, backfills later requests
    /// that fit now while the head cannot be granted (within the
    /// reservation rule), decides which idle residents to ask to unload and
    /// which preemptible holders to ask to make way, and revokes those whose
    /// grace has passed. This is the one place where grants are decided.
    ///
    /// Costs O(levels · log n) per grant and per GPU, plus at most
    /// [`BACKFILL_WINDOW`] waiters looked at for backfill: never O(queue
    /// length).
    pub(crate) fn grant_ready(&mut self, now: Instant) -> Decisions<W, H> {
        let mut decisions = Decisions {
            grants: Vec::new(),
            unloads: Vec::new(),
            preemptions: Vec::new(),
            revocations: Vec::new(),
        };
        for slot in 0..self.gpus.len() {
            self.revoke_overdue(slot, now, &mut decisions);
            self.grant_ready_on(slot, now, &mut decisions);
        }
        decisions
    }

    fn grant_ready_on(&mut self, slot: usize, now: Instant, decisions: &mut Decisions<W, H>) {
        let capacity = self.settings.capacity;
        let margin = self.settings.safety_margin_mib;
        let unload_timeout = self.settings.unload_timeout;
        loop {
            let gpu = &mut self.gpus[slot];
            let Some(head) = gpu.waiting.head(now) else {
                gpu.forget_admission();
                gpu.blocked = None;
                gpu.reserved = None;
                return;
            };
            if gpu.admission.as_ref().is_some_and(|a| a.waiter != head) {
                gpu.forget_admission();
            }
            if gpu.holding.len() >= capacity {
                self.note_reservation(slot, head);
                self.consider_preemption(slot, head, now, decisions);
                return;
            }
            if !gpu.fences_clear(now) {
                // The vanished holder may still be at work: nothing is
                // granted here, backfill included.
                return;
            }
            if self.last_token >= self.token_ceiling {
                // The broker persists a higher ceiling and tries again.
                return;
            }
            if gpu.admission.as_ref().is_some_and(|a| {
                a.victims
                    .iter()
                    .all(|victim| !gpu.residents.contains_key(victim))
            }) {
                // Everyone asked to unload for the head has: that admission
                // is over even if the head does not fit yet (a backfilled
                // lease, or a holder that stayed resident, took the room
                // meanwhile). Decide afresh now instead of idling until its
                // deadline with nobody left to wait for.
                self.close_admission(slot, now);
            }
            let gpu = &mut self.gpus[slot];
            let request = gpu
                .waiting
                .get(head)
                .expect("the head waits")
                .request
                .clone();
            let admit = gpu.admit(head, &request, margin, unload_timeout, &self.consumers, now);
            match admit {
                Admit::Grant => {
                    self.grant(slot, head, false, now, decisions);
                    continue;
                }
                Admit::Wait { why, unloads } => {
                    let stats = &mut self.stats.evictions;
                    stats.requested += unloads.len() as u64;
                    decisions.unloads.extend(unloads);
                    if let Some(Blocked::NotFreed { culprits, .. }) = &why {
                        stats.failed += culprits.len() as u64;
                    }
                    if let Some(why) = why {
                        self.gpus[slot].blocked = Some(why);
                    }
                }
            }
            self.consider_preemption(slot, head, now, decisions);
            if !self.settings.backfill || self.note_reservation(slot, head) {
                return;
            }
            let Some(candidate) = self.backfill_candidate(slot, head, now) else {
                return;
            };
            self.grant(slot, candidate, true, now, decisions);
        }
    }

    /// Grants waiter `id` on GPU `slot`: ahead of the head when
    /// `backfilled`.
    fn grant(
        &mut self,
        slot: usize,
        id: WaiterId,
        backfilled: bool,
        now: Instant,
        decisions: &mut Decisions<W, H>,
    ) {
        if !backfilled {
            self.close_admission(slot, now);
        }
        let gpu = &mut self.gpus[slot];
        let waiting = gpu.waiting.remove(id).expect("the waiter waits");
        let standing = gpu.waiting.effective(&waiting, now);
        if !backfilled {
            gpu.blocked = None;
            gpu.reserved = None;
        }
        // It uses its resident memory again.
        gpu.residents.remove(&waiting.request.consumer);
        // Below the ceiling (checked before every grant), so this cannot
        // overflow; saturating all the same, as every token sum is checked.
        self.last_token = self.last_token.saturating_add(1);
        let token = FencingToken(self.last_token);
        let waited = now.saturating_duration_since(waiting.since);
        let record = self.consumers.touch(&waiting.request.consumer, now);
        record.waiting = record.waiting.saturating_sub(1);
        record.holding += 1;
        record.grants += 1;
        self.stats.total_grants += 1;
        self.stats.last_wait = waited;
        let held = H::default();
        gpu.holding.insert(
            token,
            Holding {
                request: waiting.request,
                priority: waiting.priority,
                standing,
                granted_at: now,
                waited,
                peak_mib: 0,
                waiter: id,
                overtook: backfilled.then_some(WaiterId(self.next_waiter)),
                preempt: None,
                payload: held.clone(),
            },
        );
        decisions.grants.push(Grant {
            waiter: id,
            token,
            gpu_index: gpu.spec.index,
            gpu_uuid: gpu.spec.uuid.clone(),
            waited,
            payload: waiting.payload,
            held,
        });
    }

    /// Ends GPU `slot`'s admission, if one is under way: whoever was asked
    /// to unload for it and is gone made room; one still resident did not
    /// (the memory came from elsewhere), and still keeps its memory.
    fn close_admission(&mut self, slot: usize, now: Instant) {
        let gpu = &mut self.gpus[slot];
        let Some(admission) = gpu.admission.take() else {
            return;
        };
        for victim in admission.victims {
            if let Some(resident) = gpu.residents.get_mut(&victim) {
                resident.unload = Unload::NotAsked;
                continue;
            }
            let stats = &mut self.stats.evictions;
            stats.completed += 1;
            stats.last_unload = now.saturating_duration_since(admission.asked_at);
            stats.last_victim = victim;
        }
    }

    /// Takes a request out of the queue without granting it.
    ///
    /// Returns its payload, or `None` if it is no longer waiting (it was
    /// granted or withdrawn before); in that case nothing changes.
    pub(crate) fn withdraw(&mut self, id: WaiterId, how: Withdrawal, now: Instant) -> Option<W> {
        let waiting = self.gpus.iter_mut().find_map(|g| g.waiting.remove(id))?;
        let record = self.consumers.touch(&waiting.request.consumer, now);
        record.waiting = record.waiting.saturating_sub(1);
        self.consumers.went_idle(&waiting.request.consumer);
        match how {
            Withdrawal::Withdrawn => self.stats.ended.withdrawn += 1,
            Withdrawal::Expired => self.stats.ended.expired += 1,
        }
        Some(waiting.payload)
    }

    /// Ends a held lease and frees its permit. The consumer stays resident
    /// on the GPU with what its processes hold now (or its configured
    /// size, unmeasured), if it keeps anything.
    ///
    /// Returns what ended, or `None` if the token does not name a held lease
    /// (it ended before): ending a lease twice is harmless and changes
    /// nothing. Call [`Scheduler::grant_ready`] afterwards.
    pub(crate) fn end(
        &mut self,
        token: FencingToken,
        how: LeaseEnd,
        now: Instant,
    ) -> Option<EndedLease> {
        let gpu = self
            .gpus
            .iter_mut()
            .find(|g| g.holding.contains_key(&token))?;
        let holding = gpu.holding.remove(&token)?;
        let held = now.saturating_duration_since(holding.granted_at);
        let consumer = holding.request.consumer.clone();
        let pid = holding.request.client_pid;
        let record = self.consumers.touch(&consumer, now);
        record.holding = record.holding.saturating_sub(1);
        record.peak_mib = record.peak_mib.max(holding.peak_mib);
        let configured = record.profile.as_ref().map_or(0, |p| p.vram_mib);
        let keeps_memory = configured > 0 || record.peak_mib > 0;
        if how != LeaseEnd::Unclaimed {
            self.consumers.held_for(&consumer, held);
        }
        let observed = gpu.observed_mib(pid, &consumer);
        if keeps_memory && !gpu.holding.values().any(|h| h.request.consumer == consumer) {
            let footprint_mib = if gpu.spec.measured && observed > 0 {
                observed
            } else {
                configured
            };
            gpu.residents.insert(
                consumer.clone(),
                Resident {
                    consumer: consumer.clone(),
                    footprint_mib,
                    idle_since: now,
                    pid,
                    attribution: holding.request.attribution,
                    seen: holding.peak_mib > 0,
                    unload: Unload::NotAsked,
                },
            );
        }
        if gpu.spec.measured && how != LeaseEnd::Unclaimed {
            // Its job memory is being freed: read again before deciding
            // anything that needs memory.
            gpu.last_end = Some(now);
        }
        self.consumers.went_idle(&consumer);
        let ungraceful = matches!(how, LeaseEnd::Disconnected | LeaseEnd::Revoked(_));
        let lock_delay = self.settings.lock_delay;
        if ungraceful && !lock_delay.is_zero() && gpu.spec.measured {
            gpu.fences.push(Fence {
                who: consumer.clone(),
                pids: if pid == 0 { Vec::new() } else { vec![pid] },
                since: now,
                until: now + lock_delay,
            });
        }
        self.stats.last_hold = held;
        let ended = &mut self.stats.ended;
        match how {
            LeaseEnd::Released => ended.released += 1,
            LeaseEnd::HalfClosed => ended.half_closed += 1,
            LeaseEnd::Disconnected => ended.disconnected += 1,
            LeaseEnd::Unclaimed => ended.unclaimed += 1,
            LeaseEnd::Revoked(_) => ended.revoked += 1,
        }
        Some(EndedLease {
            consumer,
            token,
            held,
            waited: holding.waited,
            gpu_index: gpu.spec.index,
        })
    }

    /// Takes in a reading of a GPU's memory: learns how much its holders
    /// use, updates what residents keep, and forgets residents whose
    /// processes have left it. Call [`Scheduler::grant_ready`] afterwards:
    /// memory may have come back.
    ///
    /// `now` is when the reading was taken: one taken before a lease ended
    /// does not count as a reading after it.
    ///
    /// The first reading of a GPU that shows processes no lease accounts for
    /// quarantines it: nothing is granted there until they leave, or for
    /// `lock_delay` at most.
    #[cfg(test)]
    pub(crate) fn observe(&mut self, gpu_index: u32, reading: MemoryReading, now: Instant) {
        self.observe_matched(gpu_index, reading, BTreeMap::new(), now);
    }

    /// [`Scheduler::observe`], with the processes of the reading that the
    /// consumers' `match` rules tie to them (`matched`: pid → consumer). A
    /// matched process is its consumer's: a holder's while the consumer
    /// holds a lease on this GPU, otherwise it makes the consumer resident
    /// with the memory its matched processes use, evictable like any other
    /// resident, until they leave the GPU.
    pub(crate) fn observe_matched(
        &mut self,
        gpu_index: u32,
        reading: MemoryReading,
        matched: BTreeMap<u32, String>,
        now: Instant,
    ) {
        let lock_delay = self.settings.lock_delay;
        let consumers = &self.consumers;
        let Some(gpu) = self.gpus.iter_mut().find(|g| g.spec.index == gpu_index) else {
            return;
        };
        gpu.matched = matched;
        if gpu.reading_at.is_none() && !lock_delay.is_zero() {
            let strangers: Vec<u32> = reading
                .processes
                .iter()
                .filter(|p| {
                    !gpu.matched.contains_key(&p.pid)
                        && !gpu
                            .holding
                            .values()
                            .any(|h| p.belongs_to(h.request.client_pid))
                })
                .map(|p| p.pid)
                .collect();
            if !strangers.is_empty() {
                gpu.fences.push(Fence {
                    who: String::new(),
                    pids: strangers,
                    since: now,
                    until: now + lock_delay,
                });
            }
        }
        if gpu.reading_at.is_some_and(|at| at > now) {
            // An older reading arrived after a newer one: keep the newer.
            return;
        }
        gpu.reading_at = Some(now);
        for holding in gpu.holding.values_mut() {
            let used: u64 = reading
                .processes
                .iter()
                .filter(|p| gpu::owns(&gpu.matched, p, &holding.request))
                .map(|p| p.used_mib)
                .sum();
            holding.peak_mib = holding.peak_mib.max(used);
        }
        gpu.adopt_matched(&reading, |name| consumers.footprint_mib(name), now);
        let matched = &gpu.matched;
        gpu.residents.retain(|_, resident| {
            let mine = |p: &&ProcessUsage| {
                p.belongs_to(resident.pid) || matched.get(&p.pid) == Some(&resident.consumer)
            };
            let used: u64 = reading
                .processes
                .iter()
                .filter(mine)
                .map(|p| p.used_mib)
                .sum();
            let present = used > 0 || reading.processes.iter().any(|p| mine(&p));
            if present {
                resident.footprint_mib = used;
            }
            resident.seen |= present;
            // Gone from the GPU after having been seen on it: it unloaded.
            !resident.seen || present
        });
        gpu.reading = Some(reading);
    }

    /// A consumer says it unloaded from a GPU (or from all, with `None`).
    /// Returns whether it was resident.
    pub(crate) fn unloaded(
        &mut self,
        consumer: &str,
        gpu_index: Option<u32>,
        now: Instant,
    ) -> bool {
        let mut was = false;
        for gpu in &mut self.gpus {
            if gpu_index.is_none_or(|index| index == gpu.spec.index) {
                was |= gpu.residents.remove(consumer).is_some();
            }
        }
        if was {
            self.consumers.touch(consumer, now);
        }
        was
    }

    /// Forgets residents whose idle TTL has passed. Call
    /// [`Scheduler::grant_ready`] afterwards.
    pub(crate) fn expire_residents(&mut self, now: Instant) {
        for gpu in &mut self.gpus {
            gpu.residents.retain(|name, resident| {
                let ttl = self.consumers.idle_ttl(name);
                ttl.is_none_or(|ttl| now.saturating_duration_since(resident.idle_since) < ttl)
            });
        }
    }

    /// The next moment after `now` at which time alone changes a decision:
    /// an unload deadline, a lock-delay, an idle TTL, a preemption's grace,
    /// or the oldest waiter reaching `preempt_after` while a preemptible
    /// holder could be in its way. Call it after [`Scheduler::grant_ready`]
    /// at `now`.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let preempt_after = self.settings.preempt_after;
        let deadlines = self.gpus.iter().flat_map(|gpu| {
            let admission = gpu.admission.as_ref().map(|a| a.deadline);
            let fences = gpu.fences.iter().map(|f| f.until);
            let ttls = gpu.residents.iter().filter_map(|(name, resident)| {
                self.consumers
                    .idle_ttl(name)
                    .map(|ttl| resident.idle_since + ttl)
            });
            let graces = gpu
                .holding
                .values()
                .filter_map(|h| h.preempt.as_ref().filter(|p| !p.revoked))
                .map(|p| p.deadline);
            let preemptible = gpu
                .holding
                .values()
                .any(|h| h.preempt.is_none() && self.consumers.is_preemptible(&h.request.consumer));
            let head = preemptible
                .then(|| gpu.waiting.oldest_since())
                .flatten()
                .map(|since| since + preempt_after);
            admission
                .into_iter()
                .chain(fences)
                .chain(ttls)
                .chain(graces)
                .chain(head)
        });
        // One already past was acted on by the `grant_ready` before this
        // call, or cannot be (a lock-delay with nobody waiting, a waiter
        // that preempts nobody): a deadline is only what lies ahead.
        deadlines.filter(|at| *at > now).min()
    }

    /// Whether a decision waits for a reading (memory to come back, a
    /// vanished holder's processes to leave), so readings should come often.
    pub(crate) fn awaiting_memory(&self) -> bool {
        self.gpus
            .iter()
            .any(|g| g.blocked.is_some() || !g.fences.is_empty())
    }

    /// How many requests wait for the GPU `gpu_index`.
    pub(crate) fn queue_len(&self, gpu_index: u32) -> usize {
        self.gpu(gpu_index).map_or(0, |g| g.waiting.len())
    }

    /// Why the head of `gpu_index`'s queue is not granted, if it is not.
    pub(crate) fn blocked(&self, gpu_index: u32) -> Option<BlockedBy<'_>> {
        self.gpu(gpu_index).and_then(GpuState::blocked_by)
    }

    fn gpu(&self, gpu_index: u32) -> Option<&GpuState<W, H>> {
        self.gpus.iter().find(|g| g.spec.index == gpu_index)
    }

    /// The effective priority of waiter `id` at `now`, if it waits.
    pub(crate) fn effective_priority(&self, id: WaiterId, now: Instant) -> Option<i32> {
        self.gpus.iter().find_map(|g| {
            let waiting = g.waiting.get(id)?;
            Some(g.waiting.effective(waiting, now))
        })
    }

    /// How much longer the waiter at `position` of `gpu_index`'s queue is
    /// expected to wait; O(position). `None` when unknown.
    pub(crate) fn estimated_wait(
        &self,
        gpu_index: u32,
        position: u32,
        now: Instant,
    ) -> Option<Duration> {
        let gpu = self.gpu(gpu_index)?;
        let estimates = gpu.estimate_waits(
            &self.consumers,
            self.settings.capacity,
            now,
            position as usize,
        );
        estimates
            .get((position as usize).checked_sub(1)?)
            .copied()
            .flatten()
    }

    /// Whether `id` names a request that waits now.
    pub(crate) fn is_waiting(&self, id: WaiterId) -> bool {
        self.gpus.iter().any(|g| g.waiting.contains(id))
    }

    /// Takes in a new configuration (a reload): the settings and the
    /// configured consumers. Queues, holders, residents, tokens and
    /// statistics stay; a consumer no longer configured becomes a stranger,
    /// a new one is added, the others take their new profile. Call
    /// [`Scheduler::grant_ready`] afterwards: a larger capacity or smaller
    /// sizes may allow grants.
    pub(crate) fn reconfigure(
        &mut self,
        settings: Settings,
        consumers: impl IntoIterator<Item = ConsumerProfile>,
    ) {
        self.settings = Settings {
            capacity: settings.capacity.max(1),
            ..settings
        };
        for gpu in &mut self.gpus {
            // Waiters keep their priorities; only how fast they age changes.
            gpu.waiting.set_aging(settings.aging);
        }
        self.consumers.reconfigure(consumers);
    }

    /// The payload of the lease `token`, while it is held.
    pub(crate) fn held(&self, token: FencingToken) -> Option<&H> {
        self.gpus
            .iter()
            .find_map(|g| g.holding.get(&token))
            .map(|holding| &holding.payload)
    }

    /// Whether `consumer` is resident (idle, keeping memory) on `gpu_index`.
    pub(crate) fn is_resident(&self, gpu_index: u32, consumer: &str) -> bool {
        self.gpu(gpu_index)
            .is_some_and(|g| g.residents.contains_key(consumer))
    }

    /// Withdraws every waiter, for shutdown; returns their payloads.
    pub(crate) fn drain_waiters(&mut self, now: Instant) -> VecDeque<W> {
        let ids: Vec<WaiterId> = self.gpus.iter().flat_map(|g| g.waiting.ids()).collect();
        ids.into_iter()
            .filter_map(|id| self.withdraw(id, Withdrawal::Withdrawn, now))
            .collect()
    }
}
