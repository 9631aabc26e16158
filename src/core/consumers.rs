//! The consumers the core knows: the configured ones, and those that asked
//! since the start, with their activity.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How many consumers that are not configured are remembered at most. A
/// client inventing a new name for every request must not grow the broker's
/// memory without bound; the least recently active idle one is forgotten.
pub(super) const MAX_UNCONFIGURED: usize = 1024;

/// What kind of GPU work a consumer does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumerKind {
    /// Text to speech.
    Tts,
    /// A language model server.
    Llm,
    /// Image generation.
    Image,
    /// Anything else.
    Other,
}

/// A consumer as the configuration describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerProfile {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: ConsumerKind,
    /// The VRAM it keeps resident, in MiB.
    pub vram_mib: u64,
    /// Whether it may stay resident beside others (and so is never asked
    /// to unload).
    pub coexist: bool,
    /// Whether it can be asked to unload (it has an unload adapter).
    pub unloadable: bool,
    /// How long it stays resident after its last lease, at most; `None`
    /// until it unloads or leaves the GPU.
    pub idle_ttl: Option<Duration>,
    /// Higher is served first; 0 is the default and a stranger's.
    pub priority: i32,
    /// Whether its leases may be revoked for a waiter of higher priority.
    pub preemptible: bool,
    /// How long it has to release after it is asked to make way.
    pub preempt_grace: Duration,
}

impl ConsumerProfile {
    /// A consumer of `kind` with no memory of its own, priority 0, that may
    /// not be preempted or asked to unload.
    pub fn new(name: &str, kind: ConsumerKind) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            vram_mib: 0,
            coexist: false,
            unloadable: false,
            idle_ttl: None,
            priority: 0,
            preemptible: false,
            preempt_grace: DEFAULT_PREEMPT_GRACE,
        }
    }
}

/// How long a preemptible holder has to release, unless configured.
pub(crate) const DEFAULT_PREEMPT_GRACE: Duration = Duration::from_secs(30);

/// How many hold times are kept per consumer for wait estimates.
const HOLDS_KEPT: usize = 16;

/// A consumer's profile and activity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConsumerRecord {
    /// Its name.
    pub name: String,
    /// Its configuration, if it is configured.
    pub profile: Option<ConsumerProfile>,
    /// Leases granted to it since the start.
    pub grants: u64,
    /// When it last asked, was granted, withdrew or released.
    pub last_active: Option<Instant>,
    /// How many leases it holds now.
    pub holding: u32,
    /// How many of its requests wait now.
    pub waiting: u32,
    /// The most GPU memory it was seen using while it held a lease, in MiB.
    pub peak_mib: u64,
    /// Its most recent hold times, oldest first.
    pub holds: VecDeque<Duration>,
}

impl ConsumerRecord {
    fn new(name: &str, profile: Option<ConsumerProfile>) -> Self {
        Self {
            name: name.to_owned(),
            profile,
            grants: 0,
            last_active: None,
            holding: 0,
            waiting: 0,
            peak_mib: 0,
            holds: VecDeque::new(),
        }
    }

    /// Its typical hold time: the median of its recent ones.
    pub(crate) fn typical_hold(&self) -> Option<Duration> {
        median(&self.holds)
    }

    /// How long ago it was last active, at `now`.
    pub(crate) fn idle_for(&self, now: Instant) -> Option<Duration> {
        self.last_active.map(|at| now.saturating_duration_since(at))
    }

    fn is_idle(&self) -> bool {
        self.holding == 0 && self.waiting == 0
    }
}

#[derive(Debug)]
pub(super) struct ConsumerBook {
    records: BTreeMap<String, ConsumerRecord>,
    unconfigured: usize,
    /// Set when a search for an idle stranger to forget found none, so that
    /// a flood of new names does not search again until one goes idle.
    none_idle: bool,
    /// Everyone's most recent hold times, for consumers not yet seen.
    holds: VecDeque<Duration>,
}

/// The median of some durations; `None` when there are none.
fn median(holds: &VecDeque<Duration>) -> Option<Duration> {
    let mut sorted: Vec<Duration> = holds.iter().copied().collect();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

impl ConsumerBook {
    pub(super) fn new(profiles: impl IntoIterator<Item = ConsumerProfile>) -> Self {
        let records = profiles
            .into_iter()
            .map(|profile| {
                (
                    profile.name.clone(),
                    ConsumerRecord::new(&profile.name.clone(), Some(profile)),
                )
            })
            .collect();
        Self {
            records,
            unconfigured: 0,
            none_idle: false,
            holds: VecDeque::new(),
        }
    }

    /// Replaces the configured profiles; activity and statistics stay.
    pub(super) fn reconfigure(&mut self, profiles: impl IntoIterator<Item = ConsumerProfile>) {
        let mut profiles: BTreeMap<String, ConsumerProfile> = profiles
            .into_iter()
            .map(|profile| (profile.name.clone(), profile))
            .collect();
        let mut unconfigured = 0;
        for record in self.records.values_mut() {
            record.profile = profiles.remove(&record.name);
            unconfigured += usize::from(record.profile.is_none());
        }
        for (name, profile) in profiles {
            let record = ConsumerRecord::new(&name, Some(profile));
            self.records.insert(name, record);
        }
        self.unconfigured = unconfigured;
        self.none_idle = false;
    }

    /// A consumer's priority: configured, or 0.
    pub(super) fn priority(&self, name: &str) -> i32 {
        self.profile(name).map_or(0, |p| p.priority)
    }

    /// Whether `name`'s leases may be revoked for higher priorities.
    pub(super) fn is_preemptible(&self, name: &str) -> bool {
        self.profile(name).is_some_and(|p| p.preemptible)
    }

    /// How long `name` has to make way.
    pub(super) fn preempt_grace(&self, name: &str) -> Duration {
        self.profile(name)
            .map_or(DEFAULT_PREEMPT_GRACE, |p| p.preempt_grace)
    }

    /// The most memory `name` was seen using while it held a lease.
    pub(super) fn peak_mib(&self, name: &str) -> u64 {
        self.records.get(name).map_or(0, |r| r.peak_mib)
    }

    /// Learns that a lease of `name` was held for `held`.
    pub(super) fn held_for(&mut self, name: &str, held: Duration) {
        for holds in [
            self.records.get_mut(name).map(|r| &mut r.holds),
            Some(&mut self.holds),
        ]
        .into_iter()
        .flatten()
        {
            if holds.len() == HOLDS_KEPT {
                holds.pop_front();
            }
            holds.push_back(held);
        }
    }

    /// How long a lease of `name` is typically held: its own median, else
    /// the median of everyone's recent holds; `None` before any.
    pub(super) fn typical_hold(&self, name: &str) -> Option<Duration> {
        self.records
            .get(name)
            .and_then(ConsumerRecord::typical_hold)
            .or_else(|| median(&self.holds))
    }

    pub(super) fn is_configured(&self, name: &str) -> bool {
        self.records
            .get(name)
            .is_some_and(|record| record.profile.is_some())
    }

    /// Whether `name` may be asked to unload: configured with an unload
    /// adapter, and not allowed to coexist.
    pub(super) fn is_evictable(&self, name: &str) -> bool {
        self.profile(name)
            .is_some_and(|p| p.unloadable && !p.coexist)
    }

    /// The memory `name` is configured to keep resident; 0 for one that
    /// is not configured.
    pub(super) fn footprint_mib(&self, name: &str) -> u64 {
        self.records
            .get(name)
            .and_then(|r| r.profile.as_ref())
            .map_or(0, |p| p.vram_mib)
    }

    /// How long `name` stays resident when idle, at most.
    pub(super) fn idle_ttl(&self, name: &str) -> Option<Duration> {
        self.profile(name).and_then(|p| p.idle_ttl)
    }

    fn profile(&self, name: &str) -> Option<&ConsumerProfile> {
        self.records.get(name).and_then(|r| r.profile.as_ref())
    }

    /// The record of `name`, created if needed, marked active at `now`.
    pub(super) fn touch(&mut self, name: &str, now: Instant) -> &mut ConsumerRecord {
        if !self.records.contains_key(name) {
            if self.unconfigured >= MAX_UNCONFIGURED && !self.none_idle {
                self.none_idle = !self.forget_one_idle();
            }
            self.unconfigured += 1;
            self.records
                .insert(name.to_owned(), ConsumerRecord::new(name, None));
        }
        let record = self
            .records
            .get_mut(name)
            .expect("the record was inserted above");
        record.last_active = Some(now);
        record
    }

    /// How many requests of `name` wait now.
    pub(super) fn waiting(&self, name: &str) -> u32 {
        self.records.get(name).map_or(0, |record| record.waiting)
    }

    pub(super) fn records(&self) -> Vec<ConsumerRecord> {
        self.records.values().cloned().collect()
    }

    /// Call when `name` may have gone idle: a stranger that goes idle while
    /// there are more strangers than the limit is forgotten at once, so a
    /// burst of new names shrinks back to the limit as it drains.
    pub(super) fn went_idle(&mut self, name: &str) {
        let Some(record) = self.records.get(name) else {
            return;
        };
        if record.profile.is_some() || !record.is_idle() {
            return;
        }
        if self.unconfigured > MAX_UNCONFIGURED {
            self.records.remove(name);
            self.unconfigured -= 1;
        } else {
            self.none_idle = false;
        }
    }

    /// Forgets the least recently active idle stranger; `false` if none is.
    fn forget_one_idle(&mut self) -> bool {
        let oldest = self
            .records
            .values()
            .filter(|record| record.profile.is_none() && record.is_idle())
            .min_by_key(|record| record.last_active)
            .map(|record| record.name.clone());
        match oldest {
            Some(name) => {
                self.records.remove(&name);
                self.unconfigured -= 1;
                true
            }
            None => false,
        }
    }
}
