//! Starting, killing and restarting the real `gpulease serve`, and keeping
//! every line it logs together with the time the line was read (an upper
//! bound of when the logged event happened).

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gpulease::pb::v1 as pb;
use gpulease::pb::v1::lease_broker_client::LeaseBrokerClient;
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::clock::now;

/// The `gpulease` binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_gpulease");

/// The longest a single step may take before it counts as hung.
pub(crate) const PATIENCE: Duration = Duration::from_secs(20);

/// One line of a broker's stderr.
#[derive(Clone, Debug)]
pub(crate) struct LogLine {
    /// Which start of the broker wrote it.
    pub(crate) instance: u32,
    /// When the test read it.
    pub(crate) t: u64,
    /// The line.
    pub(crate) text: String,
}

/// The lines of every start of the broker in a scenario, each start's in
/// the order written.
#[derive(Clone, Debug, Default)]
pub(crate) struct BrokerLog(Arc<Mutex<Vec<LogLine>>>);

impl BrokerLog {
    /// A copy of every line so far.
    pub(crate) fn lines(&self) -> Vec<LogLine> {
        self.0.lock().unwrap().clone()
    }

    /// Whether any line reports a panic.
    pub(crate) fn panicked(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.text.contains("panicked"))
            .map(|line| line.text.clone())
    }
}

/// How to start the broker.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Extra `GPULEASE__*` variables.
    pub(crate) env: Vec<(String, String)>,
    /// The state directory, kept across restarts.
    pub(crate) state_dir: PathBuf,
    /// The working directory.
    pub(crate) dir: PathBuf,
}

/// A running `gpulease serve`, killed when dropped.
#[derive(Debug)]
pub(crate) struct BrokerProcess {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub(crate) addr: String,
    /// Which start this is (1, 2, ...).
    pub(crate) instance: u32,
    /// Its process id.
    pub(crate) pid: i32,
    /// When the test killed it with SIGKILL.
    pub(crate) killed_at: Option<u64>,
    reader: Option<JoinHandle<()>>,
}

impl BrokerProcess {
    /// Starts start number `instance` and returns once it prints its
    /// `listening on` line.
    pub(crate) async fn start(
        settings: &Settings,
        instance: u32,
        log: &BrokerLog,
    ) -> Result<Self, String> {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .current_dir(&settings.dir)
            .env_remove("GPULEASE_CONFIG")
            .env("GPULEASE__LISTEN", "127.0.0.1:0")
            .env("GPULEASE__GPU__SOURCE", "static")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if supports("state_dir") {
            command.env("GPULEASE__STATE_DIR", &settings.state_dir);
        }
        if supports("lock_delay") {
            // Without NVML it changes nothing; say so explicitly.
            command.env("GPULEASE__LOCK_DELAY", "0s");
        }
        for (key, value) in &settings.env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {BIN}: {e}"))?;
        let pid = child.id().map_or(0, |id| id as i32);
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&log.0);
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(text)) = lines.next_line().await {
                let t = now();
                sink.lock().unwrap().push(LogLine { instance, t, text });
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let addr = loop {
            let line = tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .map_err(|_| "the broker did not print its address in time".to_owned())?
                .map_err(|e| e.to_string())?;
            let Some(line) = line else {
                let _ = tokio::time::timeout(PATIENCE, reader).await;
                let said: Vec<String> = log
                    .lines()
                    .into_iter()
                    .filter(|l| l.instance == instance)
                    .map(|l| l.text)
                    .collect();
                return Err(format!(
                    "the broker exited before listening: {}",
                    said.join("\n")
                ));
            };
            if let Some(addr) = line.strip_prefix("listening on ")
                && !addr.starts_with("unix:")
            {
                break addr.to_owned();
            }
        };
        // Keep reading, so that the broker never writes into a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            addr,
            instance,
            pid,
            killed_at: None,
            reader: Some(reader),
        })
    }

    /// `kill -9`; returns when the process is gone and its last log line
    /// read. Returns the time the signal was sent.
    pub(crate) async fn kill9(&mut self) -> u64 {
        let t = now();
        signal(self.pid, Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.killed_at = Some(t);
        self.drain().await;
        t
    }

    /// SIGTERM, and the exit status once it is gone.
    pub(crate) async fn terminate(&mut self) -> Result<ExitStatus, String> {
        signal(self.pid, Signal::SIGTERM);
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .map_err(|_| "the broker did not exit after SIGTERM".to_owned())?
            .map_err(|e| e.to_string())?;
        self.drain().await;
        Ok(status)
    }

    /// Whether the process still runs.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its resident memory in KiB, from `/proc`.
    pub(crate) fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
    }

    /// How many file descriptors it has open (sockets included).
    pub(crate) fn open_fds(&self) -> Option<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .ok()
            .map(Iterator::count)
    }

    async fn drain(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(PATIENCE, reader).await;
        }
    }
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn signal(pid: i32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// Whether this build of the broker knows the top-level configuration key
/// `key` (read once from `gpulease serve --print-defaults`): keys that a
/// broker does not know are errors, so the tests set only known ones.
pub(crate) fn supports(key: &str) -> bool {
    static DEFAULTS: OnceLock<String> = OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| {
        std::process::Command::new(BIN)
            .args(["serve", "--print-defaults"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
    });
    defaults
        .lines()
        .any(|line| line.trim_start().starts_with(&format!("{key} =")))
}

/// A client of the broker at `HOST:PORT`, on a connection of its own
/// (plain TCP, no credentials: the broker's defaults).
pub(crate) async fn connect(addr: &str) -> Result<LeaseBrokerClient<Channel>, String> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))?;
    Ok(LeaseBrokerClient::new(channel))
}

/// One `Status` snapshot.
pub(crate) async fn status(addr: &str) -> Result<pb::StatusResponse, String> {
    let mut client = connect(addr).await?;
    tokio::time::timeout(PATIENCE, client.status(pb::StatusRequest::default()))
        .await
        .map_err(|_| "Status timed out".to_owned())?
        .map(tonic::Response::into_inner)
        .map_err(|e| e.to_string())
}

/// Waits on `WatchStatus` (never by polling) until a snapshot satisfies
/// `done`, for `patience` at most; the last snapshot either way.
pub(crate) async fn wait_for(
    addr: &str,
    patience: Duration,
    done: impl Fn(&pb::StatusResponse) -> bool,
) -> Result<pb::StatusResponse, String> {
    let mut last = None;
    let mut trouble = None;
    let found = tokio::time::timeout(patience, async {
        // A watch that breaks (a busy client can miss the broker's keepalive
        // pings) is opened again.
        loop {
            let mut client = match connect(addr).await {
                Ok(client) => client,
                Err(e) => {
                    trouble = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut snapshots = match client.watch_status(pb::StatusRequest::default()).await {
                Ok(response) => response.into_inner(),
                Err(e) => {
                    trouble = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            loop {
                match snapshots.message().await {
                    Ok(Some(snapshot)) if done(&snapshot) => return snapshot,
                    Ok(Some(snapshot)) => last = Some(snapshot),
                    Ok(None) => break,
                    Err(e) => {
                        trouble = Some(e.to_string());
                        break;
                    }
                }
            }
        }
    })
    .await;
    match found {
        Ok(snapshot) => Ok(snapshot),
        Err(_) => Err(match last {
            Some(s) => format!(
                "in_flight {} queue_depth {} (holders {:?}, waiters {:?})",
                s.in_flight,
                s.queue_depth,
                s.holders.iter().map(|h| &h.consumer).collect::<Vec<_>>(),
                s.waiters
                    .iter()
                    .take(10)
                    .map(|w| &w.consumer)
                    .collect::<Vec<_>>()
            ),
            None => format!("no snapshot ({trouble:?})"),
        }),
    }
}

/// Waits until nothing is held or queued: no permit and no queue slot
/// leaked.
pub(crate) async fn wait_idle(addr: &str, patience: Duration) -> Result<(), String> {
    wait_for(addr, patience, |s| s.in_flight == 0 && s.queue_depth == 0)
        .await
        .map(drop)
        .map_err(|last| {
            format!("the broker did not become idle (leaked permit or queue slot?): {last}")
        })
}
