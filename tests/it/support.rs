//! Starting a real broker and talking to it.

use std::path::PathBuf;

use gpulease_client::pb::v1 as pb;
use gpulease_client::pb::v1::lease_event::Kind as EventKind;
use gpulease_client::pb::v1::lease_request::Kind as RequestKind;
pub use gpulease_testkit::PATIENCE;
use gpulease_testkit::{self as testkit, Serve};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

/// The `gpulease` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_gpulease");

/// A `gpulease serve` child process, killed when dropped.
pub struct Broker {
    pub child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The Unix socket, when configured.
    pub socket: Option<PathBuf>,
    /// The metrics listener's `127.0.0.1:PORT`, when configured (with
    /// `GPULEASE__METRICS__LISTEN`).
    pub metrics: Option<String>,
    pub dir: tempfile::TempDir,
    /// The broker's log lines, when captured.
    pub log: Option<Log>,
    /// With [`Stderr::Unread`], the pipe nobody reads.
    _unread: Option<tokio::process::ChildStderr>,
}

/// How to start a broker.
#[derive(Default)]
pub struct Options<'a> {
    pub env: Vec<(&'a str, &'a str)>,
    pub config: Option<&'a str>,
    pub socket: bool,
    /// Files to write into the broker's directory (its working directory)
    /// before it starts, by name.
    pub files: Vec<(&'a str, &'a str)>,
    pub stderr: Stderr,
    pub args: Vec<&'a str>,
}

/// What the broker's stderr is connected to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stderr {
    /// The test's own stderr.
    #[default]
    Inherit,
    /// A pipe the test reads into [`Broker::log`].
    Capture,
    /// A pipe whose reading end the test closes at once.
    Closed,
    /// A pipe that nobody reads: it fills up, and writes block.
    Unread,
}

/// The log lines a broker wrote so far, read by a task of the test.
#[derive(Clone, Default)]
pub struct Log {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    added: std::sync::Arc<tokio::sync::Notify>,
    stop: std::sync::Arc<tokio::sync::Notify>,
}

impl Log {
    /// Waits until a line containing every one of `needles` was logged,
    /// and returns it.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let added = self.added.notified();
                if let Some(line) = self.find(needles) {
                    return line;
                }
                added.await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no log line with {needles:?} in time"))
    }

    /// The first line logged so far that contains every one of `needles`.
    pub fn find(&self, needles: &[&str]) -> Option<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .find(|line| needles.iter().all(|needle| line.contains(needle)))
            .cloned()
    }

    /// Stops reading and closes the pipe: the broker's reader went away.
    pub fn close(&self) {
        self.stop.notify_one();
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
        self.added.notify_waiters();
    }
}

impl Broker {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn with_env(env: &[(&str, &str)]) -> Self {
        Self::start_with(Options {
            env: env.to_vec(),
            ..Options::default()
        })
        .await
    }

    pub async fn start_with(options: Options<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut serve = Serve::gpulease(BIN)
            // Unload commands and relative paths land in the test's directory.
            .current_dir(dir.path())
            .state_dir(dir.path().join("state"))
            .args(&options.args);
        let socket = options.socket.then(|| dir.path().join("gpulease.sock"));
        if let Some(socket) = &socket {
            serve = serve.socket(socket);
        }
        for (name, contents) in &options.files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        if let Some(config) = options.config {
            let path = dir.path().join("gpulease.toml");
            std::fs::write(&path, config).unwrap();
            serve = serve.config(path);
        }
        let wants_metrics = options
            .env
            .iter()
            .any(|(key, value)| *key == "GPULEASE__METRICS__LISTEN" && !value.is_empty());
        let log = (options.stderr == Stderr::Capture).then(Log::default);
        let stderr = match (options.stderr, &log) {
            (Stderr::Capture, Some(captured)) => {
                let sink = captured.clone();
                testkit::Stderr::Lines {
                    sink: Box::new(move |line| {
                        eprintln!("{line}");
                        sink.push(line);
                    }),
                    close: Some(captured.stop.clone()),
                }
            }
            (Stderr::Closed, _) => testkit::Stderr::Closed,
            (Stderr::Unread, _) => testkit::Stderr::Pipe,
            _ => testkit::Stderr::Inherit,
        };
        let mut server = serve
            .envs(options.env.iter().copied())
            .expect_metrics(wants_metrics)
            .stderr(stderr)
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // An unread stderr stays open (and full) as long as the broker runs.
        let unread = server.child.stderr.take();
        let testkit::Server {
            child,
            addr,
            metrics,
            ..
        } = server;
        Self {
            child,
            addr,
            socket,
            metrics,
            dir,
            log,
            _unread: unread,
        }
    }

    pub async fn client(&self) -> gpulease_client::Client {
        gpulease_client::connect(&self.addr).await.unwrap()
    }

    pub async fn status_with(&self, token: Option<&str>) -> pb::StatusResponse {
        let options = gpulease_client::ConnectOptions {
            token: token.map(str::to_owned),
            ..Default::default()
        };
        gpulease_client::connect_with(&self.addr, &options)
            .await
            .unwrap()
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn status(&self) -> pb::StatusResponse {
        self.client()
            .await
            .status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    /// The captured log; see [`Stderr::Capture`].
    pub fn log(&self) -> &Log {
        self.log
            .as_ref()
            .expect("start the broker with Stderr::Capture")
    }

    /// Waits (on WatchStatus) until the broker has no holder and no waiter.
    pub async fn idle(&self) -> pb::StatusResponse {
        self.wait_for("no holder and no waiter", |s| {
            s.in_flight == 0 && s.queue_depth == 0
        })
        .await
    }

    /// Waits (on WatchStatus, not by sleeping) until a snapshot satisfies
    /// `done`, and returns it.
    pub async fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&pb::StatusResponse) -> bool,
    ) -> pb::StatusResponse {
        let mut client = self.client().await;
        let mut snapshots = client
            .watch_status(pb::StatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut last = None;
        let found = tokio::time::timeout(PATIENCE, async {
            while let Some(snapshot) = snapshots.message().await.unwrap() {
                if done(&snapshot) {
                    return snapshot;
                }
                last = Some(snapshot);
            }
            panic!("WatchStatus ended while waiting for {what}");
        })
        .await;
        found.unwrap_or_else(|_| panic!("timed out waiting for {what}; last status: {last:#?}"))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        testkit::terminate(&mut self.child, PATIENCE)
            .await
            .unwrap()
            .expect("the broker did not exit after SIGTERM")
    }

    /// A scrape of `/metrics`.
    pub async fn scrape(&self) -> String {
        let addr = self.metrics.as_deref().expect("metrics configured");
        let (status, headers, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        body
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let pid = child.id().expect("still running") as i32;
    testkit::signal(pid, signal).unwrap();
}

/// An `Acquire` for `consumer` with everything else unset.
pub fn acquire(consumer: &str) -> pb::Acquire {
    pb::Acquire {
        consumer: consumer.to_owned(),
        ..pb::Acquire::default()
    }
}

/// One `AcquireLease` call, seen from the client.
pub struct Call {
    pub requests: Option<mpsc::Sender<pb::LeaseRequest>>,
    pub events: Streaming<pb::LeaseEvent>,
}

impl Call {
    /// Opens a call and sends `acquire` as its first message.
    pub async fn open(broker: &Broker, acquire: pb::Acquire) -> Result<Self, Status> {
        Self::open_with(broker, vec![RequestKind::Acquire(acquire)]).await
    }

    /// Opens a call on `client` and sends `acquire` as its first message.
    pub async fn open_with_client(
        mut client: gpulease_client::Client,
        acquire: pb::Acquire,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(8);
        tx.send(pb::LeaseRequest {
            kind: Some(RequestKind::Acquire(acquire)),
        })
        .await
        .unwrap();
        let events = client
            .acquire_lease(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            requests: Some(tx),
            events,
        })
    }

    /// Opens a call whose first messages are `first`; with no messages, the
    /// client half-closes at once.
    pub async fn open_with(broker: &Broker, first: Vec<RequestKind>) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(8);
        let close = first.is_empty();
        for kind in first {
            tx.send(pb::LeaseRequest { kind: Some(kind) })
                .await
                .unwrap();
        }
        let tx = (!close).then_some(tx);
        let events = broker
            .client()
            .await
            .acquire_lease(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            requests: tx,
            events,
        })
    }

    /// The next event; `Err` when the stream ends with a status, `None`
    /// when it ends with OK.
    pub async fn next(&mut self) -> Result<Option<EventKind>, Status> {
        tokio::time::timeout(PATIENCE, self.events.message())
            .await
            .expect("no event in time")
            .map(|event| event.map(|e| e.kind.expect("an event has a kind")))
    }

    /// Waits through `Queued` events for `Granted`.
    pub async fn granted(&mut self) -> pb::Granted {
        loop {
            match self.next().await {
                Ok(Some(EventKind::Queued(_))) => continue,
                Ok(Some(EventKind::Granted(granted))) => return granted,
                other => panic!("expected Granted, got {other:?}"),
            }
        }
    }

    /// The first event, which must be `Queued`.
    pub async fn queued(&mut self) -> pb::Queued {
        match self.next().await {
            Ok(Some(EventKind::Queued(queued))) => queued,
            other => panic!("expected Queued, got {other:?}"),
        }
    }

    pub async fn send(&self, kind: RequestKind) {
        let requests = self.requests.as_ref().expect("requests still open");
        requests
            .send(pb::LeaseRequest { kind: Some(kind) })
            .await
            .unwrap();
    }

    /// Sends `release` and expects the stream to end with OK.
    pub async fn release(mut self) {
        self.send(RequestKind::Release(pb::Release {})).await;
        assert!(
            matches!(self.next().await, Ok(None)),
            "release did not end the call"
        );
    }

    /// Expects the stream to end with `code`; returns the message.
    pub async fn ends_with(&mut self, code: Code) -> String {
        loop {
            match self.next().await {
                Ok(Some(EventKind::Queued(_))) => continue,
                Err(status) if status.code() == code => return status.message().to_owned(),
                other => panic!("expected {code:?}, got {other:?}"),
            }
        }
    }
}

/// Asserts that nothing is held or queued.
pub async fn assert_idle(broker: &Broker) {
    let status = broker
        .wait_for("no holder and no waiter", |s| {
            s.in_flight == 0 && s.queue_depth == 0
        })
        .await;
    assert!(status.holders.is_empty() && status.waiters.is_empty());
}

/// A plain HTTP/1.1 GET of `path` on `addr` (`HOST:PORT`): the status, the
/// headers and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8(response).unwrap()
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("no HTTP response in time");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("an HTTP status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A `sleep` child of the test: a process the test's own leases may claim
/// as theirs (`Acquire.client_pid` is believed for the caller's
/// descendants only). Killed when dropped.
pub struct Worker(std::process::Child);

impl Worker {
    pub fn start() -> Self {
        Self(
            std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("start sleep"),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
