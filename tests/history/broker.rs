//! Starting, killing and restarting the real `gpulease serve`, and keeping
//! every line it logs together with the time the line was read (an upper
//! bound of when the logged event happened).

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_broker_client::LeaseBrokerClient;
use gpulease_testkit::PATIENCE;
use gpulease_testkit::clock::now_ns;
use gpulease_testkit::{Serve, Server, Stderr};
use nix::sys::signal::Signal;
use tonic::transport::{Channel, Endpoint};

/// The `gpulease` binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_gpulease");

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
    server: Server,
    /// `127.0.0.1:PORT`.
    pub(crate) addr: String,
    /// Which start this is (1, 2, ...).
    pub(crate) instance: u32,
    /// Its process id.
    pub(crate) pid: i32,
    /// When the test killed it with SIGKILL.
    pub(crate) killed_at: Option<u64>,
}

impl BrokerProcess {
    /// Starts start number `instance` and returns once it prints its
    /// `listening on` line; every line of its stderr goes to `log`, stamped
    /// with the time it was read.
    pub(crate) async fn start(
        settings: &Settings,
        instance: u32,
        log: &BrokerLog,
    ) -> Result<Self, String> {
        let sink = Arc::clone(&log.0);
        let server = Serve::gpulease(BIN)
            .current_dir(&settings.dir)
            .state_dir(&settings.state_dir)
            .env("GPULEASE__GPU__SOURCE", "static")
            // Without NVML it changes nothing; say so explicitly.
            .env("GPULEASE__LOCK_DELAY", "0s")
            .envs(settings.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stderr(Stderr::lines(move |text| {
                let t = now_ns();
                sink.lock().unwrap().push(LogLine { instance, t, text });
            }))
            .timeout(PATIENCE)
            .start()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            addr: server.addr.clone(),
            pid: server.pid(),
            server,
            instance,
            killed_at: None,
        })
    }

    /// `kill -9`; returns when the process is gone and its last log line
    /// read. Returns the time the signal was sent.
    pub(crate) async fn kill9(&mut self) -> u64 {
        let t = now_ns();
        self.server.kill9().await;
        self.killed_at = Some(t);
        t
    }

    /// SIGTERM, and the exit status once it is gone and its last log line
    /// read.
    pub(crate) async fn terminate(&mut self) -> Result<ExitStatus, String> {
        self.server
            .terminate(PATIENCE)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the broker did not exit after SIGTERM".to_owned())
    }

    /// Whether the process still runs.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.server.child.try_wait(), Ok(None))
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
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn signal(pid: i32, signal: Signal) {
    let _ = gpulease_testkit::signal(pid, signal);
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
