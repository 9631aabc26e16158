//! The consumers the core knows: the configured ones, and those that asked
//! since the start, with their activity.

use std::collections::BTreeMap;
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
}

/// A consumer's profile and activity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerRecord {
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
}

impl ConsumerRecord {
    /// The memory it keeps resident: the most it was seen using, but never
    /// less than its configured size.
    pub fn footprint_mib(&self) -> u64 {
        let configured = self.profile.as_ref().map_or(0, |p| p.vram_mib);
        configured.max(self.peak_mib)
    }

    /// How long ago it was last active, at `now`.
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
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
}

impl ConsumerBook {
    pub(super) fn new(profiles: impl IntoIterator<Item = ConsumerProfile>) -> Self {
        let records = profiles
            .into_iter()
            .map(|profile| {
                let record = ConsumerRecord {
                    name: profile.name.clone(),
                    profile: Some(profile),
                    grants: 0,
                    last_active: None,
                    holding: 0,
                    waiting: 0,
                    peak_mib: 0,
                };
                (record.name.clone(), record)
            })
            .collect();
        Self {
            records,
            unconfigured: 0,
            none_idle: false,
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
            self.records.insert(
                name.clone(),
                ConsumerRecord {
                    name,
                    profile: Some(profile),
                    grants: 0,
                    last_active: None,
                    holding: 0,
                    waiting: 0,
                    peak_mib: 0,
                },
            );
        }
        self.unconfigured = unconfigured;
        self.none_idle = false;
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
            self.records.insert(
                name.to_owned(),
                ConsumerRecord {
                    name: name.to_owned(),
                    profile: None,
                    grants: 0,
                    last_active: None,
                    holding: 0,
                    waiting: 0,
                    peak_mib: 0,
                },
            );
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
