//! The simulated card: it owns the truth of what each process holds,
//! answers every allocation (`oom` when it would not fit), writes the fake
//! NVML state file the broker reads, and judges each grant and unload from
//! that truth. Every step goes to the decision log in simulated time.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use super::trace::{CARD_MIB, SAFETY_MARGIN_MIB, Service};

/// What happened to one job.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct JobRecord {
    /// Whether it arrived before the end of the replay.
    pub(crate) arrived: bool,
    /// Its service's index.
    pub(crate) service: usize,
    /// When the orchestrator handed it to its service, simulated seconds.
    pub(crate) arrived_s: f64,
    /// When its service asked for the card.
    pub(crate) acquire_s: Option<f64>,
    /// When its lease was granted (the last grant, if it was preempted).
    pub(crate) granted_s: Option<f64>,
    /// Time spent in the broker's queue, over all its grants.
    pub(crate) broker_wait_s: f64,
    /// When it first started computing.
    pub(crate) started_s: Option<f64>,
    /// When it finished.
    pub(crate) done_s: Option<f64>,
    /// Whether it failed on an OOM.
    pub(crate) failed: bool,
    /// Simulated seconds of work done, over all its runs.
    pub(crate) work_done_s: f64,
    /// The start of the run in progress, if one is.
    pub(crate) running_since: Option<f64>,
    /// Its computing intervals.
    pub(crate) runs: Vec<(f64, f64)>,
    /// Times it was preempted.
    pub(crate) preemptions: u32,
}

/// An unload whose need is judged at the grant it was done for.
#[derive(Debug)]
struct PendingUnload {
    /// The service that unloaded.
    unloader: usize,
    /// The memory it freed, MiB.
    freed_mib: u64,
    /// The consumer it was asked for; `None`: an unload after a job, which
    /// is judged at the next grant to anyone.
    for_consumer: Option<String>,
    at_s: f64,
}

/// The counts a policy is judged by.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Counts {
    /// Allocations that did not fit on the card (each fails its job).
    pub(crate) oom: u64,
    /// Grants after which holders' remaining needs plus all memory held
    /// exceeded the card.
    pub(crate) overcommits: u64,
    /// Grants after which they exceeded the card less the safety margin
    /// (over-commits included).
    pub(crate) margin_breaches: u64,
    /// Models loaded.
    pub(crate) loads: u64,
    /// Models unloaded.
    pub(crate) unloads: u64,
    /// Unloads asked for by the broker.
    pub(crate) unloads_asked: u64,
    /// Unloads whose memory the grant they were done for did not need.
    pub(crate) needless_unloads: u64,
    /// Unloads whose grant never came before the end.
    pub(crate) unjudged_unloads: u64,
    /// Grants (or, without a broker, job starts).
    pub(crate) grants: u64,
    /// Preemption requests obeyed.
    pub(crate) preemptions: u64,
}

/// The simulator of one policy's replay.
pub(crate) struct Simulator {
    services: Vec<Service>,
    pids: Vec<u32>,
    state_path: PathBuf,
    start_ns: u64,
    compression: f64,
    /// Per service: model memory held, job memory held.
    model_mib: Vec<u64>,
    job_mib: Vec<u64>,
    /// Per service: the job whose lease (or turn) it holds.
    holding: Vec<Option<usize>>,
    pending: Vec<PendingUnload>,
    /// Per job id.
    pub(crate) jobs: Vec<JobRecord>,
    pub(crate) counts: Counts,
    log: std::io::BufWriter<std::fs::File>,
}

impl Simulator {
    /// A simulator for `services`, run by processes `pids`, that writes its
    /// state to `state_path` and its decision log to `log`.
    pub(crate) fn new(
        services: Vec<Service>,
        state_path: PathBuf,
        log: &std::path::Path,
        compression: f64,
        jobs: usize,
    ) -> Result<Self> {
        let n = services.len();
        let log = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let sim = Self {
            services,
            pids: vec![0; n],
            state_path,
            start_ns: 0,
            compression,
            model_mib: vec![0; n],
            job_mib: vec![0; n],
            holding: vec![None; n],
            pending: Vec::new(),
            jobs: vec![JobRecord::default(); jobs],
            counts: Counts::default(),
            log: std::io::BufWriter::new(log),
        };
        sim.write_state()?;
        Ok(sim)
    }

    /// The processes and the start of simulated time.
    pub(crate) fn start(&mut self, pids: Vec<u32>, start_ns: u64) {
        self.pids = pids;
        self.start_ns = start_ns;
    }

    /// Simulated seconds at `t_ns` on the shared clock.
    pub(crate) fn sim_s(&self, t_ns: u64) -> f64 {
        t_ns.saturating_sub(self.start_ns) as f64 / 1e9 * self.compression
    }

    /// Job `id` of `service` is handed to its service at `t_ns`.
    pub(crate) fn arrive(&mut self, id: usize, service: usize, t_ns: u64) {
        let at = self.sim_s(t_ns);
        self.jobs[id].arrived = true;
        self.jobs[id].service = service;
        self.jobs[id].arrived_s = at;
        self.note(at, service, &format!("#{id} arrives"));
    }

    /// Handles one line from `service`'s process; returns the answer
    /// (`false`: `oom`).
    pub(crate) fn handle(&mut self, service: usize, line: &str) -> Result<bool> {
        let mut words = line.split_whitespace();
        let t_ns: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("bad line {line:?}"))?;
        let at = self.sim_s(t_ns);
        let verb = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        let id = || -> Result<usize> {
            args.first()
                .and_then(|w| w.parse().ok())
                .filter(|&id: &usize| id < self.jobs.len())
                .with_context(|| format!("bad job in {line:?}"))
        };
        let mib = |i: usize| -> Result<u64> {
            args.get(i)
                .and_then(|w| w.parse().ok())
                .with_context(|| format!("bad size in {line:?}"))
        };
        match verb {
            "acquire" => {
                let id = id()?;
                self.jobs[id].acquire_s = Some(at);
                self.note(at, service, &format!("#{id} asks for the card"));
            }
            "granted" => {
                let id = id()?;
                let token: u64 = args.get(1).and_then(|w| w.parse().ok()).unwrap_or(0);
                self.grant(at, service, id, token);
            }
            "load" => {
                let (id, mib) = (id()?, mib(1)?);
                if !self.allocate(at, service, id, mib, "its model") {
                    return Ok(false);
                }
                self.model_mib[service] += mib;
                self.counts.loads += 1;
                self.write_state()?;
            }
            "loaded" => {
                let id = id()?;
                self.note(at, service, &format!("#{id} model loaded"));
            }
            "alloc" => {
                let (id, mib) = (id()?, mib(1)?);
                if !self.allocate(at, service, id, mib, "its job") {
                    return Ok(false);
                }
                self.job_mib[service] += mib;
                self.write_state()?;
            }
            "start" => {
                let id = id()?;
                let job = &mut self.jobs[id];
                job.started_s.get_or_insert(at);
                job.running_since = Some(at);
                self.note(at, service, &format!("#{id} starts"));
            }
            "done" | "preempted" => {
                let id = id()?;
                let freed = mib(if verb == "done" { 1 } else { 2 })?;
                self.job_mib[service] = self.job_mib[service].saturating_sub(freed);
                let job = &mut self.jobs[id];
                if let Some(since) = job.running_since.take() {
                    job.work_done_s += at - since;
                    job.runs.push((since, at));
                }
                if verb == "done" {
                    job.done_s = Some(at);
                } else {
                    job.preemptions += 1;
                    self.counts.preemptions += 1;
                }
                self.write_state()?;
                self.note(at, service, &format!("#{id} {verb}, frees {freed} MiB"));
            }
            "failed" => {
                let id = id()?;
                self.jobs[id].failed = true;
                self.note(at, service, &format!("#{id} FAILED"));
            }
            "release" => {
                let id = id()?;
                self.holding[service] = None;
                self.note(at, service, &format!("#{id} releases"));
            }
            "asked" => {
                self.counts.unloads_asked += 1;
                let who = args.first().copied().unwrap_or("-");
                self.note(at, service, &format!("asked to unload for {who}"));
            }
            "unload" => {
                let who = args.first().copied().unwrap_or("-");
                let freed = mib(1)?;
                self.model_mib[service] = self.model_mib[service].saturating_sub(freed);
                self.counts.unloads += 1;
                self.pending.push(PendingUnload {
                    unloader: service,
                    freed_mib: freed,
                    for_consumer: (who != "-").then(|| who.to_owned()),
                    at_s: at,
                });
                self.write_state()?;
                let state = self.describe();
                self.note(
                    at,
                    service,
                    &format!("unloads {freed} MiB (for {who}); now {state}"),
                );
            }
            _ => anyhow::bail!("unknown line {line:?}"),
        }
        Ok(true)
    }

    /// Memory held on the card in all.
    fn used_mib(&self) -> u64 {
        self.model_mib.iter().sum::<u64>() + self.job_mib.iter().sum::<u64>()
    }

    /// What a holder still has to allocate of what its job needs.
    fn outstanding_mib(&self, service: usize) -> u64 {
        self.services[service]
            .need_mib()
            .saturating_sub(self.model_mib[service] + self.job_mib[service])
    }

    /// Everything held, plus what every holder still has to allocate.
    fn committed_mib(&self) -> u64 {
        self.used_mib()
            + (0..self.services.len())
                .filter(|&s| self.holding[s].is_some())
                .map(|s| self.outstanding_mib(s))
                .sum::<u64>()
    }

    /// The card's state, for the log.
    fn describe(&self) -> String {
        let mut text = format!("used {} MiB", self.used_mib());
        let mut sep = " (";
        for (s, service) in self.services.iter().enumerate() {
            let held = self.model_mib[s] + self.job_mib[s];
            if held > 0 || self.holding[s].is_some() {
                let _ = write!(text, "{sep}{} {held}", service.name);
                if self.holding[s].is_some() {
                    let _ = write!(text, "+{} to come", self.outstanding_mib(s));
                }
                sep = ", ";
            }
        }
        if sep == ", " {
            text.push(')');
        }
        text
    }

    fn allocate(&mut self, at: f64, service: usize, id: usize, mib: u64, what: &str) -> bool {
        if self.used_mib() + mib > CARD_MIB {
            self.counts.oom += 1;
            let state = self.describe();
            self.note(
                at,
                service,
                &format!("#{id} OOM: {mib} MiB for {what} with {state} of {CARD_MIB}"),
            );
            return false;
        }
        true
    }

    fn grant(&mut self, at: f64, service: usize, id: usize, token: u64) {
        self.holding[service] = Some(id);
        self.counts.grants += 1;
        let job = &mut self.jobs[id];
        job.granted_s = Some(at);
        if let Some(asked) = job.acquire_s {
            job.broker_wait_s += at - asked;
        }
        let committed = self.committed_mib();
        let limit = CARD_MIB - SAFETY_MARGIN_MIB;
        let verdict = if committed > CARD_MIB {
            self.counts.overcommits += 1;
            self.counts.margin_breaches += 1;
            " OVER-COMMIT"
        } else if committed > limit {
            self.counts.margin_breaches += 1;
            " MARGIN BREACH"
        } else {
            ""
        };
        let state = self.describe();
        self.note(
            at,
            service,
            &format!(
                "#{id} granted{}: committed {committed} MiB of {CARD_MIB}, {state}{verdict}",
                if token == 0 {
                    String::new()
                } else {
                    format!(" (token {token})")
                }
            ),
        );
        // Judge the unloads this grant was the one for.
        let name = self.services[service].name.clone();
        let mut judged = Vec::new();
        self.pending.retain(|unload| {
            let this_one = match &unload.for_consumer {
                Some(consumer) => *consumer == name,
                None => true,
            };
            if this_one {
                let needless = unload.unloader == service || committed + unload.freed_mib <= limit;
                judged.push((unload.unloader, unload.freed_mib, unload.at_s, needless));
            }
            !this_one
        });
        for (unloader, freed, unloaded_at, needless) in judged {
            if needless {
                self.counts.needless_unloads += 1;
            }
            let who = self.services[unloader].name.clone();
            let verdict = if needless {
                format!("NEEDLESS: {committed} + {freed} MiB would have fitted within {limit}")
            } else {
                "needed".to_owned()
            };
            self.note(
                at,
                service,
                &format!("#{id} judges {who}'s unload at {unloaded_at:.1}s: {verdict}"),
            );
        }
    }

    /// Writes the fake NVML state: the card and each process's memory.
    fn write_state(&self) -> Result<()> {
        let mut text = format!(
            "gpu 0 GPU-sim-0 {CARD_MIB} {} Simulated GPU (24 GiB)\n",
            self.used_mib()
        );
        for (s, pid) in self.pids.iter().enumerate() {
            let held = self.model_mib[s] + self.job_mib[s];
            if held > 0 && *pid != 0 {
                let _ = writeln!(text, "proc 0 {pid} {held}");
            }
        }
        let temporary = self.state_path.with_extension("new");
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, &self.state_path)?;
        Ok(())
    }

    fn note(&mut self, at: f64, service: usize, what: &str) {
        let _ = writeln!(
            self.log,
            "[{at:8.1}s] {:5} {what}",
            self.services[service].name
        );
    }

    /// Ends the replay at `end_s`: closes the runs still going and counts
    /// the unloads no grant judged.
    pub(crate) fn finish(&mut self, end_s: f64) -> Result<()> {
        for job in &mut self.jobs {
            if let Some(since) = job.running_since.take() {
                job.work_done_s += end_s - since;
                job.runs.push((since, end_s));
            }
        }
        self.counts.unjudged_unloads = self.pending.len() as u64;
        let counts = self.counts.clone();
        let _ = writeln!(self.log, "[{end_s:8.1}s] end: {counts:?}");
        self.log.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Simulator;
    use crate::sharing::trace::services;

    /// A simulator of the four services, fed `lines` as `SERVICE LINE`
    /// (times in simulated seconds at 1×); returns it and the answers.
    fn replay(lines: &[&str]) -> (Simulator, Vec<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let mut sim = Simulator::new(
            services(),
            dir.path().join("state"),
            &dir.path().join("log"),
            1.0,
            16,
        )
        .unwrap();
        sim.start(vec![101, 102, 103, 104], 0);
        let answers = lines
            .iter()
            .map(|line| {
                let (service, rest) = line.split_once(' ').unwrap();
                let index = ["tts", "llm", "image", "train"]
                    .iter()
                    .position(|s| *s == service)
                    .unwrap();
                let (at, rest) = rest.split_once(' ').unwrap();
                let ns = (at.parse::<f64>().unwrap() * 1e9) as u64;
                sim.handle(index, &format!("{ns} {rest}")).unwrap()
            })
            .collect();
        (sim, answers)
    }

    #[test]
    fn an_allocation_beyond_the_card_is_an_oom_and_changes_nothing() {
        let (sim, answers) = replay(&[
            "train 1 granted 0",
            "train 1 alloc 0 16384",
            "llm 2 granted 1",
            "llm 2 load 1 10240",
            "tts 3 granted 2",
            "tts 3 load 2 3072",
        ]);
        assert_eq!(answers, [true, true, true, false, true, true]);
        assert_eq!(sim.counts.oom, 1);
        assert_eq!(sim.used_mib(), 16384 + 3072);
        // The LLM's grant promised 12 GiB beside 16: over the card; and so
        // was the TTS's, with the LLM still holding its promise.
        assert_eq!(sim.counts.overcommits, 2);
        assert_eq!(sim.counts.margin_breaches, 2);
    }

    #[test]
    fn an_unload_is_needless_when_its_grant_would_have_fitted_without_it() {
        let (sim, _) = replay(&[
            "image 1 granted 0",
            "image 1 load 0 8192",
            "image 2 release 0",
            // Asked for the LLM's 12 GiB: 8 + 12 fit in 24 less the margin.
            "image 3 unload llm 8192",
            "llm 4 granted 1",
            "llm 5 load 1 10240",
            "llm 6 release 1",
            // Asked for training's 16 GiB beside the LLM's 10: needed.
            "llm 7 unload train 10240",
            "train 8 granted 2",
        ]);
        assert_eq!(sim.counts.unloads, 2);
        assert_eq!(sim.counts.needless_unloads, 1);
        assert_eq!(sim.counts.overcommits, 0);
    }

    #[test]
    fn an_unload_after_a_job_is_needless_when_its_own_service_is_next() {
        let (sim, _) = replay(&[
            "llm 1 granted 0",
            "llm 2 load 0 10240",
            "llm 3 unload - 10240",
            "llm 4 release 0",
            "llm 5 granted 1",
        ]);
        assert_eq!(sim.counts.needless_unloads, 1);
    }
}
