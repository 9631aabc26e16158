//! The `gpulease` process: [`run`] parses the command line and hands over
//! to the broker (`serve`) or to a client command. `src/main.rs` only picks
//! the allocator and calls it.

use std::io::Write as _;
use std::process::ExitCode as ProcessExit;

use clap::Parser;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::broker::Broker;
use crate::cli::{Cli, Command, ExitCode, ServeArgs};
use crate::config::{Config, DEFAULTS};
use crate::logging;
use crate::server;
use crate::state::{StateError, StateFile};

/// Runs the `gpulease` command line, and returns its exit status.
pub fn run() -> ProcessExit {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        crash_only();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            logging::say(&format!("gpulease: cannot start the async runtime: {e}"));
            logging::flush(LAST_WORDS);
            return ProcessExit::from(ExitCode::SOFTWARE.0);
        }
    };
    let code = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        client => runtime.block_on(crate::cli::run_client(client)),
    };
    // Do not wait for tasks such as a blocked stdin read.
    runtime.shutdown_background();
    logging::flush(LAST_WORDS);
    ProcessExit::from(code.0)
}

/// init tracing → load and validate config (exit 64 before binding
/// anything) → open the GPU inventory → claim the epoch and tokens in the
/// state file → install signal handlers (SIGHUP reloads) → bind → print
/// every bound address → serve until SIGINT or SIGTERM → drain.
async fn serve(args: ServeArgs) -> ExitCode {
    if args.print_defaults {
        // A closed stdout must not panic (`print!` would).
        let _ = std::io::stdout().write_all(DEFAULTS.as_bytes());
        return ExitCode::OK;
    }
    init_tracing();
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        warn!(error = %e, "cannot start jemalloc's background threads; freed memory returns more slowly");
    }
    let config = match Config::load(args.config.as_deref(), None) {
        Ok(config) => config,
        Err(e) => {
            logging::say(&format!("gpulease: invalid configuration: {e}"));
            return ExitCode::USAGE;
        }
    };
    if args.check {
        let _ = writeln!(std::io::stdout(), "configuration is valid:\n{config:#?}");
        return ExitCode::OK;
    }
    let inventory = match crate::inventory::open(&config.gpu) {
        Ok(inventory) => inventory,
        Err(e) => {
            error!("{e}");
            logging::say(&format!("gpulease: cannot open the GPU inventory: {e}"));
            return ExitCode::UNAVAILABLE;
        }
    };
    let gpus = inventory.gpus();
    info!(
        source = inventory.source(),
        gpus = gpus.len(),
        "GPU inventory"
    );
    for gpu in &gpus {
        info!(index = gpu.index, uuid = %gpu.uuid, name = %gpu.name, total_mib = gpu.total_mib, "GPU");
    }
    let opened = if args.reset_state {
        StateFile::reset(&config.state_dir, std::time::SystemTime::now())
    } else {
        StateFile::open(&config.state_dir)
    };
    let state = match opened
        .and_then(|(file, previous)| Broker::claim(&file, previous).map(|claim| (file, claim)))
    {
        Ok(state) => state,
        Err(e) => {
            error!(error = %e, "cannot use the state file");
            let hint = match e {
                StateError::Damaged { .. } => {
                    "; if it cannot be repaired, `gpulease serve --reset-state` starts over with tokens above the earlier ones (see README)"
                }
                StateError::Io { .. } => "",
            };
            let dir = config.state_dir.display();
            logging::say(&format!(
                "gpulease: cannot use the state directory {dir}: {e}{hint}"
            ));
            return ExitCode::CANNOT_CREATE;
        }
    };
    if args.reset_state {
        warn!(
            state = %state.0.path().display(),
            first_token = state.1.first_token,
            "state reset: tokens start from a floor taken from the wall clock"
        );
    }
    info!(
        epoch = state.1.epoch,
        first_token = state.1.first_token,
        state = %state.0.path().display(),
        "fencing tokens claimed"
    );
    let (shutdown, hangups) = match shutdown_signal().and_then(|shutdown| {
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok((shutdown, hangups))
    }) {
        Ok(signals) => signals,
        Err(e) => {
            logging::say(&format!("gpulease: cannot install signal handlers: {e}"));
            return ExitCode::SOFTWARE;
        }
    };
    match server::raise_open_file_limit() {
        Ok((limit, Some(was))) => {
            info!(
                limit,
                was, "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
            );
        }
        Ok((limit, None)) => info!(limit, "open-file limit (RLIMIT_NOFILE)"),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
    }
    let listeners = match server::bind(&config).await {
        Ok(listeners) => listeners,
        Err(e) => {
            error!("{e}");
            logging::say(&format!("gpulease: {e}"));
            return ExitCode::UNAVAILABLE;
        }
    };
    let mut stdout = std::io::stdout();
    for address in listeners.addresses() {
        info!(%address, "listening");
        // The stable, machine-readable readiness line: once it is printed,
        // the broker accepts calls on that address. Nobody may be reading.
        let _ = writeln!(stdout, "listening on {address}").and_then(|()| stdout.flush());
    }
    if let Some(addr) = listeners.metrics_addr() {
        let url = crate::metrics::url(addr);
        info!(%url, "serving metrics");
        // Its own line, so that readers of `listening on` see only the
        // addresses clients call.
        let _ = writeln!(stdout, "metrics on {url}").and_then(|()| stdout.flush());
    }
    info!(
        capacity = config.capacity,
        dead_client_bound = %humantime::format_duration(config.dead_client_bound()),
        "broker ready"
    );
    match server::serve(
        &config,
        inventory,
        state,
        listeners,
        shutdown,
        Some(hangups),
    )
    .await
    {
        Ok(()) => {
            info!("stopped");
            ExitCode::OK
        }
        Err(e) => {
            error!("{e}");
            ExitCode::SOFTWARE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logging::writer())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Installs the SIGINT and SIGTERM handlers now, so that a signal that
/// arrives as soon as the broker says it listens is a graceful shutdown, and
/// returns the future that resolves on the first of them. (SIGHUP reloads:
/// `serve` installs that handler beside these. SIGPIPE is ignored by the
/// Rust runtime from the start, so a closed pipe is an `EPIPE` error where
/// it is written, never a death.)
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => info!("SIGINT received"),
            _ = terminate.recv() => info!("SIGTERM received"),
        }
    })
}

/// How long the last log lines may take to reach stderr at exit.
const LAST_WORDS: std::time::Duration = std::time::Duration::from_millis(500);

/// Makes the broker crash-only: a panic anywhere (a bug) ends the process
/// at once with SIGABRT, after its message is logged, instead of unwinding
/// one task and leaving a broker that is up but holds a permit for no one.
/// The supervisor restarts it on the same state directory, and fencing
/// tokens still increase. A hook rather than `panic = "abort"`, so that it
/// holds in every profile the binary is built with, tests included.
fn crash_only() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let backtrace = std::backtrace::Backtrace::capture();
        let place = info
            .location()
            .map_or_else(String::new, |at| format!(" at {at}"));
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        logging::say(&format!(
            "gpulease: panic in thread {thread}{place}: {what}; aborting (crash-only: restart the broker on the same state directory)\n{backtrace}"
        ));
        // Bounded: a blocked stderr must not keep a broken broker alive.
        logging::flush(LAST_WORDS);
        std::process::abort();
    }));
}
