//! The one script language of the core's scenario tests: `check(script,
//! expected)` runs a script of events against a fresh [`Scheduler`] and
//! compares what the scheduler decided with the expected lines, so that a
//! new case is a few lines of events and of decisions.
//!
//! Set-up lines come first:
//! - `card GIB [measured] [gpus=N]`: N GPUs (1 by default) of GIB each,
//!   named `GPU-0`, `GPU-1`, …, with memory readings or without. With no
//!   `card` line the scheduler has one GPU of unknown size and no memory
//!   accounting, as the broker does when it finds no GPU;
//! - `cap N`, `strict`, `margin MIB`, `nobackfill`, `aging DURATION`,
//!   `preempt_after DURATION`, `unload_timeout DURATION`,
//!   `lock_delay DURATION`: the [`Settings`] (backfill is on, as in the
//!   broker's configuration, unless `nobackfill`);
//! - `consumer NAME [vram=GIB] [coexist] [unload] [prio=N] [preemptible]
//!   [grace=DURATION] [ttl=DURATION]`: a configured consumer;
//! - `manual`: the scheduler grants only at `grant` lines, time passes only
//!   at `wait` lines, and grants and ends print their tokens and durations.
//!   Without it the scheduler grants what is ready after every event, as
//!   the broker does, and every event happens a millisecond after the one
//!   before (a reading is never taken at the very instant of an end).
//!
//! Events (sizes are GiB, with decimals: `14`, `0.5`; each consumer's
//! process is pid 100 + its number in order of first mention):
//! - `+NAME [GIB] [prio=N] [gpu=INDEX|UUID]`: NAME asks; prints its
//!   position or the rejection;
//! - `-NAME` / `expire NAME`: NAME's oldest waiting request withdraws, or
//!   its maximum wait passes;
//! - `release X` / `halfclose X` / `drop X` / `revoke X` / `preempted X` /
//!   `unclaimed X`: a lease ends by release, half-close, disconnect, an
//!   administrator's revocation, a preemption's, or because nobody took the
//!   grant; X is a consumer (its oldest lease) or `#TOKEN`;
//! - `grant`: the scheduler decides (in `manual` scripts);
//! - `wait DURATION`: time passes;
//! - `read free=GIB [KEY=GIB …]`: a reading of GPU 0, taken now; KEY is a
//!   consumer (its process), `NAME/child` (a child of its process, pid
//!   1000 more) or a bare pid (a process of nobody);
//! - `unloaded NAME [GPU]`: NAME says it freed its memory (on every GPU,
//!   or on that one);
//! - `sweep`: residents past their idle TTL leave;
//! - `tokens LAST CEILING` / `ceiling N`: the persisted token state is
//!   loaded / the ceiling is raised; `tokens` prints how many are left;
//! - what the scheduler shows: `show [GPU]` (the queue with effective
//!   priorities, the reservation, why the head waits, the residents (and
//!   whether they were asked to unload) and unleased processes), `holders`, `consumers`, `headroom [GPU]`,
//!   `evictions`, `deadline`, `stats`.
//!
//! Decisions print as `unload NAME (KEEPS, peak PEAK) for NAME`,
//! `preempt NAME for NAME grace=DURATION`, `revoke NAME`, `granted NAME`
//! (with ` on INDEX (UUID)` when there are several GPUs).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::*;

/// MiB in a GiB.
pub(super) const GIB: u64 = 1024;

/// Sizes in scripts are GiB, with decimals: `14`, `0.5`.
pub(super) fn gib(text: &str) -> u64 {
    let gib: f64 = text
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not GiB"));
    (gib * GIB as f64).round() as u64
}

/// A duration as a script writes it: `10s`, `1500ms`.
pub(super) fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|_| panic!("{text:?} is not a duration"))
}

/// GPU `index`, named `GPU-index`, of `total_mib`, with or without readings.
pub(super) fn gpu(index: u32, total_mib: u64, measured: bool) -> GpuSpec {
    GpuSpec {
        index,
        uuid: format!("GPU-{index}"),
        name: "Fake".into(),
        total_mib,
        measured,
    }
}

/// A configured consumer that keeps `vram_mib` resident and can be asked
/// to unload (unless it may coexist, when it is never asked).
pub(super) fn unloadable(name: &str, vram_mib: u64, coexist: bool) -> ConsumerProfile {
    ConsumerProfile {
        vram_mib,
        coexist,
        unloadable: true,
        ..ConsumerProfile::new(name, ConsumerKind::Other)
    }
}

/// Runs `script` (see the module's documentation) and compares what it
/// printed with `expected`, line by line, ignoring indentation and blank
/// lines.
#[track_caller]
pub(super) fn check(script: &str, expected: &str) {
    let mut lines = script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .peekable();
    let mut setup = Setup::default();
    while let Some(line) = lines.peek() {
        if !setup.apply(line) {
            break;
        }
        lines.next();
    }
    let mut run = Run::new(setup);
    for line in lines {
        run.event(line);
    }
    let expected: String = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        run.out == expected,
        "script:\n{script}\nexpected:\n{expected}\nactual:\n{}",
        run.out
    );
}

/// What the set-up lines describe.
struct Setup {
    gpus: Vec<GpuSpec>,
    settings: Settings,
    profiles: Vec<ConsumerProfile>,
    manual: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            gpus: Vec::new(),
            settings: Settings {
                backfill: true,
                ..Settings::default()
            },
            profiles: Vec::new(),
            manual: false,
        }
    }
}

impl Setup {
    /// Applies one set-up line; `false` if it is an event.
    fn apply(&mut self, line: &str) -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        let arg = words.get(1).copied().unwrap_or("");
        let settings = &mut self.settings;
        match words[0] {
            "card" => {
                let measured = words.contains(&"measured");
                let count = words
                    .iter()
                    .find_map(|w| w.strip_prefix("gpus="))
                    .map_or(1, |n| n.parse().unwrap());
                self.gpus = (0..count).map(|i| gpu(i, gib(arg), measured)).collect();
            }
            "cap" => settings.capacity = arg.parse().unwrap(),
            "strict" => settings.strict = true,
            "margin" => settings.safety_margin_mib = arg.parse().unwrap(),
            "nobackfill" => settings.backfill = false,
            "aging" => settings.aging = duration(arg),
            "preempt_after" => settings.preempt_after = duration(arg),
            "unload_timeout" => settings.unload_timeout = duration(arg),
            "lock_delay" => settings.lock_delay = duration(arg),
            "manual" => self.manual = true,
            "consumer" => {
                let mut profile = ConsumerProfile::new(arg, ConsumerKind::Other);
                for word in &words[2..] {
                    match word.split_once('=') {
                        Some(("vram", size)) => profile.vram_mib = gib(size),
                        Some(("prio", n)) => profile.priority = n.parse().unwrap(),
                        Some(("grace", d)) => profile.preempt_grace = duration(d),
                        Some(("ttl", d)) => profile.idle_ttl = Some(duration(d)),
                        None if *word == "coexist" => profile.coexist = true,
                        None if *word == "unload" => profile.unloadable = true,
                        None if *word == "preemptible" => profile.preemptible = true,
                        _ => panic!("unknown consumer option {word:?}"),
                    }
                }
                self.profiles.push(profile);
            }
            _ => return false,
        }
        true
    }
}

/// A script being run: the scheduler, the clock, and who waits and holds.
struct Run {
    sched: Scheduler<String>,
    manual: bool,
    several_gpus: bool,
    /// The card's size, for readings; 0 without a `card` line.
    total_mib: u64,
    now: Instant,
    /// Consumers in order of first mention: their pids are 100 + index.
    pids: Vec<String>,
    waiting: Vec<(String, WaiterId)>,
    held: Vec<(String, FencingToken)>,
    out: String,
}

impl Run {
    fn new(setup: Setup) -> Self {
        let total_mib = setup.gpus.first().map_or(0, |g| g.total_mib);
        Self {
            several_gpus: setup.gpus.len() > 1,
            total_mib,
            manual: setup.manual,
            sched: Scheduler::new(setup.settings, setup.gpus, setup.profiles),
            now: Instant::now(),
            pids: Vec::new(),
            waiting: Vec::new(),
            held: Vec::new(),
            out: String::new(),
        }
    }

    fn pid(&mut self, name: &str) -> u32 {
        let n = self.pids.iter().position(|p| p == name).unwrap_or_else(|| {
            self.pids.push(name.to_owned());
            self.pids.len() - 1
        });
        100 + n as u32
    }

    fn event(&mut self, line: &str) {
        if !self.manual {
            self.now += Duration::from_millis(1);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let arg = words.get(1).copied().unwrap_or("");
        let now = self.now;
        match words[0] {
            "grant" => {}
            "release" => self.end(arg, LeaseEnd::Released),
            "halfclose" => self.end(arg, LeaseEnd::HalfClosed),
            "drop" => self.end(arg, LeaseEnd::Disconnected),
            "revoke" => self.end(arg, LeaseEnd::Revoked(RevokeReason::Admin)),
            "preempted" => self.end(arg, LeaseEnd::Revoked(RevokeReason::Preempted)),
            "unclaimed" => self.end(arg, LeaseEnd::Unclaimed),
            "expire" => self.withdraw(arg, Withdrawal::Expired),
            "wait" => self.now += duration(arg),
            "read" => self.read(&words[1..]),
            "unloaded" => {
                let gpu = words.get(2).map(|i| i.parse().unwrap());
                if !self.sched.unloaded(arg, gpu, now) {
                    self.say(format_args!("{arg} was not resident"));
                }
            }
            "sweep" => self.sched.expire_residents(now),
            "tokens" if arg.is_empty() => {
                let left = self.sched.tokens_left();
                self.say(format_args!("tokens left: {left}"));
            }
            "tokens" => {
                let ceiling = words[2].parse().unwrap();
                self.sched.set_tokens(arg.parse().unwrap(), ceiling);
            }
            "ceiling" => self.sched.raise_token_ceiling(arg.parse().unwrap()),
            "show" => self.show(arg.parse().unwrap_or(0)),
            "holders" => self.holders(),
            "consumers" => self.consumers(),
            "headroom" => {
                let index = arg.parse().unwrap_or(0);
                let headroom = self.sched.snapshot(now).gpus[index].headroom_mib;
                self.say(format_args!("headroom {}", size(headroom)));
            }
            "evictions" => self.evictions(),
            "deadline" => match self.sched.next_deadline(now) {
                Some(at) => {
                    let left = humantime::format_duration(at.saturating_duration_since(now));
                    self.say(format_args!("next deadline in {left}"));
                }
                None => self.say(format_args!("no deadline")),
            },
            "stats" => self.stats(),
            op if op.starts_with('+') => self.enqueue(&op[1..], &words[1..]),
            op if op.starts_with('-') => self.withdraw(&op[1..], Withdrawal::Withdrawn),
            _ => panic!("unknown event {line:?}"),
        }
        if words[0] == "grant" || !self.manual {
            self.decide();
        }
    }

    fn say(&mut self, line: std::fmt::Arguments<'_>) {
        self.out.write_fmt(line).unwrap();
        self.out.push('\n');
    }

    fn enqueue(&mut self, consumer: &str, words: &[&str]) {
        let mut request = Request {
            consumer: consumer.to_owned(),
            client_pid: self.pid(consumer),
            ..Request::default()
        };
        for word in words {
            match word.split_once('=') {
                Some(("prio", n)) => request.priority = Some(n.parse().unwrap()),
                Some(("gpu", choice)) => {
                    request.gpu = choice
                        .parse()
                        .map_or_else(|_| GpuChoice::Uuid(choice.to_owned()), GpuChoice::Index);
                }
                None => request.vram_mib = gib(word),
                _ => panic!("unknown request option {word:?}"),
            }
        }
        match self.sched.enqueue(request, consumer.to_owned(), self.now) {
            Ok((id, gpu, position)) => {
                self.waiting.push((consumer.to_owned(), id));
                let on = if self.several_gpus {
                    format!(" on {gpu}")
                } else {
                    String::new()
                };
                self.say(format_args!("queued {consumer} at {position}{on}"));
            }
            Err(e) => self.say(format_args!("rejected {consumer:?}: {e}")),
        }
    }

    fn withdraw(&mut self, name: &str, how: Withdrawal) {
        let Some(index) = self.waiting.iter().position(|(n, _)| n == name) else {
            self.say(format_args!("{name} not waiting"));
            return;
        };
        let (_, id) = self.waiting.remove(index);
        match self.sched.withdraw(id, how, self.now) {
            Some(payload) => self.say(format_args!("withdrew {payload}")),
            None => self.say(format_args!("{name} already gone")),
        }
    }

    /// Ends the lease `who` names: `#TOKEN`, or a consumer's oldest.
    fn end(&mut self, who: &str, how: LeaseEnd) {
        let token = match who.strip_prefix('#') {
            Some(token) => FencingToken(token.parse().unwrap()),
            None => match self.held.iter().find(|(n, _)| n == who) {
                Some(&(_, token)) => token,
                None => return self.say(format_args!("{who} holds nothing")),
            },
        };
        self.held.retain(|(_, t)| *t != token);
        match self.sched.end(token, how, self.now) {
            Some(e) if self.manual => self.say(format_args!(
                "ended {} token={} held={}ms",
                e.consumer,
                e.token.0,
                e.held.as_millis()
            )),
            Some(e) => self.say(format_args!("ended {}", e.consumer)),
            None => self.say(format_args!("token={} not held", token.0)),
        }
    }

    fn read(&mut self, words: &[&str]) {
        assert!(self.total_mib > 0, "a reading needs a `card` line");
        let mut reading = MemoryReading {
            total_mib: self.total_mib,
            ..MemoryReading::default()
        };
        for word in words {
            let (key, used) = word.split_once('=').expect("KEY=GIB");
            let used_mib = gib(used);
            let process = if key == "free" {
                reading.free_mib = used_mib;
                continue;
            } else if let Ok(pid) = key.parse() {
                ProcessUsage {
                    pid,
                    used_mib,
                    ancestors: Vec::new(),
                }
            } else if let Some(parent) = key.strip_suffix("/child") {
                let parent = self.pid(parent);
                ProcessUsage {
                    pid: parent + 1000,
                    used_mib,
                    ancestors: vec![parent, 1],
                }
            } else {
                ProcessUsage {
                    pid: self.pid(key),
                    used_mib,
                    ancestors: Vec::new(),
                }
            };
            reading.processes.push(process);
        }
        reading.used_mib = self.total_mib - reading.free_mib;
        self.sched.observe(0, reading, self.now);
    }

    /// Asks the scheduler what is ready and prints its decisions.
    fn decide(&mut self) {
        let decisions = self.sched.grant_ready(self.now);
        for u in &decisions.unloads {
            let (keeps, peak) = (size(u.footprint_mib), size(u.peak_mib));
            let line = format!(
                "unload {} ({keeps}, peak {peak}) for {}",
                u.consumer, u.for_consumer
            );
            self.say(format_args!("{line}"));
        }
        for p in &decisions.preemptions {
            let grace = humantime::format_duration(p.grace);
            let line = format!(
                "preempt {} for {} grace={grace}",
                p.consumer, p.for_consumer
            );
            self.say(format_args!("{line}"));
        }
        for token in &decisions.revocations {
            let (name, _) = self.held.iter().find(|(_, t)| t == token).expect("held");
            let line = format!("revoke {name}");
            self.say(format_args!("{line}"));
        }
        for grant in decisions.grants {
            self.waiting.retain(|(_, id)| *id != grant.waiter);
            self.held.push((grant.payload.clone(), grant.token));
            let mut line = format!("granted {}", grant.payload);
            if self.several_gpus {
                write!(line, " on {} ({})", grant.gpu_index, grant.gpu_uuid).unwrap();
            }
            if self.manual {
                let waited = grant.waited.as_millis();
                write!(line, " token={} waited={waited}ms", grant.token.0).unwrap();
            }
            self.say(format_args!("{line}"));
        }
    }

    fn show(&mut self, index: usize) {
        let snapshot = self.sched.snapshot(self.now);
        let gpu = &snapshot.gpus[index];
        let mut line = String::from("queue:");
        for w in &gpu.waiters {
            write!(line, " {}({})", w.request.consumer, w.priority).unwrap();
        }
        if let Some(reserved) = &gpu.reserved_for {
            write!(line, " | reserved: {reserved}").unwrap();
        }
        if let Some(blocked) = &gpu.blocked {
            write!(line, " | {blocked}").unwrap();
        }
        for r in &gpu.residents {
            let (keeps, peak) = (size(r.resident.footprint_mib), size(r.peak_mib));
            write!(line, " | {} keeps {keeps} peak {peak}", r.resident.consumer).unwrap();
            line.push_str(match r.resident.unload {
                Unload::NotAsked => "",
                Unload::Requested => " (asked to unload)",
                Unload::NotFreed => " (did not unload)",
            });
        }
        if !gpu.unleased.is_empty() {
            line.push_str(" | unleased:");
            for p in &gpu.unleased {
                write!(line, " {} {}", p.pid, size(p.used_mib)).unwrap();
            }
        }
        self.say(format_args!("{line}"));
    }

    fn holders(&mut self) {
        let snapshot = self.sched.snapshot(self.now);
        if snapshot.holders.is_empty() {
            self.say(format_args!("no holders"));
        }
        for h in &snapshot.holders {
            let peak = size(h.peak_mib);
            let line = format!(
                "holder {} token={} on {} peak {peak}",
                h.request.consumer, h.token.0, h.gpu_index
            );
            self.say(format_args!("{line}"));
        }
    }

    fn consumers(&mut self) {
        for c in self.sched.snapshot(self.now).consumers {
            let peak = size(c.peak_mib);
            self.say(format_args!(
                "consumer {} grants={} holding={} waiting={} peak {peak}",
                c.name, c.grants, c.holding, c.waiting
            ));
        }
    }

    fn evictions(&mut self) {
        let e = self.sched.snapshot(self.now).evictions;
        let mut line = format!(
            "evictions: {} asked, {} freed, {} failed",
            e.requested, e.completed, e.failed
        );
        if !e.last_victim.is_empty() {
            let took = humantime::format_duration(e.last_unload);
            write!(line, "; last {} in {took}", e.last_victim).unwrap();
        }
        self.say(format_args!("{line}"));
    }

    fn stats(&mut self) {
        let s = self.sched.snapshot(self.now);
        self.say(format_args!(
            "in_flight={} queue={} grants={} last_wait={}ms last_hold={}ms oldest={}ms {:?}",
            s.holders.len(),
            s.waiters.len(),
            s.total_grants,
            s.last_wait.as_millis(),
            s.last_hold.as_millis(),
            s.oldest_queued.as_millis(),
            s.ended
        ));
    }
}

/// A size in MiB as scripts print it: whole GiB as `10G`, else `1536M`.
fn size(mib: impl Into<i128>) -> String {
    let mib = mib.into();
    let gib = i128::from(GIB);
    if mib % gib == 0 {
        format!("{}G", mib / gib)
    } else {
        format!("{mib}M")
    }
}
