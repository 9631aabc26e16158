//! `gpulease run -- CMD ARGS...`: hold a lease exactly as long as a command
//! runs.
//!
//! The lease is acquired first; the command starts only once it is granted,
//! with `GPULEASE_LEASE_ID`, `GPULEASE_FENCING_TOKEN`, `GPULEASE_BROKER_EPOCH`
//! and `GPULEASE_GPU_INDEX` in its environment. When the command exits, the
//! lease is released and `gpulease` exits with the command's status (128 + N
//! for a command killed by signal N). SIGTERM is forwarded to the command;
//! SIGINT too, except from a terminal, whose Ctrl-C already reaches the whole
//! foreground process group. If the lease is lost while the command runs
//! (the broker revokes it or goes away), the command is sent SIGTERM, then
//! SIGKILL after a grace period, unless `--no-kill-on-loss` is given. A
//! preemptible lease asked to make way (`preempt_requested`) sends the
//! command SIGTERM at once, so that it can stop before its grace runs out.

use std::ffi::OsString;
use std::io::{IsTerminal, Write as _};
use std::process::ExitStatus;
use std::time::Duration;

use clap::Args;
use gpulease_client::{Lease, Lost};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::pb::v1 as pb;

use super::exit::Failure;
use super::status::short;
use super::{BrokerArg, ExitCode, parse_duration};

/// How long a command may take to exit after SIGTERM when the lease is
/// lost, before it gets SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How long to wait for the broker to confirm a release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of `gpulease run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// Who is asking: 1 to 64 characters of [A-Za-z0-9._-].
    #[arg(long, env = "GPULEASE_CONSUMER")]
    consumer: String,
    /// GPU memory the command needs, in MiB (0 = unknown).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    vram_mib: u64,
    /// Give up if not granted within this time (e.g. 30s, 5m); default: wait forever.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    max_wait: Option<Duration>,
    /// Which GPU: an index or a UUID; default: whichever can take it soonest.
    #[arg(long, value_name = "GPU")]
    gpu: Option<String>,
    /// Ask with this priority; it may be below the consumer's configured
    /// priority, never above (a higher one is lowered to it).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    priority: Option<i32>,
    /// A label shown in the broker's status, as KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label, value_name = "KEY=VALUE")]
    labels: Vec<(String, String)>,
    /// Keep the command running if the lease is lost.
    #[arg(long)]
    no_kill_on_loss: bool,
    /// Print nothing but errors.
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

pub(super) async fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    if let Some(wait) = args.max_wait
        && u32::try_from(wait.as_millis()).is_err()
    {
        return Err(Failure::new(
            ExitCode::USAGE,
            "--max-wait is too long; at most 49 days",
        ));
    }
    let mut signals = Signals::new()?;
    let client = args.broker.connect().await?;
    let progress = Progress::new(args.quiet);
    // The preemption callback runs on the lease's task; the command is
    // signalled from here.
    let (preempt_tx, mut preempts) = mpsc::unbounded_channel();
    let mut request = client
        .lease(&args.consumer)
        .vram_mib(args.vram_mib)
        .client_pid(std::process::id())
        .labels(args.labels.iter().cloned())
        .on_queued(move |queued| progress.queued(queued))
        .on_preempt_requested(move |asked| {
            let _ = preempt_tx.send(asked.clone());
        });
    if let Some(gpu) = &args.gpu {
        request = request.gpu(gpu);
    }
    if let Some(priority) = args.priority {
        request = request.priority(priority);
    }
    if let Some(wait) = args.max_wait {
        request = request.max_wait(wait);
    }

    let lease = tokio::select! {
        lease = request.acquire() => lease.map_err(|e| {
            progress.clear();
            Failure::from(e)
        })?,
        // Dropping `acquire()` withdraws the request.
        () = signals.any() => {
            progress.clear();
            return Ok(ExitCode(130));
        }
    };
    progress.granted(lease.granted());

    let mut child = match spawn(&args.command, &lease) {
        Ok(child) => child,
        Err(failure) => {
            release(lease).await;
            return Err(failure);
        }
    };
    let status = supervise(
        &mut child,
        &lease,
        &mut preempts,
        &mut signals,
        !args.no_kill_on_loss,
    )
    .await;
    release(lease).await;
    let status = status.map_err(|e| {
        Failure::new(
            ExitCode::SOFTWARE,
            format!("cannot wait for the command: {e}"),
        )
    })?;
    Ok(exit_code(status))
}

fn spawn(command: &[OsString], lease: &Lease) -> Result<Child, Failure> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Failure::new(ExitCode::USAGE, "no command given after --"))?;
    Command::new(program)
        .args(args)
        .env("GPULEASE_LEASE_ID", lease.lease_id())
        .env("GPULEASE_FENCING_TOKEN", lease.token().to_string())
        .env("GPULEASE_BROKER_EPOCH", lease.broker_epoch().to_string())
        .env("GPULEASE_GPU_INDEX", lease.gpu().to_string())
        .env("CUDA_VISIBLE_DEVICES", lease.cuda_visible_devices())
        .spawn()
        .map_err(|e| {
            let name = program.to_string_lossy();
            match e.kind() {
                std::io::ErrorKind::NotFound => Failure::new(
                    ExitCode::NOT_FOUND,
                    format!("cannot run {name:?}: not found"),
                ),
                _ => Failure::new(
                    ExitCode::CANNOT_EXECUTE,
                    format!("cannot run {name:?}: {e}"),
                ),
            }
        })
}

/// Waits for the child, forwarding signals, asks it to stop when the lease
/// is to make way, and stops it if the lease is lost (when `kill_on_loss`).
async fn supervise(
    child: &mut Child,
    lease: &Lease,
    preempts: &mut mpsc::UnboundedReceiver<pb::PreemptRequested>,
    signals: &mut Signals,
    kill_on_loss: bool,
) -> std::io::Result<ExitStatus> {
    let mut lease_held = true;
    let mut kill_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            status = child.wait() => return status,
            signal = signals.next() => signal_child(child, signal),
            Some(asked) = preempts.recv(), if lease_held => {
                // The lease is still held: the command gets the grace to
                // stop, then the broker revokes it.
                eprintln!(
                    "gpulease: {} needs the GPU; asking the command to stop (SIGTERM) within {}",
                    asked.for_consumer,
                    short(asked.grace_ms)
                );
                signal_child(child, Signal::SIGTERM);
            }
            lost = lease.lost(), if lease_held => {
                let why = match lost {
                    Lost::Revoked { message, .. } => {
                        format!("the broker revoked the lease: {message}")
                    }
                    Lost::Ended => "the broker ended the lease".to_owned(),
                    Lost::Failed(status) => {
                        format!("the lease was lost: {}", Failure::from(status).message)
                    }
                };
                lease_held = false;
                if kill_on_loss {
                    crate::cli::say!("gpulease: {why}; stopping the command");
                    signal_child(child, Signal::SIGTERM);
                    kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
                } else {
                    crate::cli::say!("gpulease: {why}; the command keeps running (--no-kill-on-loss)");
                }
            }
            () = sleep_until(kill_at) => {
                kill_at = None;
                signal_child(child, Signal::SIGKILL);
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn signal_child(child: &Child, signal: Signal) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        // The child may have exited a moment ago; that is fine.
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// Releases the lease and waits briefly for the broker to confirm it; a
/// lease already lost has nothing left to release.
async fn release(lease: Lease) {
    let _ = tokio::time::timeout(RELEASE_TIMEOUT, lease.release()).await;
}

fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode(u8::try_from(128 + signal).unwrap_or(255)),
        (None, None) => ExitCode(1),
    }
}

/// The signals `gpulease run` catches, so that it can release the lease
/// instead of dying with it.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    from_terminal: bool,
}

impl Signals {
    fn new() -> Result<Self, Failure> {
        let install = |kind| {
            signal(kind).map_err(|e| {
                Failure::new(
                    ExitCode::SOFTWARE,
                    format!("cannot install a signal handler: {e}"),
                )
            })
        };
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
            from_terminal: std::io::stdin().is_terminal(),
        })
    }

    /// Any of them, while waiting for the grant (no child to forward to).
    async fn any(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }

    /// The next signal to forward to the child.
    async fn next(&mut self) -> Signal {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => {
                    // A terminal's Ctrl-C reaches the child directly: sending
                    // it again would interrupt the child's own cleanup.
                    if !self.from_terminal {
                        return Signal::SIGINT;
                    }
                }
                _ = self.terminate.recv() => return Signal::SIGTERM,
                _ = self.hangup.recv() => return Signal::SIGHUP,
            }
        }
    }
}

/// What `gpulease run` tells the user while it waits: one line redrawn in
/// place on a terminal, plain lines otherwise.
#[derive(Clone, Copy)]
struct Progress {
    quiet: bool,
    terminal: bool,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn queued(&self, queued: &pb::Queued) {
        if self.quiet {
            return;
        }
        let holders: Vec<String> = queued
            .holders
            .iter()
            .map(|h| format!("{} for {}", h.consumer, short(h.held_ms)))
            .collect();
        let held_by = if holders.is_empty() {
            String::new()
        } else {
            format!(", held by {}", holders.join(", "))
        };
        let estimate = if queued.estimated_wait_ms > 0 {
            format!(", ~{}", short(queued.estimated_wait_ms))
        } else {
            String::new()
        };
        let line = format!(
            "gpulease: waiting for the GPU: position {} of {}{estimate}{held_by}",
            queued.position, queued.queue_depth
        );
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{line}");
            let _ = stderr.flush();
        } else {
            let _ = writeln!(stderr, "{line}");
        }
    }

    fn clear(&self) {
        if self.terminal && !self.quiet {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }

    fn granted(&self, granted: &pb::Granted) {
        self.clear();
        if !self.quiet {
            crate::cli::say!(
                "gpulease: granted lease {} (fencing token {}) after {}",
                granted.lease_id,
                granted.fencing_token,
                short(granted.waited_ms)
            );
        }
    }
}
