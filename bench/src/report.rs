//! The run's results: the table on standard output, the JSON file with
//! the raw percentiles, and the SVG plot of handoff latency against queue
//! length.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde::Serialize;

use crate::procs::Transport;
use crate::scenarios::Plan;
use crate::stats::Summary;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The machine it ran on.
    pub(crate) machine: Machine,
    /// The command line.
    pub(crate) command: String,
    /// The broker binary that was measured.
    pub(crate) broker_bin: String,
    /// The sizes it used.
    pub(crate) plan: Plan,
    /// How long the run took, in seconds.
    pub(crate) wall_s: f64,
    /// `/proc/loadavg` when the run started and when it ended: how busy the
    /// machine was besides.
    pub(crate) loadavg: [String; 2],
    /// The wire's limits, per transport.
    pub(crate) wire: Vec<TransportBaselines>,
    /// `flock(2)` handoff between two processes.
    pub(crate) flock_handoff: Option<Summary>,
    /// etcd's lock, or why it was not measured.
    pub(crate) etcd: EtcdOutcome,
    /// Uncontended acquire and cycle, per transport.
    pub(crate) uncontended: Vec<Uncontended>,
    /// Handoff and `Status` per transport and queue length.
    pub(crate) handoff: Vec<HandoffPoint>,
    /// The same handoffs through a bare semaphore behind tonic.
    pub(crate) semaphore: Vec<HandoffPoint>,
    /// Grants per second per capacity and number of clients.
    pub(crate) throughput: Vec<ThroughputPoint>,
    /// Broker memory per number of waiters.
    pub(crate) memory: Vec<MemoryPoint>,
    /// The targets, checked.
    pub(crate) targets: Vec<Target>,
}

/// The machine.
#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    /// Cores available to this process.
    pub(crate) cores: usize,
    /// From `/proc/cpuinfo`.
    pub(crate) cpu: String,
    /// From `/proc/meminfo`, in GiB.
    pub(crate) memory_gib: f64,
    /// From `/proc/sys/kernel/osrelease`.
    pub(crate) kernel: String,
}

/// The 1-, 5- and 15-minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Machine {
    /// Reads it from `/proc`.
    pub(crate) fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Self {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
            memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// The echo server's figures on one transport.
#[derive(Debug, Serialize)]
pub(crate) struct TransportBaselines {
    /// The transport.
    pub(crate) transport: Transport,
    /// A message each way on an open bidi stream.
    pub(crate) bidi_rtt: Summary,
    /// A unary call.
    pub(crate) unary_rtt: Summary,
    /// The broker's acquire, against the echo: open → first answer.
    pub(crate) echo_acquire: Summary,
    /// The broker's cycle, against the echo: open → stream end.
    pub(crate) echo_cycle: Summary,
}

/// etcd's figures, or why there are none.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum EtcdOutcome {
    /// No `etcd` on the PATH.
    NotInstalled,
    /// Turned off with `--no-etcd`.
    Skipped,
    /// It did not work.
    Failed {
        /// Why.
        error: String,
    },
    /// Measured.
    Measured {
        /// `etcd --version`'s first line.
        version: String,
        /// Unlock at t0 → the waiting process's lock returns at t1.
        handoff: Summary,
        /// Uncontended lock.
        lock: Summary,
        /// Uncontended lock → unlock.
        cycle: Summary,
    },
}

/// The broker's uncontended figures on one transport.
#[derive(Debug, Serialize)]
pub(crate) struct Uncontended {
    /// The transport.
    pub(crate) transport: Transport,
    /// Open `AcquireLease` → `Granted`.
    pub(crate) acquire: Summary,
    /// Open → `Granted` → `Release` → the stream's end.
    pub(crate) cycle: Summary,
}

/// Handoff and `Status` at one queue length.
#[derive(Debug, Serialize)]
pub(crate) struct HandoffPoint {
    /// The transport.
    pub(crate) transport: Transport,
    /// Waiters queued besides the one that is granted.
    pub(crate) other_waiters: usize,
    /// `Release` sent → `Granted` read in another process.
    pub(crate) handoff: Summary,
    /// A `Status` call with `other_waiters` waiters and one holder (not
    /// measured on the bare semaphore).
    pub(crate) status: Option<Summary>,
    /// Handoffs within one process, not counted.
    pub(crate) same_process_skipped: usize,
    /// The server's CPU time per grant during the rotation, in µs (each
    /// grant also brings one new call and one call's end).
    pub(crate) server_cpu_us_per_grant: f64,
    /// Position updates (`Queued` events) the waiting clients received per
    /// grant.
    pub(crate) updates_per_grant: f64,
    /// Calls that failed.
    pub(crate) errors: u64,
}

/// Throughput at one capacity and number of clients.
#[derive(Debug, Serialize)]
pub(crate) struct ThroughputPoint {
    /// The broker's capacity.
    pub(crate) capacity: u32,
    /// Contending clients, each on its own connection.
    pub(crate) clients: usize,
    /// The processes they ran in.
    pub(crate) processes: usize,
    /// Grants per second, from the broker's `total_grants`.
    pub(crate) grants_per_s: f64,
    /// The same through a bare semaphore of `capacity` permits.
    pub(crate) semaphore_grants_per_s: f64,
    /// The broker's CPU time per grant, in µs.
    pub(crate) server_cpu_us_per_grant: f64,
    /// The bare semaphore's CPU time per grant, in µs.
    pub(crate) semaphore_cpu_us_per_grant: f64,
    /// Calls that failed.
    pub(crate) errors: u64,
}

/// Broker memory at one queue length.
#[derive(Debug, Serialize)]
pub(crate) struct MemoryPoint {
    /// Waiters queued behind one holder.
    pub(crate) waiters: usize,
    /// The broker's `VmRSS`.
    pub(crate) rss_bytes: u64,
    /// The bare semaphore's `VmRSS` with as many waiters.
    pub(crate) semaphore_rss_bytes: u64,
}

/// One of the targets.
#[derive(Debug, Serialize)]
pub(crate) struct Target {
    /// What is compared.
    pub(crate) name: String,
    /// The measured value.
    pub(crate) value: f64,
    /// The limit.
    pub(crate) limit: f64,
    /// Whether the value must stay below (`true`) or reach the limit.
    pub(crate) at_most: bool,
    /// Whether it is met.
    pub(crate) met: bool,
}

impl Report {
    /// The bidi round trip p50 on `transport`.
    fn bidi(&self, transport: Transport) -> Option<f64> {
        self.wire
            .iter()
            .find(|w| w.transport == transport)
            .map(|w| w.bidi_rtt.p50_us)
    }

    fn wire_on(&self, transport: Transport) -> Option<&TransportBaselines> {
        self.wire.iter().find(|w| w.transport == transport)
    }

    fn handoff_at(&self, transport: Transport, others: usize) -> Option<&HandoffPoint> {
        self.handoff
            .iter()
            .find(|h| h.transport == transport && h.other_waiters == others)
    }

    /// Bytes of broker memory per queued waiter: the growth from no waiter
    /// to the most, divided by the most.
    pub(crate) fn bytes_per_waiter(&self) -> Option<f64> {
        let empty = self.memory.iter().find(|m| m.waiters == 0)?;
        let most = self.memory.iter().max_by_key(|m| m.waiters)?;
        (most.waiters > 0)
            .then(|| (most.rss_bytes as f64 - empty.rss_bytes as f64) / most.waiters as f64)
    }

    /// Checks the targets against what was measured.
    pub(crate) fn check_targets(&mut self) {
        let mut targets = Vec::new();
        let smallest = self.plan.queue_sizes.iter().copied().min();
        let largest = self.plan.queue_sizes.iter().copied().max();
        for transport in [Transport::Tcp, Transport::Uds] {
            let t = transport.name();
            if let (Some(bidi), Some(one)) = (
                self.bidi(transport),
                smallest.and_then(|n| self.handoff_at(transport, n)),
            ) {
                targets.push(Target::at_most(
                    format!(
                        "handoff p50 ({} other waiter) ÷ bidi round trip p50, {t}",
                        one.other_waiters
                    ),
                    one.handoff.p50_us / bidi,
                    1.25,
                ));
            }
            if let (Some(wire), Some(solo)) = (
                self.wire_on(transport),
                self.uncontended.iter().find(|u| u.transport == transport),
            ) {
                targets.push(Target::at_most(
                    format!("uncontended acquire p50 ÷ unary round trip p50, {t}"),
                    solo.acquire.p50_us / wire.unary_rtt.p50_us,
                    1.3,
                ));
            }
            if let (Some(small), Some(large)) = (
                smallest.and_then(|n| self.handoff_at(transport, n)),
                largest.and_then(|n| self.handoff_at(transport, n)),
            ) && large.other_waiters > small.other_waiters
            {
                targets.push(Target::at_most(
                    format!(
                        "handoff p50 at {} ÷ at {} other waiters, {t}",
                        large.other_waiters, small.other_waiters
                    ),
                    large.handoff.p50_us / small.handoff.p50_us,
                    1.2,
                ));
            }
        }
        if let (Some(bytes), Some(most)) = (
            self.bytes_per_waiter(),
            self.memory.iter().map(|m| m.waiters).max(),
        ) {
            targets.push(Target::at_most(
                format!("broker RSS per queued waiter at {most} waiters, bytes"),
                bytes,
                8192.0,
            ));
        }
        if let Some(point) = self
            .throughput
            .iter()
            .find(|p| p.capacity == 1 && p.clients == 64)
        {
            targets.push(Target {
                name: "grants/s, 64 contending clients, capacity 1".into(),
                value: point.grants_per_s,
                limit: 10_000.0,
                at_most: false,
                met: point.grants_per_s >= 10_000.0,
            });
        }
        self.targets = targets;
    }

    /// The tables, in Markdown, for standard output and BENCHMARKS.md.
    pub(crate) fn tables(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "machine: {} cores, {}, {} GiB, Linux {}; run took {:.0} s; load average {} at the start, {} at the end\n",
            m.cores, m.cpu, m.memory_gib, m.kernel, self.wall_s, self.loadavg[0], self.loadavg[1]
        );
        out.push_str(&self.latency_table());
        out.push('\n');
        out.push_str(&self.handoff_table());
        out.push('\n');
        out.push_str(&self.throughput_table());
        out.push('\n');
        out.push_str(&self.memory_table());
        out.push('\n');
        out.push_str(&self.target_table());
        out
    }

    fn latency_table(&self) -> String {
        let mut rows: Vec<[String; 8]> = Vec::new();
        let row = |figure: &str, transport: &str, s: &Summary, baseline: Option<(&str, f64)>| {
            let (name, base, ratio) = match baseline {
                Some((name, base)) => (name.to_owned(), us(base), ratio(s.p50_us / base)),
                None => ("—".to_owned(), String::new(), String::new()),
            };
            [
                figure.to_owned(),
                transport.to_owned(),
                us(s.p50_us),
                us(s.p90_us),
                us(s.p99_us),
                name,
                base,
                ratio,
            ]
        };
        for w in &self.wire {
            let t = w.transport.name();
            rows.push(row(
                "wire: bidi round trip (echo server)",
                t,
                &w.bidi_rtt,
                None,
            ));
            rows.push(row(
                "wire: unary round trip (echo server)",
                t,
                &w.unary_rtt,
                None,
            ));
            rows.push(row(
                "wire: open AcquireLease → first answer (echo server)",
                t,
                &w.echo_acquire,
                None,
            ));
            rows.push(row(
                "wire: acquire → release → stream end (echo server)",
                t,
                &w.echo_cycle,
                None,
            ));
        }
        let one = self
            .plan
            .queue_sizes
            .iter()
            .copied()
            .min()
            .and_then(|n| self.handoff_at(Transport::Tcp, n));
        if let Some(flock) = &self.flock_handoff {
            rows.push(row(
                "kernel: flock(2) handoff between processes",
                "host",
                flock,
                None,
            ));
        }
        match &self.etcd {
            EtcdOutcome::Measured {
                handoff,
                lock,
                cycle,
                ..
            } => {
                let gpulease = one.map(|h| ("gpulease handoff (tcp)", h.handoff.p50_us));
                rows.push(row(
                    "etcd: lock handoff between processes",
                    "tcp",
                    handoff,
                    gpulease,
                ));
                let acquire = self
                    .uncontended
                    .iter()
                    .find(|u| u.transport == Transport::Tcp);
                rows.push(row(
                    "etcd: uncontended lock",
                    "tcp",
                    lock,
                    acquire.map(|u| ("gpulease acquire (tcp)", u.acquire.p50_us)),
                ));
                rows.push(row(
                    "etcd: uncontended lock → unlock",
                    "tcp",
                    cycle,
                    acquire.map(|u| ("gpulease cycle (tcp)", u.cycle.p50_us)),
                ));
            }
            EtcdOutcome::NotInstalled => rows.push(note_row("etcd: etcd not installed")),
            EtcdOutcome::Skipped => rows.push(note_row("etcd: skipped (--no-etcd)")),
            EtcdOutcome::Failed { error } => rows.push(note_row(&format!("etcd: failed: {error}"))),
        }
        for u in &self.uncontended {
            let t = u.transport.name();
            let wire = self.wire_on(u.transport);
            rows.push(row(
                "gpulease: uncontended acquire → Granted",
                t,
                &u.acquire,
                wire.map(|w| ("unary round trip", w.unary_rtt.p50_us)),
            ));
            rows.push(row(
                "gpulease: uncontended acquire → release → stream end",
                t,
                &u.cycle,
                wire.map(|w| ("echo cycle", w.echo_cycle.p50_us)),
            ));
        }
        if let (Some(one), Some(flock)) = (one, &self.flock_handoff) {
            rows.push(row(
                &format!("gpulease: handoff, {} other waiters", one.other_waiters),
                "tcp",
                &one.handoff,
                Some(("flock handoff", flock.p50_us)),
            ));
        }
        markdown(
            &[
                "figure",
                "transport",
                "p50 µs",
                "p90 µs",
                "p99 µs",
                "baseline",
                "baseline p50 µs",
                "p50 ratio",
            ],
            &rows,
        )
    }

    fn handoff_table(&self) -> String {
        let fewest = self.plan.queue_sizes.iter().copied().min().unwrap_or(1);
        let rows: Vec<[String; 15]> = self
            .handoff
            .iter()
            .map(|h| {
                let t = h.transport;
                let semaphore = self
                    .semaphore
                    .iter()
                    .find(|s| s.transport == t && s.other_waiters == h.other_waiters);
                let first = self.handoff_at(t, fewest);
                let unary = self.wire_on(t).map(|w| w.unary_rtt.p50_us);
                let p50 = h.handoff.p50_us;
                let div = |base: Option<f64>| base.map_or_else(String::new, |b| ratio(p50 / b));
                [
                    h.other_waiters.to_string(),
                    t.name().to_owned(),
                    us(p50),
                    us(h.handoff.p90_us),
                    us(h.handoff.p99_us),
                    div(self.bidi(t)),
                    semaphore.map_or_else(String::new, |s| us(s.handoff.p50_us)),
                    semaphore.map_or_else(String::new, |s| us(s.handoff.p99_us)),
                    div(semaphore.map(|s| s.handoff.p50_us)),
                    div(first.map(|f| f.handoff.p50_us)),
                    us(h.server_cpu_us_per_grant),
                    semaphore.map_or_else(String::new, |s| us(s.server_cpu_us_per_grant)),
                    format!("{:.1}", h.updates_per_grant),
                    h.status.as_ref().map_or_else(String::new, |s| us(s.p50_us)),
                    match (&h.status, unary) {
                        (Some(s), Some(u)) => ratio(s.p50_us / u),
                        _ => String::new(),
                    },
                ]
            })
            .collect();
        markdown(
            &[
                "other waiters",
                "transport",
                "handoff p50 µs",
                "p90 µs",
                "p99 µs",
                "÷ bidi round trip p50",
                "bare semaphore p50 µs",
                "semaphore p99 µs",
                "÷ semaphore p50",
                &format!("÷ handoff p50 at {fewest}"),
                "broker CPU µs/grant",
                "semaphore CPU µs/grant",
                "position updates/grant",
                "Status p50 µs",
                "Status ÷ unary p50",
            ],
            &rows,
        )
    }

    fn throughput_table(&self) -> String {
        let rows: Vec<[String; 8]> = self
            .throughput
            .iter()
            .map(|p| {
                [
                    p.capacity.to_string(),
                    p.clients.to_string(),
                    p.processes.to_string(),
                    format!("{:.0}", p.grants_per_s),
                    format!("{:.0}", p.semaphore_grants_per_s),
                    ratio(p.grants_per_s / p.semaphore_grants_per_s),
                    us(p.server_cpu_us_per_grant),
                    us(p.semaphore_cpu_us_per_grant),
                ]
            })
            .collect();
        markdown(
            &[
                "capacity",
                "clients",
                "processes",
                "grants/s (tcp)",
                "bare semaphore grants/s",
                "÷ semaphore",
                "broker CPU µs/grant",
                "semaphore CPU µs/grant",
            ],
            &rows,
        )
    }

    fn memory_table(&self) -> String {
        let empty = self.memory.iter().find(|m| m.waiters == 0);
        let per = |m: &MemoryPoint, rss: fn(&MemoryPoint) -> u64| match empty {
            Some(e) if m.waiters > 0 => Some((rss(m) as f64 - rss(e) as f64) / m.waiters as f64),
            _ => None,
        };
        let rows: Vec<[String; 6]> = self
            .memory
            .iter()
            .map(|m| {
                let broker = per(m, |m| m.rss_bytes);
                let semaphore = per(m, |m| m.semaphore_rss_bytes);
                let show =
                    |bytes: Option<f64>| bytes.map_or_else(String::new, |b| format!("{b:.0}"));
                [
                    m.waiters.to_string(),
                    format!("{:.1}", m.rss_bytes as f64 / 1024.0 / 1024.0),
                    show(broker),
                    format!("{:.1}", m.semaphore_rss_bytes as f64 / 1024.0 / 1024.0),
                    show(semaphore),
                    match (broker, semaphore) {
                        (Some(b), Some(s)) => ratio(b / s),
                        _ => String::new(),
                    },
                ]
            })
            .collect();
        markdown(
            &[
                "queued waiters",
                "broker RSS MiB",
                "bytes per waiter (growth from 0)",
                "bare semaphore RSS MiB",
                "semaphore bytes per waiter",
                "÷ semaphore",
            ],
            &rows,
        )
    }

    fn target_table(&self) -> String {
        let rows: Vec<[String; 4]> = self
            .targets
            .iter()
            .map(|t| {
                [
                    t.name.clone(),
                    number(t.value),
                    format!("{} {}", if t.at_most { "≤" } else { "≥" }, number(t.limit)),
                    if t.met { "met" } else { "MISSED" }.to_owned(),
                ]
            })
            .collect();
        markdown(&["target", "measured", "limit", "verdict"], &rows)
    }

    /// Plots handoff p50 and p99 against the number of other waiters, with
    /// the bidi round trip for reference.
    pub(crate) fn plot(&self, path: &Path) -> Result<()> {
        let draw = |e| anyhow!("cannot draw {}: {e}", path.display());
        let max_x = self
            .plan
            .queue_sizes
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .max(10) as f64;
        let max_y = self
            .handoff
            .iter()
            .chain(&self.semaphore)
            .map(|h| h.handoff.p99_us)
            .chain(self.wire.iter().map(|w| w.bidi_rtt.p99_us))
            .fold(1.0, f64::max)
            * 2.0;
        let min_y = self
            .handoff
            .iter()
            .chain(&self.semaphore)
            .map(|h| h.handoff.p50_us)
            .chain(self.wire.iter().map(|w| w.bidi_rtt.p50_us))
            .fold(max_y, f64::min)
            / 2.0;
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "gpulease: handoff latency vs queue length",
                ("sans-serif", 22),
            )
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (1.0..max_x * 1.5).log_scale(),
                (min_y.max(0.1)..max_y).log_scale(),
            )
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc("other waiters queued (log scale)")
            .y_desc("Release sent → Granted read, µs (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .draw()
            .map_err(draw)?;
        let series = [
            (Transport::Tcp, "p50", BLUE.stroke_width(2), true),
            (Transport::Tcp, "p99", BLUE.stroke_width(1), false),
            (Transport::Uds, "p50", RED.stroke_width(2), true),
            (Transport::Uds, "p99", RED.stroke_width(1), false),
        ];
        for (transport, label, style, median) in series {
            let points: Vec<(f64, f64)> = self
                .handoff
                .iter()
                .filter(|h| h.transport == transport)
                .map(|h| {
                    let y = if median {
                        h.handoff.p50_us
                    } else {
                        h.handoff.p99_us
                    };
                    (h.other_waiters.max(1) as f64, y)
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let name = format!("handoff {label}, {}", transport.name());
            let legend = move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style);
            if median {
                chart
                    .draw_series(LineSeries::new(points.clone(), style))
                    .map_err(draw)?
                    .label(name)
                    .legend(legend);
            } else {
                chart
                    .draw_series(DashedLineSeries::new(points.clone(), 8, 4, style))
                    .map_err(draw)?
                    .label(name)
                    .legend(legend);
            }
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, style.filled())),
                )
                .map_err(draw)?;
        }
        for (transport, color) in [(Transport::Tcp, BLUE), (Transport::Uds, RED)] {
            let points: Vec<(f64, f64)> = self
                .semaphore
                .iter()
                .filter(|h| h.transport == transport)
                .map(|h| (h.other_waiters.max(1) as f64, h.handoff.p50_us))
                .collect();
            if !points.is_empty() {
                let style = color.mix(0.5).stroke_width(1);
                chart
                    .draw_series(DashedLineSeries::new(points.clone(), 3, 3, style))
                    .map_err(draw)?
                    .label(format!(
                        "bare semaphore handoff p50, {} (baseline)",
                        transport.name()
                    ))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                chart
                    .draw_series(points.into_iter().map(|p| Cross::new(p, 4, style)))
                    .map_err(draw)?;
            }
            if let Some(bidi) = self.bidi(transport) {
                let style = color.mix(0.4).stroke_width(1);
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(1.0, bidi), (max_x * 1.5, bidi)],
                        6,
                        4,
                        style,
                    ))
                    .map_err(draw)?
                    .label(format!(
                        "bidi round trip p50, {} (baseline)",
                        transport.name()
                    ))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
        Ok(())
    }
}

impl Target {
    fn at_most(name: String, value: f64, limit: f64) -> Self {
        Self {
            name,
            value,
            limit,
            at_most: true,
            met: value <= limit,
        }
    }
}

fn note_row(note: &str) -> [String; 8] {
    let mut row: [String; 8] = Default::default();
    row[0] = note.to_owned();
    row
}

fn us(value: f64) -> String {
    format!("{value:.1}")
}

fn ratio(value: f64) -> String {
    format!("{value:.2}×")
}

fn number(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// A Markdown table with padded columns, readable as plain text too.
pub(crate) fn markdown<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(str::to_owned);
    let mut widths = header.each_ref().map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(String::as_str).collect());
    let rule: Vec<String> = widths.iter().map(|width| "-".repeat(width + 2)).collect();
    let _ = writeln!(out, "|{}|", rule.join("|"));
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
