//! `gpulease-bench sharing`: a seeded mixed day on one simulated 24 GiB
//! card, replayed under four policies (no broker, a global lock, a global
//! lock with an unload after every job, gpulease), each judged from the
//! simulator's truth.
//!
//! The orchestrator (this module) starts, per policy, the broker (the real
//! `gpulease serve`, on the fake NVML library) and one consumer process
//! per service (`consumer`, this binary's hidden worker mode), hands them
//! the trace's jobs at their (compressed) arrival times, and answers their
//! every allocation from the simulator (`sim`). BENCHMARKS.md ("The sharing
//! benchmark") defines every figure; `report` prints and plots them.

pub(crate) mod consumer;
mod report;
mod sim;
pub(crate) mod trace;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::jobs::Job;
use crate::procs::{Scratch, Server, Transport};
use consumer::ConsumerSpec;
use gpulease_testkit::clock::now_ns;
use sim::Simulator;
use trace::{Arrival, CARD_MIB, MODEL_LOAD_S, SAFETY_MARGIN_MIB, Service};

/// How long a consumer may take to connect and say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The fake NVML library's source, compiled with gcc at the start of a run.
const FAKE_NVML_SOURCE: &str = include_str!("../../../tests/fake_nvml/fake_nvml.c");

/// The broker's NVML poll interval, in wall time (the broker reads every
/// 100 ms at most while a request waits for memory; this is faster).
const POLL_INTERVAL_MS: u64 = 50;

/// Options of `gpulease-bench sharing`.
#[derive(Debug, clap::Args)]
pub(crate) struct SharingArgs {
    /// Where to write sharing.json, sharing.md, sharing-waits.svg and the
    /// decision logs.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Two simulated minutes at 20× (what tests/bench_smoke.rs runs): it
    /// checks that the benchmark works; its numbers mean nothing.
    #[arg(long)]
    quick: bool,
    /// The trace's seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated minutes to replay. Default: 30 (with --quick: 2).
    #[arg(long)]
    minutes: Option<f64>,
    /// Simulated seconds per wall second. Default: 10 (with --quick: 20).
    #[arg(long)]
    compression: Option<f64>,
    /// Scales the rate of the TTS bursts, LLM and image requests (the
    /// training runs stay as they are).
    #[arg(long, default_value_t = 1.0)]
    load: f64,
    /// The `gpulease` binary. Default: the one next to this binary.
    #[arg(long, value_name = "PATH")]
    broker_bin: Option<PathBuf>,
    /// A fake NVML library already built from tests/fake_nvml/fake_nvml.c.
    /// Default: built with gcc at the start of the run.
    #[arg(long, value_name = "PATH")]
    nvml_library: Option<PathBuf>,
    /// Replay only these policies (comma-separated). Default: all four.
    #[arg(long, value_enum, value_delimiter = ',')]
    policies: Vec<Policy>,
    /// Leave the `[scheduling]` section and the consumers' priorities and
    /// preemption out of the gpulease policy's configuration. Default: use
    /// them if the broker knows them.
    #[arg(long)]
    no_scheduling: bool,
}

/// How the services share the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Policy {
    /// Every service runs its jobs as they come and keeps its model.
    NoBroker,
    /// One lease at a time (gpulease with capacity 1 and no memory
    /// accounting); models stay loaded.
    GlobalLock,
    /// The same lock; every service unloads its model before it releases.
    GlobalLockUnload,
    /// gpulease with NVML, `capacity = 4`, `vram_mib` on every acquire,
    /// `Residency` streams, and the scheduling keys.
    Gpulease,
}

impl Policy {
    const ALL: [Self; 4] = [
        Self::NoBroker,
        Self::GlobalLock,
        Self::GlobalLockUnload,
        Self::Gpulease,
    ];

    /// Its name in tables and file names.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::NoBroker => "no broker",
            Self::GlobalLock => "global lock",
            Self::GlobalLockUnload => "global lock + unload",
            Self::Gpulease => "gpulease",
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Self::NoBroker => "no-broker",
            Self::GlobalLock => "global-lock",
            Self::GlobalLockUnload => "global-lock-unload",
            Self::Gpulease => "gpulease",
        }
    }
}

/// The replay's sizes.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Setup {
    /// The trace's seed.
    pub(crate) seed: u64,
    /// Simulated seconds replayed.
    pub(crate) duration_s: f64,
    /// Simulated seconds per wall second.
    pub(crate) compression: f64,
    /// The rate of the TTS, LLM and image arrivals, against the default mix.
    pub(crate) load: f64,
    /// Simulated GPU-seconds of work the trace brings within the replay,
    /// per simulated hour: what a policy could do at most.
    pub(crate) offered_gpu_s_per_hour: f64,
    /// The card, MiB.
    pub(crate) card_mib: u64,
    /// The safety margin, MiB.
    pub(crate) safety_margin_mib: u64,
    /// A model load, simulated seconds.
    pub(crate) model_load_s: f64,
    /// The services.
    pub(crate) services: Vec<Service>,
    /// The gpulease policy's configuration, as given to the broker.
    pub(crate) gpulease_config: String,
    /// Whether it has the scheduling keys (backfill, priorities, aging,
    /// preemption).
    pub(crate) scheduling: bool,
}

/// Runs the sharing benchmark.
pub(crate) async fn main(args: &SharingArgs, exe: PathBuf) -> Result<()> {
    let started = Instant::now();
    let load_at_start = crate::report::loadavg();
    let broker_bin = match &args.broker_bin {
        Some(path) => path.clone(),
        None => exe.with_file_name("gpulease"),
    };
    let policies: Vec<Policy> = if args.policies.is_empty() {
        Policy::ALL.to_vec()
    } else {
        args.policies.clone()
    };
    if policies.iter().any(|&p| p != Policy::NoBroker) && !broker_bin.is_file() {
        bail!(
            "no broker binary at {}: build both with `cargo build --release --workspace --bins`, or pass --broker-bin",
            broker_bin.display()
        );
    }
    let minutes = args.minutes.unwrap_or(if args.quick { 2.0 } else { 30.0 });
    let compression = args
        .compression
        .unwrap_or(if args.quick { 20.0 } else { 10.0 });
    if !(minutes > 0.0
        && minutes <= 24.0 * 60.0
        && (1.0..=1000.0).contains(&compression)
        && (0.1..=10.0).contains(&args.load))
    {
        bail!("--minutes must be in (0, 1440], --compression in [1, 1000] and --load in [0.1, 10]");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let scratch = Scratch::new()?;
    let library = match &args.nvml_library {
        Some(path) => path.clone(),
        None => build_fake_nvml(&scratch)?,
    };
    let scheduling = !args.no_scheduling && broker_knows_scheduling(&broker_bin);
    if !scheduling {
        eprintln!(
            "gpulease-bench sharing: the gpulease policy runs without the [scheduling] keys{}",
            if args.no_scheduling {
                " (--no-scheduling)"
            } else {
                " (this broker does not know them)"
            }
        );
    }
    let setup = Setup {
        seed: args.seed,
        duration_s: minutes * 60.0,
        compression,
        load: args.load,
        offered_gpu_s_per_hour: 0.0,
        card_mib: CARD_MIB,
        safety_margin_mib: SAFETY_MARGIN_MIB,
        model_load_s: MODEL_LOAD_S,
        services: trace::services(),
        gpulease_config: gpulease_config(&trace::services(), compression, &library, scheduling),
        scheduling,
    };
    let mut setup = setup;
    let trace = trace::generate(setup.seed, setup.duration_s, setup.load);
    setup.offered_gpu_s_per_hour = trace
        .iter()
        .map(|job| job.work_s.min(setup.duration_s - job.at_s))
        .sum::<f64>()
        * 3600.0
        / setup.duration_s;
    eprintln!(
        "gpulease-bench sharing: seed {}, {} jobs over {minutes} simulated minutes at {compression}×",
        setup.seed,
        trace.len()
    );
    let mut results = Vec::new();
    for policy in policies {
        eprintln!("gpulease-bench sharing: replaying under {}", policy.name());
        let replay = Replay {
            exe: &exe,
            broker_bin: &broker_bin,
            scratch: &scratch,
            out: &args.out,
            setup: &setup,
            trace: &trace,
        };
        results.push(replay.run(policy).await?);
    }
    let report = report::SharingReport::new(
        setup,
        results,
        crate::report::Machine::read(),
        std::env::args().collect::<Vec<_>>().join(" "),
        broker_bin.display().to_string(),
        started.elapsed().as_secs_f64(),
        [load_at_start, crate::report::loadavg()],
    );
    let tables = report.tables();
    print!("{tables}");
    write(&args.out.join("sharing.md"), tables.as_bytes())?;
    write(
        &args.out.join("sharing.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    report.plot(&args.out.join("sharing-waits.svg"))?;
    eprintln!(
        "gpulease-bench sharing: wrote sharing.json, sharing.md, sharing-waits.svg and the decision logs to {}",
        args.out.display()
    );
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Compiles the fake NVML library into the scratch directory.
fn build_fake_nvml(scratch: &Scratch) -> Result<PathBuf> {
    let source = scratch.path("fake_nvml.c");
    let library = scratch.path("libfake_nvml.so");
    std::fs::write(&source, FAKE_NVML_SOURCE)?;
    let status = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .context(
            "cannot run gcc to build the fake NVML library (install gcc, or pass --nvml-library)",
        )?;
    if !status.success() {
        bail!("gcc failed to build the fake NVML library: {status}");
    }
    Ok(library)
}

/// A duration in simulated seconds as the broker (in wall time) reads it.
fn wall(simulated_s: f64, compression: f64) -> String {
    format!(
        "{}ms",
        (simulated_s / compression * 1000.0).round().max(1.0)
    )
}

/// The gpulease policy's configuration: the card behind the fake NVML
/// library, the four consumers, and the scheduling keys (a separate piece,
/// [`scheduling_config`]).
fn gpulease_config(
    services: &[Service],
    compression: f64,
    library: &Path,
    scheduling: bool,
) -> String {
    let (global, per_consumer) = if scheduling {
        scheduling_config(compression)
    } else {
        (String::new(), Vec::new())
    };
    let mut toml = format!(
        "capacity = 4\n\n[gpu]\nsource = \"nvml\"\nnvml_library = {library:?}\n\
         safety_margin_mib = {SAFETY_MARGIN_MIB}\npoll_interval = \"{POLL_INTERVAL_MS}ms\"\n\
         unload_timeout = \"{}\"\n",
        wall(60.0, compression),
        library = library.display().to_string(),
    );
    toml += &global;
    for service in services {
        toml += &format!(
            "\n[consumers.{}]\nkind = \"{}\"\nvram_mib = {}\n",
            service.name, service.kind, service.model_mib
        );
        if service.coexist {
            toml += "coexist = true\n";
        }
        if service.unloads_on_request {
            toml += "unload = \"stream\"\n";
        }
        if let Some((_, lines)) = per_consumer.iter().find(|(name, _)| *name == service.name) {
            toml += lines;
        }
    }
    toml
}

/// The scheduling keys, with durations in simulated time converted to the
/// broker's wall time: the `[scheduling]` section, and lines per consumer.
/// TTS is interactive and first; the LLM and the image generator come
/// next; the training run is last, and may be preempted (it checkpoints
/// and queues the rest of its work). Aging lifts a waiter one level per
/// two simulated minutes: training overtakes a steady stream of the others
/// within four.
fn scheduling_config(compression: f64) -> (String, Vec<(&'static str, String)>) {
    let global = format!(
        "\n[scheduling]\nbackfill = true\naging = \"{}\"\npreempt_after = \"{}\"\n",
        wall(120.0, compression),
        wall(60.0, compression)
    );
    let consumers = vec![
        ("tts", "priority = 2\n".to_owned()),
        ("llm", "priority = 1\n".to_owned()),
        ("image", "priority = 1\n".to_owned()),
        (
            "train",
            format!(
                "priority = 0\npreemptible = true\npreempt_grace = \"{}\"\n",
                wall(30.0, compression)
            ),
        ),
    ];
    (global, consumers)
}

/// Whether `broker_bin` knows the `[scheduling]` keys (its embedded
/// defaults have the section): a broker rejects keys it does not know, and
/// the benchmark measures older brokers too.
fn broker_knows_scheduling(broker_bin: &Path) -> bool {
    std::process::Command::new(broker_bin)
        .args(["serve", "--print-defaults"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("[scheduling]"))
}

/// One policy's replay of the trace.
struct Replay<'a> {
    exe: &'a Path,
    broker_bin: &'a Path,
    scratch: &'a Scratch,
    out: &'a Path,
    setup: &'a Setup,
    trace: &'a [Arrival],
}

/// A consumer process.
struct Process {
    child: Child,
    stdin: ChildStdin,
}

impl Replay<'_> {
    async fn run(&self, policy: Policy) -> Result<report::PolicyResult> {
        let setup = self.setup;
        let name = policy.file_name();
        let dir = self.scratch.path(name);
        std::fs::create_dir_all(&dir)?;
        let state = dir.join("nvml-state");
        let mut sim = Simulator::new(
            setup.services.clone(),
            state.clone(),
            &self.out.join(format!("sharing-{name}.log")),
            setup.compression,
            self.trace.len(),
        )?;
        let broker = match policy {
            Policy::NoBroker => None,
            Policy::GlobalLock | Policy::GlobalLockUnload => Some(
                self.broker(
                    policy,
                    "capacity = 1\n\n[gpu]\nsource = \"static\"\n",
                    &state,
                    &dir,
                )
                .await?,
            ),
            Policy::Gpulease => Some(
                self.broker(policy, &setup.gpulease_config, &state, &dir)
                    .await?,
            ),
        };
        let address = broker
            .as_ref()
            .map(|b| b.address(Transport::Uds).to_owned());
        let (lines_tx, mut lines) = mpsc::unbounded_channel::<(usize, Option<String>)>();
        let mut processes = Vec::new();
        let mut pids = Vec::new();
        for (index, service) in setup.services.iter().enumerate() {
            let spec = ConsumerSpec {
                service: service.clone(),
                policy,
                broker: address.clone(),
                load_ms: (MODEL_LOAD_S / setup.compression * 1000.0) as u64,
            };
            let mut child = Command::new(self.exe)
                .arg("worker")
                .arg(serde_json::to_string(&Job::Consumer(spec))?)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start the {} consumer", service.name))?;
            let stdin = child.stdin.take().context("no stdin")?;
            let stdout = child.stdout.take().context("no stdout")?;
            pids.push(child.id().context("the consumer has exited")?);
            let mut stdout = BufReader::new(stdout).lines();
            let ready = tokio::time::timeout(READY_TIMEOUT, stdout.next_line())
                .await
                .with_context(|| {
                    format!("the {} consumer did not start in time", service.name)
                })??;
            if ready.as_deref() != Some("ready") {
                bail!("the {} consumer said {ready:?}, not ready", service.name);
            }
            let tx = lines_tx.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = stdout.next_line().await {
                    if tx.send((index, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, None));
            });
            processes.push(Process { child, stdin });
        }
        drop(lines_tx);

        let start = tokio::time::Instant::now();
        let start_ns = now_ns();
        sim.start(pids, start_ns);
        let at =
            |simulated_s: f64| start + Duration::from_secs_f64(simulated_s / setup.compression);
        let end = at(setup.duration_s);
        let mut next = 0;
        loop {
            let arrival = self.trace.get(next);
            let next_at = arrival.map_or(end, |a| at(a.at_s).min(end));
            tokio::select! {
                biased;
                line = lines.recv() => {
                    let Some((index, line)) = line else { bail!("every consumer has gone") };
                    let Some(line) = line else {
                        bail!("the {} consumer exited during the replay", setup.services[index].name);
                    };
                    let ok = sim.handle(index, &line)?;
                    let answer: &[u8] = if ok { b"ok\n" } else { b"oom\n" };
                    processes[index].stdin.write_all(answer).await.with_context(|| {
                        format!("the {} consumer is gone", setup.services[index].name)
                    })?;
                }
                () = tokio::time::sleep_until(next_at) => {
                    let Some(arrival) = arrival.filter(|_| next_at < end) else { break };
                    let work_ms = (arrival.work_s / setup.compression * 1000.0).round().max(1.0);
                    sim.arrive(arrival.id, arrival.service, now_ns());
                    processes[arrival.service]
                        .stdin
                        .write_all(format!("job {} {work_ms}\n", arrival.id).as_bytes())
                        .await?;
                    next += 1;
                }
            }
        }
        sim.finish(setup.duration_s)?;
        for process in &mut processes {
            let _ = process.stdin.write_all(b"stop\n").await;
        }
        for mut process in processes {
            drop(process.stdin);
            if tokio::time::timeout(Duration::from_secs(5), process.child.wait())
                .await
                .is_err()
            {
                let _ = process.child.kill().await;
            }
        }
        if let Some(broker) = broker {
            broker.stop().await?;
        }
        Ok(report::PolicyResult::new(policy, &sim, setup))
    }

    /// Starts `gpulease serve` with `config`, on the fake NVML state at
    /// `state`, logging its decisions (`RUST_LOG=info`) next to the
    /// benchmark's.
    async fn broker(
        &self,
        policy: Policy,
        config: &str,
        state: &Path,
        dir: &Path,
    ) -> Result<Server> {
        let config_path = dir.join("gpulease.toml");
        std::fs::write(&config_path, config)?;
        let log = self
            .out
            .join(format!("sharing-{}-broker.log", policy.file_name()));
        let _ = std::fs::remove_file(&log);
        Server::broker_configured(
            self.broker_bin,
            &config_path,
            &[("FAKE_NVML_STATE", state.as_os_str())],
            &dir.join("broker.sock"),
            &dir.join("state"),
            &log,
        )
        .await
        .with_context(|| {
            format!(
                "cannot start {} for {}",
                self.broker_bin.display(),
                policy.name()
            )
        })
    }
}
