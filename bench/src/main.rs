//! `gpulease-bench`: the broker's cost, measured against the wire and the
//! kernel in the same run.
//!
//! A run starts real `gpulease serve` processes (on loopback TCP and on a
//! Unix socket) and drives them from client processes: this binary started
//! again in a hidden `worker` mode (see `jobs`). It measures handoff
//! latency (one process sends `Release` at t0, another reads `Granted` at
//! t1, both on `CLOCK_MONOTONIC`), uncontended acquire and cycle, handoff
//! and `Status` against queue length, throughput under contention, the
//! broker's CPU time per grant and its memory per waiter. The baselines
//! (see `echo`): a bidi and a unary round trip to an echo server with the
//! same service, transport and runtime; the same handoffs, throughput and
//! memory through a bare semaphore behind that service; a `flock(2)`
//! handoff; and etcd's lock when an `etcd` binary is on the PATH. Every
//! figure is printed with its ratio to its baseline: on shared machines,
//! only the ratios mean much. BENCHMARKS.md explains each figure.
//!
//! Output, under `--out`: `bench.json` (raw percentiles), `table.md` (the
//! tables printed on standard output), `handoff-vs-queue.svg`, and
//! `servers.log` (the servers' standard error).

mod calls;
mod echo;
mod jobs;
mod locks;
mod procs;
mod report;
mod scenarios;
mod sharing;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::procs::Transport;
use crate::report::{EtcdOutcome, Machine, Report};
use crate::scenarios::{Bench, Plan};

/// Measures gpulease's handoff, acquire, throughput and memory, each
/// against a baseline measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "gpulease-bench", version)]
struct Cli {
    /// Where to write bench.json, table.md and handoff-vs-queue.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// A tiny run (a few iterations, a small queue), to check that the
    /// benchmark works; its numbers mean nothing.
    #[arg(long)]
    quick: bool,
    /// The `gpulease` binary to measure. Default: the one next to this
    /// binary (build both with `cargo build --release --workspace --bins`).
    #[arg(long, value_name = "PATH")]
    broker_bin: Option<PathBuf>,
    /// The `etcd` binary for the etcd baseline. Default: `etcd` on the PATH.
    #[arg(long, value_name = "PATH")]
    etcd_bin: Option<PathBuf>,
    /// Do not measure etcd even if it is installed.
    #[arg(long)]
    no_etcd: bool,
    /// Measure only these parts (comma-separated), for example to profile
    /// one of them. Default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The numbers of other waiters for the handoff runs (comma-separated).
    /// Default: 1,100,1000,10000 (with --quick: 1,20).
    #[arg(long, value_delimiter = ',')]
    queue_sizes: Vec<usize>,
    /// `Status` calls per queue length (0: none, as when profiling the
    /// handoffs alone). Default: 100 (with --quick: 5).
    #[arg(long, value_name = "N")]
    status_calls: Option<usize>,
    /// A command to start every server (the broker and the baselines, not
    /// the clients) under, split at spaces, for profiling: for example
    /// "valgrind --tool=callgrind --callgrind-out-file=cg.%p".
    #[arg(long, value_name = "COMMAND")]
    server_wrapper: Option<String>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

/// A part of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Round trips, uncontended acquire, and handoff at the fewest waiters,
    /// in interleaved rounds.
    Latency,
    /// Handoff and Status at the other queue lengths.
    Queue,
    /// The flock(2) handoff.
    Flock,
    /// etcd's lock.
    Etcd,
    /// Grants per second under contention.
    Throughput,
    /// Broker memory per waiter.
    Memory,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// Replays a seeded mixed day (TTS, LLM, image generation, training)
    /// on a simulated 24 GiB card under four policies: no broker, a global
    /// lock, a global lock with an unload after every job, and gpulease.
    Sharing(sharing::SharingArgs),
    /// Runs one client process or the echo server (internal).
    #[command(hide = true)]
    Worker {
        /// The job, as JSON.
        job: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Internal::Worker { job }) = &cli.internal {
        return jobs::main(job);
    }
    let sharing = match &cli.internal {
        Some(Internal::Sharing(args)) => Some(args),
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gpulease-bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match sharing {
        Some(args) => runtime.block_on(async {
            let exe = std::env::current_exe().context("cannot find this binary")?;
            sharing::main(args, exe).await
        }),
        None => runtime.block_on(bench(&cli)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpulease-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let load_at_start = report::loadavg();
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let broker_bin = match &cli.broker_bin {
        Some(path) => path.clone(),
        None => exe.with_file_name("gpulease"),
    };
    if !broker_bin.is_file() {
        bail!(
            "no broker binary at {}: build both with `cargo build --release --workspace --bins`, or pass --broker-bin",
            broker_bin.display()
        );
    }
    if cli.broker_bin.is_none() && older(&broker_bin, &exe) {
        eprintln!(
            "gpulease-bench: note: {} is older than this binary; if src/ changed since, \
             rebuild both with `cargo build --release --workspace --bins`",
            broker_bin.display()
        );
    }
    let etcd_bin = if cli.no_etcd {
        None
    } else {
        cli.etcd_bin.clone().or_else(|| find_on_path("etcd"))
    };
    std::fs::create_dir_all(&cli.out)
        .with_context(|| format!("cannot create {}", cli.out.display()))?;
    let log = cli.out.join("servers.log");
    let _ = std::fs::remove_file(&log);
    let mut plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if !cli.queue_sizes.is_empty() {
        plan.queue_sizes.clone_from(&cli.queue_sizes);
    }
    if let Some(calls) = cli.status_calls {
        plan.status_calls = calls;
    }
    let wrapper: Vec<String> = cli
        .server_wrapper
        .iter()
        .flat_map(|w| w.split_whitespace().map(str::to_owned))
        .collect();
    let mut bench = Bench::new(exe, broker_bin.clone(), wrapper, log, plan.clone())?;
    let wants = |part| cli.only.is_empty() || cli.only.contains(&part);

    let mut wire = Vec::new();
    let mut uncontended = Vec::new();
    let mut handoff = Vec::new();
    let mut semaphore = Vec::new();
    let fewest = plan.queue_sizes.iter().copied().min().unwrap_or(1);
    for transport in [Transport::Tcp, Transport::Uds] {
        let t = transport.name();
        if wants(Part::Latency) {
            step(&format!(
                "{t}: round trips, uncontended acquire, handoff at {fewest} other waiters"
            ));
            let figures = bench.latency_rounds(transport).await?;
            wire.push(figures.wire);
            uncontended.push(figures.uncontended);
            semaphore.push(figures.semaphore);
            handoff.push(figures.handoff);
        }
        if wants(Part::Queue) {
            for &others in plan.queue_sizes.iter().filter(|&&n| n != fewest) {
                step(&format!("{t}: handoff at {others} other waiters"));
                let (baseline, measured) = bench.queue_pair(transport, others).await?;
                semaphore.push(baseline);
                handoff.push(measured);
            }
        }
    }
    let mut flock_handoff = None;
    if wants(Part::Flock) {
        step("kernel baseline: flock(2) handoff");
        flock_handoff = Some(bench.flock().await?);
    }
    let etcd = if cli.no_etcd || !wants(Part::Etcd) {
        EtcdOutcome::Skipped
    } else {
        step("etcd baseline");
        bench.etcd(etcd_bin.as_deref()).await
    };
    if matches!(etcd, EtcdOutcome::NotInstalled) {
        eprintln!("gpulease-bench: etcd not installed");
    }
    let mut throughput = Vec::new();
    if wants(Part::Throughput) {
        for &capacity in &plan.capacities {
            for &clients in &plan.clients {
                step(&format!(
                    "throughput, capacity {capacity}, {clients} clients"
                ));
                throughput.push(bench.throughput(capacity, clients).await?);
            }
        }
    }
    let mut memory = Vec::new();
    if wants(Part::Memory) {
        step("broker memory per waiter");
        memory = bench.memory().await?;
    }

    let mut report = Report {
        machine: Machine::read(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        broker_bin: broker_bin.display().to_string(),
        plan,
        wall_s: started.elapsed().as_secs_f64(),
        loadavg: [load_at_start, report::loadavg()],
        wire,
        flock_handoff,
        etcd,
        uncontended,
        handoff,
        semaphore,
        throughput,
        memory,
        targets: Vec::new(),
    };
    report.check_targets();
    let tables = report.tables();
    print!("{tables}");
    write(&cli.out.join("table.md"), tables.as_bytes())?;
    write(
        &cli.out.join("bench.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    let svg = cli.out.join("handoff-vs-queue.svg");
    report.plot(&svg)?;
    eprintln!(
        "gpulease-bench: wrote bench.json, table.md and handoff-vs-queue.svg to {}",
        cli.out.display()
    );
    Ok(())
}

fn step(what: &str) {
    eprintln!("gpulease-bench: {what}");
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Whether `a` was modified before `b` (`cargo run --bin gpulease-bench`
/// rebuilds only this binary, and may leave an old broker next to it).
fn older(a: &Path, b: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    matches!((modified(a), modified(b)), (Some(a), Some(b)) if a < b)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}
