//! The processes a run starts: servers (the broker, the echo server, etcd)
//! and workers. Every child is killed when its handle drops, so an error
//! anywhere leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gpulease_testkit::{Serve, Stderr};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::echo::Mode;
use crate::jobs::Job;

/// How long a server may take to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A transport between client and server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    /// Loopback TCP.
    Tcp,
    /// A Unix-domain socket.
    Uds,
}

impl Transport {
    /// Its name in tables.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Uds => "uds",
        }
    }
}

/// A gRPC server in a child process, listening on TCP and a Unix socket.
#[derive(Debug)]
pub(crate) struct Server(gpulease_testkit::Server);

impl Server {
    /// Starts `gpulease serve` from `bin` with `capacity`, on `127.0.0.1:0`
    /// and `socket`, keeping its state in `state_dir`, logging warnings to
    /// `log`; under `wrapper` (a profiler
    /// and its arguments) unless it is empty.
    pub(crate) async fn broker(
        bin: &Path,
        wrapper: &[String],
        capacity: u32,
        socket: &Path,
        state_dir: &Path,
        log: &Path,
    ) -> Result<Self> {
        let serve = Serve::gpulease(bin)
            .wrapper(wrapper)
            .socket(socket)
            .env("GPULEASE__CAPACITY", capacity.to_string())
            // Its own state (the fencing-token file), not the user's.
            .state_dir(state_dir)
            // The default, info, writes a line per grant.
            .env("RUST_LOG", "warn");
        Self::start(serve, log).await
    }

    /// Starts `gpulease serve` from `bin` with the configuration file
    /// `config` and the extra environment `env`, on `127.0.0.1:0` and
    /// `socket`, keeping its state in `state_dir` and logging its decisions
    /// (`RUST_LOG=info`) to `log`: the sharing benchmark's broker.
    pub(crate) async fn broker_configured(
        bin: &Path,
        config: &Path,
        env: &[(&str, &std::ffi::OsStr)],
        socket: &Path,
        state_dir: &Path,
        log: &Path,
    ) -> Result<Self> {
        let serve = Serve::gpulease(bin)
            .config(config)
            .socket(socket)
            .state_dir(state_dir)
            .envs(env.iter().copied());
        Self::start(serve, log).await
    }

    /// Starts a baseline server: this binary in its worker mode, under
    /// `wrapper` unless it is empty.
    pub(crate) async fn baseline(
        exe: &Path,
        wrapper: &[String],
        mode: Mode,
        socket: &Path,
        log: &Path,
    ) -> Result<Self> {
        let serve = Serve::command(exe)
            .wrapper(wrapper)
            .arg("worker")
            .arg(serde_json::to_string(&Job::Echo {
                mode,
                socket: socket.to_owned(),
            })?)
            .expect_unix(true);
        Self::start(serve, log).await
    }

    /// Starts `serve` with its stderr appended to `log`, and a stdin that
    /// stays open until it is asked to stop.
    async fn start(serve: Serve, log: &Path) -> Result<Self> {
        let server = serve
            .stdin(Stdio::piped())
            .stderr(Stderr::File(log.to_owned()))
            .timeout(START_TIMEOUT)
            .start()
            .await?;
        Ok(Self(server))
    }

    /// The address to reach it over `transport`, as a client spells it.
    pub(crate) fn address(&self, transport: Transport) -> &str {
        match transport {
            Transport::Tcp => &self.0.addr,
            Transport::Uds => self.0.unix.as_deref().unwrap_or_default(),
        }
    }

    /// Its resident set size, from `/proc/PID/status`.
    pub(crate) fn rss_bytes(&self) -> Result<u64> {
        let pid = self.0.child.id().context("the server has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc/PID/status")?;
        Ok(kib * 1024)
    }

    /// The CPU time its threads have used, in nanoseconds, from
    /// `/proc/PID/task/*/schedstat` (threads that already exited are not
    /// counted; the servers keep theirs).
    pub(crate) fn cpu_ns(&self) -> Result<u64> {
        let pid = self.0.child.id().context("the server has exited")?;
        let mut total = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let schedstat =
                std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
            total += schedstat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// Asks it to stop (SIGTERM, then stdin closes) and waits; kills it if
    /// it takes too long.
    pub(crate) async fn stop(mut self) -> Result<()> {
        terminate(&mut self.0.child).await
    }
}

/// SIGTERM, wait, then SIGKILL.
pub(crate) async fn terminate(child: &mut Child) -> Result<()> {
    gpulease_testkit::terminate(child, STOP_TIMEOUT).await?;
    Ok(())
}

/// A worker: this binary started again with one [`Job`].
#[derive(Debug)]
pub(crate) struct Worker {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    /// Starts `job` in a new process named `name` in messages.
    pub(crate) fn spawn(exe: &Path, name: &str, job: &Job) -> Result<Self> {
        let mut child = Command::new(exe)
            .arg("worker")
            .arg(serde_json::to_string(job)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {name}"))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    /// Sends one command line.
    pub(crate) async fn send(&mut self, line: &str) -> Result<()> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .with_context(|| format!("worker {} is gone", self.name))
    }

    /// The next line it prints, within `timeout`.
    pub(crate) async fn line(&mut self, timeout: Duration) -> Result<String> {
        match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("worker {} exited early", self.name),
            Ok(Err(e)) => Err(e).with_context(|| format!("reading worker {}", self.name)),
            Err(_) => bail!("worker {} said nothing for {timeout:?}", self.name),
        }
    }

    /// Waits for the line `want`.
    pub(crate) async fn expect(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let line = self.line(timeout).await?;
        if line != want {
            bail!("worker {} said {line:?}, not {want:?}", self.name);
        }
        Ok(())
    }

    /// Reads its result (its last line) and waits for it to exit.
    pub(crate) async fn finish<T: DeserializeOwned>(mut self, timeout: Duration) -> Result<T> {
        let line = self.line(timeout).await?;
        let status = tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .with_context(|| format!("worker {} did not exit", self.name))??;
        if !status.success() {
            bail!("worker {} failed: {status}", self.name);
        }
        serde_json::from_str(&line)
            .with_context(|| format!("worker {} printed {line:?}, not its result", self.name))
    }
}

/// Runs `job` in a worker to its end and returns its result.
pub(crate) async fn run_job<T: DeserializeOwned>(
    exe: &Path,
    name: &str,
    job: &Job,
    timeout: Duration,
) -> Result<T> {
    Worker::spawn(exe, name, job)?.finish(timeout).await
}

/// A scratch directory under the system's temporary directory (socket
/// paths must be short), removed when dropped.
#[derive(Debug)]
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// Creates it.
    pub(crate) fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("gpulease-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// A path inside it.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
