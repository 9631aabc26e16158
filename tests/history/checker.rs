//! The history checker: what the broker logged and what the clients saw,
//! checked against the broker's promises after the run.
//!
//! The broker's log is the authority on which leases existed: one
//! `granted` line and one `lease ended` line per lease, with the consumer
//! (one per call), the lease id and the token. The clients' entries give
//! bounds on *when* things happened, all on the system-wide monotonic clock:
//!
//! - a grant happened before the client received it and before the test
//!   read its log line (upper bounds), and after the request was sent;
//! - a lease ended after the client sent the `Release` that ended it, or
//!   after the fault or drop that cut the client off (lower bounds), and
//!   before the test read its `lease ended` line.
//!
//! A violation is reported only when these bounds prove it, so that a slow
//! machine cannot fail a correct broker. The broker writes its log lines
//! after releasing its lock, so two threads can write them in another order
//! than they decided; every line carries `seq=`, the number the broker gave
//! the decision under its lock, and the checker walks each start's lines in
//! `seq` order: the order of the decisions, with no tolerance.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Display;

use crate::broker::LogLine;
use crate::counter::Record;
use crate::history::{ClientKind, FaultKind, Op};
use gpulease_testkit::clock::millis;

/// A start of the broker.
#[derive(Clone, Debug)]
pub(crate) struct Instance {
    /// Its number, as in [`LogLine::instance`].
    pub(crate) instance: u32,
    /// When the test killed it with SIGKILL, if it did.
    pub(crate) killed_at: Option<u64>,
}

/// Everything the checker looks at.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Inputs<'a> {
    /// The calls, by consumer name.
    pub(crate) ops: &'a BTreeMap<String, Op>,
    /// Every broker log line, each start's in the order written.
    pub(crate) log: &'a [LogLine],
    /// The broker's starts, in order.
    pub(crate) instances: &'a [Instance],
    /// The broker's `capacity` (one GPU).
    pub(crate) capacity: usize,
    /// The stated detection bound for a lost holder (keepalive interval +
    /// timeout), in nanoseconds.
    pub(crate) bound: u64,
    /// Allowance on top of `bound` for a loaded machine, in nanoseconds.
    pub(crate) slack: u64,
    /// The fenced counter's accepted accesses, if the workload had one.
    pub(crate) counter: Option<&'a [Record]>,
}

/// The figures of a check and the violations it found.
#[derive(Clone, Debug, Default)]
pub(crate) struct Report {
    /// Named figures, in the order computed.
    pub(crate) figures: Vec<(String, String)>,
    /// Each violation, prefixed with the promise it breaks.
    pub(crate) violations: Vec<String>,
}

impl Report {
    fn figure(&mut self, name: &str, value: impl Display) {
        self.figures.push((name.to_owned(), value.to_string()));
    }

    fn violation(&mut self, promise: &str, detail: String) {
        self.violations.push(format!("{promise}: {detail}"));
    }

    /// The violations that break `promise`.
    pub(crate) fn count(&self, promise: &str) -> usize {
        let prefix = format!("{promise}:");
        self.violations
            .iter()
            .filter(|v| v.starts_with(&prefix))
            .count()
    }

    /// The figures as `name value` lines.
    pub(crate) fn figure_lines(&self) -> Vec<String> {
        self.figures
            .iter()
            .map(|(name, value)| format!("{name}: {value}"))
            .collect()
    }
}

/// The promises, as the violations name them.
pub(crate) const PROMISES: [&str; 9] = [
    "log",
    "agreement",
    "capacity",
    "tokens",
    "fifo",
    "grant after cancel",
    "detection",
    "lost update",
    "panic",
];

/// A lease, from the broker's log.
#[derive(Clone, Debug)]
struct Lease {
    instance: u32,
    consumer: String,
    lease_id: String,
    token: u64,
    /// Read time of the `granted` line.
    grant_t: u64,
    /// Read time, `seq` and `how` of the `lease ended` line.
    end: Option<(u64, u64, String)>,
}

/// A parsed broker line: its decision's `seq` (none when the line lacks
/// one) and what it says.
#[derive(Clone, Debug)]
struct Parsed {
    seq: Option<u64>,
    logged: Logged,
}

/// What a broker line says.
#[derive(Clone, Debug)]
enum Logged {
    Granted {
        consumer: String,
        lease_id: String,
        token: u64,
    },
    Ended {
        consumer: String,
        token: u64,
        how: String,
    },
}

/// Parses a `granted` or `lease ended` line of the broker's log.
fn parse(text: &str) -> Option<Parsed> {
    let (message, rest) = if let Some(at) = text.find(": granted ") {
        ("granted", &text[at + ": granted ".len()..])
    } else if let Some(at) = text.find(": lease ended ") {
        ("ended", &text[at + ": lease ended ".len()..])
    } else {
        return None;
    };
    let fields: HashMap<&str, &str> = rest
        .split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key, value.trim_matches('"')))
        .collect();
    let consumer = (*fields.get("consumer")?).to_owned();
    let token = fields.get("token")?.parse().ok()?;
    let seq = fields.get("seq").and_then(|seq| seq.parse().ok());
    let logged = if message == "granted" {
        Logged::Granted {
            consumer,
            lease_id: (*fields.get("lease_id")?).to_owned(),
            token,
        }
    } else {
        Logged::Ended {
            consumer,
            token,
            how: (*fields.get("how")?).to_owned(),
        }
    };
    Some(Parsed { seq, logged })
}

/// Checks a history; see the module documentation.
pub(crate) fn check(inputs: &Inputs<'_>) -> Report {
    let mut checker = Checker::new(inputs);
    checker.consistency();
    checker.agreement();
    for instance in inputs.instances {
        checker.capacity_by_log(instance.instance);
        checker.capacity_by_bounds(instance.instance);
        checker.fifo(instance);
        checker.grant_after_cancel(instance.instance);
    }
    checker.tokens();
    checker.detection();
    if let Some(records) = inputs.counter {
        checker.lost_updates(records);
    }
    checker.summary();
    checker.report
}

struct Checker<'a> {
    inputs: &'a Inputs<'a>,
    /// Every lease, by (instance, token).
    leases: BTreeMap<(u32, u64), Lease>,
    /// The lease of each consumer.
    by_op: HashMap<String, (u32, u64)>,
    /// Each instance's grant and end lines, in decision (`seq`) order:
    /// seq, read time, token, and whether it is a grant.
    lines: BTreeMap<u32, Vec<(u64, u64, u64, bool)>>,
    report: Report,
}

impl<'a> Checker<'a> {
    fn new(inputs: &'a Inputs<'a>) -> Self {
        let mut checker = Self {
            inputs,
            leases: BTreeMap::new(),
            by_op: HashMap::new(),
            lines: BTreeMap::new(),
            report: Report::default(),
        };
        // Every grant and end line, by instance and seq: the order in which
        // the broker decided, whatever order the lines were written in.
        let mut decided: BTreeMap<(u32, u64), (u64, Logged)> = BTreeMap::new();
        let mut written_late: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for line in inputs.log {
            if line.text.contains("panicked") {
                checker.report.violation("panic", line.text.clone());
            }
            let Some(parsed) = parse(&line.text) else {
                continue;
            };
            let Some(seq) = parsed.seq else {
                checker.report.violation(
                    "log",
                    format!(
                        "instance {}: a line without seq: {}",
                        line.instance, line.text
                    ),
                );
                continue;
            };
            let (high, late) = written_late.entry(line.instance).or_default();
            if seq < *high {
                *late += 1;
            }
            *high = (*high).max(seq);
            if decided
                .insert((line.instance, seq), (line.t, parsed.logged))
                .is_some()
            {
                checker.report.violation(
                    "log",
                    format!("instance {}: seq {seq} logged twice", line.instance),
                );
            }
        }
        for (instance, (_, late)) in written_late {
            checker.report.figure(
                &format!(
                    "instance {instance}: log lines written out of decision order (put back by seq)"
                ),
                late,
            );
        }
        let mut orphan_ends: HashMap<(u32, u64), (u64, u64, String, String)> = HashMap::new();
        for ((instance, seq), (t, logged)) in decided {
            match logged {
                Logged::Granted {
                    consumer,
                    lease_id,
                    token,
                } => {
                    checker
                        .lines
                        .entry(instance)
                        .or_default()
                        .push((seq, t, token, true));
                    let key = (instance, token);
                    if let Some(earlier) = checker.leases.get(&key) {
                        checker.report.violation(
                            "tokens",
                            format!(
                                "instance {instance} granted token {token} twice ({} and {consumer})",
                                earlier.consumer
                            ),
                        );
                        continue;
                    }
                    if let Some(other) = checker.by_op.get(&consumer) {
                        checker.report.violation(
                            "log",
                            format!("{consumer} was granted twice ({other:?} and {key:?})"),
                        );
                    }
                    checker.by_op.insert(consumer.clone(), key);
                    let end = orphan_ends.remove(&key).map(|(end_t, end_seq, how, _)| {
                        checker.report.violation(
                            "log",
                            format!(
                                "instance {instance}: token {token} ({consumer}) ended at seq {end_seq}, before its grant at seq {seq}"
                            ),
                        );
                        (end_t, end_seq, how)
                    });
                    checker.leases.insert(
                        key,
                        Lease {
                            instance,
                            consumer,
                            lease_id,
                            token,
                            grant_t: t,
                            end,
                        },
                    );
                }
                Logged::Ended {
                    consumer,
                    token,
                    how,
                } => {
                    checker
                        .lines
                        .entry(instance)
                        .or_default()
                        .push((seq, t, token, false));
                    let key = (instance, token);
                    match checker.leases.get_mut(&key) {
                        Some(lease) if lease.end.is_none() && lease.consumer == consumer => {
                            lease.end = Some((t, seq, how));
                        }
                        Some(lease) => checker.report.violation(
                            "log",
                            format!(
                                "instance {instance} ended token {token} of {} again, as {consumer} ({how})",
                                lease.consumer
                            ),
                        ),
                        None => {
                            orphan_ends.insert(key, (t, seq, how, consumer));
                        }
                    }
                }
            }
        }
        for ((instance, token), (_, _, how, consumer)) in orphan_ends {
            checker.report.violation(
                "log",
                format!(
                    "instance {instance} ended token {token} ({consumer}, {how}), never granted"
                ),
            );
        }
        checker
    }

    fn op(&self, lease: &Lease) -> Option<&'a Op> {
        self.inputs.ops.get(&lease.consumer)
    }

    fn killed_at(&self, instance: u32) -> Option<u64> {
        self.inputs
            .instances
            .iter()
            .find(|i| i.instance == instance)
            .and_then(|i| i.killed_at)
    }

    /// The latest moment the lease was surely granted by.
    fn granted_by(&self, lease: &Lease) -> u64 {
        let seen = self
            .op(lease)
            .and_then(|op| op.granted.as_ref())
            .filter(|seen| seen.token == lease.token)
            .map(|seen| seen.t);
        seen.map_or(lease.grant_t, |t| t.min(lease.grant_t))
    }

    /// The earliest moment the lease can have ended, when the clients know.
    fn held_until(&self, lease: &Lease) -> Option<u64> {
        let (_, _, how) = lease.end.as_ref()?;
        self.op(lease)?.end_lower_bound(how)
    }

    /// Every lease ends once, in the instance that granted it, unless that
    /// instance was killed.
    fn consistency(&mut self) {
        let mut never_ended = Vec::new();
        for lease in self.leases.values() {
            if lease.end.is_none() && self.killed_at(lease.instance).is_none() {
                never_ended.push(format!(
                    "instance {} token {} ({}) has no `lease ended` line",
                    lease.instance, lease.token, lease.consumer
                ));
            }
        }
        for detail in never_ended {
            self.report.violation("log", detail);
        }
    }

    /// What the clients saw matches what the broker logged.
    fn agreement(&mut self) {
        let mut unlogged_at_kill = 0;
        let mut violations = Vec::new();
        for op in self.inputs.ops.values() {
            let lease = self
                .by_op
                .get(&op.name)
                .and_then(|key| self.leases.get(key));
            match (&op.granted, lease) {
                (Some(seen), None) => {
                    if self
                        .killed_at(op.instance)
                        .is_some_and(|k| k >= seen.t && k - seen.t < 100_000_000)
                    {
                        unlogged_at_kill += 1;
                    } else {
                        violations.push(format!(
                            "{} saw token {} granted, but the broker logged no grant",
                            op.name, seen.token
                        ));
                    }
                }
                (Some(seen), Some(lease)) => {
                    if seen.token != lease.token || seen.lease_id != lease.lease_id {
                        violations.push(format!(
                            "{} saw token {} ({}), the broker logged token {} ({})",
                            op.name, seen.token, seen.lease_id, lease.token, lease.lease_id
                        ));
                    }
                    // "Unclaimed" skips the lock-delay: it must mean that
                    // the consumer never heard of the grant.
                    if lease
                        .end
                        .as_ref()
                        .is_some_and(|(_, _, how)| how == "unclaimed")
                    {
                        violations.push(format!(
                            "{} saw token {} granted, yet the broker says it went unclaimed",
                            op.name, seen.token
                        ));
                    }
                }
                (None, Some(lease)) => {
                    // A release that ended a lease was read after `Granted`
                    // was sent on the same stream: a client that saw its
                    // call end must have seen the grant too.
                    let polite = lease
                        .end
                        .as_ref()
                        .is_some_and(|(_, _, how)| how == "released" || how == "half_closed");
                    let watched = op.ended.is_some()
                        && matches!(
                            op.client,
                            Some(ClientKind::InProcess | ClientKind::Proxied | ClientKind::Worker)
                        );
                    if polite && watched {
                        violations.push(format!(
                            "{} never saw a grant, yet the broker says token {} was released",
                            op.name, lease.token
                        ));
                    }
                }
                (None, None) => {}
            }
        }
        for detail in violations {
            self.report.violation("agreement", detail);
        }
        self.report.figure(
            "grants seen by no log line, at a broker kill",
            unlogged_at_kill,
        );
    }

    /// Walks the log in decision (`seq`) order: at no grant may more than
    /// `capacity` leases be open.
    fn capacity_by_log(&mut self, instance: u32) {
        let Some(lines) = self.lines.get(&instance) else {
            return;
        };
        let capacity = self.inputs.capacity;
        let mut open: BTreeSet<u64> = BTreeSet::new();
        let mut violations = Vec::new();
        for &(seq, _, token, grant) in lines {
            if !grant {
                // An end before its grant is reported as a log violation.
                open.remove(&token);
                continue;
            }
            open.insert(token);
            if open.len() <= capacity {
                continue;
            }
            let consumer = self
                .leases
                .get(&(instance, token))
                .map_or("?", |lease| lease.consumer.as_str());
            violations.push(format!(
                "instance {instance}: token {token} ({consumer}) granted at seq {seq} while {} leases were open: {:?}",
                open.len() - 1,
                open.iter()
                    .filter(|o| **o != token)
                    .filter_map(|o| self.leases.get(&(instance, *o)))
                    .map(|l| (&l.consumer, l.token))
                    .collect::<Vec<_>>()
            ));
        }
        for detail in violations {
            self.report.violation("capacity", detail);
        }
    }

    /// From the clients' bounds alone: the intervals in which each lease
    /// was surely held never overlap more than `capacity` deep.
    fn capacity_by_bounds(&mut self, instance: u32) {
        let mut events = Vec::new();
        for lease in self.leases.values().filter(|l| l.instance == instance) {
            let from = self.granted_by(lease);
            if let Some(until) = self.held_until(lease)
                && until > from
            {
                // Ends sort before starts at the same instant: open intervals.
                events.push((from, 1u8, lease.token));
                events.push((until, 0u8, lease.token));
            }
        }
        events.sort_unstable();
        let mut held = BTreeSet::new();
        let mut worst = 0;
        let mut violations = Vec::new();
        for (t, start, token) in events {
            if start == 0 {
                held.remove(&token);
                continue;
            }
            held.insert(token);
            worst = worst.max(held.len());
            if held.len() > self.inputs.capacity {
                violations.push(format!(
                    "instance {instance}: at {:.1} ms tokens {:?} were all surely held",
                    millis(t),
                    held
                ));
            }
        }
        for detail in violations {
            self.report.violation("capacity", detail);
        }
        self.report.figure(
            &format!("instance {instance}: most leases surely held at once"),
            worst,
        );
    }

    /// FIFO among live waiters: a request that was surely in the queue
    /// before another was sent is granted first, unless it stopped waiting
    /// first.
    fn fifo(&mut self, instance: &Instance) {
        let ops: Vec<&Op> = self
            .inputs
            .ops
            .values()
            .filter(|op| op.instance == instance.instance)
            .collect();
        // Earlier requests: surely queued by `first_event`; either granted
        // (token) or never (then waiting until at least `until`).
        let mut earlier: Vec<(u64, &str, Option<u64>, Option<u64>)> = Vec::new();
        // Later requests: sent at `invoke`, granted `token` by `granted_by`.
        let mut later: Vec<(u64, &str, u64, u64)> = Vec::new();
        for op in &ops {
            let lease = self
                .by_op
                .get(&op.name)
                .filter(|(i, _)| *i == instance.instance)
                .and_then(|key| self.leases.get(key));
            if let (Some(lease), Some(invoke)) = (lease, op.invoke) {
                later.push((invoke, &op.name, lease.token, self.granted_by(lease)));
            }
            let Some(queued) = op.first_event else {
                continue;
            };
            match lease {
                Some(lease) => earlier.push((queued, &op.name, Some(lease.token), None)),
                None => {
                    let Some(until) = op.wait_end_lower_bound(instance.killed_at) else {
                        continue;
                    };
                    // The call ended before anything the client knows of
                    // could end it, or with an error that nothing the
                    // client knows of explains (a connection dropped for a
                    // missed keepalive while the client was busy): something
                    // else ended the wait, at an unknown moment; undecidable.
                    let unexplained = op.ended.as_ref().is_some_and(|(t, code)| {
                        *t < until
                            || !(code == "ok"
                                || code == "DeadlineExceeded"
                                || instance.killed_at.is_some_and(|k| k <= *t))
                    });
                    if unexplained {
                        continue;
                    }
                    earlier.push((queued, &op.name, None, Some(until)));
                }
            }
        }
        earlier.sort_unstable();
        later.sort_unstable();
        let mut next = 0;
        let mut top_token: Option<(u64, &str)> = None;
        let mut top_wait: Option<(u64, &str)> = None;
        let mut violations = Vec::new();
        for &(invoke, name, token, granted_by) in &later {
            while next < earlier.len() && earlier[next].0 < invoke {
                let (_, other, other_token, until) = earlier[next];
                if let Some(t) = other_token
                    && top_token.is_none_or(|(best, _)| t > best)
                {
                    top_token = Some((t, other));
                }
                if let Some(u) = until
                    && top_wait.is_none_or(|(best, _)| u > best)
                {
                    top_wait = Some((u, other));
                }
                next += 1;
            }
            if let Some((t, other)) = top_token
                && t > token
            {
                violations.push(format!(
                    "instance {}: {other} was queued before {name} was sent, yet got token {t} after {name}'s {token}",
                    instance.instance
                ));
            }
            if let Some((until, other)) = top_wait
                && until > granted_by
            {
                violations.push(format!(
                    "instance {}: {other} was queued before {name} was sent and still waited at {name}'s grant (token {token}), but was never granted",
                    instance.instance
                ));
            }
        }
        self.report.figure(
            &format!(
                "instance {}: FIFO: queued requests x later grants",
                instance.instance
            ),
            format!("{} x {}", earlier.len(), later.len()),
        );
        for detail in violations {
            self.report.violation("fifo", detail);
        }
    }

    /// No grant after a cancel completed: a grant's earliest possible time
    /// is the latest `invoke` of any request granted no later (tokens are
    /// handed out in grant order).
    fn grant_after_cancel(&mut self, instance: u32) {
        let mut earliest = BTreeMap::new();
        let mut latest_invoke = 0;
        for lease in self.leases.values().filter(|l| l.instance == instance) {
            if let Some(invoke) = self.op(lease).and_then(|op| op.invoke) {
                latest_invoke = latest_invoke.max(invoke);
            }
            earliest.insert(lease.token, latest_invoke);
        }
        let mut checked = 0;
        let mut violations = Vec::new();
        for op in self
            .inputs
            .ops
            .values()
            .filter(|op| op.instance == instance)
        {
            let Some(cancelled) = op.cancel_completed() else {
                continue;
            };
            checked += 1;
            let Some(&(_, token)) = self.by_op.get(&op.name) else {
                continue;
            };
            if let Some(&not_before) = earliest.get(&token)
                && not_before > cancelled
            {
                violations.push(format!(
                    "instance {instance}: {} was granted token {token} at least {:.1} ms after its cancel completed",
                    op.name,
                    millis(not_before - cancelled)
                ));
            }
        }
        self.report.figure(
            &format!("instance {instance}: completed cancels checked"),
            checked,
        );
        for detail in violations {
            self.report.violation("grant after cancel", detail);
        }
    }

    /// Tokens strictly increase: within a start in decision order, across
    /// restarts, and in real time (a grant seen before another request was
    /// even sent has the lower token).
    fn tokens(&mut self) {
        let mut violations = Vec::new();
        let mut before: Option<(u32, u64)> = None;
        for instance in self.inputs.instances {
            let tokens: Vec<u64> = self
                .leases
                .keys()
                .filter(|(i, _)| *i == instance.instance)
                .map(|(_, t)| *t)
                .collect();
            let (Some(&low), Some(&high)) = (tokens.first(), tokens.last()) else {
                continue;
            };
            if let Some((previous, previous_high)) = before
                && low <= previous_high
            {
                violations.push(format!(
                    "instance {} handed out token {low} after instance {previous} had handed out {previous_high}: tokens went back across a restart",
                    instance.instance
                ));
            }
            self.report.figure(
                &format!("instance {}: tokens", instance.instance),
                format!("{low}..={high} ({} grants)", tokens.len()),
            );
            before = Some((instance.instance, before.map_or(high, |(_, h)| h.max(high))));
        }
        // Real time, across every start.
        let mut granted: Vec<(u64, u64, &str)> = Vec::new();
        let mut sent: Vec<(u64, u64, &str)> = Vec::new();
        for lease in self.leases.values() {
            granted.push((self.granted_by(lease), lease.token, &lease.consumer));
            if let Some(invoke) = self.op(lease).and_then(|op| op.invoke) {
                sent.push((invoke, lease.token, &lease.consumer));
            }
        }
        granted.sort_unstable();
        sent.sort_unstable();
        let mut next = 0;
        let mut top: Option<(u64, &str)> = None;
        let mut inversions = 0;
        for &(invoke, token, name) in &sent {
            while next < granted.len() && granted[next].0 < invoke {
                let (_, t, other) = granted[next];
                if top.is_none_or(|(best, _)| t > best) {
                    top = Some((t, other));
                }
                next += 1;
            }
            if let Some((t, other)) = top
                && t >= token
            {
                inversions += 1;
                if inversions <= 5 {
                    violations.push(format!(
                        "{other} was granted token {t} before {name} was sent, yet {name} got token {token}"
                    ));
                }
            }
        }
        if inversions > 5 {
            violations.push(format!("... {} more real-time inversions", inversions - 5));
        }
        // Decision order: each start hands out its tokens in the order it
        // decides its grants.
        for (instance, lines) in &self.lines {
            let mut high: Option<(u64, u64)> = None;
            for &(seq, _, token, grant) in lines {
                if !grant {
                    continue;
                }
                if let Some((high_seq, high_token)) = high
                    && token <= high_token
                {
                    violations.push(format!(
                        "instance {instance}: token {token} granted at seq {seq}, after token {high_token} at seq {high_seq}"
                    ));
                }
                if high.is_none_or(|(_, high_token)| token > high_token) {
                    high = Some((seq, token));
                }
            }
        }
        for detail in violations {
            self.report.violation("tokens", detail);
        }
    }

    /// Every holder cut off by a fault loses its lease within the bound.
    fn detection(&mut self) {
        let limit = self.inputs.bound + self.inputs.slack;
        let mut worst: BTreeMap<FaultKind, u64> = BTreeMap::new();
        let mut counted: BTreeMap<FaultKind, u64> = BTreeMap::new();
        let mut violations = Vec::new();
        for op in self.inputs.ops.values() {
            let Some((fault_t, kind)) = op.fault_at() else {
                continue;
            };
            let Some(lease) = self
                .by_op
                .get(&op.name)
                .and_then(|key| self.leases.get(key))
            else {
                continue;
            };
            match &lease.end {
                Some((end_t, _, _)) if *end_t < fault_t => {}
                Some((end_t, _, how)) => {
                    let latency = end_t - fault_t;
                    *counted.entry(kind).or_default() += 1;
                    let top = worst.entry(kind).or_default();
                    *top = (*top).max(latency);
                    if latency > limit {
                        violations.push(format!(
                            "{} ({kind:?}) lost token {} only {:.0} ms after the fault ({how}); the bound is {:.0} ms + {:.0} ms slack",
                            op.name,
                            lease.token,
                            millis(latency),
                            millis(self.inputs.bound),
                            millis(self.inputs.slack)
                        ));
                    }
                }
                None => {
                    if self
                        .killed_at(lease.instance)
                        .is_none_or(|killed| killed > fault_t + limit)
                    {
                        violations.push(format!(
                            "{} ({kind:?}) never lost token {}",
                            op.name, lease.token
                        ));
                    }
                }
            }
        }
        for (kind, latency) in &worst {
            self.report.figure(
                &format!("lost holders detected after {kind:?}: count, slowest ms"),
                format!("{}, {:.0}", counted[kind], millis(*latency)),
            );
        }
        for detail in violations {
            self.report.violation("detection", detail);
        }
    }

    /// The fenced counter: every accepted write is the previous value plus
    /// one (else an increment was lost), and every write a client saw
    /// accepted is there.
    fn lost_updates(&mut self, records: &[Record]) {
        let mut value = 0;
        let mut lost = 0;
        let mut written = HashSet::new();
        let mut violations = Vec::new();
        for record in records.iter().filter(|r| r.kind == b'W') {
            if record.value <= value {
                let gone = value + 1 - record.value;
                lost += gone;
                violations.push(format!(
                    "token {} wrote {} over {value}: {gone} increment(s) lost",
                    record.token, record.value
                ));
            } else if record.value > value + 1 {
                violations.push(format!(
                    "token {} wrote {} over {value}: a value nobody read",
                    record.token, record.value
                ));
            }
            value = record.value;
            written.insert((record.token, record.value));
        }
        let mut acknowledged = 0;
        let mut refused_writes = 0;
        let mut refused_reads = 0;
        let mut stale_accepted = 0;
        let mut stale_refused = 0;
        for op in self.inputs.ops.values() {
            refused_reads += op.reads.iter().filter(|r| r.2.is_none()).count();
            let ended = self
                .by_op
                .get(&op.name)
                .and_then(|key| self.leases.get(key))
                .and_then(|lease| lease.end.as_ref())
                .map(|end| end.0);
            for &(t, token, value, accepted) in &op.writes {
                let stale = ended.is_some_and(|ended| ended < t);
                match (accepted, stale) {
                    (true, true) => stale_accepted += 1,
                    (false, true) => stale_refused += 1,
                    _ => {}
                }
                if accepted {
                    acknowledged += 1;
                    if !written.contains(&(token, value)) {
                        violations.push(format!(
                            "{} saw its write of {value} with token {token} accepted, but it is not in the counter",
                            op.name
                        ));
                    }
                } else {
                    refused_writes += 1;
                }
            }
        }
        let applied = records.iter().filter(|r| r.kind == b'W').count();
        self.report.figure("counter: final value", value);
        self.report.figure(
            "counter: increments applied, acknowledged",
            format!("{applied}, {acknowledged}"),
        );
        self.report.figure(
            "counter: stale accesses refused (reads, writes)",
            format!("{refused_reads}, {refused_writes}"),
        );
        self.report.figure(
            "counter: writes after the writer's lease ended: refused, accepted (nobody newer had touched it)",
            format!("{stale_refused}, {stale_accepted}"),
        );
        self.report.figure("counter: lost updates", lost);
        for detail in violations {
            self.report.violation("lost update", detail);
        }
    }

    fn summary(&mut self) {
        let ops = self.inputs.ops.values();
        let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
        let mut faults: BTreeMap<String, u64> = BTreeMap::new();
        let (mut cancels, mut drops, mut expired, mut releases) = (0, 0, 0, 0);
        for op in ops {
            if let Some(kind) = op.client {
                *by_kind.entry(format!("{kind:?}")).or_default() += 1;
            }
            for (_, fault) in &op.faults {
                *faults.entry(format!("{fault:?}")).or_default() += 1;
            }
            cancels += u64::from(op.cancel_sent.is_some());
            drops += u64::from(op.dropped.is_some());
            releases += u64::from(op.release_sent.is_some());
            expired += u64::from(
                op.ended
                    .as_ref()
                    .is_some_and(|(_, code)| code == "DeadlineExceeded"),
            );
        }
        let mut ends: BTreeMap<&str, u64> = BTreeMap::new();
        for lease in self.leases.values() {
            let how = lease
                .end
                .as_ref()
                .map_or("(broker killed)", |e| e.2.as_str());
            *ends.entry(how).or_default() += 1;
        }
        let mut summary = vec![
            (
                "calls (AcquireLease)".to_owned(),
                format!("{} {by_kind:?}", self.inputs.ops.len()),
            ),
            ("grants".to_owned(), self.leases.len().to_string()),
            ("lease ends".to_owned(), format!("{ends:?}")),
            (
                "client actions: releases, cancels while waiting, drops, max-wait expiries"
                    .to_owned(),
                format!("{releases}, {cancels}, {drops}, {expired}"),
            ),
            (
                "faults injected into clients".to_owned(),
                format!("{faults:?}"),
            ),
            (
                "broker starts (kill -9 + restart between)".to_owned(),
                self.inputs.instances.len().to_string(),
            ),
        ];
        summary.append(&mut self.report.figures);
        self.report.figures = summary;
        let counts: Vec<String> = PROMISES
            .iter()
            .map(|p| format!("{p} {}", self.report.count(p)))
            .collect();
        self.report.figure("violations", counts.join(", "));
    }
}
