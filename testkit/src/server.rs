//! Starting a server process and reading the addresses it prints: one
//! `listening on ADDR` line per listener (`unix:/PATH` for a Unix socket)
//! and `metrics on http://HOST:PORT/metrics`, printed once each accepts.
//! The broker prints them, and so do the benchmark's baseline servers.
//!
//! A start waits for the lines it expects, within a timeout; when the
//! server exits first or is too slow, the error quotes what it wrote on
//! standard error. The process is killed when its [`Server`] drops, so a
//! failed test leaves nothing running.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The longest a single step of a test may take before it counts as hung;
/// also how long a start waits for its addresses unless told otherwise.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How many of its last stderr lines a failed start quotes.
const QUOTED_LINES: usize = 40;

/// Where a started server's standard error goes.
pub enum Stderr {
    /// The caller's own standard error (a failed start then quotes nothing:
    /// it is already there).
    Inherit,
    /// Appended to this file; a failed start quotes its last lines.
    File(PathBuf),
    /// Read line by line by a task of the kit, each line handed to `sink`
    /// the moment it is read (a caller that stamps lines with the clock
    /// gets the read time). A failed start quotes the lines. When `close`
    /// is notified, the task stops reading and closes the pipe, as a reader
    /// that went away would.
    Lines {
        /// Receives every line, in order.
        sink: Box<dyn FnMut(String) + Send>,
        /// Stops the reading, when given.
        close: Option<Arc<Notify>>,
    },
    /// A pipe whose reading end is closed at once, before the server
    /// writes anything: its log writes fail from the start.
    Closed,
    /// A pipe left to the caller in [`Server::child`]'s `stderr`: unread,
    /// it fills up and the server's writes block.
    Pipe,
}

impl Stderr {
    /// [`Stderr::Lines`] with no way to stop reading.
    pub fn lines(sink: impl FnMut(String) + Send + 'static) -> Self {
        Self::Lines {
            sink: Box::new(sink),
            close: None,
        }
    }
}

impl fmt::Debug for Stderr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inherit => f.write_str("Inherit"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Lines { close, .. } => f
                .debug_struct("Lines")
                .field("close", &close.is_some())
                .finish_non_exhaustive(),
            Self::Closed => f.write_str("Closed"),
            Self::Pipe => f.write_str("Pipe"),
        }
    }
}

/// A server process to start, and what to wait for: a builder. Every
/// setting has a default; [`Serve::start`] starts it.
#[derive(Debug)]
pub struct Serve {
    program: PathBuf,
    wrapper: Vec<String>,
    args: Vec<OsString>,
    clear_gpulease_env: bool,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    stdin: Option<Stdio>,
    stderr: Stderr,
    expect_unix: bool,
    expect_metrics: bool,
    timeout: Duration,
}

impl Serve {
    /// `program`, with no arguments and the caller's environment: a server
    /// that is not the broker but prints the same lines (the benchmark's
    /// baselines).
    pub fn command(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            wrapper: Vec::new(),
            args: Vec::new(),
            clear_gpulease_env: false,
            env: Vec::new(),
            current_dir: None,
            stdin: None,
            stderr: Stderr::Inherit,
            expect_unix: false,
            expect_metrics: false,
            timeout: PATIENCE,
        }
    }

    /// `bin serve` as a test wants it: none of the caller's `GPULEASE*`
    /// variables (only the test's settings count, whatever the shell has
    /// set), TCP on `127.0.0.1:0`, and `RUST_LOG=info` (a line per
    /// decision). Later settings override these.
    pub fn gpulease(bin: impl Into<PathBuf>) -> Self {
        let mut serve = Self::command(bin);
        serve.clear_gpulease_env = true;
        serve
            .arg("serve")
            .env("GPULEASE__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
    }

    /// Runs the program under `wrapper` (a profiler and its arguments)
    /// unless it is empty.
    pub fn wrapper(mut self, wrapper: &[String]) -> Self {
        self.wrapper = wrapper.to_vec();
        self
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds arguments.
    pub fn args(mut self, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Self {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// `--config PATH`.
    pub fn config(self, path: impl AsRef<Path>) -> Self {
        self.arg("--config").arg(path.as_ref())
    }

    /// Sets an environment variable (the last setting of a name counts).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets environment variables.
    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    /// The broker's Unix socket (`GPULEASE__SOCKET`); the start then waits
    /// for its `listening on unix:` line too.
    pub fn socket(self, path: impl AsRef<Path>) -> Self {
        self.env("GPULEASE__SOCKET", path.as_ref())
            .expect_unix(true)
    }

    /// The broker's state directory (`GPULEASE__STATE_DIR`), so that it
    /// never touches the user's.
    pub fn state_dir(self, path: impl AsRef<Path>) -> Self {
        self.env("GPULEASE__STATE_DIR", path.as_ref())
    }

    /// The working directory (where relative paths and unload commands
    /// land).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// Standard input; by default the caller's.
    pub fn stdin(mut self, stdin: Stdio) -> Self {
        self.stdin = Some(stdin);
        self
    }

    /// Standard error; by default the caller's.
    pub fn stderr(mut self, stderr: Stderr) -> Self {
        self.stderr = stderr;
        self
    }

    /// Whether to wait for a `listening on unix:` line too.
    pub fn expect_unix(mut self, expect: bool) -> Self {
        self.expect_unix = expect;
        self
    }

    /// Whether to wait for a `metrics on` line too.
    pub fn expect_metrics(mut self, expect: bool) -> Self {
        self.expect_metrics = expect;
        self
    }

    /// How long to wait for the expected lines; [`PATIENCE`] by default.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the process and returns once it printed a `listening on` line
    /// for TCP and every other line expected: it then accepts calls. Its
    /// standard output is read to its end by a task, so that it never
    /// writes into a closed pipe.
    ///
    /// Must run inside a tokio runtime. Cancelling it kills the process.
    ///
    /// # Errors
    /// When it cannot start, exits before it listens, or does not listen
    /// within the timeout; the message quotes its standard error.
    pub async fn start(self) -> Result<Server, StartError> {
        let mut command = match self.wrapper.split_first() {
            Some((profiler, args)) => {
                let mut command = Command::new(profiler);
                command.args(args).arg(&self.program);
                command
            }
            None => Command::new(&self.program),
        };
        if self.clear_gpulease_env {
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("GPULEASE") {
                    command.env_remove(name);
                }
            }
        }
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        if let Some(stdin) = self.stdin {
            command.stdin(stdin);
        }
        let name = self.program.display().to_string();
        let log_file = match &self.stderr {
            Stderr::Inherit => {
                command.stderr(Stdio::inherit());
                None
            }
            Stderr::File(path) => {
                let file = File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| StartError(format!("cannot open {}: {e}", path.display())))?;
                command.stderr(file);
                Some(path.clone())
            }
            Stderr::Lines { .. } | Stderr::Closed | Stderr::Pipe => {
                command.stderr(Stdio::piped());
                None
            }
        };
        let (expect_unix, expect_metrics, timeout) =
            (self.expect_unix, self.expect_metrics, self.timeout);
        let mut child = command
            .spawn()
            .map_err(|e| StartError(format!("cannot start {name}: {e}")))?;
        let early = Arc::new(Mutex::new(VecDeque::new()));
        let started = Arc::new(AtomicBool::new(false));
        let mut stderr_reader = None;
        match self.stderr {
            Stderr::Lines { sink, close } => {
                let stderr = child.stderr.take().expect("stderr is piped");
                stderr_reader = Some(tokio::spawn(read_lines(
                    stderr,
                    sink,
                    close,
                    Arc::clone(&early),
                    Arc::clone(&started),
                )));
            }
            Stderr::Closed => drop(child.stderr.take()),
            Stderr::Inherit | Stderr::File(_) | Stderr::Pipe => {}
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut unix, mut metrics) = (None, None, None);
        let listened = tokio::time::timeout(timeout, async {
            while addr.is_none()
                || (expect_unix && unix.is_none())
                || (expect_metrics && metrics.is_none())
            {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        if let Some(url) = line.strip_prefix("metrics on http://") {
                            metrics = Some(url.trim_end_matches("/metrics").to_owned());
                        }
                        match line.strip_prefix("listening on ") {
                            Some(a) if a.starts_with("unix:") => unix = Some(a.to_owned()),
                            Some(a) => addr = Some(a.to_owned()),
                            None => {}
                        }
                    }
                    Ok(None) => return Err("exited before it listened"),
                    Err(_) => return Err("wrote something unreadable before it listened"),
                }
            }
            Ok(())
        })
        .await;
        let failure = match listened {
            Ok(Ok(())) => None,
            Ok(Err(what)) => Some(what.to_owned()),
            Err(_) => Some(format!("did not listen within {timeout:?}")),
        };
        if let Some(what) = failure {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(PATIENCE, child.wait()).await;
            if let Some(reader) = stderr_reader {
                let _ = tokio::time::timeout(PATIENCE, reader).await;
            }
            let said = match log_file {
                Some(path) => last_lines(&path),
                None => early.lock().unwrap().iter().cloned().collect(),
            };
            return Err(StartError(if said.is_empty() {
                format!("{name} {what}")
            } else {
                format!("{name} {what}; its stderr:\n{}", said.join("\n"))
            }));
        }
        started.store(true, Ordering::Relaxed);
        early.lock().unwrap().clear();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            addr: addr.expect("the loop ends with an address"),
            unix,
            metrics,
            stderr_reader,
        })
    }
}

/// Hands each line of `stderr` to `sink` until it ends or `close` is
/// notified; keeps the last lines in `early` until the start succeeded, for
/// its error.
async fn read_lines(
    stderr: impl AsyncRead + Unpin,
    mut sink: Box<dyn FnMut(String) + Send>,
    close: Option<Arc<Notify>>,
    early: Arc<Mutex<VecDeque<String>>>,
    started: Arc<AtomicBool>,
) {
    let mut lines = BufReader::new(stderr).lines();
    let closed = async {
        match close {
            Some(close) => close.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed);
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if !started.load(Ordering::Relaxed) {
                        let mut early = early.lock().unwrap();
                        if early.len() == QUOTED_LINES {
                            early.pop_front();
                        }
                        early.push_back(line.clone());
                    }
                    sink(line);
                }
                _ => return,
            },
            // Returning drops `lines`, which closes the reading end.
            () = &mut closed => return,
        }
    }
}

/// The last lines of the file at `path` (empty when unreadable).
fn last_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(QUOTED_LINES)..]
        .iter()
        .map(|line| (*line).to_owned())
        .collect()
}

/// A started server, killed when dropped.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub child: Child,
    /// Its TCP address, `HOST:PORT`.
    pub addr: String,
    /// Its Unix socket as printed (`unix:/PATH`), when expected.
    pub unix: Option<String>,
    /// Its metrics listener, `HOST:PORT`, when expected.
    pub metrics: Option<String>,
    /// The task reading its standard error, with [`Stderr::Lines`].
    pub stderr_reader: Option<JoinHandle<()>>,
}

impl Server {
    /// Its process id (0 once it has been waited for).
    pub fn pid(&self) -> i32 {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or(0)
    }

    /// `kill -9`; returns once the process is gone and its last stderr
    /// line was handed over.
    pub async fn kill9(&mut self) {
        let _ = signal(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.stderr_done().await;
    }

    /// SIGTERM, then the exit status once it is gone and its last stderr
    /// line was handed over; see [`terminate`].
    ///
    /// # Errors
    /// When waiting for it fails.
    pub async fn terminate(&mut self, patience: Duration) -> std::io::Result<Option<ExitStatus>> {
        let status = terminate(&mut self.child, patience).await?;
        self.stderr_done().await;
        Ok(status)
    }

    /// Waits, for [`PATIENCE`] at most, until every line of its standard
    /// error was handed to the sink (with [`Stderr::Lines`]; at once
    /// otherwise). Its stderr ends when the process and every child that
    /// shares it are gone.
    pub async fn stderr_done(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = tokio::time::timeout(PATIENCE, reader).await;
        }
    }
}

/// Sends `signal` to the process `pid`.
///
/// # Errors
/// When there is no such process (it is gone) or it may not be signalled.
pub fn signal(pid: i32, signal: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(Pid::from_raw(pid), signal)
}

/// Asks `child` to stop (SIGTERM, then its stdin closes) and waits for
/// `patience`: `Some(status)` when it exited in time, else `None` once it
/// has been killed.
///
/// # Errors
/// When waiting for it or killing it fails.
pub async fn terminate(
    child: &mut Child,
    patience: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        let _ = signal(pid, Signal::SIGTERM);
    }
    drop(child.stdin.take());
    match tokio::time::timeout(patience, child.wait()).await {
        Ok(status) => status.map(Some),
        Err(_) => {
            child.kill().await?;
            Ok(None)
        }
    }
}

/// A server that did not start; the message says why and quotes its
/// standard error.
#[derive(Debug)]
pub struct StartError(String);

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server played by `sh -c script`.
    fn sh(script: &str) -> Serve {
        Serve::command("sh").arg("-c").arg(script)
    }

    #[tokio::test]
    async fn a_start_reads_every_address_it_expects() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let mut server = sh("echo starting >&2; \
             echo 'listening on 127.0.0.1:1'; echo 'listening on unix:/run/x.sock'; \
             echo 'metrics on http://127.0.0.1:2/metrics'; exec sleep 600")
        .expect_unix(true)
        .expect_metrics(true)
        .stderr(Stderr::lines(move |line| sink.lock().unwrap().push(line)))
        .start()
        .await
        .unwrap();
        assert_eq!(server.addr, "127.0.0.1:1");
        assert_eq!(server.unix.as_deref(), Some("unix:/run/x.sock"));
        assert_eq!(server.metrics.as_deref(), Some("127.0.0.1:2"));
        server.kill9().await;
        assert_eq!(*seen.lock().unwrap(), ["starting"]);
    }

    #[tokio::test]
    async fn a_server_that_exits_first_is_an_error_quoting_its_stderr() {
        let error = sh("echo 'bad key: capacity' >&2; exit 64")
            .stderr(Stderr::lines(drop))
            .start()
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("exited before it listened"), "{error}");
        assert!(error.contains("bad key: capacity"), "{error}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_listen_in_time_is_an_error_quoting_its_log_file() {
        let dir = std::env::temp_dir().join(format!("gpulease-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("stderr.log");
        let error = sh("echo 'listening on unix:/only/the/socket'; echo stuck >&2; exec sleep 600")
            .expect_unix(true)
            .stderr(Stderr::File(log))
            .timeout(Duration::from_secs(1))
            .start()
            .await
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(error.contains("did not listen within 1s"), "{error}");
        assert!(error.contains("stuck"), "{error}");
    }
}
