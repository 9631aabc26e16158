//! History tests: the real `gpulease serve` under a randomized workload with
//! injected faults, its history checked afterwards against the broker's
//! promises; a lost-update workload on a fenced counter; proptest fuzzing of
//! the request handling; and an opt-in soak. RELIABILITY.md says what each
//! scenario proves and keeps the figures of the last run.
//!
//! This target has its own `main` (`harness = false`) because the same
//! binary is also the worker process that the workload starts, kills and
//! freezes (`GPULEASE_HISTORY_WORKER` set: see `worker.rs`). It prints one
//! closing line that CI reads: `history: N passed, M failed`.
//!
//! Arguments follow libtest where it matters, so that `cargo test` and
//! `cargo nextest` can drive it: names (substrings) select scenarios;
//! `--exact`, `--skip NAME`, `--list`, `--ignored` and `--include-ignored`
//! work; other flags are accepted and ignored. The soak is opt-in (listed as
//! ignored): `cargo test --test history -- soak`, or `GPULEASE_SOAK=1`.
//!
//! Environment: `GPULEASE_HISTORY_SEED` replays a seed (every scenario
//! prints its own); `GPULEASE_HISTORY_SECS` sets the main workload's length
//! (default 20); `GPULEASE_FUZZ_CASES` the fuzzer's cases (default 64);
//! `GPULEASE_SOAK_WAITERS` and `GPULEASE_SOAK_SECS` the soak's size.

mod broker;
mod checker;
mod counter;
mod fuzz;
mod history;
mod proxy;
mod rng;
mod selftest;
mod soak;
mod worker;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// A scenario: its name, whether it is opt-in, and its body, which returns
/// its figures or what failed.
struct Scenario {
    name: &'static str,
    opt_in: bool,
    run: fn(&Context) -> Result<Vec<String>, String>,
}

/// What a scenario gets.
struct Context {
    runtime: tokio::runtime::Runtime,
    seed: u64,
    /// Where to keep logs, histories and reports for a look afterwards.
    artifacts: PathBuf,
}

const SCENARIOS: [Scenario; 5] = [
    Scenario {
        name: "checker_catches_broken_histories",
        opt_in: false,
        run: |_| selftest::run(),
    },
    Scenario {
        name: "faults_and_lost_updates",
        opt_in: false,
        run: |cx| {
            let secs = env_number("GPULEASE_HISTORY_SECS", 20);
            let config = workload::Config {
                capacity: 1,
                duration: Duration::from_secs(secs),
                in_process: 200,
                proxied: 6,
                workers: 8,
                cli: 3,
                restarts: 2,
                counter: true,
                process_faults: true,
                interval: Duration::from_millis(300),
                timeout: Duration::from_millis(500),
                slack: Duration::from_millis(1200),
            };
            cx.runtime
                .block_on(workload::run(&config, cx.seed, &cx.artifacts))
        },
    },
    Scenario {
        name: "capacity_three",
        opt_in: false,
        run: |cx| {
            let secs = env_number("GPULEASE_HISTORY_SECS", 20) / 2;
            let config = workload::Config {
                capacity: 3,
                duration: Duration::from_secs(secs.max(1)),
                in_process: 200,
                proxied: 3,
                workers: 6,
                cli: 2,
                restarts: 0,
                counter: false,
                process_faults: true,
                interval: Duration::from_millis(300),
                timeout: Duration::from_millis(500),
                slack: Duration::from_millis(1200),
            };
            cx.runtime
                .block_on(workload::run(&config, cx.seed, &cx.artifacts))
        },
    },
    Scenario {
        name: "fuzz_request_handling",
        opt_in: false,
        run: |cx| {
            let cases = u32::try_from(env_number("GPULEASE_FUZZ_CASES", 64)).unwrap_or(64);
            fuzz::run(&cx.runtime, cx.seed, cases)
        },
    },
    Scenario {
        name: "soak",
        opt_in: true,
        run: |cx| {
            cx.runtime
                .block_on(soak::run(soak::Knobs::from_env(), cx.seed, &cx.artifacts))
        },
    },
];

/// The command line, as far as this harness understands it.
#[derive(Debug, Default)]
struct Args {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    ignored: bool,
    include_ignored: bool,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Self {
        let mut parsed = Self::default();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--exact" => parsed.exact = true,
                "--list" => parsed.list = true,
                "--ignored" => parsed.ignored = true,
                "--include-ignored" => parsed.include_ignored = true,
                "--skip" => parsed.skips.extend(args.next()),
                // Flags that take a value, which is not a filter.
                "--format" | "--test-threads" | "--color" | "--logfile" | "-Z"
                | "--shuffle-seed" | "--report-time" => {
                    if args.peek().is_some_and(|next| !next.starts_with('-')) {
                        args.next();
                    }
                }
                flag if flag.starts_with('-') => {}
                filter => parsed.filters.push(filter.to_owned()),
            }
        }
        parsed
    }

    fn matches(&self, name: &str) -> bool {
        let selected = self.filters.is_empty()
            || self.filters.iter().any(|f| {
                if self.exact {
                    f == name
                } else {
                    name.contains(f.as_str())
                }
            });
        selected && !self.skips.iter().any(|s| name.contains(s.as_str()))
    }

    /// Whether `scenario` runs: selected, and opt-in ones only when asked
    /// for (by `--ignored`, `--include-ignored`, `GPULEASE_SOAK=1`, or by
    /// their exact name).
    fn runs(&self, scenario: &Scenario) -> bool {
        if !self.matches(scenario.name) {
            return false;
        }
        if scenario.opt_in {
            self.ignored
                || self.include_ignored
                || std::env::var("GPULEASE_SOAK").is_ok_and(|v| v == "1")
                || self.filters.iter().any(|f| f == scenario.name)
        } else {
            !self.ignored
        }
    }
}

fn env_number(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    match std::env::var("GPULEASE_HISTORY_SEED") {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("GPULEASE_HISTORY_SEED={text:?} is not a number"))
        }
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            (nanos as u64) ^ (u64::from(std::process::id()) << 32)
        }
    }
}

fn main() -> ExitCode {
    if let Ok(role) = std::env::var(worker::ROLE) {
        return worker::main(&role);
    }
    let args = Args::parse(std::env::args().skip(1));
    if args.list {
        for scenario in &SCENARIOS {
            if args.matches(scenario.name) && (!args.ignored || scenario.opt_in) {
                println!("{}: test", scenario.name);
            }
        }
        return ExitCode::SUCCESS;
    }
    let seed = seed();
    let (mut passed, mut failed) = (0, 0);
    for scenario in SCENARIOS.iter().filter(|s| args.runs(s)) {
        println!(
            "scenario {} (seed {seed}; replay with GPULEASE_HISTORY_SEED={seed})",
            scenario.name
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let context = Context {
            runtime,
            seed,
            artifacts: PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
                .join("history")
                .join(scenario.name),
        };
        let started = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (scenario.run)(&context)))
                .unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(ToString::to_string))
                        .unwrap_or_default();
                    Err(format!("panicked: {why}"))
                });
        context.runtime.shutdown_timeout(Duration::from_secs(5));
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(figures) => {
                passed += 1;
                for line in figures {
                    println!("    {line}");
                }
                println!("scenario {} ... ok ({took:.1} s)", scenario.name);
            }
            Err(why) => {
                failed += 1;
                for line in why.lines() {
                    println!("    {line}");
                }
                println!("scenario {} ... FAILED ({took:.1} s)", scenario.name);
            }
        }
    }
    println!("history: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
