//! The sharing benchmark's figures per policy, the targets, the
//! Markdown tables and the plot of each service's wait distribution.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use serde::Serialize;

use super::sim::{Counts, Simulator};
use super::{Policy, Setup};
use crate::report::{Machine, markdown};

/// Waits of one service, in simulated seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Waits {
    /// How many.
    pub(crate) n: usize,
    /// Nearest-rank median.
    pub(crate) p50_s: f64,
    /// Nearest-rank 95th percentile.
    pub(crate) p95_s: f64,
    /// The longest.
    pub(crate) max_s: f64,
}

impl Waits {
    fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = (p / 100.0 * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Self {
            n: sorted.len(),
            p50_s: rank(50.0),
            p95_s: rank(95.0),
            max_s: sorted[sorted.len() - 1],
        }
    }
}

/// One service under one policy.
#[derive(Debug, Serialize)]
pub(crate) struct ServiceResult {
    /// Its name.
    pub(crate) name: String,
    /// Jobs handed to it.
    pub(crate) arrived: usize,
    /// Jobs that finished.
    pub(crate) done: usize,
    /// Jobs that failed on an OOM.
    pub(crate) failed: usize,
    /// Jobs that had not started when the replay ended.
    pub(crate) unstarted: usize,
    /// Finished jobs per simulated hour.
    pub(crate) jobs_per_hour: f64,
    /// Simulated GPU-seconds of work done by jobs that did not fail.
    pub(crate) useful_s: f64,
    /// Arrival → the job starts computing (includes its model load and its
    /// service's own queue); a job not started by the end counts with its
    /// wait so far.
    pub(crate) end_to_end: Waits,
    /// `acquire` sent → `Granted` read, over all of a job's grants; zero
    /// without a broker.
    pub(crate) broker: Waits,
    /// The end-to-end waits, sorted, for the plot.
    pub(crate) end_to_end_samples: Vec<f64>,
}

/// One policy's replay.
#[derive(Debug, Serialize)]
pub(crate) struct PolicyResult {
    /// The policy.
    pub(crate) policy: Policy,
    /// Its name.
    pub(crate) name: String,
    /// The simulator's counts.
    pub(crate) counts: Counts,
    /// Per service.
    pub(crate) services: Vec<ServiceResult>,
    /// Useful simulated GPU-seconds per simulated hour, all services.
    pub(crate) useful_gpu_s_per_hour: f64,
    /// Fraction of the replay during which at least one job computed.
    pub(crate) busy_fraction: f64,
}

impl PolicyResult {
    /// The figures of `sim` after its replay.
    pub(crate) fn new(policy: Policy, sim: &Simulator, setup: &Setup) -> Self {
        let end = setup.duration_s;
        let per_hour = 3600.0 / end;
        let services: Vec<ServiceResult> = setup
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| {
                let jobs: Vec<_> = sim
                    .jobs
                    .iter()
                    .filter(|j| j.arrived && j.service == index)
                    .collect();
                let arrived = jobs.len();
                let done = jobs.iter().filter(|j| j.done_s.is_some()).count();
                let failed = jobs.iter().filter(|j| j.failed).count();
                let unstarted = jobs
                    .iter()
                    .filter(|j| !j.failed && j.started_s.is_none())
                    .count();
                let useful_s = jobs
                    .iter()
                    .filter(|j| !j.failed)
                    .map(|j| j.work_done_s)
                    .sum();
                let mut end_to_end: Vec<f64> = jobs
                    .iter()
                    .filter(|j| !j.failed)
                    .map(|j| j.started_s.unwrap_or(end) - j.arrived_s)
                    .collect();
                end_to_end.sort_by(f64::total_cmp);
                let broker: Vec<f64> = jobs
                    .iter()
                    .filter(|j| j.acquire_s.is_some() && !j.failed)
                    .map(|j| {
                        let waiting = match (j.acquire_s, j.granted_s) {
                            (Some(asked), Some(granted)) if granted >= asked => 0.0,
                            (Some(asked), _) => end - asked,
                            _ => 0.0,
                        };
                        j.broker_wait_s + waiting
                    })
                    .collect();
                ServiceResult {
                    name: service.name.clone(),
                    arrived,
                    done,
                    failed,
                    unstarted,
                    jobs_per_hour: done as f64 * per_hour,
                    useful_s,
                    end_to_end: Waits::of(&end_to_end),
                    broker: Waits::of(&broker),
                    end_to_end_samples: end_to_end,
                }
            })
            .collect();
        let useful: f64 = services.iter().map(|s| s.useful_s).sum();
        let mut runs: Vec<(f64, f64)> = sim
            .jobs
            .iter()
            .flat_map(|j| j.runs.iter().copied())
            .collect();
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut busy, mut until) = (0.0, f64::MIN);
        for (from, to) in runs {
            let from = from.max(until);
            if to > from {
                busy += to - from;
            }
            until = until.max(to);
        }
        Self {
            policy,
            name: policy.name().to_owned(),
            counts: sim.counts.clone(),
            services,
            useful_gpu_s_per_hour: useful * per_hour,
            busy_fraction: busy / end,
        }
    }

    fn service(&self, name: &str) -> Option<&ServiceResult> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// One of the targets, judged.
#[derive(Debug, Serialize)]
pub(crate) struct Verdict {
    /// The target, as the issue words it.
    pub(crate) target: String,
    /// What was measured.
    pub(crate) measured: String,
    /// Whether it is met.
    pub(crate) met: bool,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub(crate) struct SharingReport {
    /// The machine.
    pub(crate) machine: Machine,
    /// The command line.
    pub(crate) command: String,
    /// The broker binary.
    pub(crate) broker_bin: String,
    /// Wall seconds the run took.
    pub(crate) wall_s: f64,
    /// `/proc/loadavg` at the start and the end.
    pub(crate) loadavg: [String; 2],
    /// The replay's sizes.
    pub(crate) setup: Setup,
    /// Per policy.
    pub(crate) policies: Vec<PolicyResult>,
    /// The targets, where the policies they compare were replayed.
    pub(crate) targets: Vec<Verdict>,
}

impl SharingReport {
    /// The report of a run, its targets judged.
    pub(crate) fn new(
        setup: Setup,
        policies: Vec<PolicyResult>,
        machine: Machine,
        command: String,
        broker_bin: String,
        wall_s: f64,
        loadavg: [String; 2],
    ) -> Self {
        let mut report = Self {
            machine,
            command,
            broker_bin,
            wall_s,
            loadavg,
            setup,
            policies,
            targets: Vec::new(),
        };
        report.targets = report.judge();
        report
    }

    fn policy(&self, policy: Policy) -> Option<&PolicyResult> {
        self.policies.iter().find(|p| p.policy == policy)
    }

    fn judge(&self) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        let Some(gpulease) = self.policy(Policy::Gpulease) else {
            return verdicts;
        };
        let c = &gpulease.counts;
        verdicts.push(Verdict {
            target: "0 OOM events, 0 over-commits, 0 safety-margin breaches".into(),
            measured: format!(
                "{} OOM, {} over-commits, {} margin breaches",
                c.oom, c.overcommits, c.margin_breaches
            ),
            met: c.oom == 0 && c.overcommits == 0 && c.margin_breaches == 0,
        });
        if let Some(unload) = self.policy(Policy::GlobalLockUnload) {
            let ratio = gpulease.useful_gpu_s_per_hour / unload.useful_gpu_s_per_hour.max(1e-9);
            verdicts.push(Verdict {
                target: "useful GPU work ≥ 1.4 × the global lock with an unload after every job"
                    .into(),
                measured: format!(
                    "{ratio:.2}× ({:.0} against {:.0} GPU-s/h; the trace offered {:.0}, at most {:.2}×)",
                    gpulease.useful_gpu_s_per_hour,
                    unload.useful_gpu_s_per_hour,
                    self.setup.offered_gpu_s_per_hour,
                    self.setup.offered_gpu_s_per_hour / unload.useful_gpu_s_per_hour.max(1e-9)
                ),
                met: ratio >= 1.4,
            });
        }
        if let (Some(lock), Some(tts)) = (self.policy(Policy::GlobalLock), gpulease.service("tts"))
            && let Some(lock_tts) = lock.service("tts")
        {
            let ratio = tts.end_to_end.p95_s / lock_tts.end_to_end.p95_s.max(1e-9);
            verdicts.push(Verdict {
                target: "TTS end-to-end p95 wait ≤ ½ the plain global lock's".into(),
                measured: format!(
                    "{ratio:.2}× ({:.1} s against {:.1} s)",
                    tts.end_to_end.p95_s, lock_tts.end_to_end.p95_s
                ),
                met: ratio <= 0.5,
            });
        }
        if let Some(tts) = gpulease.service("tts") {
            verdicts.push(Verdict {
                target: "TTS broker wait p95 ≤ 1 s (simulated)".into(),
                measured: format!("{:.2} s", tts.broker.p95_s),
                met: tts.broker.p95_s <= 1.0,
            });
        }
        let share = c.needless_unloads as f64 / (c.unloads.max(1)) as f64;
        verdicts.push(Verdict {
            target: "needless unloads ≤ 5 % of unloads".into(),
            measured: format!(
                "{:.1} % ({} of {})",
                share * 100.0,
                c.needless_unloads,
                c.unloads
            ),
            met: share <= 0.05,
        });
        verdicts
    }

    /// The tables, in Markdown.
    pub(crate) fn tables(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let s = &self.setup;
        let _ = writeln!(
            out,
            "machine: {} cores, {}, {} GiB, Linux {}; run took {:.0} s; load average {} at the start, {} at the end",
            m.cores, m.cpu, m.memory_gib, m.kernel, self.wall_s, self.loadavg[0], self.loadavg[1]
        );
        let _ = writeln!(
            out,
            "replay: seed {}, load {}, {:.0} simulated minutes at {}× ({} jobs, {:.0} GPU-s/h of work offered), {} MiB card, {} MiB safety margin, {} s per model load{}\n",
            s.seed,
            s.load,
            s.duration_s / 60.0,
            s.compression,
            self.policies.first().map_or(0, |p| p
                .services
                .iter()
                .map(|s| s.arrived)
                .sum::<usize>()),
            s.offered_gpu_s_per_hour,
            s.card_mib,
            s.safety_margin_mib,
            s.model_load_s,
            if s.scheduling {
                ""
            } else {
                "; gpulease without the [scheduling] keys"
            }
        );
        let rows: Vec<[String; 11]> = self
            .policies
            .iter()
            .map(|p| {
                let c = &p.counts;
                [
                    p.name.clone(),
                    format!(
                        "{:.0} ({:.0} %)",
                        p.useful_gpu_s_per_hour,
                        p.useful_gpu_s_per_hour / s.offered_gpu_s_per_hour.max(1e-9) * 100.0
                    ),
                    format!("{:.0} %", p.busy_fraction * 100.0),
                    c.oom.to_string(),
                    c.overcommits.to_string(),
                    c.margin_breaches.to_string(),
                    c.loads.to_string(),
                    format!("{} ({} asked)", c.unloads, c.unloads_asked),
                    format!("{} ({} unjudged)", c.needless_unloads, c.unjudged_unloads),
                    p.services
                        .iter()
                        .map(|s| s.failed)
                        .sum::<usize>()
                        .to_string(),
                    c.preemptions.to_string(),
                ]
            })
            .collect();
        out += &markdown(
            &[
                "policy",
                "useful GPU-s/h (of offered)",
                "GPU busy",
                "OOM",
                "over-commits",
                "margin breaches",
                "model loads",
                "unloads",
                "needless unloads",
                "failed jobs",
                "preemptions",
            ],
            &rows,
        );
        out.push('\n');
        let mut rows: Vec<[String; 10]> = Vec::new();
        for p in &self.policies {
            for service in &p.services {
                let e = &service.end_to_end;
                let b = &service.broker;
                let broker = |value: String| {
                    if p.policy == Policy::NoBroker {
                        "—".to_owned()
                    } else {
                        value
                    }
                };
                rows.push([
                    p.name.clone(),
                    service.name.clone(),
                    format!("{:.1}", service.jobs_per_hour),
                    format!(
                        "{} / {} / {} / {}",
                        service.arrived, service.done, service.failed, service.unstarted
                    ),
                    format!("{:.1}", e.p50_s),
                    format!("{:.1}", e.p95_s),
                    format!("{:.1}", e.max_s),
                    broker(format!("{:.2}", b.p50_s)),
                    broker(format!("{:.2}", b.p95_s)),
                    broker(format!("{:.1}", b.max_s)),
                ]);
            }
        }
        out += &markdown(
            &[
                "policy",
                "service",
                "jobs/h",
                "arrived / done / failed / unstarted",
                "wait p50 s",
                "wait p95 s",
                "wait max s",
                "broker p50 s",
                "broker p95 s",
                "broker max s",
            ],
            &rows,
        );
        if !self.targets.is_empty() {
            out.push('\n');
            let rows: Vec<[String; 3]> = self
                .targets
                .iter()
                .map(|v| {
                    [
                        v.target.clone(),
                        v.measured.clone(),
                        if v.met { "met" } else { "MISSED" }.to_owned(),
                    ]
                })
                .collect();
            out += &markdown(&["target (gpulease)", "measured", "verdict"], &rows);
        }
        out
    }

    /// Plots each service's end-to-end wait distribution (one panel per
    /// service, one line per policy: the fraction of jobs that waited at
    /// most x).
    pub(crate) fn plot(&self, path: &Path) -> Result<()> {
        let draw = |e| anyhow!("cannot draw {}: {e}", path.display());
        let root = SVGBackend::new(path, (1000, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let root = root
            .titled(
                "gpulease sharing benchmark: wait from arrival to the job's start (failed jobs left out)",
                ("sans-serif", 22),
            )
            .map_err(draw)?;
        let colors = [RED, BLACK, MAGENTA, BLUE];
        let max_x = self
            .policies
            .iter()
            .flat_map(|p| &p.services)
            .map(|s| s.end_to_end.max_s)
            .fold(10.0, f64::max)
            * 1.5;
        let names: Vec<String> = self.setup.services.iter().map(|s| s.name.clone()).collect();
        for (panel, name) in root.split_evenly((2, 2)).iter().zip(&names) {
            let mut chart = ChartBuilder::on(panel)
                .caption(name, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(44)
                .build_cartesian_2d((0.1..max_x).log_scale(), 0.0..1.0)
                .map_err(draw)?;
            chart
                .configure_mesh()
                .x_desc("wait, simulated s (log scale)")
                .y_desc("fraction of jobs")
                .x_label_formatter(&|x| format!("{x:.1}"))
                .light_line_style(WHITE)
                .draw()
                .map_err(draw)?;
            for (policy, color) in self.policies.iter().zip(colors.iter().cycle()) {
                let Some(service) = policy.service(name) else {
                    continue;
                };
                let samples = &service.end_to_end_samples;
                if samples.is_empty() {
                    continue;
                }
                let n = samples.len() as f64;
                let mut points = vec![(0.1, 0.0)];
                for (i, wait) in samples.iter().enumerate() {
                    let x = wait.max(0.1);
                    points.push((x, i as f64 / n));
                    points.push((x, (i + 1) as f64 / n));
                }
                let style = color.stroke_width(2);
                chart
                    .draw_series(LineSeries::new(points, style))
                    .map_err(draw)?
                    .label(policy.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(draw)?;
        }
        root.present().map_err(draw)?;
        Ok(())
    }
}
